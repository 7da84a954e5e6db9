"""`compress qat` on a tiny model: block-wise reconstruction lowers every block's output error, the
end-to-end phase trains the scales, the output is a gptq-int checkpoint that loads, a run killed in
the end-to-end phase resumes to the same bytes, and bad input is refused before any work."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compress import models
from tests.test_cli import assert_clean_error, run
from tests.train.helpers import edited, kill_resume_and_compare

ARGS = ["--bits", 3, "--group-size", 32, "--nsamples", 8, "--seqlen", 64, "--batch", 2, "--block-lr", 1e-3,
        "--scale-lr", 1e-3, "--dtype", "float32"]


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


def _step(rep):
    return rep["steps"][0]


def test_qat_lowers_block_errors_and_writes_a_loadable_checkpoint(tiny_llama, env, tmp_path):
    out = tmp_path / "q"
    res = run(["qat", tiny_llama, *ARGS, "--init", "minmax", "--e2e-steps", 4, "--e2e-lr", 1e-3,
               "--report", tmp_path / "r.json", "-o", out])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    extra = _step(rep)["extra"]
    blocks = extra["qat_blocks"]
    assert len(blocks) == 2 and all(b["mse_trained"] < b["mse_init"] and b["kept"] == "trained"
                                    for b in blocks.values())
    assert extra["qat_e2e"]["steps"] == 4 and extra["qat_e2e"]["target"] == "text"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 3
    loaded = models.load(str(out))
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids).logits).all()


def test_blocks_that_training_made_worse_keep_the_gptq_start(tiny_llama, env, tmp_path):
    # on this tiny model GPTQ's solution is a sharp optimum: steps this large only leave it
    res = run(["qat", tiny_llama, *ARGS, "--e2e-steps", 0, "--report", tmp_path / "r.json", "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    blocks = _step(json.loads((tmp_path / "r.json").read_text()))["extra"]["qat_blocks"]
    assert all(b["kept"] == "start" and b["mse_trained"] >= b["mse_init"] for b in blocks.values())
    res = run(["quantize", tiny_llama, "--method", "gptq", "--grid", "mse", *ARGS[:8], "--dtype", "float32",
               "-o", tmp_path / "g"])
    assert res.exit_code == 0, res.output
    a, b = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "g" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qat_with_a_teacher_trains_on_its_distribution(tiny_llama, env, tmp_path):
    res = run(["qat", tiny_llama, *ARGS, "--no-blockwise", "--e2e-steps", 2, "--teacher", tiny_llama,
               "--report", tmp_path / "r.json", "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    extra = _step(json.loads((tmp_path / "r.json").read_text()))["extra"]
    assert extra["qat_e2e"]["target"] == "teacher" and "qat_blocks" not in extra


def test_qat_killed_in_the_end_to_end_phase_resumes_to_the_same_bytes(tiny_llama, env, tmp_path, monkeypatch):
    args = ["qat", tiny_llama, *ARGS, "--e2e-steps", 4, "--checkpoint-every", 2]
    kill_resume_and_compare(monkeypatch, args, tmp_path, die_at=1, resumed_step=2)   # the block-wise phase has none


@pytest.mark.parametrize("case", ["teacher-vocab", "nothing-trained", "lr"])
def test_bad_input_is_refused_before_any_work(case, tiny_llama, env, tmp_path):
    extra, needle = [], ""
    if case == "teacher-vocab":
        extra, needle = ["--e2e-steps", 1, "--teacher", edited(tiny_llama, tmp_path / "t", vocab_size=999)], "vocabulary"
    elif case == "nothing-trained":
        extra, needle = ["--no-blockwise", "--e2e-steps", 0], "--e2e-steps"
    else:
        extra, needle = ["--e2e-lr", 0], "--e2e-lr"
    res = run(["qat", tiny_llama, *ARGS, *extra, "-o", tmp_path / "o"])
    assert_clean_error(res, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_qat_checkpoint_exports_to_gguf_and_onnx_unchanged(tiny_llama, env, tmp_path):
    """The QAT output is an ordinary gptq-int checkpoint: 4-bit g32 symmetric maps onto GGUF's Q4_0
    exactly, and ONNX Runtime gives the torch model's logits."""
    pytest.importorskip("onnxruntime")
    from compress.export.onnx import export_onnx
    from compress.qlinear import QuantLinear
    from compress.runtime_onnx import OnnxCausalLM
    ck = tmp_path / "q"
    res = run(["qat", tiny_llama, "--bits", 4, "--group-size", 32, "--sym", "--init", "minmax", *ARGS[4:],
               "--e2e-steps", 2, "-o", ck])
    assert res.exit_code == 0, res.output
    assert run(["export", "gguf", ck, "-o", tmp_path / "q.gguf"]).exit_code == 0
    packed, gg = models.load(str(ck)), models.load(str(tmp_path / "q.gguf"))
    for name, mod in packed.model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.dequantize(), gg.model.get_submodule(name).weight.detach()), name
    export_onnx(str(ck), tmp_path / "onnx")
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = packed.model(ids, use_cache=False).logits
    out = OnnxCausalLM(tmp_path / "onnx")(input_ids=ids, use_cache=False).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def _codes(folder):
    state = load_file(folder / "model.safetensors")
    return {k: v for k, v in state.items() if k.endswith((".qweight", ".qzeros", ".g_idx"))}


def test_qat_from_a_gptq_checkpoint_starts_from_its_codes(tiny_llama, env, tmp_path):
    """Scales-only training from a GPTQ checkpoint (act-order: permuted groups) keeps every code and
    group index of the checkpoint it started from."""
    grid = ["--bits", 4, "--group-size", 32, "--nsamples", 8, "--seqlen", 64]
    res = run(["quantize", tiny_llama, "--method", "gptq", *grid, "--act-order", "--no-static-groups", "-o", tmp_path / "g"])
    assert res.exit_code == 0, res.output
    assert any(not torch.equal(t, t.sort().values) for k, t in _codes(tmp_path / "g").items() if k.endswith("g_idx"))
    res = run(["qat", tiny_llama, *grid, "--from-checkpoint", tmp_path / "g", "--no-blockwise", "--e2e-steps", 2,
               "--e2e-lr", 1e-3, "--batch", 2, "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    a, b = _codes(tmp_path / "g"), _codes(tmp_path / "q")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(f / "model.safetensors") for f in (tmp_path / "g", tmp_path / "q"))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.endswith(".scales"))     # the scales trained


def test_qat_from_an_awq_checkpoint_takes_its_norms_and_starts_closer(tiny_llama, env, tmp_path):
    grid = ["--bits", 3, "--group-size", 32, "--nsamples", 8, "--seqlen", 64]
    res = run(["quantize", tiny_llama, "--method", "awq", *grid, "-o", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    reps = {}
    for name, start in (("awq", ["--from-checkpoint", tmp_path / "a"]), ("rtn", ["--init", "minmax"])):
        res = run(["qat", tiny_llama, *grid, *start, "--e2e-steps", 0, "--block-epochs", 1, "--batch", 2,
                   "--report", tmp_path / f"{name}.json", "-o", tmp_path / name])
        assert res.exit_code == 0, res.output
        reps[name] = _step(json.loads((tmp_path / f"{name}.json").read_text()))["extra"]["qat_blocks"]
    assert all(reps["awq"][b]["mse_init"] < reps["rtn"][b]["mse_init"] for b in reps["awq"])
    sa, sq = (load_file(f / "model.safetensors") for f in (tmp_path / "a", tmp_path / "awq"))
    norms = [k for k in sa if "layernorm" in k]
    base = load_file(tiny_llama / "model.safetensors")
    assert norms and all(torch.equal(sa[k], sq[k]) for k in norms)                    # AWQ's folded norms
    assert any(not torch.equal(sa[k], base[k].to(sa[k].dtype)) for k in norms)


@pytest.mark.parametrize("case", ["grid", "other-model", "missing"])
def test_from_checkpoint_that_does_not_fit_is_refused_before_any_work(case, tiny_llama, env, tmp_path):
    grid = ["--bits", 4, "--group-size", 32]
    src = tmp_path / "missing"
    if case != "missing":
        from tests.conftest import build_tiny
        other = tiny_llama if case == "grid" else build_tiny(tmp_path / "m2", ffn=96)
        bits = ["--bits", 3, "--group-size", 32] if case == "grid" else grid
        src = tmp_path / "src"
        assert run(["quantize", other, "--method", "rtn", *bits, "-o", src]).exit_code == 0
    needle = {"grid": "training grid", "other-model": "intermediate_size", "missing": "no such checkpoint"}[case]
    res = run(["qat", tiny_llama, *grid, "--from-checkpoint", src, "--nsamples", 8, "--seqlen", 64, "-o", tmp_path / "o"])
    assert_clean_error(res, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()

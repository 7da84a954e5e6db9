"""`compress lora` on a tiny packed checkpoint: gradients reach the adapters and the input but not the
frozen codes, training lowers the loss, `peft` loads the adapter onto the dequantized model and
computes what the suite computed, the merged checkpoint is the re-quantized sum, a killed run
resumes to the same adapter, and bad input is refused with nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_tiny
from tests.test_cli import assert_clean_error, run
from tests.train.helpers import edited, kill_resume_and_compare

ARGS = ["--nsamples", 8, "--seqlen", 32, "--batch", 2, "--lr", 1e-2, "--eval-windows", 0, "--rank", 4]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = build_tiny(d / "base", layers=2, seed=0)
    res = run(["quantize", base, "--method", "rtn", "--bits", 4, "--group-size", 32, "-o", d / "q4"])
    assert res.exit_code == 0, res.output
    return base, d / "q4"


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


def _ours(ckpt, adapter=None):
    """The suite's model of ``ckpt`` with the adapter in folder ``adapter`` attached."""
    from compress import models
    from compress.train.lora import load_adapter
    loaded = models.load(str(ckpt))
    if adapter is not None:
        load_adapter(loaded.model, adapter)
    return loaded.model.eval()


def _dequantized(base, ckpt):
    """A plain transformers model holding ``ckpt``'s dequantized weights."""
    from transformers import AutoModelForCausalLM

    from compress import models
    from compress.qlinear import QuantLinear
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    loaded = models.load(str(ckpt))
    own = hf.state_dict()
    with torch.no_grad():
        for k, t in loaded.model.state_dict().items():     # embeddings and norms as the checkpoint stores them
            if k in own and own[k].shape == t.shape and t.is_floating_point():
                own[k].copy_(t)
        for n, m in loaded.model.named_modules():
            if isinstance(m, QuantLinear):
                hf.get_submodule(n).weight.copy_(m.dequantize())
    return hf


def test_gradients_reach_the_adapters_and_the_input_not_the_codes(packed):
    from compress import models
    from compress.train.lora import LoRAOptions, attach
    layer_name = "model.layers.0.mlp.down_proj"
    loaded = models.load(str(packed[1]))
    q = loaded.model.get_submodule(layer_name)
    w = q.dequantize()
    codes = q.qweight.clone()
    lin = attach(loaded.model, LoRAOptions(rank=4), seed=1)[layer_name]
    with torch.no_grad():
        lin.lora_B.weight.normal_(0, 0.1)
    x = torch.randn(3, w.shape[1], requires_grad=True)
    lin(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    a, b = lin.lora_A.weight.detach().clone().requires_grad_(True), lin.lora_B.weight.detach().clone().requires_grad_(True)
    (xr @ w.t() + (xr @ a.t() @ b.t()) * lin.scaling).square().sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-4)
    assert torch.allclose(lin.lora_A.weight.grad, a.grad, atol=1e-4) and lin.lora_A.weight.grad.abs().sum() > 0
    assert torch.allclose(lin.lora_B.weight.grad, b.grad, atol=1e-4)
    assert torch.equal(q.qweight, codes) and not any(t.requires_grad for t in q.buffers())


def test_adapter_trains_and_peft_computes_what_the_suite_computes(packed, env, tmp_path):
    peft = pytest.importorskip("peft", reason="peft (test extra) is not installed")
    base, ckpt = packed
    out = tmp_path / "ad"
    res = run(["lora", ckpt, *ARGS, "--steps", 10, "--targets", "q_proj", "--targets", "re:.*mlp\\..*",
               "--report", tmp_path / "r.json", "-o", out])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["loss_last"] < rep["loss_first"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert sorted(cfg["target_modules"]) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in
                                                  ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    state = load_file(out / "adapter_model.safetensors")
    assert all(state[k].abs().sum() > 0 for k in state if "lora_B" in k)       # trained away from zero
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine = _ours(ckpt, out)(ids).logits
        without = _ours(ckpt)(ids).logits
        theirs = peft.PeftModel.from_pretrained(_dequantized(base, ckpt), str(out)).eval()(ids).logits
    assert (mine - without).abs().max() > 1e-2                     # the adapter changes the outputs ...
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()   # ... as peft applies it


def test_merged_checkpoint_is_the_requantized_sum(packed, env, tmp_path):
    from compress import models
    from compress.formats import gptq_int
    from compress.qlinear import QuantLinear
    base, ckpt = packed
    res = run(["lora", ckpt, *ARGS, "--steps", 6, "-o", tmp_path / "ad"])
    assert res.exit_code == 0, res.output
    res = run(["lora", ckpt, *ARGS, "--steps", 6, "--merge", "-o", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    merged, start, ours = models.load(str(tmp_path / "m")), models.load(str(ckpt)), _ours(ckpt, tmp_path / "ad")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["compress"]["lora_merged"]
    assert meta["codes_changed"] > 0
    changed = 0
    for n, m in merged.model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        p0 = start.model.get_submodule(n)
        assert torch.equal(m.scales, p0.scales) and torch.equal(m.qzeros, p0.qzeros)   # the grid is kept
        target = p0.dequantize() + ours.get_submodule(n).delta()
        g = m.g_idx.long()
        step = m.scales.to(torch.float32).t()[:, g]
        z = gptq_int.unpack(m.packed())[1].to(torch.float32).t()[:, g]
        w = m.dequantize()
        inside = (target > -z * step) & (target < (2 ** m.bits - 1 - z) * step)    # not clamped to the grid
        assert bool(((w - target).abs()[inside] <= step[inside] / 2 + 1e-5).all())
        changed += int((m.qweight != p0.qweight).any())
    assert changed > 0


def test_killed_lora_resumes_to_the_same_adapter(packed, env, tmp_path, monkeypatch):
    args = ["lora", packed[1], *ARGS, "--steps", 6, "--checkpoint-every", 2]
    kill_resume_and_compare(monkeypatch, args, tmp_path, die_at=2, resumed_step=4,
                            weights="adapter_model.safetensors")


@pytest.mark.parametrize("case", ["float", "rank", "targets", "vocab", "steps"])
def test_bad_input_is_one_line_error_with_nothing_written(case, packed, env, tmp_path):
    base, ckpt = packed
    extra, needle = [], ""
    if case == "float":
        ckpt, needle = base, "not a packed gptq-int checkpoint"
    elif case == "rank":
        extra, needle = ["--rank", 0], "--lora-rank"
    elif case == "targets":
        extra, needle = ["--targets", "nothing_here"], "match none"
    elif case == "vocab":
        extra, needle = ["--teacher", edited(base, tmp_path / "t2", vocab_size=999)], "vocabulary"
    else:
        extra, needle = ["--steps", 0], "--steps"
    out = tmp_path / "o"
    assert_clean_error(run(["lora", ckpt, *ARGS, *extra, "-o", out]), needle)
    assert not out.exists() and not list(tmp_path.glob(".o.work"))


def test_eval_ppl_applies_an_adapter(packed, env, tmp_path):
    base, ckpt = packed
    assert run(["lora", ckpt, *ARGS, "--steps", 8, "-o", tmp_path / "ad"]).exit_code == 0
    plain = run(["eval", "ppl", ckpt, "--max-windows", 2, "--json", tmp_path / "p.json"])
    with_ad = run(["eval", "ppl", ckpt, "--adapter", tmp_path / "ad", "--max-windows", 2, "--json", tmp_path / "a.json"])
    assert plain.exit_code == 0 and with_ad.exit_code == 0, with_ad.output
    p, a = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("p", "a"))
    assert a["adapter"] == str(tmp_path / "ad") and a["ppl"] != p["ppl"]
    again = run(["eval", "ppl", ckpt, "--adapter", tmp_path / "ad", "--max-windows", 2, "--json", tmp_path / "b.json"])
    assert json.loads((tmp_path / "b.json").read_text())["ppl"] == a["ppl"] and again.exit_code == 0

"""SmoothQuant W8A8: the migration, the W8A8 module, the w8a8-int8 checkpoint through the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from compress import api, models
from compress.errors import CompressError
from compress.formats import w8a8
from compress.config import Targets
from compress.methods.smoothquant import SmoothQuant, SmoothQuantOptions, smooth_scales
from compress.registry import RunRecord, StatsBook
from compress.runners.sequential import StepRun, run_step
from compress.qlinear import W8A8Linear
from compress.scheme import W8A8Scheme
from kernels import dispatch
from kernels.reference import int8_linear_ref, quantize_per_token_int8
from tests.test_cli import assert_clean_error, run


def test_smooth_scales_formula():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(16, generator=gen) * 10 + 0.1
    w1, w2 = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)
    s = smooth_scales(a, [w1, w2], 0.5)
    wmax = torch.cat([w1, w2]).abs().amax(0)
    assert torch.allclose(s, a.sqrt() / wmax.sqrt())
    # after migration the activation and weight ranges of each channel are equal at alpha 0.5
    assert torch.allclose(a / s, wmax * s, rtol=1e-5)
    assert torch.allclose(smooth_scales(a, [w1], 1.0), a / 1.0)


class SmoothOnly(SmoothQuant):
    """The migration alone (no quantization): the float model computes the same function."""

    def process_block(self, blk):
        self._smooth(blk, blk.groups())


def smooth_model(loaded, windows, opts) -> RunRecord:
    run = StepRun(loaded, Targets(), SmoothOnly(opts), RunRecord(), StatsBook(), progress=False)
    return run_step(run, windows)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_migration_preserves_the_float_model(family, request):
    loaded = models.load(str(request.getfixturevalue(f"tiny_{family}")))
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = loaded.model(ids).logits
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    rec = smooth_model(loaded, torch.randint(0, 300, (3, 32)), SmoothQuantOptions(alpha=0.5, smooth_linear_prev=True))
    with torch.no_grad():
        out = loaded.model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    changed = {k for k, v in loaded.model.state_dict().items() if not torch.equal(v, before[k])}
    down = "mlp.down_proj" if family == "llama" else "fc2"
    up = "mlp.up_proj" if family == "llama" else "fc1"
    assert f"{loaded.arch.blocks}.1.{down}.weight" in changed and f"{loaded.arch.blocks}.1.{up}.weight" in changed
    # llama: q/k/v, gate/up, down (v -> o skipped: grouped-query attention); opt: all four groups
    assert len(rec.extra["smoothed_groups"]) == (3 if family == "llama" else 4) * 2


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_linear_matches_float(static):
    gen = torch.Generator().manual_seed(5 + static)
    lin = torch.nn.Linear(160, 72)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 160, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(72, generator=gen))
    x = torch.randn(3, 11, 160, generator=gen)
    scale = w8a8.static_input_scale(x.abs().max()) if static else None
    m = W8A8Linear.from_float(lin, scale)
    assert m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32
    dispatch.reset_path_counts()
    with torch.no_grad():
        y, ref = m(x), lin(x)
        bias = lin.bias.detach()
    assert dispatch.path_counts("int8")["torch"] == 1
    assert y.shape == ref.shape and y.dtype == torch.float32
    rel = float((y - ref).norm() / (ref - bias).norm())
    assert rel < 0.02, rel
    # a true int8 product: exactly the twin's int32 accumulation of the quantized operands
    if static:
        xq, xs = w8a8.quantize_activation_static(x, m.input_scale)
    else:
        xq, xs = quantize_per_token_int8(x)
    exact = int8_linear_ref(xq.reshape(-1, 160), xs.reshape(-1).contiguous(), m.weight, m.weight_scale, m.bias,
                            torch.float32)
    assert torch.equal(y.reshape(-1, 72), exact)


def test_static_scale_saturates_outside_calibrated_range():
    x = torch.tensor([[0.5, -1.0, 3.0]])
    xq, xs = w8a8.quantize_activation_static(x, w8a8.static_input_scale(1.0))
    assert xq.tolist() == [[64, -127, 127]] and xs.shape == (1,)


def test_w8a8_scheme_validation():
    with pytest.raises(CompressError, match="bits must be 8"):
        W8A8Scheme(bits=4)
    with pytest.raises(CompressError, match="group size must be -1"):
        W8A8Scheme(group_size=128)
    with pytest.raises(CompressError, match="act_scheme"):
        W8A8Scheme(act_scheme="per-head")
    assert W8A8Scheme.from_dict(W8A8Scheme(act_scheme="static").to_dict()) == W8A8Scheme(act_scheme="static")


@pytest.fixture(scope="module")
def sq(tiny_llama, tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("sq")
    out, stats = d / "sq", d / "sq.safetensors"
    res = run(["quantize", tiny_llama, "--method", "smoothquant", "--nsamples", 4, "--seqlen", 32,
               "--data-dir", tiny_data, "--save-stats", stats, "-o", out])
    assert res.exit_code == 0, res.output
    return out, stats


def test_w8a8_checkpoint_roundtrip(sq, tiny_llama, tiny_data, tmp_path):
    out, _ = sq
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compress-w8a8"
    assert qc["compress"]["format"] == "w8a8-int8" and qc["compress"]["format_version"] == 2
    sq_opts = qc["compress"]["steps"][0]["options"]
    assert qc["input_activations"]["dynamic"] is True and sq_opts["alpha"] == 0.5
    assert sq_opts["smoothed_groups"] == 4        # 2 blocks x (q/k/v, gate/up): norm-fed groups only by default
    t = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj"
    assert t[f"{name}.weight"].dtype == torch.int8 and t[f"{name}.weight"].shape == (192, 96)
    assert t[f"{name}.weight_scale"].dtype == torch.float32 and t[f"{name}.weight_scale"].shape == (192,)
    assert f"{name}.input_scale" not in t and f"{name}.qweight" not in t
    res = run(["inspect", out])
    assert res.exit_code == 0, res.output
    assert "w8a8-int8 v2" in res.output and "smoothquant w8a8" in res.output
    info = json.loads(run(["inspect", out, "--json"]).output)
    assert len(info["layers"]) == 14 and 8.0 < info["bits_per_weight_quantized"] < 8.5
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", tiny_llama, "--max-windows", 2, "--data-dir", tiny_data, "--json", js])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    assert r["method"] == "smoothquant" and r["kld"] < 2e-3 and abs(r["ppl"] / r["base_ppl"] - 1) < 0.01
    # the loaded checkpoint is the model quantized in memory (stored in float32: exactly)
    mem = models.load(str(tiny_llama))
    api.quantize(mem, "smoothquant", progress=False, load_stats=sq[1])
    out32 = tmp_path / "sq32"
    assert run(["quantize", tiny_llama, "--method", "smoothquant", "--load-stats", sq[1], "--dtype", "float32",
                "-o", out32]).exit_code == 0
    disk = models.load(str(out32))
    assert sum(isinstance(m, W8A8Linear) for m in disk.model.modules()) == 14
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        a, b = mem.model(ids).logits, disk.model(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_static_act_scheme(sq, tiny_llama, tiny_data, tmp_path):
    _, stats = sq
    out = tmp_path / "static"
    res = run(["quantize", tiny_llama, "--method", "smoothquant", "--act-scheme", "static", "--alpha", "0.6",
               "--load-stats", stats, "-o", out])
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
                                       "strategy": "tensor"}
    assert qc["compress"]["scheme"]["act_scheme"] == "static"
    t = load_file(str(out / "model.safetensors"))
    s = t["model.layers.1.self_attn.o_proj.input_scale"]
    assert s.dtype == torch.float32 and s.shape == () and float(s) > 0
    loaded = models.load(str(out))
    m = loaded.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(m, W8A8Linear) and m.act_scheme == "static"
    res = run(["eval", "ppl", out, "--base", tiny_llama, "--max-windows", 1, "--data-dir", tiny_data])
    assert res.exit_code == 0 and "KLD" in res.output, res.output
    kld = float(res.output.split("KLD")[1].split()[0])
    assert kld < 0.05


@pytest.mark.parametrize("args,needle", [
    (["--method", "smoothquant", "--bits", "4"], "--bits applies to"),
    (["--method", "smoothquant", "--group-size", "128"], "--group-size applies to"),
    (["--method", "smoothquant", "--asym"], "--sym/--asym applies to"),
    (["--method", "smoothquant", "--act-order"], "act-order"),
    (["--method", "smoothquant", "--damp", "0.1"], "--damp"),
    (["--method", "smoothquant", "--alpha", "1.5"], "alpha"),
    (["--method", "gptq", "--alpha", "0.5"], "--alpha"),
    (["--method", "rtn", "--act-scheme", "static"], "--act-scheme"),
    (["--method", "awq", "--smooth-linear-prev"], "--smooth-linear-prev"),
])
def test_bad_smoothquant_options(tiny_llama, tmp_path, args, needle):
    res = run(["quantize", tiny_llama, *args, "-o", tmp_path / "o"])
    assert_clean_error(res, needle)
    assert not (tmp_path / "o").exists()


def test_loaded_statistics_reproduce_the_calibrated_checkpoint(sq, tiny_llama, tmp_path):
    res = run(["quantize", tiny_llama, "--method", "smoothquant", "--load-stats", sq[1], "-o", tmp_path / "o"])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(sq[0] / "model.safetensors")), load_file(str(tmp_path / "o" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["compress"]
    assert qc["stats_loaded_from"] == str(sq[1]) and "calibration" not in qc


def test_smoothquant_rejects_other_statistics(tiny_llama, tiny_data, tmp_path):
    stats = tmp_path / "h.safetensors"
    res = run(["quantize", tiny_llama, "--method", "gptq", "--group-size", "32", "--nsamples", "2", "--seqlen", "16",
               "--data-dir", tiny_data, "--save-stats", stats, "-o", tmp_path / "g"])
    assert res.exit_code == 0, res.output
    res = run(["quantize", tiny_llama, "--method", "smoothquant", "--load-stats", stats, "-o", tmp_path / "o"])
    assert_clean_error(res, "hessian statistics")


@pytest.mark.slow
def test_smoothquant_smollm2(smollm2, real_data, tmp_path):
    out = tmp_path / "sq"
    res = run(["quantize", smollm2, "--method", "smoothquant", "--nsamples", 4, "--seqlen", 128,
               "--data-dir", real_data, "-o", out])
    assert res.exit_code == 0, res.output
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", smollm2, "--max-windows", 2, "--data-dir", real_data, "--json", js])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    assert math.isfinite(r["ppl"]) and abs(r["ppl"] / r["base_ppl"] - 1) < 0.05 and r["kld"] < 0.05

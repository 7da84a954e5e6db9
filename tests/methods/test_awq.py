"""AWQ: the scale search and clip search on synthetic layers, the transform on tiny models, the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from compress import models
from compress.formats import gptq_int
from compress.config import Targets
from compress.methods.awq import AWQ, AWQOptions
from compress.registry import RunRecord, StatsBook
from compress.runners.sequential import StepRun, run_step
from compress.solvers.awq_search import (apply_clip, awq_solve, clip_search, fake_quantize, hessian_error,
                                         search_scale)
from compress.quantizer import dequantize_values
from compress.scheme import IntScheme
from tests.test_cli import assert_clean_error, run


def outlier_layer(gen: torch.Generator, n: int = 48, k: int = 128, t: int = 256, outliers: int = 4,
                  factor: float = 25.0):
    """A linear with a few input channels much larger than the rest (as in LLM activations)."""
    x = torch.randn(t, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:outliers]] *= factor
    w = torch.randn(n, k, generator=gen) * 0.05
    h = x.t() @ x / t
    return w, x, h, x.abs().mean(dim=0)


def out_err(x: torch.Tensor, w: torch.Tensor, w_eff: torch.Tensor) -> float:
    """Squared error of the layer output, computed from the inputs themselves (not the Hessian)."""
    return float(((x @ (w - w_eff).t()) ** 2).sum())


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (3, 128, True), (4, -1, True)])
def test_chosen_scales_beat_no_scaling(bits, group, sym):
    gen = torch.Generator().manual_seed(100 + bits)
    w, x, h, x_mean = outlier_layer(gen)
    scheme = IntScheme(bits=bits, group_size=group, sym=sym)
    res = search_scale([w], x_mean, scheme, hessian_error(h, [w]))
    # the first candidate is alpha = 0: the objective of the unscaled, rounded weight
    assert len(res.errors) == 20
    assert res.baseline_error == pytest.approx(hessian_error(h, [w])([fake_quantize(w, scheme)]), rel=1e-6)
    s = res.scales
    assert res.alpha > 0 and not torch.allclose(s, torch.ones_like(s))
    # normalised: the scales straddle 1
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-4)
    scaled = out_err(x, w, fake_quantize(w * s, scheme) / s)
    unscaled = out_err(x, w, fake_quantize(w, scheme))
    assert scaled <= unscaled
    assert scaled < 0.9 * unscaled, (scaled, unscaled)   # outlier channels: a real gain


def test_alpha_zero_is_the_identity():
    gen = torch.Generator().manual_seed(7)
    w, x, h, x_mean = outlier_layer(gen, outliers=0)
    scheme = IntScheme(bits=4, group_size=64)
    # an objective that prefers no scaling: the search must return s = 1 exactly
    res = search_scale([w], x_mean, scheme, lambda eff: float(((eff[0] - fake_quantize(w, scheme)) ** 2).sum()))
    assert res.alpha == 0 and torch.equal(res.scales, torch.ones_like(res.scales))


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64), (3, -1)])
def test_awq_error_below_rtn(bits, group):
    gen = torch.Generator().manual_seed(200 + bits)
    w, x, h, x_mean = outlier_layer(gen, k=256)
    scheme = IntScheme(bits=bits, group_size=group)
    r = awq_solve(w, h, x_mean, scheme)
    rtn = out_err(x, w, fake_quantize(w, scheme))
    awq = out_err(x, w, r.effective_weight())
    assert awq < 0.8 * rtn, (awq, rtn)
    noclip = awq_solve(w, h, x_mean, scheme, clip=False)
    assert out_err(x, w, noclip.effective_weight()) < rtn


def test_clip_search_never_worse_per_group_and_shrinks():
    gen = torch.Generator().manual_seed(3)
    w, x, h, _ = outlier_layer(gen, k=128, outliers=0)
    scheme = IntScheme(bits=3, group_size=64)
    mv = clip_search(w, h, scheme)
    assert mv.shape == (48, 2)
    amax = torch.stack([w[:, :64].abs().amax(1), w[:, 64:].abs().amax(1)], dim=1)
    assert bool((mv <= amax + 1e-7).all()) and bool((mv >= 0.5 * amax - 1e-7).all())
    assert int((mv < amax - 1e-7).sum()) > 10       # Gaussian rows at 3 bits: many ranges shrink
    clipped = apply_clip(w, mv, scheme)
    for g0 in (0, 64):
        xg, wg = x[:, g0:g0 + 64], w[:, g0:g0 + 64]
        e_clip = ((xg @ (wg - fake_quantize(clipped, scheme)[:, g0:g0 + 64]).t()) ** 2).sum(0)
        e_none = ((xg @ (wg - fake_quantize(w, scheme)[:, g0:g0 + 64]).t()) ** 2).sum(0)
        assert bool((e_clip <= e_none * (1 + 1e-4) + 1e-6).all())


def test_narrow_last_group():
    """K = 96 with group 64: groups of 64 and 32 columns, as SmolLM2's 576 = 4x128 + 64."""
    gen = torch.Generator().manual_seed(11)
    w, x, h, x_mean = outlier_layer(gen, k=96)
    scheme = IntScheme(bits=4, group_size=64)
    r = awq_solve(w, h, x_mean, scheme)
    assert r.qscales.shape == (2, 48) and r.clip_max.shape == (48, 2)
    assert torch.equal(r.g_idx, torch.arange(96, dtype=torch.int32) // 64)
    ws = w * r.scales
    assert bool((r.clip_max[:, 1] <= ws[:, 64:].abs().amax(1) + 1e-6).all())
    p = gptq_int.pack(r.q, r.qscales, r.zeros, r.g_idx, 4)
    assert torch.equal(p.dequantize(), dequantize_values(r.q, r.qscales, r.zeros, r.g_idx))
    assert out_err(x, w, r.effective_weight()) < out_err(x, w, fake_quantize(w, scheme))


def _with_outliers(path, first_prev: str) -> models.Loaded:
    loaded = models.load(str(path))
    with torch.no_grad():
        for block in loaded.arch.get_blocks(loaded.model):
            norm = block.get_submodule(first_prev)
            norm.weight[torch.arange(0, norm.weight.shape[0], 17)] *= 8.0
    return loaded


class ScaleOnly(AWQ):
    """AWQ's scale search and transform alone (no clipping, no quantization)."""

    def process_block(self, blk):
        self._scale(blk, blk.groups())


def awq_scale_model(loaded, windows, **options) -> RunRecord:
    method = ScaleOnly(AWQOptions(**options))
    run = StepRun(loaded, Targets(), method, RunRecord(), StatsBook(), progress=False)
    return run_step(run, windows)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_transform_preserves_the_float_model(family, request):
    path = request.getfixturevalue(f"tiny_{family}")
    loaded = _with_outliers(path, models.arch_for(family).groups[0].prev)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = loaded.model(ids).logits
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    rec = awq_scale_model(loaded, torch.randint(0, 300, (4, 32)), bits=3, group_size=32)
    alphas = rec.extra["awq_alphas"]
    with torch.no_grad():
        out = loaded.model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    assert any(a for a in alphas.values()) and not rec.packed
    changed = [k for k, v in loaded.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("q_proj" in k for k in changed) and any("layernorm" in k or "layer_norm" in k for k in changed)
    vo = [a for k, a in alphas.items() if k.endswith(("o_proj", "out_proj"))]
    if family == "llama":
        assert vo == [None, None]          # grouped-query attention: v_proj is narrower than o_proj's input
    else:
        assert all(a is not None for a in vo)


def test_awq_cli_roundtrip_and_stats(tiny_llama, tiny_data, tmp_path):
    out, stats = tmp_path / "awq", tmp_path / "awq.safetensors"
    common = ["--bits", "4", "--group-size", "64", "--nsamples", "4", "--seqlen", "32", "--data-dir", tiny_data]
    res = run(["quantize", tiny_llama, "--method", "awq", *common, "--save-stats", stats, "-o", out])
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["compress"]["format"] == "gptq-int"
    awq = qc["compress"]["steps"][0]["options"]
    assert qc["compress"]["method"] == "awq" and awq["n_grid"] == 20
    assert awq["clip"] is True and awq["scaled_groups"] == 6   # 2 blocks x 3 (v -> o: GQA)
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.scales"].shape == (2, 96)     # 96 = 64 + 32
    # the norm absorbed the scales
    assert not torch.equal(t["model.layers.0.input_layernorm.weight"],
                           load_file(str(tiny_llama / "model.safetensors"))["model.layers.0.input_layernorm.weight"].half())
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", tiny_llama, "--max-windows", 2, "--data-dir", tiny_data, "--json", js])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    assert math.isfinite(r["ppl"]) and 0 <= r["kld"] < 0.5 and r["method"] == "awq"
    # reusing the search: no calibration, the same checkpoint
    out2 = tmp_path / "awq2"
    res = run(["quantize", tiny_llama, "--method", "awq", "--bits", "4", "--group-size", "64",
               "--load-stats", stats, "-o", out2])
    assert res.exit_code == 0, res.output
    t2 = load_file(str(out2 / "model.safetensors"))
    assert t.keys() == t2.keys() and all(torch.equal(t[k], t2[k]) for k in t)
    # a different grid cannot reuse it
    res = run(["quantize", tiny_llama, "--method", "awq", "--bits", "3", "--group-size", "64",
               "--load-stats", stats, "-o", tmp_path / "bad"])
    assert_clean_error(res, "searched for int4 g64")
    # awq keeps the Hessians too: GPTQ on the same scaled weights can reuse the search
    res = run(["quantize", tiny_llama, "--method", "awq+gptq", "--bits", "4", "--group-size", "64",
               "--load-stats", stats, "-o", tmp_path / "ag"])
    assert res.exit_code == 0, res.output
    t3 = load_file(str(tmp_path / "ag" / "model.safetensors"))
    assert not torch.equal(t3["model.layers.0.mlp.down_proj.qweight"], t["model.layers.0.mlp.down_proj.qweight"])


def test_awq_gptq_on_opt(tiny_opt, tiny_data, tmp_path):
    """awq+gptq on OPT: biases, LayerNorm bias, v_proj -> out_proj and fc1 -> fc2 (ReLU) scaling."""
    out, stats = tmp_path / "ag", tmp_path / "ag.safetensors"
    common = ["--method", "awq+gptq", "--bits", "3", "--group-size", "32", "--act-order"]
    res = run(["quantize", tiny_opt, *common, "--nsamples", "4", "--seqlen", "32", "--data-dir", tiny_data,
               "--awq-objective", "linear", "--save-stats", stats, "-o", out])
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["compress"]["method"] == "awq+gptq"
    awq = qc["compress"]["steps"][0]["options"]
    assert awq["clip"] is False and awq["objective"] == "linear"
    res = run(["quantize", tiny_opt, *common, "--load-stats", stats, "-o", tmp_path / "ag2"])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ag2" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    res = run(["eval", "ppl", out, "--base", tiny_opt, "--max-windows", 1, "--data-dir", tiny_data])
    assert res.exit_code == 0 and "KLD" in res.output, res.output
    # searched without clipping: plain awq (which clips) must not pretend to reuse it
    res = run(["quantize", tiny_opt, "--method", "awq", "--bits", "3", "--group-size", "32", "--load-stats", stats,
               "-o", tmp_path / "a"])
    assert_clean_error(res, "awq_clip")
    res = run(["quantize", tiny_opt, "--method", "awq", "--bits", "3", "--group-size", "32", "--load-stats", stats,
               "--no-awq-clip", "-o", tmp_path / "a"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,needle", [
    (["--method", "awq", "--act-order"], "act-order"),
    (["--method", "awq", "--alpha", "0.5"], "--alpha"),
    (["--method", "awq", "--static-groups"], "static-groups"),
    (["--method", "gptq", "--awq-objective", "linear"], "awq-objective"),
    (["--method", "smoothquant", "--no-awq-clip"], "awq-clip"),
])
def test_bad_awq_options(tiny_llama, tmp_path, args, needle):
    assert_clean_error(run(["quantize", tiny_llama, *args, "-o", tmp_path / "o"]), needle)
    assert not (tmp_path / "o").exists()


def test_awq_stats_file_of_another_kind(tiny_llama, tiny_data, tmp_path):
    stats = tmp_path / "g.safetensors"
    res = run(["quantize", tiny_llama, "--method", "gptq", "--group-size", "32", "--nsamples", "2", "--seqlen", "16",
               "--data-dir", tiny_data, "--save-stats", stats, "-o", tmp_path / "g"])
    assert res.exit_code == 0, res.output
    res = run(["quantize", tiny_llama, "--method", "awq", "--group-size", "32", "--load-stats", stats,
               "-o", tmp_path / "o"])
    assert_clean_error(res, "awq_scales")


@pytest.mark.slow
def test_awq_smollm2(smollm2, real_data, tmp_path):
    out = tmp_path / "awq"
    res = run(["quantize", smollm2, "--method", "awq", "--bits", "4", "--group-size", "128", "--nsamples", 4,
               "--seqlen", 128, "--data-dir", real_data, "-o", out])
    assert res.exit_code == 0, res.output
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", smollm2, "--max-windows", 2, "--data-dir", real_data, "--json", js])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    # 576-wide layers at group 128: a narrow last group of 64 columns
    assert json.loads(run(["inspect", out, "--json"]).output)["layers"][0]["groups"] == 5
    # a sanity bound: 4 calibration windows and 2 evaluation windows are noisy (the perplexity moves by
    # several percent between CPUs whose BLAS rounds differently); the comparison below is the check
    assert math.isfinite(r["ppl"]) and r["ppl"] < 1.5 * r["base_ppl"]
    # it beats round-to-nearest at the same setting on the same windows
    rtn, rjs = tmp_path / "rtn", tmp_path / "rtn.json"
    assert run(["quantize", smollm2, "--bits", "4", "--group-size", "128", "-o", rtn]).exit_code == 0
    assert run(["eval", "ppl", rtn, "--base", smollm2, "--max-windows", 2, "--data-dir", real_data,
                "--json", rjs]).exit_code == 0
    assert r["kld"] < json.loads(rjs.read_text())["kld"]

"""Quantizing the lm_head (``--lm-head``): untying, RTN and GPTQ, the checkpoint round trip, ONNX."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from calib.data import CalibSpec
from compress import api, models
from compress.solvers.obs import output_error
from compress.qlinear import QuantLinear
from compress.quantizer import dequantize_values, quantize_rtn
from compress.scheme import IntScheme
from tests.test_cli import assert_clean_error, run

SCHEME = IntScheme(bits=4, group_size=64, sym=False)
OPTS = dict(bits=4, group_size=64, sym=False)


def logits(model, seed=0):
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rtn_lm_head_round_trip(tiny_llama, tmp_path):
    """The lm_head is RTN of the (tied) embedding table; the embedding itself is untouched; the
    written checkpoint loads back to the same logits as the in-memory model."""
    src = models.load(str(tiny_llama))
    table = src.model.get_input_embeddings().weight.detach().clone()
    assert src.model.config.tie_word_embeddings
    mem = models.load(str(tiny_llama))
    api.quantize(mem, "rtn", **OPTS, progress=False, lm_head=True)
    out = tmp_path / "q"
    info = api.quantize_to_folder(str(tiny_llama), out, "rtn", progress=False, lm_head=True, **OPTS)
    assert info["modules"] == 2 * 7 + 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert "lm_head" in cfg["quantization_config"]["compress"]["quantized_modules"]
    t = load_file(str(out / "model.safetensors"))
    assert "lm_head.qweight" in t and "lm_head.weight" not in t
    assert torch.equal(t["model.embed_tokens.weight"], table.half())
    loaded = models.load(str(out))
    head = loaded.model.lm_head
    assert isinstance(head, QuantLinear)
    q, s, z, g = quantize_rtn(table, SCHEME)
    assert torch.equal(head.dequantize(torch.float32), dequantize_values(q, s, z, g))
    assert torch.equal(loaded.model.get_input_embeddings().weight, table.half().float())
    assert torch.allclose(logits(loaded.model), logits(mem.model), atol=2e-3, rtol=0)
    # quantizing the head changes the model more than the body alone does
    body = models.load(str(tiny_llama))
    api.quantize(body, "rtn", **OPTS, progress=False)
    ref = logits(src.model)
    assert (logits(mem.model) - ref).norm() > (logits(body.model) - ref).norm()


def test_gptq_lm_head_beats_rtn_and_stats_round_trip(tiny_llama, tiny_data, tmp_path):
    """GPTQ solves the lm_head against the Hessian of the final norm's output (saved under
    "lm_head" with --save-stats); its layer error is below RTN's; reloading the statistics gives
    the same integers."""
    calib = CalibSpec(nsamples=8, seqlen=64)
    scheme = IntScheme(bits=3, group_size=32, sym=False, act_order=True)
    opts = dict(bits=3, group_size=32, sym=False, act_order=True)
    stats = tmp_path / "stats.safetensors"
    a = models.load(str(tiny_llama))
    table = a.model.get_input_embeddings().weight.detach().clone()
    api.quantize(a, "gptq", **opts, progress=False, calib=calib, data_dir=str(tiny_data), lm_head=True,
                 save_stats=stats)
    from calib.stats import load_stats
    st = load_stats(stats)
    H = st["lm_head"].hessian()
    assert H.shape == (96, 96)
    head = a.model.lm_head
    assert isinstance(head, QuantLinear)
    q, s, z, g = quantize_rtn(table, scheme)
    assert output_error(table, head.dequantize(torch.float32), H) < 0.9 * output_error(
        table, dequantize_values(q, s, z, g), H)
    b = models.load(str(tiny_llama))
    api.quantize(b, "gptq", **opts, progress=False, lm_head=True, load_stats=stats)
    assert torch.equal(b.model.lm_head.qweight, head.qweight)
    c = models.load(str(tiny_llama))
    api.quantize(c, "gptq", **opts, progress=False, calib=calib, data_dir=str(tiny_data), load_stats=stats)
    assert not isinstance(c.model.lm_head, QuantLinear)
    # statistics without the lm_head's cannot serve --lm-head
    nohead = tmp_path / "nohead.safetensors"
    api.quantize(models.load(str(tiny_llama)), "gptq", **opts, progress=False, calib=calib,
                 data_dir=str(tiny_data), save_stats=nohead)
    with pytest.raises(Exception, match="no statistics for lm_head"):
        api.quantize(models.load(str(tiny_llama)), "gptq", **opts, progress=False, lm_head=True, load_stats=nohead)


def test_lm_head_onnx_export_parity(tiny_llama, tmp_path):
    """The exported graph runs the checkpoint's packed lm_head as MatMulNBits and a plain Gather
    over the unquantized embedding; ORT equals torch."""
    from compress.export import onnx as xo
    from compress.runtime_onnx import OnnxCausalLM
    out = tmp_path / "q"
    api.quantize_to_folder(str(tiny_llama), out, "rtn", progress=False, lm_head=True, **OPTS)
    loaded = models.load(str(out))
    info = xo.export_onnx(loaded, tmp_path / "onnx")
    assert info["model"]["lm_head"] == "quantized (checkpoint)"
    assert info["model"]["embedding"].startswith("Gather fp32")
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    got = OnnxCausalLM(tmp_path / "onnx")(input_ids=ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_cli_lm_head_and_grid_options(tiny_llama, tmp_path):
    res = run(["quantize", tiny_llama, "--bits", "4", "--group-size", "32", "--lm-head", "-o", tmp_path / "ok"])
    assert res.exit_code == 0, res.output
    assert "17 layers quantized" in res.output or "15 layers quantized" in res.output
    assert_clean_error(run(["quantize", tiny_llama, "--method", "awq", "--lm-head", "-o", tmp_path / "a"]),
                       "--lm-head", "awq")
    assert_clean_error(run(["quantize", tiny_llama, "--grid", "mse", "-o", tmp_path / "b"]), "--grid", "rtn")
    assert_clean_error(run(["quantize", tiny_llama, "--method", "gptq", "--grid", "best", "-o", tmp_path / "c"]),
                       "--grid")


def test_cli_gptq_mse_grid_with_lm_head(tiny_llama, tiny_data, tmp_path):
    """`--grid mse --lm-head` from the CLI: recorded in the checkpoint, the lm_head packed, and the
    searched grids differ from the min-max ones of the same run."""
    common = ["quantize", tiny_llama, "--method", "gptq", "--bits", "3", "--group-size", "32", "--act-order",
              "--nsamples", "8", "--seqlen", "64", "--data-dir", tiny_data, "--lm-head"]
    res = run(common + ["--grid", "mse", "-o", tmp_path / "mse"])
    assert res.exit_code == 0, res.output
    res = run(common + ["-o", tmp_path / "minmax"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "mse" / "config.json").read_text())["quantization_config"]["compress"]
    assert meta["steps"][0]["options"]["grid"] == "mse" and meta["steps"][0]["lm_head"] is True
    a = load_file(str(tmp_path / "mse" / "model.safetensors"))
    b = load_file(str(tmp_path / "minmax" / "model.safetensors"))
    assert "lm_head.qweight" in a
    assert not torch.equal(a["lm_head.scales"], b["lm_head.scales"])
    # shrunken ranges: smaller scales on average
    assert float(a["model.layers.0.mlp.down_proj.scales"].float().mean()) < float(
        b["model.layers.0.mlp.down_proj.scales"].float().mean())


def test_gptq_lm_head_refuses_a_projected_head(tiny_data, tmp_path):
    """OPT with word_embed_proj_dim != hidden: a projection sits between the final norm and the
    lm_head, so the final norm's output is not the lm_head's input: a clear error (RTN works)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from tests.conftest import _tokenizer
    cfg = OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                    pad_token_id=0)
    folder = tmp_path / "opt"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    _tokenizer().save_pretrained(folder)
    opts = dict(bits=4, group_size=32, sym=False)
    with pytest.raises(Exception, match="does not read model.decoder.final_layer_norm's output"):
        api.quantize(models.load(str(folder)), "gptq", **opts, progress=False, lm_head=True,
                     calib=CalibSpec(nsamples=4, seqlen=32), data_dir=str(tiny_data))
    rtn = models.load(str(folder))
    api.quantize(rtn, "rtn", **opts, progress=False, lm_head=True)
    assert isinstance(rtn.model.lm_head, QuantLinear)

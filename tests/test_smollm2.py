"""The real model, end to end through the CLI, on a few windows (marked slow)."""
from __future__ import annotations

import json

import pytest

from tests.test_cli import run

pytestmark = pytest.mark.slow


def test_models_fetch_is_cached(smollm2):
    res = run(["models", "fetch", "smollm2-135m"])
    assert res.exit_code == 0 and res.output.strip() == str(smollm2)
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6  # fp32
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30


def test_the_cached_tokenizer_gives_fixed_ids(smollm2):
    """The cached folder's tokenizer splits a fixed sentence into SmolLM2's ids (with the BOS the
    folder's tokenizer adds): the same under transformers 4.57 and 5.x, which reads
    tokenizer.json as written because the folder records PreTrainedTokenizerFast."""
    from compress import models
    tok = models.load("smollm2-135m").tokenizer
    assert tok("The history of the city")["input_ids"] == [1, 504, 1463, 282, 260, 2240]
    cfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_rtn_g128_on_smollm2(smollm2, real_data, tmp_path):
    """4-bit group 128 (576 = 4 x 128 + 64): quantize, inspect, evaluate 2 windows against fp32."""
    out = tmp_path / "q4"
    res = run(["quantize", "smollm2-135m", "--bits", "4", "--group-size", "128", "--sym", "-o", out])
    assert res.exit_code == 0, res.output
    info = json.loads(run(["inspect", out, "--json"]).output)
    assert len(info["layers"]) == 210
    assert {l["groups"] for l in info["layers"]} == {5, 12}  # ceil(576/128), 1536/128
    assert info["size_bytes"] < 0.3 * (smollm2 / "model.safetensors").stat().st_size

    js = tmp_path / "q4.json"
    res = run(["eval", "ppl", out, "--base", "smollm2-135m", "--max-windows", 2, "--json", js])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    assert r["tokens"] == 2 * 511
    # quantization costs something, but a working 4-bit model stays close to its base
    assert r["base_ppl"] < r["ppl"] < 1.6 * r["base_ppl"]
    assert 0.01 < r["kld"] < 1.0 and r["top1"] > 0.5


def test_rtn_8bit_per_channel_is_near_lossless(smollm2, real_data, tmp_path):
    out = tmp_path / "q8"
    assert run(["quantize", "smollm2-135m", "--bits", "8", "--group-size", "-1", "--sym", "-o", out]).exit_code == 0
    js = tmp_path / "q8.json"
    assert run(["eval", "ppl", out, "--base", "smollm2-135m", "--max-windows", 2, "--json", js]).exit_code == 0
    r = json.loads(js.read_text())
    assert abs(r["ppl"] / r["base_ppl"] - 1) < 0.01 and r["kld"] < 0.01 and r["top1"] > 0.9


def test_gguf_file_loads_as_the_same_model(smollm2, real_data, tmp_path):
    """A .gguf path is accepted wherever a model is: the original GGUF evaluates like the fp32 folder."""
    from compress import models
    src = models.source_gguf("smollm2-135m")
    if src is None:
        pytest.skip("the original GGUF is not in the cache (fetched by an older version)")
    a, b = tmp_path / "gguf.json", tmp_path / "folder.json"
    assert run(["eval", "ppl", src, "--max-windows", 2, "--json", a]).exit_code == 0
    assert run(["eval", "ppl", "smollm2-135m", "--max-windows", 2, "--json", b]).exit_code == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["ppl"] == pytest.approx(rb["ppl"], rel=1e-4)

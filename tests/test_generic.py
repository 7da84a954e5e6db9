"""The generic path: a causal LM whose model type has no description (Starcoder2 here) still
quantizes with the methods that need none, the blocks found as the repeated block list and the
linears in the order a traced forward pass reaches them; methods that need a description refuse in
one line naming the model type; the path taken is in the output and the metadata."""
from __future__ import annotations

import json

import pytest
import torch

from compress import models
from tests.conftest import build_tiny
from tests.test_cli import assert_clean_error, run

CAL = ["--nsamples", 8, "--seqlen", 64]
X = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("gen") / "starcoder2", "starcoder2")


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


def test_generic_description_follows_the_forward_pass(tiny):
    m = models.load(str(tiny))
    assert m.arch.family == "generic" and m.arch.blocks == "model.layers"
    assert [g.linears for g in m.arch.groups] == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.c_fc",),
        ("mlp.c_proj",)]
    assert not any(g.scalable for g in m.arch.groups)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_generic_model_quantizes_and_loads(method, tiny, env, tmp_path):
    out = tmp_path / "q"
    res = run(["quantize", tiny, "--method", method, "--bits", 4, "--group-size", 32, "--dtype", "float32",
               *(CAL if method == "gptq" else []), "--report", tmp_path / "r.json", "-o", out])
    assert res.exit_code == 0, res.output
    assert "architecture: generic path" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["architecture"] == "generic"
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["compress"]
    assert meta["architecture"] == "generic" and len(meta["quantized_modules"]) == 2 * 6
    packed, ref = models.load(str(out)), models.load(str(tiny)).model
    with torch.no_grad():
        for name, mod in packed.model.named_modules():
            if hasattr(mod, "packed"):
                ref.get_submodule(name).weight.copy_(mod.packed().dequantize())
        torch.testing.assert_close(packed.model(X).logits, ref(X).logits, rtol=1e-4, atol=1e-4)


def test_generic_model_prunes(tiny, env, tmp_path):
    res = run(["prune", tiny, "--method", "sparsegpt", "--sparsity", 0.5, *CAL, "-o", tmp_path / "p"])
    assert res.exit_code == 0, res.output
    p = models.load(str(tmp_path / "p"))
    assert float((p.model.model.layers[1].mlp.c_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("args", [["quantize", "--method", "awq"], ["quantize", "--method", "smoothquant"],
                                  ["prune", "--method", "structured", "--heads", 0.5],
                                  ["quantize", "--method", "gptq", "--lm-head"]])
def test_methods_that_need_a_description_refuse_before_any_work(args, tiny, env, tmp_path):
    res = run([args[0], tiny, *args[1:], *CAL, "-o", tmp_path / "o"])
    assert_clean_error(res, "starcoder2", "needs an architecture description")
    assert not (tmp_path / "o").exists()


def test_a_model_that_is_not_a_causal_lm_is_still_refused(tiny, env, tmp_path):
    from tests.train.helpers import edited
    bad = edited(tiny, tmp_path / "bad", model_type="starcoder2", architectures=["Starcoder2ForSequenceClassification"])
    assert_clean_error(run(["quantize", bad, "-o", tmp_path / "o"]), "unsupported architecture", "generic path")

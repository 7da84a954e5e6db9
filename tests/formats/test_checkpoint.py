"""Packed checkpoints: per-module schemes (format v2), version-1 checkpoints still load, and a
tampered config, record or tensor is refused with one line before it is evaluated."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress import models
from tests.test_cli import assert_clean_error, run


@pytest.fixture(scope="module")
def mixed(tiny_llama, tmp_path_factory):
    """4-bit g32 everywhere, 8-bit per-channel symmetric down_proj, k_proj left dense."""
    out = tmp_path_factory.mktemp("mixed") / "m"
    recipe = tmp_path_factory.mktemp("r") / "r.yaml"
    recipe.write_text(json.dumps({"steps": [{"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["k_proj"],
                                             "overrides": [{"targets": ["mlp.down_proj"], "bits": 8,
                                                            "group_size": -1, "sym": True}]}]}))
    res = run(["run", recipe, "--model", tiny_llama, "-o", out])
    assert res.exit_code == 0, res.output
    return out


def _copy(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors is not None:
        t = load_file(str(dst / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _ppl(path, tiny_data):
    return run(["eval", "ppl", path, "--max-windows", 1, "--data-dir", tiny_data])


def test_mixed_checkpoint_loads_with_each_modules_scheme(mixed):
    loaded = models.load(str(mixed))
    b = loaded.model.model.layers[0]
    assert b.mlp.down_proj.bits == 8 and b.mlp.down_proj.scales.shape[0] == 1
    assert b.mlp.up_proj.bits == 4 and b.mlp.up_proj.scales.shape[0] == 3
    assert isinstance(b.self_attn.k_proj, torch.nn.Linear)
    qc = json.loads((mixed / "config.json").read_text())["quantization_config"]
    assert "-:^model\\.layers\\.0\\.self_attn\\.k_proj$" in qc["dynamic"]


def qc_of(cfg):
    return cfg["quantization_config"]


@pytest.mark.parametrize("edit,needle", [
    (lambda c: qc_of(c).update(bits=7), "bits = 7"),
    (lambda c: qc_of(c).update(group_size=64), "group_size = 64"),
    (lambda c: qc_of(c).update(sym=True), "sym = True"),
    (lambda c: qc_of(c).update(desc_act=True), "desc_act = True"),
    (lambda c: qc_of(c)["compress"]["scheme"].update(bits=7), "bits must be one of"),
    (lambda c: qc_of(c)["compress"]["modules"]["model.layers.1.mlp.up_proj"].update(bits=8), "dynamic rule"),
    (lambda c: qc_of(c)["dynamic"].pop("+:^model\\.layers\\.0\\.mlp\\.down_proj$"), "dynamic rule"),
    (lambda c: qc_of(c)["dynamic"].update({"+:^model\\.layers\\.9\\.mlp\\.up_proj$": {"bits": 8}}),
     "names no quantized module"),
    (lambda c: qc_of(c)["compress"]["modules"].pop("model.layers.1.mlp.up_proj"), "do not list"),
    (lambda c: qc_of(c)["compress"].update(format_version=9), "format version 9"),
    (lambda c: qc_of(c)["compress"]["modules"]["model.layers.1.mlp.up_proj"].update(group_size=64),
     "dynamic rule"),
])
def test_tampered_config_is_refused(mixed, tiny_data, tmp_path, edit, needle):
    bad = _copy(mixed, tmp_path / "bad", edit_config=edit)
    assert_clean_error(_ppl(bad, tiny_data), needle)
    assert_clean_error(run(["inspect", bad]), needle)


def test_tensor_shapes_must_match_the_records(mixed, tiny_data, tmp_path):
    def halve_groups(t):
        t["model.layers.0.mlp.gate_proj.scales"] = t["model.layers.0.mlp.gate_proj.scales"][:2].contiguous()
    assert_clean_error(_ppl(_copy(mixed, tmp_path / "a", edit_tensors=halve_groups), tiny_data),
                       "gate_proj.scales has shape (2, 192), expected (3, 192)")

    def shuffle_gidx(t):
        t["model.layers.0.mlp.up_proj.g_idx"] = t["model.layers.0.mlp.up_proj.g_idx"].flip(0).contiguous()
    assert_clean_error(_ppl(_copy(mixed, tmp_path / "b", edit_tensors=shuffle_gidx), tiny_data),
                       "g_idx does not follow group size 32")

    def drop(t):
        del t["model.layers.1.mlp.down_proj.qweight"]
    assert_clean_error(_ppl(_copy(mixed, tmp_path / "c", edit_tensors=drop), tiny_data),
                       "down_proj.qweight", "missing")


def test_version_1_checkpoint_still_loads(tiny_llama, tiny_data, tmp_path):
    """A uniform checkpoint as version 1 wrote it (no per-module records, no dynamic rules)."""
    v2 = tmp_path / "v2"
    assert run(["quantize", tiny_llama, "--bits", "4", "--group-size", "32", "-o", v2]).exit_code == 0

    def to_v1(c):
        m = qc_of(c)["compress"]
        m["format_version"] = 1
        m["scheme"]["format_version"] = 1
        del m["modules"]
    v1 = _copy(v2, tmp_path / "v1", edit_config=to_v1)
    a, b = models.load(str(v1)), models.load(str(v2))
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    res = run(["inspect", v1])
    assert res.exit_code == 0 and "gptq-int v1" in res.output, res.output
    # a version-1 config whose top level disagrees with its record is refused as well
    bad = _copy(v1, tmp_path / "bad", edit_config=lambda c: qc_of(c).update(bits=7))
    assert_clean_error(_ppl(bad, tiny_data), "bits = 7")

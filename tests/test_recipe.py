"""Recipes: validated in full before any work; `compress quantize` is a one-step recipe; targets,
ignore and per-module schemes; evaluation and export steps."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compress import models
from compress.errors import CompressError
from compress.qlinear import QuantLinear
from compress.recipe import Recipe
from tests.test_cli import assert_clean_error, run


def _write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("data,needle", [
    ({"steps": [{"method": "gptq", "bitz": 4}]}, "step 1 (gptq): unknown option 'bitz'"),
    ({"steps": [{"method": "rtn"}, {"method": "nope"}]}, "unknown method 'nope'"),
    ({"steps": [{"method": "gptq", "bits": 5}]}, "step 1 (gptq): --bits must be one of 2, 3, 4, 8"),
    ({"steps": [{"method": "rtn", "overrides": [{"targets": ["down_proj"], "bits": 7}]}]}, "override"),
    ({"steps": [{"method": "rtn", "overrides": [{"targets": ["down_proj"], "alpha": 0.5}]}]}, "override"),
    ({"steps": [{"method": "rtn", "targets": ["re:("]}]}, "bad target pattern"),
    ({"steps": [{"method": "rtn"}], "extra": 1}, "unknown key 'extra'"),
    ({"steps": []}, "non-empty list"),
    ({"steps": [{"eval": {}}]}, "at least one compression step"),
    ({"steps": [{"method": "rtn"}, {"eval": {"protocol": "wt9"}}]}, "step 2 (eval): protocol"),
    ({"steps": [{"method": "rtn"}, {"export": {"format": "tflite", "out": "x"}}]}, "step 2 (export)"),
    ({"steps": [{"method": "rtn"}, {"export": {"format": "gguf", "out": "x.bin"}}]}, "must end with .gguf"),
    ({"steps": [{"method": "rtn"}, {"export": {"format": "onnx"}}]}, "'out'"),
    ({"steps": [{"method": "rtn"}, {"eval": {}}, {"method": "gptq"}]}, "step 3: compression steps come before"),
    ({"steps": [{"method": "rtn"}, {"method": "smoothquant"}]}, "different formats"),
    ({"steps": [{"method": "kquant", "type": "Q4_K_M"}, {"method": "rtn"}]}, "only compression step"),
    ({"steps": [{"method": "awq", "lm_head": True}]}, "lm_head"),
    ({"calibration": {"nsamples": 4}, "steps": [{"method": "rtn"}]}, "calibration options apply"),
    ({"calibration": {"samples": 4}, "steps": [{"method": "gptq"}]}, "unknown calibration key 'samples'"),
    ({"steps": [{"method": "gptq", "eval": {}}]}, "exactly one of"),
])
def test_recipe_errors_name_the_step(tmp_path, tiny_llama, data, needle):
    with pytest.raises(CompressError, match=None) as e:
        Recipe.from_dict(data)
    assert needle in str(e.value), str(e.value)
    res = run(["run", _write(tmp_path, data), "--model", tiny_llama, "-o", tmp_path / "o"])
    assert_clean_error(res, needle)
    assert not (tmp_path / "o").exists()


def test_not_yaml_and_missing_file(tmp_path, tiny_llama):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [method: {")
    assert_clean_error(run(["run", bad, "--model", tiny_llama, "-o", tmp_path / "o"]), "not valid YAML")
    assert_clean_error(run(["run", tmp_path / "none.yaml", "-o", tmp_path / "o"]), "cannot read recipe")
    ok = _write(tmp_path, {"steps": [{"method": "rtn"}]})
    assert_clean_error(run(["run", ok, "-o", tmp_path / "o"]), "no model")


def test_quantize_is_a_one_step_recipe(tmp_path, tiny_llama, tiny_data):
    """--save-recipe writes what the command ran; `compress run` of it writes the same bytes."""
    a, rec = tmp_path / "a", tmp_path / "q.yaml"
    res = run(["quantize", tiny_llama, "--method", "gptq", "--bits", "3", "--group-size", "32", "--act-order",
               "--nsamples", "4", "--seqlen", "32", "--data-dir", tiny_data, "--ignore", "re:.*k_proj",
               "--save-recipe", rec, "-o", a])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(rec.read_text())
    assert data["model"] == str(tiny_llama)
    assert data["steps"] == [{"method": "gptq", "bits": 3, "group_size": 32, "sym": False, "act_order": True,
                              "static_groups": True, "damp": 0.01, "block_size": 128, "grid": "minmax",
                              "true_sequential": False,
                              "ignore": ["re:.*k_proj"]}]
    assert data["calibration"] == {"source": "wikitext2", "nsamples": 4, "seqlen": 32, "seed": 0}
    b = tmp_path / "b"
    res = run(["run", rec, "--data-dir", tiny_data, "-o", b])
    assert res.exit_code == 0, res.output
    for f in ("model.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_mixed_precision_recipe_with_eval_and_export(tmp_path, tiny_llama, tiny_data):
    """8-bit down_proj in the first and last block, 4-bit elsewhere, q/k left dense; evaluated and
    exported to GGUF in the same run."""
    recipe = {
        "calibration": {"nsamples": 4, "seqlen": 32},
        "steps": [
            {"method": "gptq", "bits": 4, "group_size": 32, "ignore": ["re:.*\\.(q|k)_proj"],
             "overrides": [{"targets": ["re:model\\.layers\\.(0|1)\\.mlp\\.down_proj"], "bits": 8,
                            "group_size": -1, "sym": True}]},
            {"eval": {"protocol": "wt2-quick", "max_windows": 2, "base": True}},
            {"export": {"format": "gguf", "out": str(tmp_path / "m.gguf")}},
        ]}
    out, rep_path = tmp_path / "mixed", tmp_path / "report.json"
    res = run(["run", _write(tmp_path, recipe), "--model", tiny_llama, "--data-dir", tiny_data, "-o", out,
               "--report", rep_path])
    assert res.exit_code == 0, res.output
    assert "eval wt2-quick: ppl" in res.output and "exported gguf" in res.output
    rep = json.loads(rep_path.read_text())
    assert rep["modules"] == 2 * 5 and rep["post"][0]["eval"]["kld"] > 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["compress"]["format_version"] == 2
    dyn = qc["dynamic"]
    assert dyn["+:^model\\.layers\\.0\\.mlp\\.down_proj$"] == {"bits": 8, "group_size": -1, "desc_act": True,
                                                                "sym": True}
    assert "-:^model\\.layers\\.1\\.self_attn\\.q_proj$" in dyn
    assert qc["compress"]["modules"]["model.layers.1.mlp.up_proj"]["bits"] == 4
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (192 * 8 // 32, 96)
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (1, 96)
    assert t["model.layers.0.mlp.up_proj.qweight"].shape == (96 * 4 // 32, 192)
    assert "model.layers.0.self_attn.q_proj.weight" in t and "model.layers.0.self_attn.q_proj.qweight" not in t
    loaded = models.load(str(out))
    down = loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.bits == 8
    assert isinstance(loaded.model.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    info = json.loads(run(["inspect", out, "--json"]).output)
    assert sorted({(l["bits"], l["groups"]) for l in info["layers"]}) == [(4, 3), (8, 1)]
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q4_1"
    assert types["blk.0.attn_q.weight"] == "F16"


def test_targets_that_match_nothing_and_explicit_targets(tmp_path, tiny_llama):
    assert_clean_error(run(["quantize", tiny_llama, "--targets", "re:.*gate", "-o", tmp_path / "o"]),
                       "match no linear")
    out = tmp_path / "t"
    res = run(["quantize", tiny_llama, "--group-size", "32", "--targets", "mlp.down_proj", "-o", out])
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["compress"]["quantized_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_two_steps_compress_disjoint_modules(tmp_path, tiny_llama, tiny_data):
    recipe = {"calibration": {"nsamples": 4, "seqlen": 32},
              "steps": [{"method": "awq", "bits": 4, "group_size": 32, "targets": ["re:.*mlp\\..*"]},
                        {"method": "gptq", "bits": 3, "group_size": 32}]}
    out = tmp_path / "two"
    res = run(["run", _write(tmp_path, recipe), "--model", tiny_llama, "--data-dir", tiny_data, "-o", out])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["compress"]
    assert meta["method"] == "awq,gptq"
    assert [s["method"] for s in meta["steps"]] == ["awq", "gptq"]
    assert meta["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 4
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["bits"] == 3
    assert len(meta["modules"]) == 14


def test_onnx_export_step_with_a_target(tmp_path, tiny_llama):
    """An export step takes the ONNX target; an option that contradicts it stops the run before
    any work."""
    pytest.importorskip("onnxruntime")
    recipe = {"steps": [{"method": "rtn", "bits": 4, "group_size": 32},
                        {"export": {"format": "onnx", "target": "prefill", "out": str(tmp_path / "onnx")}}]}
    res = run(["run", _write(tmp_path, recipe), "--model", tiny_llama, "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "onnx" / "export_info.json").read_text())
    assert (info["target"], info["weights_at_load"]) == ("prefill", "float")
    recipe["steps"][1]["export"].update(out=str(tmp_path / "onnx2"), fmt="matmulnbits")
    res = run(["run", _write(tmp_path, recipe, "bad.yaml"), "--model", tiny_llama, "-o", tmp_path / "q2"])
    assert_clean_error(res, "step 2 (export onnx)", "does not go with the matmulnbits format")
    assert not (tmp_path / "q2").exists()

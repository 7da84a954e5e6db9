"""The ONNX commands end to end through the CLI on a tiny model."""
import json

import pytest

from tests.test_cli import assert_clean_error, run


@pytest.fixture(scope="module")
def q8(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnxcli") / "q8"
    assert run(["quantize", tiny_llama, "--bits", "8", "--group-size", "32", "-o", out]).exit_code == 0
    return out


def test_export_eval_generate(q8, tiny_llama, tiny_data, tmp_path):
    onnx_dir = tmp_path / "onnx"
    res = run(["export", "onnx", q8, "-o", onnx_dir])
    assert res.exit_code == 0, res.output
    assert (onnx_dir / "model.onnx").is_file() and (onnx_dir / "tokenizer.json").is_file()
    a, b = tmp_path / "ort.json", tmp_path / "torch.json"
    res = run(["eval", "ppl", onnx_dir, "--runtime", "onnxruntime", "--max-windows", 2, "--data-dir", tiny_data,
               "--json", a])
    assert res.exit_code == 0, res.output
    assert run(["eval", "ppl", q8, "--max-windows", 2, "--data-dir", tiny_data, "--json", b]).exit_code == 0
    ort, ref = json.loads(a.read_text()), json.loads(b.read_text())
    assert ort["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    g1 = run(["generate", onnx_dir, "--runtime", "onnxruntime", "--prompt", "the river", "--max-new-tokens", 12])
    g2 = run(["generate", q8, "--prompt", "the river", "--max-new-tokens", 12])
    assert g1.exit_code == 0 and g2.exit_code == 0
    assert g1.stdout == g2.stdout


def test_export_bad_input(tiny_opt, tmp_path):
    assert_clean_error(run(["export", "onnx", tmp_path / "missing", "-o", tmp_path / "o"]), "no such file")
    res = run(["export", "onnx", tiny_opt, "-o", tmp_path / "o"])
    assert_clean_error(res, "onnx export supports")
    assert not (tmp_path / "o").exists()
    res = run(["export", "onnx", tiny_opt, "--format", "int3", "-o", tmp_path / "o"])
    assert res.exit_code == 2 and "Invalid value" in res.output

"""ONNX export targets: balanced (level 0), decode (level 4), prefill (4-bit file, weights expanded
to fp32 when ONNX Runtime loads it). What ONNX Runtime makes of each folder is read back from the
graph it optimizes, with the session config our runtime and ONNX Runtime GenAI use."""
from __future__ import annotations

import json

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from compress import api, models  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.export import genai  # noqa: E402
from compress.export import onnx as xo  # noqa: E402
from compress.runtime_onnx import OnnxCausalLM  # noqa: E402
from tests.conftest import build_tiny  # noqa: E402
from tests.test_cli import assert_clean_error, run  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny GroupQueryAttention-sized model, 4-bit, asymmetric groups of 32."""
    root = tmp_path_factory.mktemp("targets")
    model = build_tiny(root / "llama192", "llama", seed=1, hidden=192, ffn=320)
    out = root / "ckpt"
    api.quantize_to_folder(str(model), out, progress=False, bits=4, group_size=32, sym=False)
    return out


def optimized_ops(folder, tmp_path, config: dict) -> dict:
    """Op type -> count in the graph ONNX Runtime runs for ``folder`` with session ``config``, and
    under ``"weights"`` the sorted (element type, shape) of its initializers."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / xo.MODEL_FILE), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    ops["weights"] = sorted((t.data_type, tuple(t.dims)) for t in m.graph.initializer)
    return ops


def test_prefill_target_expands_the_weights_at_load(ckpt, tmp_path):
    loaded = models.load(str(ckpt))
    info = xo.export_onnx(loaded, tmp_path / "pre", target="prefill")
    assert (info["target"], info["format"], info["weights_at_load"], info["contrib_ops"]) == \
        ("prefill", "qdq", "float", True)
    assert info["model"]["attention"] == "GroupQueryAttention"
    cfg = json.loads((tmp_path / "pre" / genai.CONFIG_FILE).read_text())
    assert cfg["model"]["decoder"]["session_options"][xo.FOLD_AT_LOAD] == "1"
    assert cfg["search"]["past_present_share_buffer"] is True
    # the file holds 4-bit weights: about the qdq format's size, far under the fp32 model's
    xo.export_onnx(loaded, tmp_path / "qdq", fmt="qdq")
    xo.export_onnx(str(ckpt.parent / "llama192"), tmp_path / "fp32")
    size = xo.file_sizes(tmp_path / "pre")["total"]
    assert size < 1.2 * xo.file_sizes(tmp_path / "qdq")["total"]
    assert size < 0.6 * xo.file_sizes(tmp_path / "fp32")["total"]
    # with the folder's session config every DequantizeLinear is folded into fp32 MatMul weights;
    # without it, ONNX Runtime fuses them into MatMulNBits (4-bit weights at run time)
    folded = optimized_ops(tmp_path / "pre", tmp_path, xo.session_config(info))
    assert "DequantizeLinear" not in folded and "MatMulNBits" not in folded
    # after loading, the graph ONNX Runtime runs is the fp32 model's, node for node: the same
    # kernels on float weights of the same shapes, hence fp32 speed on any CPU
    assert folded == optimized_ops(tmp_path / "fp32", tmp_path, {})
    fused = optimized_ops(tmp_path / "pre", tmp_path, {})
    assert fused.get("MatMulNBits", 0) > 0
    # and the numbers are the checkpoint's
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = loaded.model(input_ids=ids, use_cache=False).logits.float()
    ours = OnnxCausalLM(tmp_path / "pre")
    out = ours(input_ids=ids, use_cache=False).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    seq = ours.generate(ids[:, :8], max_new_tokens=6)
    balanced = OnnxCausalLM(xo.export_onnx(loaded, tmp_path / "bal")["out"])
    assert torch.equal(seq, balanced.generate(ids[:, :8], max_new_tokens=6))


def test_decode_and_balanced_targets(ckpt, tmp_path):
    info = xo.export_onnx(str(ckpt), tmp_path / "dec", target="decode")
    assert (info["target"], info["format"], info["accuracy_level"], info["weights_at_load"]) == \
        ("decode", "matmulnbits", 4, "packed")
    info = xo.export_onnx(str(ckpt), tmp_path / "dq", fmt="qdq", target="decode")
    assert xo.session_config(info) == {"session.qdq_matmulnbits_accuracy_level": "4"}
    info = xo.export_onnx(str(ckpt), tmp_path / "bal")
    assert (info["target"], info["format"], info["accuracy_level"]) == ("balanced", "matmulnbits", 0)
    assert xo.session_config(info) == {}


def test_target_errors(ckpt, tmp_path):
    src = str(ckpt)
    for kwargs, msg in [(dict(target="prefill", fmt="matmulnbits"), "does not go with the matmulnbits format"),
                        (dict(target="prefill", accuracy_level=4), "an accuracy level does not apply"),
                        (dict(target="prefill", lm_head_bits=8), "quantize the lm_head in the checkpoint"),
                        (dict(target="decode", accuracy_level=0), "target decode is accuracy level 4"),
                        (dict(target="latency"), "ONNX target must be one of")]:
        with pytest.raises(CompressError, match=msg):
            xo.export_onnx(src, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_target(ckpt, tmp_path):
    res = run(["export", "onnx", ckpt, "--target", "prefill", "-o", tmp_path / "pre"])
    assert res.exit_code == 0, res.output
    assert "qdq, target prefill" in res.output
    info = json.loads((tmp_path / "pre" / xo.INFO_FILE).read_text())
    assert info["weights_at_load"] == "float"
    res = run(["export", "onnx", ckpt, "--target", "prefill", "--format", "matmulnbits", "-o", tmp_path / "bad"])
    assert_clean_error(res, "does not go with the matmulnbits format")
    assert not (tmp_path / "bad").exists()

"""`compress export compressed-tensors`: packed checkpoints rewritten in the layout vLLM loads, read
back with the compressed-tensors library's own packing and decompressors (and by transformers'
compressed-tensors integration) to the suite's own weights; what the layout cannot hold is refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compress import models
from compress.compat import TRANSFORMERS_MAJOR
from tests.test_cli import assert_clean_error, run

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors (test extra) is not installed")
CAL = ["--nsamples", 8, "--seqlen", 64]


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_the_librarys(bits, dim):
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32

    from compress.export.compressed_tensors import pack_int32
    lo = -(1 << (bits - 1))
    v = torch.randint(lo, -lo, (13, 21), generator=torch.Generator().manual_seed(bits + dim), dtype=torch.int8)
    assert torch.equal(pack_int32(v, bits, dim), pack_to_int32(v, bits, packed_dim=dim))


def _decompress(folder, name, group):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = load_file(folder / "model.safetensors")
    data = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".") and k != name + ".bias"}
    args = QuantizationArgs(**cfg["config_groups"][group]["weights"])
    return BaseCompressor.load_from_registry(cfg["format"]).decompress_weight(data, quantization_args=args)


@pytest.mark.parametrize("case", [
    ("gptq", ["--bits", 4, "--group-size", 32, "--act-order", "--no-static-groups"]),   # permuted groups
    ("rtn", ["--bits", 4, "--group-size", 32, "--sym"]),
    ("rtn", ["--bits", 8, "--group-size", -1]),                                           # per channel
], ids=["gptq4-actorder", "rtn4-sym", "rtn8-channel"])
def test_library_decompresses_our_weights(case, tiny_llama, env, tmp_path):
    method, args = case
    res = run(["quantize", tiny_llama, "--method", method, *args, *(CAL if method == "gptq" else []),
               "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    res = run(["export", "compressed-tensors", tmp_path / "q", "-o", tmp_path / "ct"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(cfg)                          # the library's own schema
    assert cfg["format"] == CompressionFormat.pack_quantized.value
    ours = models.load(str(tmp_path / "q"))
    (group, scheme), = cfg["config_groups"].items()
    assert (scheme["weights"]["actorder"] == "group") == (method == "gptq")
    for name in scheme["targets"]:
        w = _decompress(tmp_path / "ct", name, group)
        assert torch.equal(w.to(torch.float16), ours.model.get_submodule(name).dequantize().to(torch.float16)), name


@pytest.mark.skipif(TRANSFORMERS_MAJOR >= 5, reason="compressed-tensors 0.14 (the reader pinned here) "
                    "declares transformers<5; transformers 5's integration needs a later release")
def test_transformers_loads_the_export_with_our_logits(tiny_llama, env, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    assert run(["quantize", tiny_llama, "--method", "rtn", "--bits", 4, "--group-size", 32, "--dtype", "float32",
                "-o", tmp_path / "q"]).exit_code == 0
    assert run(["export", "compressed-tensors", tmp_path / "q", "--dtype", "float32", "-o", tmp_path / "ct"]).exit_code == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(ids).logits, models.load(str(tmp_path / "q")).model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_w8a8_exports_as_int_quantized(tiny_llama, env, tmp_path):
    res = run(["quantize", tiny_llama, "--method", "smoothquant", *CAL, "-o", tmp_path / "sq"])
    assert res.exit_code == 0, res.output
    assert run(["export", "compressed-tensors", tmp_path / "sq", "-o", tmp_path / "ct"]).exit_code == 0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group, scheme), = cfg["config_groups"].items()
    assert cfg["format"] == "int-quantized" and scheme["input_activations"]["dynamic"] is True
    ours = models.load(str(tmp_path / "sq"))
    for name in scheme["targets"]:
        torch.testing.assert_close(_decompress(tmp_path / "ct", name, group).float(),
                                   ours.model.get_submodule(name).dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["3-bit", "float"])
def test_what_the_layout_cannot_hold_is_refused(case, tiny_llama, env, tmp_path):
    src = tiny_llama
    if case == "3-bit":
        src = tmp_path / "q3"
        assert run(["quantize", tiny_llama, "--method", "rtn", "--bits", 3, "--group-size", 32, "-o", src]).exit_code == 0
    res = run(["export", "compressed-tensors", src, "-o", tmp_path / "ct"])
    assert_clean_error(res, "3-bit" if case == "3-bit" else "not a packed checkpoint")
    assert not (tmp_path / "ct").exists()


def test_quantize_and_prune_write_compressed_tensors_directly(tiny_llama, env, tmp_path):
    res = run(["quantize", tiny_llama, "--method", "rtn", "--bits", 4, "--group-size", 32, "--format",
               "compressed-tensors", "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and not (tmp_path / ".q.packed").exists()
    assert run(["quantize", tiny_llama, "--method", "rtn", "--bits", 4, "--group-size", 32, "-o", tmp_path / "p"]).exit_code == 0
    assert run(["export", "compressed-tensors", tmp_path / "p", "-o", tmp_path / "e"]).exit_code == 0
    a, b = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "e" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = run(["prune", tiny_llama, "--method", "magnitude", "--sparsity", 0.5, "--format", "compressed-tensors",
               "-o", tmp_path / "s"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]["sparsity_config"]

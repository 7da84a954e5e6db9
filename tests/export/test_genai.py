"""ONNX Runtime GenAI runs the exported folder: genai_config.json, same greedy tokens as our runtime.

``tiny_llama`` (head_dim 24) exports standard-op attention with a concatenating KV cache;
``tiny_gqa`` (head_dim 48) exports GroupQueryAttention, which GenAI runs with one shared
past/present buffer per layer.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                         "onnxruntime-genai==0.17.1)")

from compress.errors import CompressError  # noqa: E402
from compress.export import genai  # noqa: E402
from compress.runtime_onnx import OnnxCausalLM  # noqa: E402
from tests.conftest import build_tiny  # noqa: E402
from tests.test_cli import run  # noqa: E402

NEW_TOKENS = 8
PROMPT = [248, 211, 146, 123, 161, 251, 282]


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama192", "llama", seed=1, hidden=192, ffn=320)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama, tiny_gqa):
    """Quantize (RTN 4-bit g32) and export through the CLI, once per (model, format, kv cache)."""
    root = tmp_path_factory.mktemp("genai")
    models = {"tiny_llama": tiny_llama, "tiny_gqa": tiny_gqa}
    cache = {}

    def make(name, fmt="matmulnbits", kv=True):
        key = (name, fmt, kv)
        if name not in models:          # another family's tiny model
            models[name] = build_tiny(root / name, name, seed=3)
        if key not in cache:
            ckpt = root / f"{name}-ckpt"
            if not ckpt.exists():
                res = run(["quantize", models[name], "--method", "rtn", "--bits", 4, "--group-size", 32, "-o", ckpt])
                assert res.exit_code == 0, res.output
            out = root / f"{name}-{fmt}-{'kv' if kv else 'nokv'}"
            how = ["--target", "prefill"] if fmt == "prefill" else ["--format", fmt]
            res = run(["export", "onnx", ckpt, *how, "--kv-cache" if kv else "--no-kv-cache", "-o", out])
            assert res.exit_code == 0, res.output
            cache[key] = out
        return cache[key]
    return make


def genai_greedy(out_dir, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """GenAI's greedy continuation of ``prompt`` and its logits after the prompt."""
    model = og.Model(str(out_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    first = np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):], first


@pytest.mark.parametrize("name,fmt,shared", [("tiny_llama", "matmulnbits", False), ("tiny_gqa", "matmulnbits", True),
                                             ("tiny_gqa", "qdq", False), ("qwen3", "matmulnbits", True),
                                             ("phi3", "matmulnbits", False), ("gemma3_text", "matmulnbits", True),
                                             ("gemma2", "qdq", False), ("tiny_gqa", "prefill", True)])
def test_genai_greedy_matches_onnx_runtime(exported, name, fmt, shared):
    out = exported(name, fmt)
    cfg = json.loads((out / genai.CONFIG_FILE).read_text())
    assert cfg["search"]["past_present_share_buffer"] is shared
    ours = OnnxCausalLM(out)
    eos = cfg["model"]["eos_token_id"]
    want = ours.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, eos_token_id=eos)[0, len(PROMPT):].tolist()
    got, logits = genai_greedy(out, PROMPT, NEW_TOKENS)
    assert got == want
    assert len(set(want)) > 1 or name == "gemma3_text"   # the tiny random Gemma 3 repeats one token
    ref = ours(input_ids=torch.tensor([PROMPT])).logits[0, -1].numpy()
    assert float(np.abs(logits - ref).max() / np.abs(ref).max()) < 1e-5


def test_genai_config_names_the_graph(exported):
    out = exported("tiny_llama")
    cfg = json.loads((out / genai.CONFIG_FILE).read_text())
    info = json.loads((out / "export_info.json").read_text())
    dec = cfg["model"]["decoder"]
    assert info["genai_config"] == genai.CONFIG_FILE
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                             "past_value_names": "past_key_values.%d.value"}
    assert dec["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                              "present_value_names": "present.%d.value"}
    m = info["model"]
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"],
                                    m["hidden_size"])
    assert (cfg["model"]["type"], cfg["model"]["vocab_size"], cfg["model"]["eos_token_id"]) == ("llama", 320, 0)
    assert "session.qdq_matmulnbits_accuracy_level" not in dec["session_options"]


def test_qdq_config_pins_accuracy_level(exported):
    cfg = json.loads((exported("tiny_gqa", "qdq") / genai.CONFIG_FILE).read_text())
    assert cfg["model"]["decoder"]["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "0"


def test_no_kv_cache_export_has_no_genai_config(exported):
    out = exported("tiny_llama", kv=False)
    assert not (out / genai.CONFIG_FILE).exists()
    assert json.loads((out / "export_info.json").read_text())["genai_config"] is None


def _config(**over):
    names_in = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{kv}" for i in range(2)
                                                                  for kv in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    kw = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_size=24, hidden_size=96, vocab_size=320,
              context_length=1024, eos_token_id=[2, 3], inputs=names_in, outputs=names_out)
    kw.update(over)
    return genai.genai_config(**kw)


def test_genai_config_tokens_and_errors():
    cfg = _config()
    assert cfg["model"]["eos_token_id"] == [2, 3] and cfg["model"]["pad_token_id"] == 2
    assert "bos_token_id" not in cfg["model"]
    with pytest.raises(CompressError, match="present.1.value"):
        _config(outputs=["logits", "present.0.key", "present.0.value", "present.1.key"])
    with pytest.raises(CompressError, match="input_ids"):
        _config(inputs=["inputs_embeds"])
    with pytest.raises(CompressError, match="token_type_ids"):
        _config(inputs=["input_ids", "token_type_ids"])
    with pytest.raises(CompressError, match="eos_token_id"):
        _config(eos_token_id=None)

"""``genai_config.json`` for ONNX Runtime GenAI (its "decoder" model schema).

:func:`genai_config` maps an exported decoder's dimensions, special tokens and actual graph
input/output names onto the configuration ``onnxruntime_genai.Model(folder)`` reads;
:func:`write_genai_config` writes it next to ``model.onnx``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import CompressError

log = logging.getLogger(__name__)

CONFIG_FILE = "genai_config.json"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
OPTIONAL_INPUTS = ("attention_mask", "position_ids")


def _layer_names(pattern: str, num_layers: int, names: list[str], side: str) -> str:
    """``pattern`` when the graph has one such name per layer, else a CompressError."""
    missing = [pattern % i for i in range(num_layers) if pattern % i not in names]
    if missing:
        raise CompressError(f"ONNX Runtime GenAI needs the {side} {pattern % 0!r} ... for every layer; "
                            f"the graph lacks {', '.join(missing[:4])}")
    return pattern


def _decoder_inputs(inputs: list[str], num_layers: int) -> dict:
    """The decoder's ``inputs`` section from the graph's input names."""
    if "input_ids" not in inputs:
        raise CompressError("ONNX Runtime GenAI feeds token ids through an 'input_ids' graph input")
    out = {"input_ids": "input_ids"}
    out.update({n: n for n in OPTIONAL_INPUTS if n in inputs})
    unknown = [n for n in inputs if n not in out and not n.startswith("past_key_values.")]
    if unknown:
        raise CompressError(f"ONNX Runtime GenAI cannot feed the graph inputs {', '.join(unknown)}")
    out["past_key_names"] = _layer_names(PAST_KEY, num_layers, inputs, "input")
    out["past_value_names"] = _layer_names(PAST_VALUE, num_layers, inputs, "input")
    return out


def _decoder_outputs(outputs: list[str], num_layers: int) -> dict:
    """The decoder's ``outputs`` section from the graph's output names."""
    if "logits" not in outputs:
        raise CompressError("ONNX Runtime GenAI reads a 'logits' graph output")
    return {"logits": "logits",
            "present_key_names": _layer_names(PRESENT_KEY, num_layers, outputs, "output"),
            "present_value_names": _layer_names(PRESENT_VALUE, num_layers, outputs, "output")}


def _token_ids(eos_token_id, bos_token_id, pad_token_id) -> dict:
    """eos (one id or a list), bos and pad ids; pad falls back to the first eos id."""
    eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not eos or any(e is None for e in eos):
        raise CompressError("ONNX Runtime GenAI needs an eos_token_id (config.json, generation_config.json "
                            "or the tokenizer)")
    eos = [int(e) for e in eos]
    out = {"eos_token_id": eos[0] if len(eos) == 1 else eos,
           "pad_token_id": int(eos[0] if pad_token_id is None else pad_token_id)}
    if bos_token_id is not None:
        out["bos_token_id"] = int(bos_token_id)
    return out


def _search(context_length: int, share_buffer: bool) -> dict:
    """Greedy search by default, up to the context length."""
    return {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": int(context_length), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": bool(share_buffer),
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def genai_config(*, num_layers: int, num_heads: int, num_kv_heads: int, head_size: int, hidden_size: int,
                 vocab_size: int, context_length: int, eos_token_id, bos_token_id=None, pad_token_id=None,
                 inputs: list[str], outputs: list[str], model_type: str = "llama", filename: str = "model.onnx",
                 share_buffer: bool = False, session_config: dict | None = None) -> dict:
    """The ``genai_config.json`` content for a decoder graph with a KV cache.

    ``inputs`` / ``outputs``: the graph's input and output names (``input_ids``, optional
    ``attention_mask`` / ``position_ids``, ``past_key_values.{i}.key|value`` -> ``logits``,
    ``present.{i}.key|value``). ``share_buffer``: GenAI binds one max-length buffer per layer as
    both past and present (only for attention that writes the new positions in place).
    ``session_config``: ONNX Runtime session config entries (string values).
    Raises CompressError when the graph lacks a tensor GenAI feeds or reads.
    """
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    session.update({k: str(v) for k, v in (session_config or {}).items()})
    decoder = {"session_options": session, "filename": filename, "head_size": int(head_size),
               "hidden_size": int(hidden_size), "inputs": _decoder_inputs(list(inputs), num_layers),
               "outputs": _decoder_outputs(list(outputs), num_layers), "num_attention_heads": int(num_heads),
               "num_hidden_layers": int(num_layers), "num_key_value_heads": int(num_kv_heads)}
    model = {"context_length": int(context_length), "decoder": decoder, "type": model_type,
             "vocab_size": int(vocab_size), **_token_ids(eos_token_id, bos_token_id, pad_token_id)}
    return {"model": model, "search": _search(context_length, share_buffer)}


def write_genai_config(out_dir, **kwargs) -> Path:
    """Write :func:`genai_config` (same keyword arguments) as ``out_dir/genai_config.json``."""
    path = Path(out_dir) / CONFIG_FILE
    path.write_text(json.dumps(genai_config(**kwargs), indent=2))
    return path


def _special_token(loaded, key: str):
    """A special token id from generation_config.json, config.json or the tokenizer (first found)."""
    for src in (getattr(loaded.model, "generation_config", None), loaded.model.config, loaded.tokenizer):
        value = getattr(src, key, None) if src is not None else None
        if value is not None:
            return value
    return None


def write_for_export(out_dir: Path, loaded, session: dict, meta: dict, info: dict,
                     filename: str) -> str | None:
    """Write genai_config.json for a KV-cache ONNX export (``session``: its ONNX Runtime session
    config entries; ``meta``/``info``: the export's model description and graph names); its file
    name, or None (with a warning) without an eos token id."""
    eos = _special_token(loaded, "eos_token_id")
    if eos is None:
        log.warning("no eos_token_id in the model's configs or tokenizer: %s not written", CONFIG_FILE)
        return None
    write_genai_config(out_dir, num_layers=meta["num_layers"], num_heads=meta["num_heads"],
                       num_kv_heads=meta["num_kv_heads"], head_size=meta["head_dim"], hidden_size=meta["hidden_size"],
                       vocab_size=meta["vocab_size"], context_length=meta["max_position_embeddings"],
                       eos_token_id=eos, bos_token_id=_special_token(loaded, "bos_token_id"),
                       pad_token_id=_special_token(loaded, "pad_token_id"), inputs=info["inputs"],
                       outputs=info["outputs"], model_type=meta["model_type"], filename=filename,
                       share_buffer=meta["attention"] == "GroupQueryAttention", session_config=session)
    return CONFIG_FILE

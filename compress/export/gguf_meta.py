"""GGUF metadata: the model's keys (:func:`model_metadata`) and the tokenizer's, copied from a
source GGUF or derived from ``tokenizer.json`` (:func:`tokenizer_metadata`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CompressError
from ..formats.gguf_file import read_gguf_layout
from .gguf_arch import LEARNED_POSITION_ARCHS, LAYER_NORM_ARCHS, QUANTIZATION_VERSION, HParams
from .gguf_vocab import tokenizer_from_folder

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------

@dataclass
class KV:
    key: str
    value: object
    vtype: object                 # gguf.GGUFValueType
    sub_type: object = None


def _kv_from_field(key: str, f) -> KV:
    from gguf import GGUFValueType
    t0 = f.types[0]
    if t0 == GGUFValueType.ARRAY:
        return KV(key, f.contents(), t0, f.types[-1])
    return KV(key, f.contents(), t0)


def source_gguf_for(loaded) -> Path | None:
    """The original GGUF a model came from, when one is known and on disk."""
    from .. import models
    if loaded.kind == "gguf":
        return Path(loaded.path)
    cand = []
    if loaded.kind in ("hf", "folder"):
        cand.append(Path(loaded.path) / "source.gguf")
    src = (loaded.quant or {}).get("source_model")
    if src:
        if src in models.REGISTRY:
            p = models.source_gguf(src)
            if p is not None:
                cand.append(p)
        else:
            p = Path(src).expanduser()
            cand.append(p if p.suffix == ".gguf" else p / "source.gguf")
    return next((p for p in cand if p.is_file()), None)


_GENERAL_COPY = ("general.name", "general.organization", "general.finetune", "general.basename",
                 "general.size_label", "general.license", "general.languages")


def metadata_from_source(path: Path, vocab: int) -> tuple[list[KV], list[KV]]:
    """``tokenizer.*`` and descriptive ``general.*`` keys of an existing GGUF, copied as they are."""
    from gguf import GGUFReader
    read_gguf_layout(Path(path))          # a one-line error for a damaged file, before the reader sees it
    r = GGUFReader(str(path))
    tok = [_kv_from_field(k, f) for k, f in r.fields.items() if k.startswith("tokenizer.")]
    gen = [_kv_from_field(k, r.fields[k]) for k in _GENERAL_COPY if k in r.fields]
    tokens = r.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CompressError(f"{path} has no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab:
        raise CompressError(f"the tokenizer of {path} has {len(tokens.data)} tokens, the model's vocabulary {vocab}")
    return tok, gen


def model_metadata(hp: HParams, file_type: int, name: str, general: list[KV] | None = None,
                   extra: dict | None = None) -> list[KV]:
    from gguf import GGUFValueType as T
    a = hp.arch
    kvs = [KV("general.type", "model", T.STRING)]
    general = [g for g in (general or []) if g.key != "general.type"]
    if not any(g.key == "general.name" for g in general):
        kvs.append(KV("general.name", name, T.STRING))
    kvs += general
    kvs += [KV(f"{a}.block_count", hp.n_layer, T.UINT32),
            KV(f"{a}.context_length", hp.n_ctx, T.UINT32),
            KV(f"{a}.embedding_length", hp.n_embd, T.UINT32),
            KV(f"{a}.feed_forward_length", hp.n_ff, T.UINT32),
            KV(f"{a}.attention.head_count", hp.n_head, T.UINT32),
            KV(f"{a}.attention.head_count_kv", hp.n_head_kv, T.UINT32),
            KV(f"{a}.rope.freq_base", hp.rope_theta, T.FLOAT32),
            KV(f"{a}.attention.layer_norm{'' if a in LAYER_NORM_ARCHS else '_rms'}_epsilon", hp.rms_eps, T.FLOAT32),
            KV("general.file_type", int(file_type), T.UINT32),
            KV(f"{a}.vocab_size", hp.vocab, T.UINT32),
            KV(f"{a}.rope.dimension_count", hp.rope_dims or hp.head_dim, T.UINT32)]
    if a in LEARNED_POSITION_ARCHS:    # no rotary keys
        kvs = [kv for kv in kvs if ".rope." not in kv.key]
    family = {f"{a}.{k}": (v, {"u32": T.UINT32, "f32": T.FLOAT32, "str": T.STRING, "bool": T.BOOL}[kind])
              for k, v, kind in hp.family}
    if hp.head_dim * hp.n_head != hp.n_embd:
        family.setdefault(f"{a}.attention.key_length", (hp.head_dim, T.UINT32))
        family.setdefault(f"{a}.attention.value_length", (hp.head_dim, T.UINT32))
    kvs += [KV(k, v, t) for k, (v, t) in family.items()]
    kvs.append(KV("general.quantization_version", QUANTIZATION_VERSION, T.UINT32))
    for k, v in (extra or {}).items():
        if isinstance(v, bool):
            kvs.append(KV(f"compress.{k}", v, T.BOOL))
        elif isinstance(v, (int, np.integer)):
            kvs.append(KV(f"compress.{k}", int(v), T.UINT32 if v >= 0 else T.INT32))
        elif isinstance(v, float):
            kvs.append(KV(f"compress.{k}", v, T.FLOAT32))
        elif isinstance(v, (list, tuple)):
            if v:
                kvs.append(KV(f"compress.{k}", [str(x) for x in v], T.ARRAY, T.STRING))
        elif v is not None and str(v):
            kvs.append(KV(f"compress.{k}", str(v), T.STRING))
    return kvs


def tokenizer_metadata(loaded, hp: HParams) -> tuple[list[KV], list[KV], str]:
    """(tokenizer keys, general keys, where they came from)."""
    src = source_gguf_for(loaded)
    if src is not None:
        tok, gen = metadata_from_source(src, hp.vocab)
        return tok, gen, str(src)
    return tokenizer_from_folder(Path(loaded.path), loaded.model.config, hp.vocab), [], "tokenizer.json"

"""GGUF metadata: the model's keys (:func:`model_metadata`) and the tokenizer's, copied from a
source GGUF or derived from ``tokenizer.json`` (:func:`tokenizer_metadata`)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CompressError
from ..formats.gguf_file import read_gguf_layout
from .gguf_arch import LEARNED_POSITION_ARCHS, LAYER_NORM_ARCHS, QUANTIZATION_VERSION, HParams

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


def tokenizer_from_folder(folder: Path, config, vocab: int) -> list[KV]:
    """Tokenizer keys derived from a Hugging Face ``tokenizer.json`` (byte-level BPE only).

    Token types: added special tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL;
    ids the tokenizer does not cover (vocab padding) become ``[PAD<id>]`` UNUSED, as llama.cpp's
    converter does. The pre-tokenizer is ``gpt-2`` for a lone byte-level pre-tokenizer with GPT-2's
    regex, else ``default`` (llama.cpp names pre-tokenizers by a hash of the tokenizer's behaviour;
    a model with its original GGUF gets that GGUF's keys instead).
    """
    from gguf import GGUFValueType, TokenType
    tj_path = Path(folder) / "tokenizer.json"
    if not tj_path.is_file():
        raise CompressError(f"{folder} has no tokenizer.json: cannot write the GGUF tokenizer")
    try:
        tj = json.loads(tj_path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"corrupt tokenizer.json in {folder}: {e.msg}") from None
    model = tj.get("model") or {}
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise CompressError(f"GGUF export derives only byte-level BPE tokenizers (gpt2 style); {folder} has "
                            f"a {model.get('type')} tokenizer and no original GGUF to copy from")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for a in tj.get("added_tokens", []):
        id_to_tok[int(a["id"])] = a["content"]
        types[int(a["id"])] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    n = max(vocab, max(id_to_tok) + 1)
    if n != vocab:
        raise CompressError(f"the tokenizer in {folder} has ids up to {max(id_to_tok)}, the model's vocabulary is {vocab}")
    tokens, ttypes = [], []
    for i in range(n):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            ttypes.append(types.get(i, int(TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            ttypes.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tc = {}
    if (Path(folder) / "tokenizer_config.json").is_file():
        try:
            tc = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        except json.JSONDecodeError:
            tc = {}
    kvs = [KV("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING),
           KV("tokenizer.ggml.pre", _pre_name(tj.get("pre_tokenizer") or {}, folder), GGUFValueType.STRING),
           KV("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
           KV("tokenizer.ggml.token_type", ttypes, GGUFValueType.ARRAY, GGUFValueType.INT32)]
    if merges:
        kvs.append(KV("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING))
    tok_id = {t: i for i, t in enumerate(tokens)}

    def ident(key, cfg_key):
        v = getattr(config, cfg_key, None)
        if v is None and isinstance(tc.get(key), str):
            v = tok_id.get(tc[key])
        if isinstance(v, list):
            v = v[0] if v else None
        return v

    for key, cfg_key, gkey in (("bos_token", "bos_token_id", "bos_token_id"), ("eos_token", "eos_token_id", "eos_token_id"),
                               ("unk_token", "unk_token_id", "unknown_token_id"), ("pad_token", "pad_token_id", "padding_token_id")):
        v = ident(key, cfg_key)
        if v is not None and 0 <= int(v) < n:
            kvs.append(KV(f"tokenizer.ggml.{gkey}", int(v), GGUFValueType.UINT32))
    kvs.append(KV("tokenizer.ggml.add_bos_token", bool(tc.get("add_bos_token", False)), GGUFValueType.BOOL))
    kvs.append(KV("tokenizer.ggml.add_space_prefix", False, GGUFValueType.BOOL))
    template = tc.get("chat_template")
    if not isinstance(template, str) and (Path(folder) / "chat_template.jinja").is_file():
        template = (Path(folder) / "chat_template.jinja").read_text()
    if isinstance(template, str) and template:
        kvs.append(KV("tokenizer.chat_template", template, GGUFValueType.STRING))
    return kvs


def _pre_name(pre: dict, folder) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre-tokenizer: a lone byte-level
    pre-tokenizer with GPT-2's split regex is llama.cpp's ``gpt-2``; anything else gets
    ``default`` (llama.cpp's generic regex), with a warning."""
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"
    log.warning("%s: pre-tokenizer %s has no llama.cpp name here; writing 'default' (llama.cpp may split "
                "text differently from transformers)", folder, pre.get("type"))
    return "default"


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

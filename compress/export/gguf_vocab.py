"""The GGUF tokenizer keys derived from a Hugging Face ``tokenizer.json`` (when no original GGUF is
there to copy them from), for the two tokenizer kinds llama.cpp runs from such files:

* byte-level BPE (GPT-2 style: SmolLM2, Qwen, Llama 3): llama.cpp's ``gpt2`` model, the vocabulary
  and the merges as they are;
* SentencePiece BPE with byte fallback (Llama 2, Mistral, Phi-3, Gemma, as transformers converts
  their ``tokenizer.model``): llama.cpp's ``llama`` model, which merges the adjacent pair whose
  joined piece has the highest score. The scores are the merges' priorities: a piece scores
  minus the rank of the first merge that makes it (transformers lists a SentencePiece model's
  merges by the joined piece's score), so llama.cpp merges in the order transformers does.
  Byte pieces ``<0xNN>`` are BYTE, the unknown piece UNKNOWN; ``add_space_prefix`` is whether the
  normalizer or pre-tokenizer puts a "▁" before the text.

Token types otherwise: added special tokens CONTROL, other added tokens USER_DEFINED, the rest
NORMAL; ids the tokenizer does not cover (vocabulary padding) become ``[PAD<id>]`` UNUSED, as
llama.cpp's converter writes them.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import CompressError

log = logging.getLogger(__name__)
SPACE = "\u2581"          # SentencePiece's word boundary


def tokenizer_from_folder(folder: Path, config, vocab: int) -> list:
    """The ``tokenizer.*`` keys (:class:`compress.export.gguf_meta.KV`) for a model folder."""
    from gguf import GGUFValueType as T
    from gguf import TokenType

    from .gguf_meta import KV
    folder = Path(folder)
    tj = _json(folder / "tokenizer.json", required=True)
    tc = _json(folder / "tokenizer_config.json") or {}
    model = tj.get("model") or {}
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "ByteLevel" not in pre
    if model.get("type") != "BPE" or not (spm or "ByteLevel" in pre):
        raise CompressError(f"GGUF export derives byte-level BPE and SentencePiece BPE tokenizers; {folder} has "
                            f"a {model.get('type')} tokenizer and no original GGUF to copy from")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for a in tj.get("added_tokens", []):
        id_to_tok[int(a["id"])] = a["content"]
        types[int(a["id"])] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    if max(id_to_tok) + 1 > vocab:
        raise CompressError(f"the tokenizer in {folder} has ids up to {max(id_to_tok)}, the model's vocabulary is {vocab}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tokens, ttypes = [], []
    for i in range(vocab):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            ttypes.append(types.get(i, int(TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            ttypes.append(int(TokenType.UNUSED))
    kvs = [KV("tokenizer.ggml.model", "llama" if spm else "gpt2", T.STRING)]
    if spm:
        unk = model.get("unk_token")
        for i, t in enumerate(tokens):
            if ttypes[i] == int(TokenType.NORMAL) and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                ttypes[i] = int(TokenType.BYTE)
            elif t == unk:
                ttypes[i] = int(TokenType.UNKNOWN)
        kvs += [KV("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
                KV("tokenizer.ggml.scores", merge_scores(tokens, merges), T.ARRAY, T.FLOAT32),
                KV("tokenizer.ggml.token_type", ttypes, T.ARRAY, T.INT32)]
    else:
        kvs += [KV("tokenizer.ggml.pre", _pre_name(tj.get("pre_tokenizer") or {}, folder), T.STRING),
                KV("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
                KV("tokenizer.ggml.token_type", ttypes, T.ARRAY, T.INT32)]
        if merges:
            kvs.append(KV("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING))
    tok_id = {t: i for i, t in enumerate(tokens)}

    def ident(key, cfg_key):
        v = getattr(config, cfg_key, None)
        if v is None and isinstance(tc.get(key), (str, dict)):
            v = tok_id.get(tc[key] if isinstance(tc[key], str) else tc[key].get("content"))
        if isinstance(v, list):
            v = v[0] if v else None
        return v

    for key, cfg_key, gkey in (("bos_token", "bos_token_id", "bos_token_id"), ("eos_token", "eos_token_id", "eos_token_id"),
                               ("unk_token", "unk_token_id", "unknown_token_id"), ("pad_token", "pad_token_id", "padding_token_id")):
        v = ident(key, cfg_key)
        if v is not None and 0 <= int(v) < vocab:
            kvs.append(KV(f"tokenizer.ggml.{gkey}", int(v), T.UINT32))
    kvs.append(KV("tokenizer.ggml.add_bos_token", bool(tc.get("add_bos_token", False)), T.BOOL))
    if spm:
        kvs.append(KV("tokenizer.ggml.add_eos_token", bool(tc.get("add_eos_token", False)), T.BOOL))
    kvs.append(KV("tokenizer.ggml.add_space_prefix", spm and _space_prefix(tj), T.BOOL))
    template = tc.get("chat_template")
    if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, str) and template:
        kvs.append(KV("tokenizer.chat_template", template, T.STRING))
    return kvs


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece scores from the merges' ranks (module doc): minus the rank of the
    first merge making each piece, 0 for pieces no merge makes (single characters, bytes, specials)."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        left, _, right = m.partition(" ")
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _space_prefix(tj: dict) -> bool:
    """The tokenizer puts "▁" before the text: a ``Prepend("▁")`` normalizer, or a Metaspace
    pre-tokenizer that prepends."""
    norm = tj.get("normalizer") or {}
    for n in norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]:
        if n.get("type") == "Prepend" and n.get("prepend") == SPACE:
            return True
    pre = tj.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]:
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


def _json(path: Path, required: bool = False):
    if not path.is_file():
        if required:
            raise CompressError(f"{path.parent} has no {path.name}: cannot write the GGUF tokenizer")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        if required:
            raise CompressError(f"corrupt {path.name} in {path.parent}: {e.msg}") from None
        return None


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

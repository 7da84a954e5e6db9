"""GGUF export: llama.cpp's model file, written with gguf-py's ``GGUFWriter``.

A written file holds

* the architecture metadata llama.cpp's loader reads for ``llama`` (context/embedding/feed-forward
  lengths, block count, head counts, rope base and dimension count, RMS epsilon, vocab size,
  ``general.file_type``, ``general.quantization_version``);
* the tokenizer: copied key for key from the model's original GGUF when there is one (a
  registered model's ``source.gguf``, a ``.gguf`` input, or the source named by a packed
  checkpoint), otherwise derived from ``tokenizer.json`` (byte-level BPE only: ``gpt2`` model,
  tokens, token types, merges, bos/eos/unk/pad ids, ``add_bos_token``);
* every tensor under llama.cpp's name (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``,
  ``output`` only when the embeddings are not tied), with llama.cpp's query/key row permutation
  (the one ``convert_hf_to_gguf.py`` applies for the llama arch and transformers' GGUF loader
  undoes); 1-D tensors float32, 2-D tensors in their GGML type;
* this suite's own keys under ``compress.*`` (method, mix, per-tensor notes), which llama.cpp ignores.

Files are written to a temporary sibling and renamed into place when complete. docs/GGUF.md
describes the mapping and the exporter's choices.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import CompressError
from ..fileio import atomic_file
from ..formats.ggml_mix import FLOAT_TYPES, MIXES, TensorChoice, get_mix, select_types
from ..formats.ggml_model import GGMLModel, GGMLTensor, bits_per_weight, quantize_model_rtn
from ..formats.gguf_file import read_gguf_layout
from ..solvers.ggml_grid import CODECS, pack_codes

log = logging.getLogger(__name__)

# Hugging Face model type -> llama.cpp architecture written
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
              "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2", "gpt_neox": "gptneox"}
SUPPORTED_MODEL_TYPES = tuple(GGUF_ARCHS)
# architectures with LayerNorm (weight and bias) rather than RMSNorm; those with learned positions (no rotary)
LAYER_NORM_ARCHS = ("gpt2", "gptneox")
LEARNED_POSITION_ARCHS = ("gpt2",)
# architectures whose q/k rows llama.cpp's converter permutes (rotary halves interleaved)
PERMUTED_QK = ("llama",)
QUANTIZATION_VERSION = 2

# block-relative Hugging Face module -> llama.cpp tensor base name
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",          # qwen3: per-head norms after the projections
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GLOBAL_INV = {v: k for k, v in GLOBAL_NAMES.items()}
# where a family's block names differ from llama's (as gguf-py's tensor name map has them)
_GEMMA_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
FAMILY_BLOCK_NAMES = {"phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
                      "gemma2": _GEMMA_NAMES, "gemma3": _GEMMA_NAMES,
                      "gpt2": {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}}
FAMILY_BLOCK_NAMES["gptneox"] = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
                                 "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                                 "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
FAMILY_GLOBAL_NAMES = {"gpt2": {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
                                "transformer.ln_f": "output_norm", "lm_head": "output"},
                       "gptneox": {"gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm",
                                   "embed_out": "output"}}
_ORDER = [*BLOCK_NAMES.values(), "attn_qkv", "post_attention_norm", "post_ffw_norm"]


def block_names(gguf_arch: str = "llama") -> dict[str, str]:
    """Block-relative Hugging Face module -> llama.cpp tensor base name, for one llama.cpp arch."""
    names = dict(BLOCK_NAMES)
    for hf, g in FAMILY_BLOCK_NAMES.get(gguf_arch, {}).items():
        names = {k: v for k, v in names.items() if v != g}      # the llama module that had this name
        names[hf] = g
    return names


def global_names(gguf_arch: str = "llama") -> dict[str, str]:
    """Hugging Face module outside the blocks -> llama.cpp tensor base name."""
    return FAMILY_GLOBAL_NAMES.get(gguf_arch, GLOBAL_NAMES)


def gguf_arch(config) -> str:
    """The llama.cpp architecture of a transformers config (llama for types GGUF export refuses)."""
    return GGUF_ARCHS.get(getattr(config, "model_type", None), "llama")

# ggml type name -> the llama_ftype a file made mostly of it carries
_FTYPE_OF_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                  "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}
FTYPE_NAMES = {m.ftype: m.name for m in MIXES.values()}


# --------------------------------------------------------------------------------------------
# names and hyperparameters
# --------------------------------------------------------------------------------------------

def gguf_name(hf_name: str, blocks_prefix: str = "model.layers", arch: str = "llama") -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (llama.cpp's names for
    the llama.cpp architecture ``arch``)."""
    base, _, suffix = hf_name.rpartition(".")
    glob = global_names(arch)
    if base in glob:
        return f"{glob[base]}.{suffix}"
    names = block_names(arch)
    m = re.fullmatch(re.escape(blocks_prefix) + r"\.(\d+)\.(.+)", base)
    if m and m.group(2) in names:
        return f"blk.{m.group(1)}.{names[m.group(2)]}.{suffix}"
    raise CompressError(f"tensor {hf_name} has no llama.cpp name (unsupported module for GGUF export)")


def hf_name(name: str, blocks_prefix: str = "model.layers", arch: str = "llama") -> str:
    """Inverse of :func:`gguf_name`: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, suffix = name.rpartition(".")
    glob = {v: k for k, v in global_names(arch).items()}
    if base in glob:
        return f"{glob[base]}.{suffix}"
    inv = {v: k for k, v in block_names(arch).items()}
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in inv:
        return f"{blocks_prefix}.{m.group(1)}.{inv[m.group(2)]}.{suffix}"
    raise CompressError(f"unknown llama.cpp tensor name {name}")


def check_exportable(config) -> None:
    """Refuse, in one line, a model llama.cpp would run as another function than transformers."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CompressError(f"GGUF export supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}, not '{mt}'")
    rope = getattr(config, "rope_scaling", None)
    if rope and not (mt == "gemma3_text" and (rope.get("rope_type") or rope.get("type")) == "linear"):
        raise CompressError(f"GGUF export does not handle rope scaling ({rope})")
    if mt != "gpt_neox" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise CompressError("GGUF export does not handle linear biases (attention_bias / mlp_bias)")
    if mt in ("gemma2", "gemma3_text"):
        _check_gemma(config, GGUF_ARCHS[mt])


def _check_gemma(config, arch: str) -> None:
    """llama.cpp fixes what Gemma's config.json states: the sliding-window layers (every other one
    for gemma2, five of every six for gemma3), the query scale (1/sqrt(head_dim), or
    1/sqrt(hidden/heads) for the 27B models) and gemma3's local rotary base (10000)."""
    n, every = int(config.num_hidden_layers), {"gemma2": 2, "gemma3": 6}[arch]
    want = ["sliding_attention" if i % every < every - 1 else "full_attention" for i in range(n)]
    if list(getattr(config, "layer_types", None) or want) != want:
        raise CompressError(f"GGUF export: llama.cpp's {arch} makes {'every other layer' if every == 2 else 'every sixth layer'} "
                            f"a full-attention layer; this model's layer_types are {config.layer_types}")
    head_dim = int(config.head_dim)
    qpas = getattr(config, "query_pre_attn_scalar", head_dim)
    big = n in {"gemma2": (46,), "gemma3": (62,)}[arch] and qpas == config.hidden_size // config.num_attention_heads
    if qpas != head_dim and not big:
        raise CompressError(f"GGUF export: llama.cpp's {arch} scales queries by 1/sqrt(head_dim={head_dim}); "
                            f"this model's query_pre_attn_scalar is {qpas}")
    if arch == "gemma3" and float(getattr(config, "rope_local_base_freq", 10000.0)) != 10000.0:
        raise CompressError(f"GGUF export: llama.cpp's gemma3 uses a local rotary base of 10000; this model's "
                            f"rope_local_base_freq is {config.rope_local_base_freq}")


def _family_kvs(config, arch: str, head_dim: int) -> tuple:
    """The metadata llama.cpp's converter writes for a family beyond the llama keys:
    ``(key after '<arch>.', value, 'u32'|'f32'|'str')``."""
    c = config
    if arch == "phi3":
        orig = getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings
        return (("rope.scaling.original_context_length", int(orig), "u32"),
                ("attention.sliding_window", int(getattr(c, "sliding_window", None) or 0), "u32"))
    if arch == "gptneox":
        return (("use_parallel_residual", bool(getattr(c, "use_parallel_residual", True)), "bool"),)
    if arch not in ("gemma2", "gemma3"):
        return ()
    kv = [("attention.key_length", head_dim, "u32"), ("attention.value_length", head_dim, "u32"),
          ("attention.sliding_window", int(c.sliding_window), "u32")]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None) is not None:
            kv.append((key, float(getattr(c, key)), "f32"))
    if getattr(c, "rope_scaling", None):
        kv += [("rope.scaling.type", "linear", "str"), ("rope.scaling.factor", float(c.rope_scaling["factor"]), "f32")]
    return tuple(kv)


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    vocab: int
    tied: bool
    arch: str = "llama"              # llama.cpp architecture
    rope_dims: int = 0               # rotated dimensions of a head (0: all of them)
    family: tuple = ()               # the family's own metadata (:func:`_family_kvs`)

    @property
    def permuted(self) -> bool:
        return self.arch in PERMUTED_QK

    @classmethod
    def from_config(cls, config) -> "HParams":
        check_exportable(config)
        n_head = int(config.num_attention_heads)
        n_embd = int(config.hidden_size)
        head_dim = int(getattr(config, "head_dim", None) or n_embd // n_head)
        arch = GGUF_ARCHS[config.model_type]
        rot = float(getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None) or 1.0)
        n_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * n_embd
        return cls(n_layer=int(config.num_hidden_layers), n_embd=n_embd, n_ff=int(n_ff),
                   n_head=n_head, n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
                   head_dim=head_dim,
                   n_ctx=int(config.max_position_embeddings), rope_theta=float(getattr(config, "rope_theta", 10000.0)),
                   rms_eps=float(getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_epsilon", None)
                                 or config.layer_norm_eps),
                   vocab=int(config.vocab_size),
                   tied=bool(getattr(config, "tie_word_embeddings", False)), arch=arch,
                   rope_dims=int(rot * n_embd) // n_head if rot != 1.0 else head_dim,
                   family=_family_kvs(config, arch, head_dim))


def permute_qk(t: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py, llama arch): within each head the
    rows of the two rotary halves are interleaved. Works on any tensor whose dim 0 is the rows
    (float weights, biases, or uint8 GGUF rows: quantization is row by row, so it commutes)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise CompressError(f"cannot permute {rows} rows into {n_head} heads of two rotary halves")
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def neox_qkv(t: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """GPT-NeoX's fused query_key_value rows, (q, k, v) per head, into llama.cpp's order: every
    head's q rows, then every k, then every v (its converter's reordering); ``inverse`` undoes it.
    Rows only: it applies to quantized rows as well."""
    rows = t.shape[0]
    hd = rows // (3 * n_head)
    if inverse:
        return t.reshape(3, n_head, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t.reshape(n_head, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def model_tensors(model, arch) -> dict[str, torch.Tensor]:
    """GGUF-named float tensors of a (float or dequantized) model, in llama.cpp's file order;
    ``output.weight`` only when the embeddings are not tied."""
    hp_tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    from ..qlinear import QuantLinear, W8A8Linear
    quant = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}
    state = dict(model.state_dict())
    for name, m in quant.items():
        for k in [k for k in state if k.startswith(name + ".")]:
            if k != name + ".bias":
                state.pop(k)
        state[name + ".weight"] = m.dequantize(torch.float32)
    a = gguf_arch(model.config)
    for k, v in state.items():
        if hp_tied and k == arch.lm_head + ".weight":
            continue
        if not v.is_floating_point():
            raise CompressError(f"tensor {k} is not a float tensor; cannot export it to GGUF")
        out[gguf_name(k, arch.blocks, a)] = as_stored(k, v.detach().to(torch.float32).cpu(), a)
    return dict(sorted(out.items(), key=lambda kv: _file_order(kv[0])))


def as_stored(hf: str, t: torch.Tensor, arch: str) -> torch.Tensor:
    """A tensor as llama.cpp (architecture ``arch``) stores it: a Gemma norm's weight with the 1 of
    its (1 + weight) added, as llama.cpp's converter does (its RMSNorm multiplies by the weight)."""
    from ..formats.gguf_tensors import NORM_OFFSET
    if NORM_OFFSET.get(arch) and hf.endswith("norm.weight"):
        return t + NORM_OFFSET[arch]
    return t


class StreamedTensors(Mapping):
    """:func:`model_tensors` of a streamed model (:mod:`compress.stream`): the same GGUF names in
    the same order, each tensor taken from the model when its block is in memory, else read from
    the checkpoint's files when asked for (one at a time)."""

    def __init__(self, model, arch, stream):
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        names = [k for k in model.state_dict(keep_vars=True) if not (tied and k == arch.lm_head + ".weight")]
        self.model, self.stream = model, stream
        a = self.arch = gguf_arch(model.config)
        self.names = dict(sorted(((gguf_name(k, arch.blocks, a), k) for k in names), key=lambda kv: _file_order(kv[0])))

    def _tensor(self, hf: str) -> torch.Tensor:
        mod, _, leaf = hf.rpartition(".")
        return getattr(self.model.get_submodule(mod) if mod else self.model, leaf)

    def shapes(self) -> dict[str, tuple]:
        """Every tensor's shape, from the model (its ``meta`` tensors have them): nothing is read."""
        return {g: tuple(self._tensor(hf).shape) for g, hf in self.names.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        hf = self.names[name]
        t = self._tensor(hf)
        if t.is_meta:
            t = self.stream.read([hf])[hf]
        return as_stored(hf, t.detach().to(torch.float32).cpu(), self.arch)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _file_order(name: str):
    if name.startswith("token_embd"):
        return (0, 0, 0)
    m = re.match(r"blk\.(\d+)\.(\w+)", name)
    if m:
        return (1, int(m.group(1)), _ORDER.index(m.group(2)) if m.group(2) in _ORDER else 99)
    return (2, 0 if name.startswith("output_norm") else 1, 0)


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


# --------------------------------------------------------------------------------------------
# writing and reading
# --------------------------------------------------------------------------------------------

def _np(t: GGMLTensor) -> np.ndarray:
    d = t.data.detach().cpu().contiguous()
    if t.type == "F32":
        return d.to(torch.float32).numpy()
    if t.type == "F16":
        return d.to(torch.float16).numpy()
    return d.to(torch.uint8).numpy()


def write_gguf(path: Path, kvs: list[KV], tensors: list[GGMLTensor], hp: HParams, progress: bool = False) -> Path:
    """Write a GGUF atomically (temporary sibling, then rename). ``tensors`` hold rows in Hugging
    Face order; q/k rows are permuted here as llama.cpp's converter does."""
    import gguf
    path = Path(path)
    if path.suffix != ".gguf":
        raise CompressError(f"GGUF output must end with .gguf, got {path}")

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), hp.arch)
        for kv in kvs:
            if kv.key == "general.architecture":
                continue
            w.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)
        for t in tensors:
            data = t.data
            if hp.permuted and re.search(r"\.attn_q\.(weight|bias)$", t.name):
                data = permute_qk(data, hp.n_head, hp.n_head)
            elif hp.permuted and re.search(r"\.attn_k\.(weight|bias)$", t.name):
                data = permute_qk(data, hp.n_head, hp.n_head_kv)
            elif hp.arch == "gptneox" and re.search(r"\.attn_qkv\.(weight|bias)$", t.name):
                data = neox_qkv(data, hp.n_head)
            arr = _np(GGMLTensor(t.name, t.type, t.shape, data))
            if t.type in FLOAT_TYPES:
                w.add_tensor(t.name, arr)
            else:
                w.add_tensor(t.name, arr, raw_dtype=gguf.GGMLQuantizationType[t.type])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()

    return atomic_file(path, write)


def inspect_gguf(path: Path) -> dict:
    """Per-tensor types, sizes and bits per weight of a GGUF file, plus this suite's notes."""
    from gguf import GGUFReader
    path = Path(path)
    read_gguf_layout(path)               # structure only: inspect shows any GGUF that is intact
    r = GGUFReader(str(path))

    def val(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:
            return default

    notes = {}
    for item in val("compress.tensor_notes", []) or []:
        name, _, note = item.partition("=")
        notes[name] = note
    tensors = []
    q_bytes = q_params = all_bytes = all_params = 0
    counts: dict[str, int] = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]      # (rows, cols)
        n = int(math.prod(shape))
        nbytes = int(t.n_bytes)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": shape, "bytes": nbytes,
                        "bits_per_weight": 8 * nbytes / n if n else None, "note": notes.get(t.name, "")})
        all_bytes += nbytes
        all_params += n
        if len(shape) >= 2:
            q_bytes += nbytes
            q_params += n
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    ft = val("general.file_type")
    return {
        "path": str(path), "size_bytes": path.stat().st_size, "architecture": val("general.architecture"),
        "name": val("general.name"), "file_type": ft, "file_type_name": FTYPE_NAMES.get(ft, str(ft)),
        "method": val("compress.method"), "mix": val("compress.mix"), "pure": val("compress.pure"),
        "imatrix": val("compress.imatrix"), "parameters": all_params,
        "bits_per_weight_matrices": 8 * q_bytes / q_params if q_params else None,
        "bits_per_weight_overall": 8 * all_bytes / all_params if all_params else None,
        "type_counts": counts, "tensors": tensors,
    }


# --------------------------------------------------------------------------------------------
# building GGUFs from models and checkpoints
# --------------------------------------------------------------------------------------------

def plan_types(tensors: Mapping[str, torch.Tensor], mix: str, hp: HParams, pure: bool, has_imatrix: bool):
    shapes = (tensors.shapes() if isinstance(tensors, StreamedTensors)       # no tensor read to plan
              else {n: tuple(t.shape) for n, t in tensors.items()})
    return select_types(shapes.items(), mix, n_layer=hp.n_layer,
                        n_head=hp.n_head, n_head_kv=hp.n_head_kv, pure=pure, has_imatrix=has_imatrix)


def _notes(tensors: list[GGMLTensor]) -> list[str]:
    return [f"{t.name}={t.note}" for t in tensors if t.note]


def build_rtn(loaded, mix: str, importance: dict[str, torch.Tensor] | None = None, pure: bool = False,
              progress: bool = True) -> GGMLModel:
    """llama.cpp's quantization of ``loaded`` (its float or dequantized weights) with a mix."""
    hp = HParams.from_config(loaded.model.config)
    floats = model_tensors(loaded.model, loaded.arch)
    imp = gguf_importance(importance, floats, hp.arch)
    if importance is not None and not imp:
        raise CompressError("the importance matrix has no entry for any tensor of this model")
    plan = plan_types(floats, mix, hp, pure, bool(imp))
    tensors = quantize_model_rtn(floats, plan, imp, progress)
    return GGMLModel(tensors, get_mix(mix).name, pure, "kquant", plan)


def gguf_importance(importance, floats, arch: str = "llama") -> dict[str, torch.Tensor]:
    """Importance keyed by GGUF tensor name, from {our module name or GGUF name: (K,)}."""
    out = {}
    for k, v in (importance or {}).items():
        try:
            name = k if (k.startswith("blk.") or k.split(".")[0] in _GLOBAL_INV or k.split(".")[0] == "position_embd") \
                else gguf_name(k + ".weight", arch=arch)
        except CompressError:           # a tensor this model does not have: left out, as below
            continue
        if name in floats:
            out[name] = v
    return out


def save_ggml_model(loaded, gm: GGMLModel, out: Path, extra: dict | None = None, progress: bool = False) -> dict:
    """Write a :class:`GGMLModel` built from ``loaded`` as a GGUF; returns a summary."""
    hp = HParams.from_config(loaded.model.config)
    tok, gen, tok_src = tokenizer_metadata(loaded, hp)
    file_type = get_mix(gm.mix).ftype if gm.mix in MIXES else _dominant_ftype(gm.tensors)
    meta = {"method": gm.method, "mix": gm.mix, "pure": gm.pure, "package_version": __version__,
            "tensor_notes": _notes(gm.tensors), **(extra or {})}
    ordered = sorted(gm.tensors, key=lambda t: _file_order(t.name))
    kvs = model_metadata(hp, file_type, Path(str(loaded.source)).name, gen, meta) + tok
    write_gguf(out, kvs, ordered, hp, progress=progress)
    counts: dict[str, int] = {}
    for t in ordered:
        if len(t.shape) >= 2:
            counts[t.type] = counts.get(t.type, 0) + 1
    return {"out": str(out), "tensors": len(ordered), "type_counts": counts,
            "fallbacks": sum(1 for c in gm.plan.values() if c.fallback) if gm.plan else 0,
            "bits_per_weight_matrices": bits_per_weight(ordered), "size_bytes": Path(out).stat().st_size,
            "tokenizer_from": tok_src, "file_type": FTYPE_NAMES.get(file_type, str(file_type))}


def _dominant_ftype(tensors: list[GGMLTensor]) -> int:
    sizes: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            sizes[t.type] = sizes.get(t.type, 0) + math.prod(t.shape)
    top = max(sizes, key=sizes.get) if sizes else "F32"
    return _FTYPE_OF_TYPE.get(top, 0)


# --------------------------------------------------------------------------------------------
# gptq-int checkpoints -> GGML legacy blocks (direct mapping of the integers)
# --------------------------------------------------------------------------------------------

def map_gptq_int(packed, target: str) -> tuple[torch.Tensor, str]:
    """Write a gptq-int linear as GGML ``target`` blocks without re-rounding, when possible.

    Every 32-column block must lie inside one scale group (group size a multiple of 32, or per
    channel; no act-order permutation across a block). Then, with ``s`` the group scale and ``z``
    the zero-point of an output row (``W = s * (q - z)``):

    * Q4_0 / Q5_0 / Q8_0 (``y = d * c``): ``d = s``, ``c = q - z``; exact when ``q - z`` fits the
      type's code range (always for symmetric 2/3/4-bit -> Q4_0, asymmetric 2/3-bit -> Q4_0,
      asymmetric 4-bit -> Q5_0, symmetric 8-bit -> Q8_0).
    * Q4_1 / Q5_1 (``y = d * c + m``): ``d = s``, ``c = q``, ``m = fp16(-s * z)``: exact up to
      the float16 rounding of ``m`` (relative 2^-11 of ``|s * z|``, per block).

    Returns ``(uint8 rows, "exact" | "fp16-m")``; raises CompressError when the mapping does not fit.
    """
    from ..formats import gptq_int
    n, k = packed.out_features, packed.in_features
    if k % 32:
        raise CompressError(f"{k} input columns are not a multiple of 32")
    g = packed.g_idx.to(torch.int64).view(k // 32, 32)
    if not bool((g == g[:, :1]).all()):
        raise CompressError("a 32-column block spans several scale groups (act-order or a group size "
                            "that is not a multiple of 32)")
    q, zeros = gptq_int.unpack(packed)                                   # (N, K), (G, N)
    gb = g[:, 0]                                                         # group of each 32-block
    s = packed.scales.to(torch.float32)[gb].t()                          # (N, K/32), fp16 values
    z = zeros.to(torch.int64)[gb].t()                                   # (N, K/32)
    q = q.to(torch.int64).view(n, k // 32, 32)
    cd = CODECS.get(target)
    if cd is None or target not in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        raise CompressError(f"no direct gptq-int mapping to {target}")
    tmpl = torch.zeros((n * (k // 32), cd.size), dtype=torch.uint8)
    tmpl[:, 0:2] = s.reshape(-1).to(torch.float16).view(torch.uint8).view(-1, 2)
    if target in ("Q4_0", "Q5_0", "Q8_0"):
        c = q - z[:, :, None]
        how = "exact"
    else:
        c = q
        m = (-(s * z.to(torch.float32))).to(torch.float16)
        tmpl[:, 2:4] = m.reshape(-1).view(torch.uint8).view(-1, 2)
        how = "exact" if bool(torch.equal(m.to(torch.float32), -(s * z.to(torch.float32)))) else "fp16-m"
    if int(c.min()) < cd.cmin or int(c.max()) > cd.cmax:
        raise CompressError(f"codes {int(c.min())}..{int(c.max())} do not fit {target}'s range "
                            f"{cd.cmin}..{cd.cmax}")
    data = pack_codes(tmpl, c.reshape(-1, 32), target)
    return data.view(n, -1), how


def auto_target(scheme) -> str | None:
    """The GGML type a gptq-int scheme maps onto by default (None: no direct mapping)."""
    if scheme.bits == 8:
        return "Q8_0" if scheme.sym else None
    if scheme.sym or scheme.bits <= 3:
        return "Q4_0"
    return "Q4_1"


def build_from_packed(loaded, target: str | None) -> tuple[GGMLModel, dict]:
    """A gptq-int checkpoint as GGUF by direct mapping of its integers (see :func:`map_gptq_int`).

    ``target`` None picks :func:`auto_target`. Tensors left unquantized in the checkpoint
    (embedding, norms; stored as float16 there) are written F16 (2-D) and F32 (1-D): lossless.
    """
    from ..qlinear import QuantLinear
    scheme = loaded.quant.get("scheme_obj")
    if loaded.quant.get("format") != "gptq-int" or scheme is None:
        raise CompressError(f"{loaded.source}: only gptq-int checkpoints map directly onto GGUF types; "
                            "pass --type to re-quantize the dequantized weights")
    modules = loaded.quant.get("modules") or {}

    def target_for(mod_name: str) -> str:
        ms = modules.get(mod_name, scheme)
        t = target or auto_target(ms)
        if t is None:
            raise CompressError(f"{loaded.source}: {mod_name} ({ms.describe()}) has no GGUF equivalent "
                                "(GGUF has no asymmetric 8-bit type); pass --type (e.g. Q8_0) to re-quantize")
        return t

    targets = {target_for(n) for n in modules} or {target or auto_target(scheme)}
    HParams.from_config(loaded.model.config)          # refuses a model GGUF cannot describe
    floats = model_tensors(loaded.model, loaded.arch)
    tensors, how = [], {}
    arch = loaded.arch
    for name, w in floats.items():
        hf = hf_name(name, arch.blocks, gguf_arch(loaded.model.config))
        mod_name = hf.rpartition(".")[0]
        mod = loaded.model.get_submodule(mod_name) if name.endswith(".weight") else None
        if isinstance(mod, QuantLinear):
            tgt = target_for(mod_name)
            try:
                data, h = map_gptq_int(mod.packed(), tgt)
            except CompressError as e:
                raise CompressError(f"{loaded.source}: {mod_name} cannot be written as {tgt}: {e}; "
                                    "pass --type to re-quantize instead") from None
            how[h] = how.get(h, 0) + 1
            tensors.append(GGMLTensor(name, tgt, tuple(w.shape), data, f"gptq-int->{tgt} {h}"))
        elif w.dim() >= 2:
            tensors.append(GGMLTensor(name, "F16", tuple(w.shape), w.to(torch.float16)))
        else:
            tensors.append(GGMLTensor(name, "F32", tuple(w.shape), w))
    plan = {t.name: TensorChoice(t.name, t.shape, "", t.type, t.type, t.type != "F32") for t in tensors}
    tgt = "+".join(sorted(targets))
    gm = GGMLModel(tensors, f"gptq-int->{tgt}", False, f"export:{loaded.quant.get('method', 'gptq-int')}", plan)
    return gm, {"mapping": how, "target": tgt, "scheme": scheme.describe()}

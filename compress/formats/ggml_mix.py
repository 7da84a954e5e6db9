"""llama.cpp file types ("mixes") and per-tensor GGML type selection.

``select_types`` ports the rules of llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp,
llama.cpp vendored in llama-cpp-python 0.3.36) for the file types this suite writes, including its
fallback when a row length is not a multiple of the type's block (Q2_K/Q3_K -> Q4_0,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16). docs/GGUF.md lists the rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import CompressError
from . import kquants



@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type: its ``general.file_type`` id and its default tensor type."""

    name: str
    ftype: int          # enum llama_ftype
    default: str        # GGML type of most 2-D tensors (before the mix rules and fallbacks)
    description: str


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("F32", 0, "F32", "all float32"),
    Mix("F16", 1, "F16", "2-D tensors float16, 1-D float32"),
    Mix("Q4_0", 2, "Q4_0", "4.5 bpw, symmetric 32-blocks"),
    Mix("Q4_1", 3, "Q4_1", "5.0 bpw, asymmetric 32-blocks"),
    Mix("Q8_0", 7, "Q8_0", "8.5 bpw"),
    Mix("Q5_0", 8, "Q5_0", "5.5 bpw, symmetric 32-blocks"),
    Mix("Q5_1", 9, "Q5_1", "6.0 bpw, asymmetric 32-blocks"),
    Mix("Q2_K", 10, "Q2_K", "Q2_K; attn_v, ffn_down, attn_output Q3_K"),
    Mix("Q3_K_S", 11, "Q3_K", "Q3_K everywhere"),
    Mix("Q3_K_M", 12, "Q3_K", "Q3_K; attn_v Q5_K/Q4_K, attn_output Q4_K, ffn_down Q5_K/Q4_K"),
    Mix("Q3_K_L", 13, "Q3_K", "Q3_K; attn_v, attn_output, ffn_down Q5_K"),
    Mix("Q4_K_S", 14, "Q4_K", "Q4_K; first attn_v and ffn_down layers Q5_K"),
    Mix("Q4_K_M", 15, "Q4_K", "Q4_K; half of attn_v and ffn_down Q6_K"),
    Mix("Q5_K_S", 16, "Q5_K", "Q5_K everywhere"),
    Mix("Q5_K_M", 17, "Q5_K", "Q5_K; half of attn_v and ffn_down Q6_K"),
    Mix("Q6_K", 18, "Q6_K", "Q6_K everywhere"),
)}
# llama-quantize's aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FLOAT_TYPES = ("F32", "F16")


def get_mix(name: str) -> Mix:
    key = str(name).upper()
    key = ALIASES.get(key, key)
    if key not in MIXES:
        raise CompressError(f"unknown GGUF type '{name}'; available: {', '.join(MIXES)} "
                            f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return MIXES[key]


def type_block_size(type_name: str) -> int:
    if type_name in FLOAT_TYPES:
        return 1
    return kquants.get_type(type_name).block_size


def type_nbytes(type_name: str, rows: int, cols: int) -> int:
    if type_name == "F32":
        return 4 * rows * cols
    if type_name == "F16":
        return 2 * rows * cols
    t = kquants.get_type(type_name)
    return rows * (cols // t.block_size) * t.type_size


# llama.cpp's tensor categories (tensor_get_category)
OUTPUT, TOKEN_EMBD, ATTN_Q, ATTN_K, ATTN_V, ATTN_QKV, ATTN_OUTPUT = (
    "output", "token_embd", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output")
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "ffn_up", "ffn_gate", "ffn_down", "other"


def tensor_category(name: str) -> str:
    if name == "output.weight":
        return OUTPUT
    if name == "token_embd.weight":
        return TOKEN_EMBD
    for key, cat in (("attn_qkv.weight", ATTN_QKV), ("attn_v.weight", ATTN_V), ("attn_k.weight", ATTN_K),
                     ("attn_q.weight", ATTN_Q), ("attn_output.weight", ATTN_OUTPUT)):
        if key in name:
            return cat
    for key, cat in (("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE), ("ffn_down", FFN_DOWN)):
        if key in name:
            return cat
    return OTHER


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors we write: matrices, not norms, not
    learned position embeddings (GPT-2)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name and \
        not name.startswith("position_embd.") and "ffn_gate_inp" not in name


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's weight_name_comparer: by block number (-1 outside blocks), then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def fallback_type(type_name: str, cols: int) -> str:
    """llama.cpp's tensor_type_fallback for a row length ``cols``."""
    if type_name in FLOAT_TYPES or cols % type_block_size(type_name) == 0:
        return type_name
    new = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(type_name, type_name)
    if cols % type_block_size(new) != 0:
        new = "F16"
    return new


@dataclass
class TensorChoice:
    """The type chosen for one GGUF tensor (``shape`` is (rows, cols), cols = ggml's ne[0])."""

    name: str
    shape: tuple[int, ...]
    category: str
    type: str                 # the type written
    wanted: str               # the mix's choice before the row-length fallback
    quantize: bool            # False for tensors kept as they are (norms: F32)

    @property
    def fallback(self) -> bool:
        return self.type != self.wanted

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "category": self.category, "type": self.type,
                "wanted": self.wanted, "fallback": self.fallback}


def select_types(tensors, mix: str, *, n_layer: int, n_head: int, n_head_kv: int, pure: bool = False,
                 has_imatrix: bool = False, n_expert: int = 0) -> dict[str, TensorChoice]:
    """Per-tensor GGML types for a llama-architecture model, as ``llama-quantize`` picks them.

    ``tensors``: iterable of ``(gguf_name, shape)``, shape ``(rows, cols)`` for matrices (cols is
    the row length, ggml's ne[0]) or ``(n,)`` for vectors. ``pure`` is ``llama-quantize --pure``
    (one type for all, still with the row-length fallbacks); ``has_imatrix`` changes the Q4_0/Q5_0
    mixes' first ffn_down layers, as in llama.cpp; ``n_expert`` (a mixture of experts, whose
    stacked tensors are ``(experts, rows, cols)``) the rules for experts.
    Returns ``{name: TensorChoice}`` in llama.cpp's processing order.
    """
    m = get_mix(mix)
    items = sorted(((str(n), tuple(int(s) for s in shape)) for n, shape in tensors), key=lambda t: _llama_order(t[0]))
    names = [n for n, _ in items]
    n_attention_wv = sum(tensor_category(n) in (ATTN_V, ATTN_QKV) for n in names)
    tied = not any(tensor_category(n) == OUTPUT for n in names)
    n_gqa = n_head // max(1, n_head_kv)
    is_70b = n_layer == 80 and n_head != n_head_kv
    state = {"i_attention_wv": 0, "i_ffn_down": 0, "n_expert": n_expert}
    out: dict[str, TensorChoice] = {}
    for name, shape in items:
        cat = tensor_category(name)
        if not allows_quantization(name, shape):
            out[name] = TensorChoice(name, shape, cat, "F32", "F32", False)
            continue
        if m.default in FLOAT_TYPES:
            out[name] = TensorChoice(name, shape, cat, m.default, m.default, True)
            continue
        new = m.default
        if not pure:
            new = _mix_rule(m, name, new, cat, shape[-1], state, n_attention_wv, n_layer, n_gqa, tied,
                            has_imatrix, is_70b)
        out[name] = TensorChoice(name, shape, cat, fallback_type(new, shape[-1]), new, True)
    return out


def _mix_rule(m: Mix, name: str, new: str, cat: str, ncols: int, st: dict, n_attention_wv: int, n_layer: int,
              n_gqa: int, tied: bool, has_imatrix: bool, is_70b: bool) -> str:
    """llama_tensor_get_type_impl for the file types of :data:`MIXES` (with the rules for experts)."""
    f = m.name
    if cat == OUTPUT or (tied and cat == TOKEN_EMBD):
        if ncols % type_block_size(new) != 0:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == TOKEN_EMBD:
        return new
    if cat in (ATTN_V, ATTN_QKV):
        i = st["i_attention_wv"]
        if f == "Q2_K":
            new = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif f == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif f == "Q3_K_L":
            new = "Q5_K"
        elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_attention_wv):
            new = "Q6_K"
        elif f == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if st["n_expert"] == 8:          # llama.cpp: "for the 8-expert model, bumping this to Q8_0"
            new = "Q8_0"
        st["i_attention_wv"] = i + 1
        return new
    if cat == ATTN_K and st["n_expert"] == 8:
        return "Q8_0"
    if cat == FFN_DOWN:
        i, n = st["i_ffn_down"], n_layer
        if st["n_expert"] > 1:           # llama.cpp's layer_info: the layer from the name (shared experts too)
            i = int(re.match(r"blk\.(\d+)\.", name).group(1))
        if f == "Q2_K":
            new = "Q3_K"
        elif f == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"       # llama arch: use_more_bits branch is not Falcon-only
        elif f == "Q3_K_L":
            new = "Q5_K"
        elif f == "Q4_K_M":
            if use_more_bits(i, n):
                new = "Q6_K"
        elif f == "Q5_K_M" and use_more_bits(i, n):
            new = "Q6_K"
        elif f == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        elif f in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            new = "Q4_1" if f == "Q4_0" else "Q5_1"
        st["i_ffn_down"] = i + 1
        return new
    if cat == ATTN_OUTPUT:
        if st["n_expert"] == 8:          # llama.cpp: the 8-expert model's attn_output a step up for the low mixes
            return "Q5_K" if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else new
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(f, new)
    if cat == ATTN_QKV:      # (unreachable for llama: fused qkv is handled with attn_v above)
        return new
    return new

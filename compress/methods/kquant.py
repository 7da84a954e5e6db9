"""GGML quantization of whole models: llama.cpp's type mixes, and GPTQ onto GGML grids.

Three parts, each usable alone:

1. **Mixes** (``select_types``): which GGML type each tensor of a llama-architecture model gets
   for a llama.cpp file type such as ``Q4_K_M``: a port of the rules of llama.cpp's
   ``llama_tensor_get_type`` (src/llama-quant.cpp, llama.cpp vendored in llama-cpp-python 0.3.36)
   for the file types this suite writes, including its fallback when a row length is not a
   multiple of the type's block (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
   then F16). docs/GGUF.md lists the rules.
2. **Block codec** (``block_grid``, ``block_codes``, ``pack_codes``): for GGUF block bytes of any
   supported type, the per-weight grid ``y = A * c - M`` (``A``, ``M`` float32 computed with the
   decoder's own operations, so ``A * c - M`` is bit for bit what ``kquants.dequantize`` gives)
   and the integer codes ``c``; and the inverse, writing codes into blocks.
3. **GPTQ with GGML grids** (``gptq_kquant_solve``): GPTQ's column sweep where each GGML block's
   scales (and mins) are chosen by llama.cpp's importance-weighted scale search (importance =
   the Hessian diagonal) on the current, error-compensated weights when the sweep reaches the
   block; every column is then rounded onto that block's grid and its error propagated through
   the inverse-Hessian Cholesky factor. The result is standard GGUF block bytes whose decoding
   equals the weights GPTQ used.

Model-level drivers (``quantize_model_rtn``, ``quantize_model_gptq``) return a
:class:`GGMLModel`: GGUF-named tensors (bytes or floats) plus the per-tensor plan; the GGUF writer
(:mod:`compress.export.gguf`) writes it.
"""
from __future__ import annotations

import logging
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CompressError
from ..formats import kquants
from .gptq import damped_inverse_cholesky, output_error

log = logging.getLogger(__name__)

QK_K = 256

# --------------------------------------------------------------------------------------------
# 1. llama.cpp file types ("mixes") and per-tensor type selection
# --------------------------------------------------------------------------------------------


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
    """llama.cpp's tensor_allows_quantization for the tensors of a llama model."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


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
                 has_imatrix: bool = False) -> dict[str, TensorChoice]:
    """Per-tensor GGML types for a llama-architecture model, as ``llama-quantize`` picks them.

    ``tensors``: iterable of ``(gguf_name, shape)``, shape ``(rows, cols)`` for matrices (cols is
    the row length, ggml's ne[0]) or ``(n,)`` for vectors. ``pure`` is ``llama-quantize --pure``
    (one type for all, still with the row-length fallbacks); ``has_imatrix`` changes the Q4_0/Q5_0
    mixes' first ffn_down layers, as in llama.cpp. Dense models only (no experts).
    Returns ``{name: TensorChoice}`` in llama.cpp's processing order.
    """
    m = get_mix(mix)
    items = sorted(((str(n), tuple(int(s) for s in shape)) for n, shape in tensors), key=lambda t: _llama_order(t[0]))
    names = [n for n, _ in items]
    n_attention_wv = sum(tensor_category(n) in (ATTN_V, ATTN_QKV) for n in names)
    tied = not any(tensor_category(n) == OUTPUT for n in names)
    n_gqa = n_head // max(1, n_head_kv)
    is_70b = n_layer == 80 and n_head != n_head_kv
    state = {"i_attention_wv": 0, "i_ffn_down": 0}
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
            new = _mix_rule(m, new, cat, shape[-1], state, n_attention_wv, n_layer, n_gqa, tied,
                            has_imatrix, is_70b)
        out[name] = TensorChoice(name, shape, cat, fallback_type(new, shape[-1]), new, True)
    return out


def _mix_rule(m: Mix, new: str, cat: str, ncols: int, st: dict, n_attention_wv: int, n_layer: int,
              n_gqa: int, tied: bool, has_imatrix: bool, is_70b: bool) -> str:
    """llama_tensor_get_type_impl for the file types of :data:`MIXES` (llama arch, no experts)."""
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
        st["i_attention_wv"] = i + 1
        return new
    if cat == FFN_DOWN:
        i, n = st["i_ffn_down"], n_layer
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
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(f, new)
    if cat == ATTN_QKV:      # (unreachable for llama: fused qkv is handled with attn_v above)
        return new
    return new


# --------------------------------------------------------------------------------------------
# 2. block codec: grids and integer codes of GGML blocks
# --------------------------------------------------------------------------------------------
#
# A code field is a list of bit fields; each stores ``nbits`` bits of the stored value
# ``s = c + offset`` (starting at bit ``vshift`` of s) at byte ``byte[n]``, bit ``shift[n]`` of the
# block, for the n-th weight of the block.

@dataclass(frozen=True)
class _Field:
    vshift: int
    nbits: int
    byte: np.ndarray      # (block_size,) int64
    shift: np.ndarray     # (block_size,) int64


@dataclass(frozen=True)
class _Codec:
    name: str
    block: int
    size: int
    cmin: int
    cmax: int
    offset: int           # stored = c + offset
    fields: tuple[_Field, ...]


def _n(block: int) -> np.ndarray:
    return np.arange(block, dtype=np.int64)


def _make_codecs() -> dict[str, _Codec]:
    n32, n256 = _n(32), _n(256)
    nib32 = lambda base: _Field(0, 4, base + n32 % 16, 4 * (n32 // 16))      # noqa: E731
    q5h = lambda base: _Field(4, 1, base + n32 // 8, n32 % 8)                 # noqa: E731  (u32 qh, little-endian)
    two = lambda base: _Field(0, 2, base + 32 * (n256 // 128) + n256 % 32, 2 * ((n256 % 128) // 32))  # noqa: E731
    k4 = lambda base: _Field(0, 4, base + 32 * (n256 // 64) + n256 % 32, 4 * ((n256 % 64) // 32))     # noqa: E731
    hbit = lambda base, vs: _Field(vs, 1, base + n256 % 32, n256 // 32)      # noqa: E731
    h, g, l = n256 // 128, (n256 % 128) // 32, n256 % 32
    return {c.name: c for c in (
        _Codec("Q4_0", 32, 18, -8, 7, 8, (nib32(2),)),
        _Codec("Q4_1", 32, 20, 0, 15, 0, (nib32(4),)),
        _Codec("Q5_0", 32, 22, -16, 15, 16, (nib32(6), q5h(2))),
        _Codec("Q5_1", 32, 24, 0, 31, 0, (nib32(8), q5h(4))),
        _Codec("Q8_0", 32, 34, -128, 127, 256, (_Field(0, 8, 2 + n32, 0 * n32),)),   # two's complement byte
        _Codec("Q2_K", 256, 84, 0, 3, 0, (two(16),)),
        _Codec("Q3_K", 256, 110, -4, 3, 4, (two(32), hbit(0, 2))),
        _Codec("Q4_K", 256, 144, 0, 15, 0, (k4(16),)),
        _Codec("Q5_K", 256, 176, 0, 31, 0, (k4(48), hbit(16, 4))),
        _Codec("Q6_K", 256, 210, -32, 31, 32, (_Field(0, 4, 64 * h + l + 32 * (g & 1), 4 * (g >> 1)),
                                              _Field(4, 2, 128 + 32 * h + l, 2 * g))),
    )}


CODECS = _make_codecs()


def _codec(type_name: str) -> _Codec:
    c = CODECS.get(type_name)
    if c is None:
        raise CompressError(f"no block codec for GGML type {type_name}; supported: {', '.join(CODECS)}")
    return c


def _fp16_at(data: torch.Tensor, a: int) -> torch.Tensor:
    return data[:, a:a + 2].contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes ``(nb, 12)`` -> 6-bit scales and mins ``(nb, 8)`` (get_scale_min_k4)."""
    s = s.to(torch.int64)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, m


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K: 12 bytes ``(nb, 12)`` -> signed 6-bit scales ``(nb, 16)``."""
    s = s.to(torch.int64)
    j = torch.arange(16)
    lo = torch.where(j < 8, s[:, j.clamp(max=7)] & 15, s[:, (j - 8).clamp(min=0)] >> 4)
    hi = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (lo | (hi << 4)) - 32


def block_grid(data: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each weight of GGUF blocks: ``y = A * c - M`` with integer ``c``.

    data: uint8 ``(nb, type_size)``. Returns float32 ``A, M`` ``(nb, block_size)``, computed with
    the decoder's operations (``d * sc``, ``dmin * m``), so that ``A * c - M`` equals the decoded
    weight bit for bit (for Q4_1/Q5_1, ``M = -m`` and ``A*c - (-m) == d*c + m`` exactly).
    """
    cd = _codec(type_name)
    nb = data.shape[0]
    B = cd.block
    if type_name in ("Q4_0", "Q5_0", "Q8_0"):
        d = _fp16_at(data, 0)
        return d[:, None].expand(nb, B).contiguous(), torch.zeros((nb, B))
    if type_name in ("Q4_1", "Q5_1"):
        d, m = _fp16_at(data, 0), _fp16_at(data, 2)
        return d[:, None].expand(nb, B).contiguous(), (-m)[:, None].expand(nb, B).contiguous()
    if type_name == "Q2_K":
        sc = data[:, 0:16].to(torch.int64)
        d, dmin = _fp16_at(data, 80), _fp16_at(data, 82)
        A = d[:, None] * (sc & 15).float()
        M = dmin[:, None] * (sc >> 4).float()
        return A.repeat_interleave(16, 1), M.repeat_interleave(16, 1)
    if type_name == "Q3_K":
        d = _fp16_at(data, 108)
        A = d[:, None] * _q3_scales(data[:, 96:108]).float()
        return A.repeat_interleave(16, 1), torch.zeros((nb, B))
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _fp16_at(data, 0), _fp16_at(data, 2)
        sc, m = _k4_scale_min(data[:, 4:16])
        A = d[:, None] * sc.float()
        M = dmin[:, None] * m.float()
        return A.repeat_interleave(32, 1), M.repeat_interleave(32, 1)
    if type_name == "Q6_K":
        d = _fp16_at(data, 208)
        sc = data[:, 192:208].contiguous().view(torch.int8).float()
        A = d[:, None] * sc
        return A.repeat_interleave(16, 1), torch.zeros((nb, B))
    raise CompressError(f"no block grid for GGML type {type_name}")


def block_codes(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """Integer codes ``c`` ``(nb, block_size)`` int64 of GGUF blocks (``y = A * c - M``)."""
    cd = _codec(type_name)
    d = data.to(torch.int64)
    s = torch.zeros((data.shape[0], cd.block), dtype=torch.int64)
    for f in cd.fields:
        part = (d[:, torch.from_numpy(f.byte)] >> torch.from_numpy(f.shift)) & ((1 << f.nbits) - 1)
        s |= part << f.vshift
    if type_name == "Q8_0":
        return ((s + 128) & 255) - 128
    return s - cd.offset


def pack_codes(template: torch.Tensor, codes: torch.Tensor, type_name: str) -> torch.Tensor:
    """Blocks whose scale fields are ``template``'s and whose codes are ``codes``.

    template: uint8 ``(nb, type_size)``; codes: integer ``(nb, block_size)`` in the type's range.
    """
    cd = _codec(type_name)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < cd.cmin or int(c.max()) > cd.cmax):
        raise ValueError(f"{type_name} codes must lie in [{cd.cmin}, {cd.cmax}]")
    s = (c + cd.offset) & 255 if type_name == "Q8_0" else c + cd.offset
    out = template.to(torch.int64).clone()
    for f in cd.fields:                       # clear every code bit, then OR the new ones in
        mask = torch.zeros(cd.size, dtype=torch.int64)
        mask.index_put_((torch.from_numpy(f.byte),), torch.from_numpy(((1 << f.nbits) - 1) << f.shift),
                        accumulate=True)
        out &= ~mask & 255
    for f in cd.fields:
        part = ((s >> f.vshift) & ((1 << f.nbits) - 1)) << torch.from_numpy(f.shift)
        out.index_add_(1, torch.from_numpy(f.byte), part)
    return out.to(torch.uint8)


def decode_blocks(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """``A * c - M``: equal to ``kquants.dequantize`` of the same blocks (``(nb, block_size)``)."""
    A, M = block_grid(data, type_name)
    return A * block_codes(data, type_name).float() - M


# --------------------------------------------------------------------------------------------
# 3. GPTQ onto GGML grids
# --------------------------------------------------------------------------------------------


@dataclass
class KQuantGPTQResult:
    """What :func:`gptq_kquant_solve` returns for one ``(N, K)`` layer.

    data: uint8 ``(N, K / block * type_size)``: GGUF rows. weight: float32 ``(N, K)``, equal to
    ``kquants.dequantize(data, type, (N, K))`` bit for bit: the weights GPTQ's error propagation
    used. loss: ``sum (w - q)^2 / U[i, i]^2 / 2`` (GPTQ's own report). info: ``output_error``
    ``tr((W - Q) H (W - Q)^T)`` with the given H, ``dead_columns``, ``damp_tries``.
    """

    data: torch.Tensor
    weight: torch.Tensor
    loss: float
    damp: float
    fallback: str | None = None
    info: dict = field(default_factory=dict)


@contextmanager
def single_thread():
    """Run torch CPU ops single-threaded inside the block (restored after).

    The column sweep is thousands of small ops; intra-op threads only add synchronisation there,
    and on a busy machine OpenMP's waiting made the sweep ~20x slower (0.8 s vs 18 s for a
    576x576 Q5_0 layer on 2 shared cores)."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _importance(h: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    imp = torch.diagonal(h).clone() if importance is None else importance.to(torch.float32).clone()
    pos = imp[imp > 0]
    floor = float(pos.mean()) * 1e-6 if pos.numel() else 1.0
    return imp.clamp_min(floor)


def gptq_kquant_solve(W: torch.Tensor, H: torch.Tensor, type_name: str, damp: float = 0.01,
                      block_size: int | None = None, max_damp_tries: int = 5,
                      importance: torch.Tensor | None = None) -> KQuantGPTQResult:
    """GPTQ for ``W (N, K)`` against ``H (K, K)`` onto the grid of a GGML type.

    The sweep visits columns in natural order (GGML blocks are contiguous). When it reaches the
    first column of a GGML block, the block's fp16 scales/mins and integer sub-block scales are
    chosen by ``kquants.quantize`` (llama.cpp's importance-weighted search; importance = the
    Hessian diagonal, or ``importance``) on the block's current weights, i.e. after the error
    compensation of every earlier column; each column of the block is then rounded to the nearest
    point of its grid ``A * c - M`` (codes clamped to the type's range) and its error propagated
    as in GPTQ. Lazy batches are ``block_size`` columns (default: 128, or 256 for k-quants), a
    multiple of the GGML block. Cholesky failures raise the dampening tenfold (at most
    ``max_damp_tries`` times), then fall back to plain importance-weighted quantization;
    both are recorded in ``fallback``.
    """
    with single_thread():
        return _gptq_kquant_solve(W, H, type_name, damp, block_size, max_damp_tries, importance)


def _gptq_kquant_solve(W, H, type_name, damp, block_size, max_damp_tries, importance) -> KQuantGPTQResult:
    if W.dim() != 2:
        raise CompressError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(W.shape)}")
    n, k = W.shape
    if tuple(H.shape) != (k, k):
        raise CompressError(f"Hessian shape {tuple(H.shape)} does not match the weight's {k} input features")
    cd = _codec(type_name)
    B = cd.block
    if k % B:
        raise CompressError(f"{type_name} needs the row length ({k}) to be a multiple of {B}")
    L = block_size or max(B, 128)
    if L % B:
        raise CompressError(f"GPTQ block size {L} must be a multiple of the {type_name} block ({B})")
    w0 = W.detach().to(torch.float32).cpu()
    h_given = H.detach().to(torch.float32).cpu()
    h = h_given.clone()
    w = w0.clone()
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    imp = _importance(h_given, importance)

    u, cur, tries = damped_inverse_cholesky(h, damp, max_damp_tries, f"GPTQ-{type_name}")
    info = {"dead_columns": int(dead.sum()), "damp_tries": tries}
    if u is None:
        log.warning("GPTQ-%s: Cholesky failed after %d tries; falling back to importance-weighted rounding",
                    type_name, tries)
        data = kquants.quantize(w0, type_name, imp)
        q = kquants.dequantize(data, type_name, (n, k))
        err = output_error(w0, q, h_given)
        info["output_error"] = err
        return KQuantGPTQResult(data, q, 0.5 * err, cur, "rtn", info)

    nblk = k // B
    wt = w.t().contiguous()                           # (K, N): row i is input column i
    qt = torch.empty((k, n), dtype=torch.float32)
    errt = torch.empty((k, n), dtype=torch.float32)
    blocks = torch.empty((n, nblk, cd.size), dtype=torch.uint8)
    for i1 in range(0, k, L):
        i2 = min(i1 + L, k)
        w1 = wt[i1:i2]
        u1 = u[i1:i2, i1:i2]
        for b0 in range(i1, i2, B):
            cur_w = w1[b0 - i1:b0 - i1 + B].t().contiguous()           # (N, B), compensated so far
            tmpl = kquants.quantize(cur_w, type_name, imp[b0:b0 + B])     # (N, type_size)
            A, M = block_grid(tmpl, type_name)
            At, Mt = A.t().contiguous(), M.t().contiguous()              # (B, N)
            codes = torch.empty((B, n), dtype=torch.float32)
            for jj in range(B):
                j = b0 - i1 + jj
                col = w1[j]
                a, m = At[jj], Mt[jj]
                c = torch.where(a != 0, torch.round((col + m) / torch.where(a != 0, a, torch.ones_like(a))),
                                torch.zeros_like(col)).clamp_(cd.cmin, cd.cmax)
                dq = a * c - m                                           # the decoder's arithmetic
                codes[jj] = c
                qt[i1 + j] = dq
                e = (col - dq) / u1[j, j]
                errt[i1 + j] = e
                if j + 1 < i2 - i1:
                    w1[j + 1:].addr_(u1[j, j + 1:], e, alpha=-1.0)
            blocks[:, b0 // B] = pack_codes(tmpl, codes.t().to(torch.int64), type_name)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), errt[i1:i2], alpha=-1.0)
    data = blocks.reshape(n, nblk * cd.size)
    q = qt.t().contiguous()
    info["output_error"] = output_error(w0, q, h_given)
    loss = 0.5 * float((errt * errt).sum())
    return KQuantGPTQResult(data, q, loss, cur, f"damp-increased:{cur:g}" if tries > 1 else None, info)


# --------------------------------------------------------------------------------------------
# 4. whole models
# --------------------------------------------------------------------------------------------


@dataclass
class GGMLTensor:
    """One GGUF tensor: ``data`` is float32/float16 ``shape`` or uint8 GGUF rows for quantized types.

    Rows are in the model's (Hugging Face) order; the GGUF writer applies llama.cpp's q/k row
    permutation.
    """

    name: str               # GGUF name
    type: str               # "F32", "F16" or a GGML type name
    shape: tuple[int, ...]  # logical (rows, cols) or (n,)
    data: torch.Tensor
    note: str = ""          # "imatrix", "gptq", "fallback Q4_K->Q5_0", ...


@dataclass
class GGMLModel:
    tensors: list[GGMLTensor]
    mix: str
    pure: bool
    method: str
    plan: dict[str, TensorChoice]
    meta: dict = field(default_factory=dict)


def quantize_tensor(w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Float ``(rows, cols)`` -> ``type_name``: uint8 GGUF rows, or float32/float16 values."""
    w = w.detach().to(torch.float32).cpu().contiguous()
    if type_name == "F32":
        return w
    if type_name == "F16":
        return w.to(torch.float16)
    try:
        return kquants.quantize(w, type_name, importance)
    except ValueError as e:
        raise CompressError(str(e)) from None


def decode_tensor(t: GGMLTensor) -> torch.Tensor:
    """The float32 values a GGUF reader gets for ``t``."""
    if t.type in FLOAT_TYPES:
        return t.data.to(torch.float32)
    return kquants.dequantize(t.data, t.type, t.shape)


def _check_importance(name: str, imp: torch.Tensor, cols: int) -> torch.Tensor:
    imp = imp.detach().to(torch.float32).reshape(-1).cpu()
    if imp.numel() != cols:
        raise CompressError(f"the importance matrix entry for {name} has {imp.numel()} values, "
                            f"the tensor has {cols} columns (an imatrix of another model?)")
    return imp


def _note(choice: TensorChoice, extra: str = "") -> str:
    parts = [p for p in (extra, f"fallback {choice.wanted}->{choice.type}" if choice.fallback else "") if p]
    return ", ".join(parts)


def quantize_model_rtn(model_tensors: dict[str, torch.Tensor], plan: dict[str, TensorChoice],
                       importance: dict[str, torch.Tensor] | None = None, progress: bool = True) -> list[GGMLTensor]:
    """Quantize GGUF-named float tensors with the planned types (llama.cpp's quantizers, optionally
    importance-weighted by ``importance``: ``{gguf tensor name: (cols,)}``)."""
    from tqdm import tqdm
    out = []
    importance = importance or {}
    for name in tqdm(list(plan), desc="quantize", unit="tensor", disable=not progress, leave=False):
        ch = plan[name]
        w = model_tensors[name]
        if not ch.quantize:
            out.append(GGMLTensor(name, "F32", ch.shape, w.detach().to(torch.float32).cpu().contiguous()))
            continue
        imp = importance.get(name)
        if imp is not None:
            imp = _check_importance(name, imp, ch.shape[-1])
        uses = imp is not None and ch.type not in FLOAT_TYPES + ("Q8_0",)
        out.append(GGMLTensor(name, ch.type, ch.shape, quantize_tensor(w, ch.type, imp),
                              _note(ch, "imatrix" if uses else "")))
    return out


def quantize_model_gptq(loaded, plan: dict[str, TensorChoice], windows: torch.Tensor,
                        to_gguf_name, damp: float = 0.01, device: str = "cpu",
                        progress: bool = True) -> tuple[dict[str, GGMLTensor], dict]:
    """GPTQ onto the planned GGML grids for every decoder-block linear, through the sequential
    runner (true-sequential groups: each group's Hessian is collected with the block's earlier
    groups already quantized; block i+1 sees the quantized block i).

    ``to_gguf_name(full_param_name) -> gguf name``. Replaces the block linears' weights by their
    quantized values in place. Returns ``({gguf name: GGMLTensor}, record)`` with per-tensor
    losses and fallbacks.
    """
    from calib.runner import run_sequential

    model, arch = loaded.model, loaded.arch
    done: dict[str, GGMLTensor] = {}
    rec = {"losses": {}, "output_errors": {}, "fallbacks": {}}
    t0 = time.perf_counter()

    def process(i, block, inputs):
        for g in arch.groups:
            H = inputs.group_hessian(block, g.linears).hessian()
            for lname in g.linears:
                lin = block.get_submodule(lname)
                gname = to_gguf_name(f"{arch.blocks}.{i}.{lname}.weight")
                ch = plan[gname]
                w = lin.weight.data
                if ch.type in FLOAT_TYPES:
                    data = quantize_tensor(w, ch.type)
                    done[gname] = GGMLTensor(gname, ch.type, ch.shape, data, _note(ch))
                    lin.weight.data = data.to(torch.float32).to(w.device, w.dtype)
                    continue
                res = gptq_kquant_solve(w.to(torch.float32), H, ch.type, damp=damp)
                done[gname] = GGMLTensor(gname, ch.type, ch.shape, res.data,
                                         _note(ch, f"gptq {res.fallback}" if res.fallback else "gptq"))
                rec["losses"][gname] = res.loss
                rec["output_errors"][gname] = res.info["output_error"]
                if res.fallback:
                    rec["fallbacks"][gname] = res.fallback
                    log.warning("%s: %s", gname, res.fallback)
                lin.weight.data = res.weight.to(w.device, w.dtype)
            del H

    run_sequential(model, arch, windows, process, device=device, progress=progress, desc="gptq-gguf")
    rec["seconds"] = time.perf_counter() - t0
    return done, rec


def bits_per_weight(tensors: list[GGMLTensor], quantized_only: bool = True) -> float:
    nbytes = params = 0
    for t in tensors:
        if quantized_only and len(t.shape) < 2:
            continue
        nbytes += t.data.numel() * t.data.element_size()
        params += math.prod(t.shape)
    return 8 * nbytes / params if params else float("nan")

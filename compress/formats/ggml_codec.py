"""The block codec of GGML (llama.cpp) weight types: what a block's bytes mean, field by field.

Every supported type decodes as ``y = A * c - M`` per weight: integer codes ``c`` and a grid
``A``, ``M`` built from the block's scales. For the k-quants (Q2_K..Q6_K) the grid of each
sub-block is ``d * sc`` (and ``dmin * m``): float16 super-block scales ``d``, ``dmin`` times small
integer sub-block scales ``sc``, ``m``; for the legacy 32-weight types it is the float16 ``d``
(and ``m``) itself.

* :func:`block_scales` / :func:`pack_scales`: the scale fields, read and written.
* :func:`block_grid`: ``A``, ``M`` per weight, computed with the decoder's own operations, so
  ``A * c - M`` is bit for bit what :func:`compress.formats.kquants.dequantize` gives.
* :func:`block_codes` / :func:`pack_codes`: the integer codes, read and written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CompressError
from . import ggml_bits

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


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).reshape(-1, 1).view(torch.uint8)


@dataclass(frozen=True)
class BlockScales:
    """The scale fields of ``nb`` blocks. ``d``, ``dmin``: float32 ``(nb,)`` (float16 values; ``dmin``
    None for types without mins). ``sc``, ``m``: int64 ``(nb, subs)`` sub-block scales and mins of a
    k-quant (None for the legacy types, whose grid is ``d`` and ``m`` themselves; ``m`` None
    without mins)."""

    d: torch.Tensor
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    m: torch.Tensor | None = None


@dataclass(frozen=True)
class ScaleLayout:
    """Where a type keeps its scales: byte offsets of ``d`` and ``dmin`` (None: absent), the number
    of sub-blocks and the range of the integer sub-block scales and mins (k-quants only)."""

    d_at: int
    dmin_at: int | None
    subs: int = 0
    sc_range: tuple[int, int] = (0, 0)
    m_range: tuple[int, int] = (0, 0)

    @property
    def legacy(self) -> bool:
        return self.subs == 0


SCALE_LAYOUTS = {
    "Q4_0": ScaleLayout(0, None), "Q5_0": ScaleLayout(0, None), "Q8_0": ScaleLayout(0, None),
    "Q4_1": ScaleLayout(0, 2), "Q5_1": ScaleLayout(0, 2),
    "Q2_K": ScaleLayout(80, 82, 16, (0, 15), (0, 15)),
    "Q3_K": ScaleLayout(108, None, 16, (-32, 31)),
    "Q4_K": ScaleLayout(0, 2, 8, (0, 63), (0, 63)),
    "Q5_K": ScaleLayout(0, 2, 8, (0, 63), (0, 63)),
    "Q6_K": ScaleLayout(208, None, 16, (-128, 127)),
}


def scale_layout(type_name: str) -> ScaleLayout:
    lay = SCALE_LAYOUTS.get(type_name)
    if lay is None:
        raise CompressError(f"no block codec for GGML type {type_name}; supported: {', '.join(SCALE_LAYOUTS)}")
    return lay


def block_scales(data: torch.Tensor, type_name: str) -> BlockScales:
    """The scale fields of GGUF blocks ``data`` (uint8 ``(nb, type_size)``)."""
    lay = scale_layout(type_name)
    d = _fp16_at(data, lay.d_at)
    dmin = None if lay.dmin_at is None else _fp16_at(data, lay.dmin_at)
    if lay.legacy:
        return BlockScales(d, dmin)
    if type_name == "Q2_K":
        s = data[:, 0:16].to(torch.int64)
        return BlockScales(d, dmin, s & 15, s >> 4)
    if type_name == "Q3_K":
        return BlockScales(d, None, ggml_bits.unpack_q3_scales(data[:, 96:108]))
    if type_name in ("Q4_K", "Q5_K"):
        sc, m = ggml_bits.unpack_k4_scales(data[:, 4:16])
        return BlockScales(d, dmin, sc, m)
    return BlockScales(d, None, data[:, 192:208].contiguous().view(torch.int8).to(torch.int64))   # Q6_K


def pack_scales(template: torch.Tensor, type_name: str, s: BlockScales) -> torch.Tensor:
    """``template``'s blocks with their scale fields set to ``s`` (codes unchanged). The float
    scales are stored as float16 (give float16 values to keep them exact); integer sub-block
    scales must lie in the type's range."""
    lay = scale_layout(type_name)
    out = template.clone()
    out[:, lay.d_at:lay.d_at + 2] = _fp16_bytes(s.d)
    if lay.dmin_at is not None:
        out[:, lay.dmin_at:lay.dmin_at + 2] = _fp16_bytes(s.dmin)
    if lay.legacy:
        return out
    for v, (lo, hi), what in ((s.sc, lay.sc_range, "scales"), (s.m, lay.m_range, "mins")):
        if v is not None and v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
            raise ValueError(f"{type_name} sub-block {what} must lie in [{lo}, {hi}]")
    sc = s.sc.to(torch.int64)
    if type_name == "Q2_K":
        out[:, 0:16] = (sc | (s.m.to(torch.int64) << 4)).to(torch.uint8)
    elif type_name == "Q3_K":
        out[:, 96:108] = ggml_bits.pack_q3_scales(sc + 32)
    elif type_name in ("Q4_K", "Q5_K"):
        out[:, 4:16] = ggml_bits.pack_k4_scales(sc, s.m.to(torch.int64))
    else:                                                                   # Q6_K
        out[:, 192:208] = sc.to(torch.int8).view(torch.uint8)
    return out


def scale_grid(s: BlockScales, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block ``A = d * sc`` and ``M = dmin * m`` ``(nb, subs)`` (legacy types: one sub-block,
    ``A = d`` and ``M = -m``), with the decoder's float32 operations."""
    if scale_layout(type_name).legacy:
        M = torch.zeros_like(s.d) if s.dmin is None else -s.dmin
        return s.d[:, None], M[:, None]
    A = s.d[:, None] * s.sc.float()
    M = torch.zeros_like(A) if s.m is None else s.dmin[:, None] * s.m.float()
    return A, M


def block_grid(data: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each weight of GGUF blocks: ``y = A * c - M`` with integer ``c``.

    data: uint8 ``(nb, type_size)``. Returns float32 ``A, M`` ``(nb, block_size)``, computed with
    the decoder's operations (``d * sc``, ``dmin * m``), so that ``A * c - M`` equals the decoded
    weight bit for bit (for Q4_1/Q5_1, ``M = -m`` and ``A*c - (-m) == d*c + m`` exactly).
    """
    A, M = scale_grid(block_scales(data, type_name), type_name)
    rep = _codec(type_name).block // A.shape[1]
    return A.repeat_interleave(rep, 1), M.repeat_interleave(rep, 1)

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



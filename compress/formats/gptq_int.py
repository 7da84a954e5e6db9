"""The GPTQ integer layout ("gptq-int", format version 1).

Byte-level description: docs/FORMATS.md. Packing is defined here; the dequantize twin used
by the runtime lives in ``kernels.reference`` (kernels never import this package).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.reference import dequantize_gptq, unpack_bitstream

FORMAT_ID = "gptq-int"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2, 3)
COMPACT_VERSION = 3            # written when some module stores its codes compactly (below)


def packed_words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values in ``[0, 2**bits)`` along dim 0 into int32 words.

    ``values`` ``(count, *rest)`` -> int32 ``(ceil(count * bits / 32), *rest)``; value i
    occupies bits ``[i * bits, (i + 1) * bits)`` of the little-endian stream.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}; expected 2, 3, 4 or 8")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing")
    count = v.shape[0]
    nwords = packed_words(count, bits)
    rest = v.shape[1:]
    out = torch.zeros((nwords + 1,) + rest, dtype=torch.int64, device=v.device)
    offset = torch.arange(count, device=v.device, dtype=torch.int64) * bits
    word = offset // 32
    shift = (offset % 32).view((count,) + (1,) * len(rest))
    lo = (v << shift) & 0xFFFFFFFF
    hi = v >> (32 - shift)          # the bits that spill into the next word (0 when none)
    out.index_add_(0, word, lo)
    out.index_add_(0, word + 1, hi)
    out = out[:nwords]
    out = torch.where(out >= (1 << 31), out - (1 << 32), out)
    return out.to(torch.int32)


@dataclass
class PackedInt:
    """A GPTQ-layout packed linear weight: plain named tensors plus the shape."""

    qweight: torch.Tensor   # int32 (ceil(K*bits/32), N)
    qzeros: torch.Tensor    # int32 (G, ceil(N*bits/32))
    scales: torch.Tensor    # float16 (G, N)
    g_idx: torch.Tensor     # int32 (K,)
    bits: int
    in_features: int
    out_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx,
                               self.bits, self.in_features, dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
         bits: int) -> PackedInt:
    """Pack quantized values into the GPTQ layout.

    q: integer ``(N, K)`` in ``[0, 2**bits)``; scales ``(G, N)``; zeros integer ``(G, N)`` in
    ``[1, 2**bits)`` (a zero of 0 has no "minus one" encoding and is rejected); g_idx ``(K,)``.
    """
    n, k = q.shape
    z = zeros.to(torch.int64)
    if z.numel() and int(z.min()) < 1:
        raise ValueError("zero-points must be >= 1 in the GPTQ v1 layout (stored as zero - 1)")
    qweight = pack_bitstream(q.t().contiguous(), bits)
    qzeros = pack_bitstream((z - 1).t().contiguous(), bits).t().contiguous()
    return PackedInt(qweight=qweight, qzeros=qzeros, scales=scales.to(torch.float16).contiguous(),
                     g_idx=g_idx.to(torch.int32).contiguous(), bits=bits, in_features=k, out_features=n)


def zero_points(p: PackedInt) -> torch.Tensor:
    """The zero points ``(G, N)`` as int32 (stored minus one)."""
    return (unpack_bitstream(p.qzeros.t().contiguous(), p.bits, p.out_features).t() + 1).contiguous()


def unpack(p: PackedInt) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: returns ``(q (N, K), zeros (G, N))`` as int32."""
    return unpack_bitstream(p.qweight, p.bits, p.in_features).t().contiguous(), zero_points(p)


def from_tensors(t: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int) -> PackedInt:
    return PackedInt(qweight=t["qweight"], qzeros=t["qzeros"], scales=t["scales"], g_idx=t["g_idx"],
                     bits=bits, in_features=in_features, out_features=out_features)


# --------------------------------------------------------------------------- compact codes of a sparse layer
# A pruned and quantized layer holds mostly codes equal to their group's zero point (the codes of
# 0.0). Stored compactly, ``qweight`` is replaced by ``codes_bitmask`` (uint8 (N, ceil(K/8)), bit k
# of row n set where code (n, k) differs from its zero point, little-endian bit order) and
# ``codes`` (int32, the bitstream of those codes in row-major order, packed as qweight's columns
# are). Decoding fills the other positions with the zero point, so the codes come back bit for bit.
COMPACT_TENSORS = ("codes", "codes_bitmask", "qzeros", "scales", "g_idx")


def _zero_codes(p: PackedInt) -> torch.Tensor:
    """The code of 0.0 at every position ``(N, K)``: each column's group's zero point."""
    return zero_points(p).index_select(0, p.g_idx.to(torch.int64)).t()


def compact(p: PackedInt) -> dict[str, torch.Tensor]:
    from .bits import pack_bits
    q = unpack_bitstream(p.qweight, p.bits, p.in_features).t()                           # (N, K)
    keep = q != _zero_codes(p)
    kept = q[keep].to(torch.int64)
    bitmask = pack_bits(keep)
    codes = pack_bitstream(kept, p.bits) if kept.numel() else torch.zeros(0, dtype=torch.int32)
    return {"codes": codes, "codes_bitmask": bitmask, "qzeros": p.qzeros, "scales": p.scales, "g_idx": p.g_idx}


def from_compact(t: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int,
                 name: str = "") -> PackedInt:
    """The :class:`PackedInt` of :func:`compact`'s tensors (ValueError when they disagree)."""
    from .bits import unpack_bits
    n, k = out_features, in_features
    bm = t["codes_bitmask"]
    if bm.dtype != torch.uint8 or tuple(bm.shape) != (n, -(-k // 8)):
        raise ValueError(f"{name}.codes_bitmask has shape {tuple(bm.shape)} ({bm.dtype}), expected ({n}, {-(-k // 8)}) uint8")
    keep = unpack_bits(bm, (n, k))
    count = int(keep.sum())
    if t["codes"].dtype != torch.int32 or t["codes"].dim() != 1 or t["codes"].numel() != packed_words(count, bits):
        raise ValueError(f"{name}.codes holds {t['codes'].numel()} words, the bitmask marks {count} codes "
                         f"({packed_words(count, bits)} words)")
    shell = PackedInt(torch.zeros(0, dtype=torch.int32), t["qzeros"], t["scales"], t["g_idx"], bits, k, n)
    q = _zero_codes(shell).to(torch.int64).clone()
    q[keep] = unpack_bitstream(t["codes"], bits, count).to(torch.int64) if count else q[keep]
    if q.numel() and int(q.max()) >= (1 << bits):
        raise ValueError(f"{name}: a zero point lies outside the {bits}-bit code range")
    return PackedInt(pack_bitstream(q.t().contiguous(), bits), t["qzeros"], t["scales"], t["g_idx"], bits, k, n)

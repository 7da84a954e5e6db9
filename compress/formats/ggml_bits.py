"""Bit packing of the GGML block layouts (nibbles, 2-bit quants, high bits, 6-bit scale fields).

Byte-level description: docs/KQUANTS.md.
"""
from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------
# bit packing shared by several layouts
# ----------------------------------------------------------------------------------------------

def pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8)


def or_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``qs = lo; qs |= hi << 4`` on uint8 (Q4_0/Q4_1 do not mask ``lo``; equal to
    ``pack_nibbles`` whenever both are in 0..15)."""
    return ((lo | (hi << 4)) & 0xFF).to(torch.uint8)


def pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """L ``(nb, 256)`` in [0, 3] -> ``qs (nb, 64)``: byte ``32*(n/128) + n%32``, shift ``2*((n%128)/32)``."""
    nb = L.shape[0]
    q = (L & 3).reshape(nb, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
    return (q << shifts).sum(dim=2).reshape(nb, 64).to(torch.uint8)


def pack_highbits(bits: torch.Tensor) -> torch.Tensor:
    """bits ``(nb, 8*32)`` of one bit each -> ``(nb, 32)``: bit ``n/32`` of byte ``n%32``."""
    nb = bits.shape[0]
    q = bits.reshape(nb, 8, 32)
    shifts = torch.arange(8, dtype=torch.int64).view(1, 8, 1)
    return (q << shifts).sum(dim=1).to(torch.uint8)


def pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins ``(nb, 8)`` (uint8 values) -> the 12 packed bytes of Q4_K/Q5_K."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    b0 = (lo_s | ((hi_s >> 4) << 6)) & 255
    b1 = (lo_m | ((hi_m >> 4) << 6)) & 255
    b2 = ((hi_s & 0xF) | ((hi_m & 0xF) << 4)) & 255
    return torch.cat([b0, b1, b2], dim=1).to(torch.uint8)


def unpack_k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes ``(nb, 12)`` -> ``(sc, m)`` ``(nb, 8)`` int64 (``get_scale_min_k4``)."""
    s = s.to(torch.int64)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, m


def pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """6-bit values ``(nb, 16)`` in [0, 63] -> the 12 packed bytes of Q3_K."""
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4) & 3
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 4, 1)
    high = (hi.reshape(-1, 4, 4) << shifts).sum(dim=1)          # byte 8 + j%4, shift 2*(j/4)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def unpack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    """12 packed bytes ``(nb, 12)`` -> signed scales ``(nb, 16)`` int64 in [-32, 31]."""
    s = s.to(torch.int64)
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)
    return (low | (high << 4)) - 32


def pack_q5_high(L: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: bit 4 of the 32 quants -> little-endian uint32 ``qh`` as ``(nb, 4)`` bytes."""
    bits = ((L >> 4) & 1).reshape(-1, 4, 8)
    shifts = torch.arange(8, dtype=torch.int64).view(1, 1, 8)
    return (bits << shifts).sum(dim=2).to(torch.uint8)


def unpack_q5_high(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int64).view(1, 1, 8)
    return ((qh.to(torch.int64).unsqueeze(2) >> shifts) & 1).reshape(-1, 32)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``(nb, 16)`` -> ``(nb, 32)``: low nibbles then high nibbles."""
    q = qs.to(torch.int64)
    return torch.cat([q & 0xF, q >> 4], dim=1)

"""The legacy 32-weight GGML types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), bit-exact with llama.cpp's
``quantize_row_q*_ref`` and importance-weighted ``quantize_q*`` paths; registered on import.
"""
from __future__ import annotations

import torch

from .ggml_bits import (pack_nibbles, or_nibbles, pack_q5_high, unpack_q5_high, unpack_nibbles)
from .ggml_round import (cdiv, sqrtf, c_cast_low_byte, int8, fp16_bytes, fp16_from_bytes, first_absmax,
    first_min, first_max, make_qx_quants, make_qkx_quants)
from .ggml_type import KQuantType


def _round_half_away(t: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero (exact: ``t - trunc(t)`` is exact in float)."""
    tr = torch.trunc(t)
    frac = (t - tr).abs()
    return tr + torch.where(frac >= 0.5, torch.sign(t), torch.zeros_like(t))


def _legacy_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` for the legacy importance-weighted paths."""
    return qw * sqrtf(sigma2.unsqueeze(1) + x * x)


def _legacy_sym_quants(x: torch.Tensor, qw, sigma2, half: int):
    """Scales and quants of Q4_0 (``half`` 8) and Q5_0 (16): ``quantize_row_q{4,5}_0_ref``
    without importance weights, ``quantize_row_q{4,5}_0_impl`` with them."""
    if qw is None:
        _, mx = first_absmax(x, 1)
        d = mx / -float(half)
        inv = torch.where(d != 0, cdiv(1.0, d), torch.zeros_like(d))
        # MIN(2*half - 1, (int8_t)(x*id + half + 0.5f)) stored in a uint8_t
        q = int8(c_cast_low_byte((x * inv.unsqueeze(1)) + (half + 0.5))).clamp_max_(2 * half - 1) & 0xFF
        return d, q
    w = _legacy_weights(x, qw, sigma2)
    d, L = make_qx_quants(x.t().contiguous(), half, w.t().contiguous())
    return d, L.t().to(torch.int64)


def _legacy_asym_ref(x: torch.Tensor, nmax: int):
    """Scale, minimum and the low bytes of ``(uint8_t)((x - min) * id + 0.5f)`` of
    ``quantize_row_q{4,5}_1_ref`` (``nmax`` 15 or 31), before Q4_1's clamp."""
    mn, mx = first_min(x, 1), first_max(x, 1)
    d = (mx - mn) / float(nmax)
    inv = torch.where(d != 0, cdiv(1.0, d), torch.zeros_like(d))
    return d, mn, c_cast_low_byte((x - mn.unsqueeze(1)) * inv.unsqueeze(1) + 0.5)


def _legacy_asym_impl(x: torch.Tensor, qw, sigma2, nmax: int):
    """Scales, minimums and quants of ``quantize_row_q{4,5}_1_impl`` (``nmax`` 15 or 31)."""
    w = _legacy_weights(x, qw, sigma2)
    d, the_min, L = make_qkx_quants(x.t().contiguous(), w.t().contiguous(), nmax,
                                     -0.9, 0.05, 36, use_mad=False, qkx3=True)
    return d, -the_min, L.t().to(torch.int64)


class Q4_0(KQuantType, name="Q4_0", type_id=2, block_size=32, type_size=18):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        d, q = _legacy_sym_quants(x, qw, sigma2, 8)
        return torch.cat([fp16_bytes(d), or_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        q = (unpack_nibbles(data[:, 2:18]) - 8).float()
        return d * q


class Q4_1(KQuantType, name="Q4_1", type_id=3, block_size=32, type_size=20):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        if qw is None:      # quantize_row_q4_1_ref
            d, m, q = _legacy_asym_ref(x, 15)
            q = int8(q).clamp_max_(15) & 0xFF
        else:               # quantize_row_q4_1_impl
            d, m, q = _legacy_asym_impl(x, qw, sigma2, 15)
        return torch.cat([fp16_bytes(d), fp16_bytes(m), or_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        m = fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
        q = unpack_nibbles(data[:, 4:20]).float()
        return d * q + m


class Q5_0(KQuantType, name="Q5_0", type_id=6, block_size=32, type_size=22):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        d, q = _legacy_sym_quants(x, qw, sigma2, 16)
        return torch.cat([fp16_bytes(d), pack_q5_high(q), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        q = unpack_nibbles(data[:, 6:22]) | (unpack_q5_high(data[:, 2:6]) << 4)
        return d * (q - 16).float()


class Q5_1(KQuantType, name="Q5_1", type_id=7, block_size=32, type_size=24):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        if qw is None:      # quantize_row_q5_1_ref: (uint8_t)(v + 0.5f) without a clamp, as in llama.cpp
            d, m, q = _legacy_asym_ref(x, 31)
        else:               # quantize_row_q5_1_impl
            d, m, q = _legacy_asym_impl(x, qw, sigma2, 31)
        return torch.cat([fp16_bytes(d), fp16_bytes(m), pack_q5_high(q),
                          pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        m = fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
        q = unpack_nibbles(data[:, 8:24]) | (unpack_q5_high(data[:, 4:8]) << 4)
        return d * q.float() + m


class Q8_0(KQuantType, name="Q8_0", type_id=8, block_size=32, type_size=34):
    def quantize_blocks(self, x, qw, sigma2):
        # llama.cpp's quantize_q8_0 ignores quant_weights: both paths are quantize_row_q8_0_ref
        amax = x.abs().amax(1)
        d = amax / 127.0
        inv = torch.where(d != 0, cdiv(1.0, d), torch.zeros_like(d))
        q = c_cast_low_byte(_round_half_away(x * inv.unsqueeze(1))).to(torch.uint8)
        return torch.cat([fp16_bytes(d), q], dim=1)

    def dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        q = data[:, 2:34].contiguous().view(torch.int8).float()
        return q * d

"""llama.cpp-compatible GGML quantization formats (Q4_0 ... Q8_0 and the k-quants Q2_K ... Q6_K).

Byte-level description: docs/KQUANTS.md. Each format is a registered class with a stable id equal
to ggml's type id. ``quantize`` produces exactly the bytes llama.cpp's ``ggml_quantize_chunk``
writes: with ``imatrix=None`` the ``quantize_row_*_ref`` path, with an importance matrix the
importance-weighted ``quantize_*(..., quant_weights)`` path. ``dequantize`` decodes exactly as
llama.cpp's ``dequantize_row_*`` (and gguf-py's ``gguf.quants.dequantize``) do.

Everything is vectorised over all blocks of a tensor. To reproduce llama.cpp's bytes the float
arithmetic follows the C code operation by operation:

* float32 throughout; no fused multiply-adds (torch never fuses separate ops on CPU);
* sums are accumulated in llama.cpp's order: the inner loops over the 16 or 32 weights of a
  sub-block become a Python loop over those positions with every sub-block of the tensor in one
  vector (tensors are laid out ``(n, S)``: position inside the sub-block first, sub-block index
  last, so each step adds one contiguous row);
* ``nearest_int`` (the 12582912 magic-number trick) is round-half-to-even; it is emulated bit for
  bit where its argument is not provably small, and is ``torch.round`` where it is;
* ``sqrtf`` is computed in float64 and rounded to float32 (torch's vectorised float32 sqrt is not
  correctly rounded on AVX-512; the float64 route is, for sqrt, exactly the correctly rounded
  float32 result);
* divisions by a scalar constant are real divisions (``torch.div`` with a tensor numerator):
  ``scalar / tensor`` in torch multiplies by a reciprocal, which rounds differently;
* fp16 by round-to-nearest-even (``Tensor.to(torch.float16)``), and quants recomputed with the
  fp16-rounded ``d``/``dmin`` exactly where llama.cpp does so;
* "first occurrence" maxima (``if (ax > amax)``) use ``argmax``, which returns the first index.
"""
from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ClassVar

import numpy as np
import torch

__all__ = ["KQuantType", "TYPES", "get_type", "quantize", "dequantize", "QK_K"]

QK_K = 256
_GROUP_MAX_EPS = float(np.float32(1e-15))
_MAGIC = 12582912.0                     # 1.5 * 2**23
# Blocks handled per vectorised pass: bounds the memory of the (n, S) work tensors.
_CHUNK_WEIGHTS = 1 << 19

TYPES: dict[str, "KQuantType"] = {}
_BY_ID: dict[int, "KQuantType"] = {}


# ----------------------------------------------------------------------------------------------
# float32 arithmetic helpers that reproduce the C expressions exactly
# ----------------------------------------------------------------------------------------------

def _cdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` with IEEE float32 division (``num`` a float32 constant, ``t`` a tensor)."""
    return torch.div(torch.tensor(num, dtype=torch.float32), t)


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``)."""
    return torch.sqrt(t.double()).float()


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """Bit-exact ``nearest_int``: ``(bits(f + 12582912.f) & 0x7fffff) - 0x400000`` as int32.

    Equal to round-half-to-even for ``|f| <= 4194303``; reproduces llama.cpp's result outside.
    """
    v = (f + _MAGIC).view(torch.int32)
    return (v & 0x7FFFFF) - 0x400000


def _c_cast_low_byte(t: torch.Tensor) -> torch.Tensor:
    """The low byte (0..255, int64) of a C ``(int8_t)``/``(uint8_t)`` cast of float ``t``.

    GCC on x86-64 converts through ``cvttss2si``: truncation toward zero, and 0x80000000 for NaN
    and out-of-range values (so ``inf`` becomes 0); the narrow type keeps the low byte.
    """
    ok = t.abs() < 2147483648.0
    i = torch.where(ok, t, torch.zeros_like(t)).to(torch.int64)
    return torch.where(ok, i, torch.full_like(i, -(1 << 31))) & 0xFF


def _int8(b: torch.Tensor) -> torch.Tensor:
    """Reinterpret low bytes 0..255 as int8 values -128..127."""
    return ((b ^ 0x80) - 0x80)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (round-to-nearest-even) and back to float32."""
    return t.to(torch.float16).to(torch.float32)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float32 ``(N,)`` -> the little-endian fp16 bytes ``(N, 2)`` uint8."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 2)`` -> float32 ``(N,)``."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for (i...) s += t[i];`` over dim 0, in order, in float32."""
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


def _seqsum_first(t: torch.Tensor) -> torch.Tensor:
    """``float s = t[0]; for (i = 1...) s += t[i];`` over dim 0, in order, in float32."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


def _first_absmax(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``for (...) if (fabsf(x) > amax) { amax = fabsf(x); max = x; }`` starting from 0.

    Returns ``(amax, max)``; ``max`` is +0.0 where every element is zero. A NaN never wins a
    ``>`` comparison, so NaNs are skipped (amax is -1 where all are NaN).
    """
    ax = x.abs().nan_to_num_(nan=-1.0, posinf=math.inf)
    amax, idx = ax.max(dim=dim)
    mx = x.gather(dim, idx.unsqueeze(dim)).squeeze(dim)
    mx = torch.where(amax > 0, mx, torch.zeros_like(mx))
    return amax, mx


def _first_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``min = x[0]; for (...) if (x < min) min = x;`` (the first minimal element, sign of zero kept)."""
    idx = x.argmin(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def _first_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``max = x[0]; for (...) if (x > max) max = x;`` (the first maximal element)."""
    idx = x.argmax(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def _to_sub(x: torch.Tensor, n: int) -> torch.Tensor:
    """Blocks ``(nb, B)`` -> sub-block-major work layout ``(n, nb * B // n)``."""
    return x.reshape(-1, n).t().contiguous()


def _from_sub(t: torch.Tensor, nb: int) -> torch.Tensor:
    """Work layout ``(n, S)`` -> blocks ``(nb, B)``."""
    return t.t().reshape(nb, -1)


# ----------------------------------------------------------------------------------------------
# the scale searches of ggml-quants.c, vectorised over sub-blocks; all take (n, S) tensors
# ----------------------------------------------------------------------------------------------

def _make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None,
                    finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale search.

    x ``(n, S)``; w ``(n, S)`` weights or None for ``x*x``. Returns ``(scale (S,), L (n, S))`` with
    L in ``[0, 2*nmax - 1]`` (float32 holding integers). ``finite=False`` when x may hold inf/NaN
    (scales computed from overflowing sums): quants then use the bit-level ``nearest_int``.
    """
    amax, mx = _first_absmax(x, 0)
    zero = amax < _GROUP_MAX_EPS
    if w is None:
        w = x * x
    wx = w * x
    lo, hi = float(-nmax), float(nmax - 1)

    def quants(iscale: torch.Tensor) -> torch.Tensor:
        # for finite x, |iscale * x| <= nmax + 1 (iscale = -(nmax + ...)/max): round() is nearest_int()
        if finite:
            return (x * iscale).round_().clamp_(lo, hi)
        return _nearest_int(x * iscale).clamp_(int(lo), int(hi)).float()

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l = quants(iscale)
        sumlx = _seqsum(wx * l)
        suml2 = _seqsum((w * l).mul_(l))
        return sumlx, suml2

    iscale = _cdiv(float(-nmax), mx)
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    best_iscale = iscale
    f_nmax, f_tenth = np.float32(nmax), np.float32(0.1)
    for step in range(-9, 10):
        if step == 0:
            continue
        num = float(-(f_nmax + f_tenth * np.float32(step)))
        isc = _cdiv(num, mx)
        slx, sl2 = sums(isc)
        upd = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / sl2
        scale = torch.where(upd, new_scale, scale)
        best = torch.where(upd, new_scale * slx, best)
        best_iscale = torch.where(upd, isc, best_iscale)
    L = quants(best_iscale).add_(float(nmax))
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: symmetric scale with coordinate descent.

    Returns ``(scale (S,), L (n, S))``, L in ``[0, 2*nmax - 1]`` (all zero for an all-zero group).
    """
    n = x.shape[0]
    amax, mx = _first_absmax(x, 0)
    zero = amax < _GROUP_MAX_EPS
    lo, hi = float(-nmax), float(nmax - 1)
    iscale = _cdiv(float(-nmax), mx)
    l = (x * iscale).round_().clamp_(lo, hi)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * l)
    suml2 = _seqsum((w * l).mul_(l))
    # llama.cpp stops after a pass without changes; a further pass from an unchanged state
    # changes nothing either, so running all five passes everywhere gives the same result.
    for _ in range(5):
        for i in range(n):
            wi, wxi, li = w[i], wx[i], l[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new_l = _nearest_int((x[i] * sl2) / slx).clamp_(int(lo), int(hi)).float()
            slx_n = slx + wxi * new_l
            sl2_n = sl2 + (wi * new_l) * new_l
            accept = ((slx > 0) & (new_l != li) & (sl2_n > 0)
                      & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n))
            l[i] = torch.where(accept, new_l, li)
            sumlx = torch.where(accept, slx_n, sumlx)
            suml2 = torch.where(accept, sl2_n, suml2)
    L = l + float(nmax)
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool, qkx3: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` (qkx3=False) / ``make_qkx3_quants`` (qkx3=True): scale and min search.

    x, w ``(n, S)``. Returns ``(scale (S,), the_min (S,), L (n, S))``, L in ``[0, nmax]``.
    """
    f_nmax = float(nmax)
    S = x.shape[1]
    # qkx3 feeds -min into an fp16 field (Q4_1/Q5_1 `m`), where the sign of a zero min shows:
    # take llama.cpp's first minimal element there; elsewhere the sign of zero never reaches a byte
    xmin = _first_min(x, 0) if qkx3 else x.amin(0)
    mx = x.amax(0)
    mn = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    degenerate = (mx <= mn) if qkx3 else (mx == mn)
    sum_w = _seqsum_first(w)
    sum_x = _seqsum_first(w * x)

    n = x.shape[0]
    L = torch.empty_like(x)
    tmp = torch.empty_like(x)
    prods = torch.empty((3,) + tuple(x.shape), dtype=x.dtype)
    prod_rows = [prods[:, i] for i in range(n)]       # (3, S) views, made once
    tmp_rows = [tmp[i] for i in range(n)]
    sums = torch.empty((3, S), dtype=torch.float32)
    sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
    bound = torch.empty(S, dtype=torch.float32)
    big = torch.empty(S, dtype=torch.bool)

    def quants(isc: torch.Tensor, m: torch.Tensor) -> None:
        """L = MAX(0, MIN(nmax, nearest_int(isc * (x - m))))."""
        torch.sub(x, m, out=L).mul_(isc)
        # |isc * (x - m)| <= |isc| * max(max - m, m - min). With llama.cpp's grids that is about
        # nmax, where round() is nearest_int(); only a degenerate grid (a range so small that
        # isc overflows) needs the bit-level emulation, which also reproduces C's inf handling.
        torch.maximum(mx - m, m - xmin, out=bound).mul_(isc.abs())
        torch.le(bound, 4.0e6, out=big)
        if bool(big.logical_or_(degenerate).all()):
            L.round_().clamp_(0.0, f_nmax)
        else:
            L.copy_(_nearest_int(L).clamp_(0, nmax))

    def error(sc: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(L, sc, out=tmp)
        tmp.add_(m).sub_(x)
        if use_mad:
            tmp.abs_()
        else:
            tmp.mul_(tmp)
        tmp.mul_(w)
        torch.add(tmp_rows[0], 0.0, out=out)          # float e = 0; e += ... in order
        for row in tmp_rows[1:]:
            out.add_(row)

    # The running best, one row each: error, scale, min, and the grid that produced the winning
    # quants (iscale and the min it was built on). llama.cpp moves `min` to the best candidate's
    # min as it goes, so later candidates' grids (max - min) and quants (x - min) use it.
    ERR, SCALE, MIN, ISCALE, GRIDMIN = range(5)
    state = torch.empty((5, S), dtype=torch.float32)
    cand = torch.empty((5, S), dtype=torch.float32)
    s_bits, c_bits = state.view(torch.int32), cand.view(torch.int32)
    flip = torch.empty((5, S), dtype=torch.int32)
    upd = torch.empty(S, dtype=torch.bool)
    dpos = torch.empty(S, dtype=torch.bool)
    pos = torch.empty(S, dtype=torch.bool)
    rng = torch.empty(S, dtype=torch.float32)
    D = torch.empty(S, dtype=torch.float32)

    torch.sub(mx, mn, out=rng)
    torch.div(torch.tensor(f_nmax), rng, out=state[ISCALE])
    torch.div(torch.tensor(1.0), state[ISCALE], out=state[SCALE])
    state[MIN].copy_(mn)
    state[GRIDMIN].copy_(mn)
    quants(state[ISCALE], state[MIN])
    error(state[SCALE], state[MIN], state[ERR])

    f_rmin, f_rdelta = np.float32(rmin), np.float32(rdelta)
    for step in range(nstep + 1):
        num = float(f_rmin + f_rdelta * np.float32(step) + np.float32(nmax))
        cand[GRIDMIN].copy_(state[MIN])
        torch.sub(mx, cand[GRIDMIN], out=rng)
        torch.div(torch.tensor(num), rng, out=cand[ISCALE])
        quants(cand[ISCALE], cand[GRIDMIN])
        torch.mul(w, L, out=prods[0])
        torch.mul(prods[0], L, out=prods[1])
        torch.mul(prods[0], x, out=prods[2])
        torch.add(prod_rows[0], 0.0, out=sums)        # sum_l, sum_l2, sum_xl, in order
        for row in prod_rows[1:]:
            sums.add_(row)
        torch.mul(sum_w, sum_l2, out=D).sub_(sum_l * sum_l)
        torch.div(sum_w * sum_xl - sum_x * sum_l, D, out=cand[SCALE])
        torch.div(sum_l2 * sum_x - sum_l * sum_xl, D, out=cand[MIN])
        # if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }
        torch.gt(cand[MIN], 0.0, out=pos)
        if bool(pos.any()):
            cand[MIN].masked_fill_(pos, 0.0)
            cand[SCALE] = torch.where(pos, sum_xl / sum_l2, cand[SCALE])
        error(cand[SCALE], cand[MIN], cand[ERR])
        # if (D > 0 && cur_error < best_error) take the candidate: a bitwise select of all rows
        torch.lt(cand[ERR], state[ERR], out=upd)
        torch.gt(D, 0.0, out=dpos)
        upd.logical_and_(dpos)
        mask = upd.to(torch.int32).neg_()
        torch.bitwise_xor(s_bits, c_bits, out=flip)
        flip.bitwise_and_(mask)
        s_bits.bitwise_xor_(flip)
    quants(state[ISCALE], state[GRIDMIN])
    L.masked_fill_(degenerate, 0.0)
    best_scale = torch.where(degenerate, torch.zeros_like(mn), state[SCALE])
    best_min = torch.where(degenerate, mn, state[MIN])
    return best_scale, -best_min, L


def _make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: positive scale for a set of scales.

    x, qw ``(n, S)``. Returns ``(scale (S,), L (n, S))`` where L holds the ``uint8_t`` values
    llama.cpp stores (as int64).
    """
    n = x.shape[0]
    mx = torch.zeros_like(x[0])
    for i in range(n):              # max = MAX(max, x[i]) = max > x[i] ? max : x[i] (NaN included)
        mx = torch.where(mx > x[i], mx, x[i])
    zero = mx < _GROUP_MAX_EPS
    wx = qw * x
    iscale = _cdiv(float(nmax), mx)
    L0 = (_nearest_int(x * iscale) & 255).float()
    scale = _cdiv(1.0, iscale)
    diff = x - scale * L0
    best_mse = _seqsum((qw * diff) * diff)
    best_iscale = iscale
    f_tenth, f_nmax = np.float32(0.1), np.float32(nmax)
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = _cdiv(float(f_tenth * np.float32(step) + f_nmax), mx)
        sc = _cdiv(1.0, isc)
        l = _nearest_int(isc * x).clamp_max_(nmax).float()
        diff = x - sc * l
        mse = _seqsum((qw * diff) * diff)
        upd = mse < best_mse
        best_mse = torch.where(upd, mse, best_mse)
        best_iscale = torch.where(upd, isc, best_iscale)
    l = _nearest_int(best_iscale * x).clamp_max_(nmax)
    lf = l.float()
    L = (l & 255).float()
    sumlx = _seqsum(wx * lf)
    suml2 = _seqsum((qw * lf) * lf)
    for _ in range(5):
        for i in range(n):
            wi, wxi, li = qw[i], wx[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new_l = _nearest_int((x[i] * sl2) / slx).clamp_max_(nmax).float()
            slx_n = slx + wxi * new_l
            sl2_n = sl2 + (wi * new_l) * new_l
            accept = ((slx > 0) & (sl2 > 0) & (new_l != li)
                      & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n))
            L[i] = torch.where(accept, (new_l.to(torch.int32) & 255).float(), li)
            sumlx = torch.where(accept, slx_n, sumlx)
            suml2 = torch.where(accept, sl2_n, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L.to(torch.int64)


# ----------------------------------------------------------------------------------------------
# bit packing shared by several layouts
# ----------------------------------------------------------------------------------------------

def _pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8)


def _or_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``qs = lo; qs |= hi << 4`` on uint8 (Q4_0/Q4_1 do not mask ``lo``; equal to
    ``_pack_nibbles`` whenever both are in 0..15)."""
    return ((lo | (hi << 4)) & 0xFF).to(torch.uint8)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """L ``(nb, 256)`` in [0, 3] -> ``qs (nb, 64)``: byte ``32*(n/128) + n%32``, shift ``2*((n%128)/32)``."""
    nb = L.shape[0]
    q = (L & 3).reshape(nb, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
    return (q << shifts).sum(dim=2).reshape(nb, 64).to(torch.uint8)


def _pack_highbits(bits: torch.Tensor) -> torch.Tensor:
    """bits ``(nb, 8*32)`` of one bit each -> ``(nb, 32)``: bit ``n/32`` of byte ``n%32``."""
    nb = bits.shape[0]
    q = bits.reshape(nb, 8, 32)
    shifts = torch.arange(8, dtype=torch.int64).view(1, 8, 1)
    return (q << shifts).sum(dim=1).to(torch.uint8)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins ``(nb, 8)`` (uint8 values) -> the 12 packed bytes of Q4_K/Q5_K."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    b0 = (lo_s | ((hi_s >> 4) << 6)) & 255
    b1 = (lo_m | ((hi_m >> 4) << 6)) & 255
    b2 = ((hi_s & 0xF) | ((hi_m & 0xF) << 4)) & 255
    return torch.cat([b0, b1, b2], dim=1).to(torch.uint8)


def _unpack_k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes ``(nb, 12)`` -> ``(sc, m)`` ``(nb, 8)`` int64 (``get_scale_min_k4``)."""
    s = s.to(torch.int64)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, m


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """6-bit values ``(nb, 16)`` in [0, 63] -> the 12 packed bytes of Q3_K."""
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4) & 3
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 4, 1)
    high = (hi.reshape(-1, 4, 4) << shifts).sum(dim=1)          # byte 8 + j%4, shift 2*(j/4)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def _unpack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    """12 packed bytes ``(nb, 12)`` -> signed scales ``(nb, 16)`` int64 in [-32, 31]."""
    s = s.to(torch.int64)
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)
    return (low | (high << 4)) - 32


def _pack_q5_high(L: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: bit 4 of the 32 quants -> little-endian uint32 ``qh`` as ``(nb, 4)`` bytes."""
    bits = ((L >> 4) & 1).reshape(-1, 4, 8)
    shifts = torch.arange(8, dtype=torch.int64).view(1, 1, 8)
    return (bits << shifts).sum(dim=2).to(torch.uint8)


def _unpack_q5_high(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int64).view(1, 1, 8)
    return ((qh.to(torch.int64).unsqueeze(2) >> shifts) & 1).reshape(-1, 32)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``(nb, 16)`` -> ``(nb, 32)``: low nibbles then high nibbles."""
    q = qs.to(torch.int64)
    return torch.cat([q & 0xF, q >> 4], dim=1)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

class KQuantType:
    """A GGML quantization type: layout constants plus block quantize / dequantize.

    Subclasses register themselves: ``class Q4_K(KQuantType, name="Q4_K", type_id=12, ...)``.
    Ids are ggml's ``enum ggml_type`` values and are never reused.
    """

    name: ClassVar[str]
    type_id: ClassVar[int]
    block_size: ClassVar[int]        # weights per block
    type_size: ClassVar[int]         # bytes per block
    row_sigma2: ClassVar[bool] = False   # imatrix path needs the mean of x^2 over the whole row

    def __init_subclass__(cls, *, name: str, type_id: int, block_size: int, type_size: int, **kw):
        super().__init_subclass__(**kw)
        if name in TYPES or type_id in _BY_ID:
            raise ValueError(f"GGML type {name} / id {type_id} registered twice")
        cls.name, cls.type_id, cls.block_size, cls.type_size = name, type_id, block_size, type_size
        inst = cls()
        TYPES[name] = inst
        _BY_ID[type_id] = inst

    @property
    def bpw(self) -> float:
        """Bits per weight."""
        return self.type_size * 8 / self.block_size

    def __repr__(self) -> str:
        return (f"{self.name}(type_id={self.type_id}, block_size={self.block_size}, "
                f"type_size={self.type_size}, bpw={self.bpw:g})")

    # x: (nb, block_size) float32; qw: (nb, block_size) or None; sigma2: (nb,) or None
    def quantize_blocks(self, x: torch.Tensor, qw: torch.Tensor | None,
                        sigma2: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def get_type(name_or_id: str | int | KQuantType) -> KQuantType:
    """Look a type up by name (``"Q4_K"``, case-insensitive) or ggml type id (``12``)."""
    if isinstance(name_or_id, KQuantType):
        return name_or_id
    if isinstance(name_or_id, (int, np.integer)) and not isinstance(name_or_id, bool):
        t = _BY_ID.get(int(name_or_id))
        if t is None:
            raise ValueError(f"unknown GGML type id {name_or_id}; supported ids: "
                             + ", ".join(f"{v.name}={k}" for k, v in sorted(_BY_ID.items())))
        return t
    if isinstance(name_or_id, str):
        t = TYPES.get(name_or_id.upper())
        if t is None:
            raise ValueError(f"unknown GGML quantization type {name_or_id!r}; supported: "
                             + ", ".join(TYPES))
        return t
    raise ValueError(f"expected a GGML type name or id, got {type(name_or_id).__name__}")


# ----------------------------------------------------------------------------------------------
# legacy 32-weight types
# ----------------------------------------------------------------------------------------------

def _round_half_away(t: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero (exact: ``t - trunc(t)`` is exact in float)."""
    tr = torch.trunc(t)
    frac = (t - tr).abs()
    return tr + torch.where(frac >= 0.5, torch.sign(t), torch.zeros_like(t))


def _legacy_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` for the legacy importance-weighted paths."""
    return qw * _sqrtf(sigma2.unsqueeze(1) + x * x)


def _legacy_sym_quants(x: torch.Tensor, qw, sigma2, half: int):
    """Scales and quants of Q4_0 (``half`` 8) and Q5_0 (16): ``quantize_row_q{4,5}_0_ref``
    without importance weights, ``quantize_row_q{4,5}_0_impl`` with them."""
    if qw is None:
        _, mx = _first_absmax(x, 1)
        d = mx / -float(half)
        inv = torch.where(d != 0, _cdiv(1.0, d), torch.zeros_like(d))
        # MIN(2*half - 1, (int8_t)(x*id + half + 0.5f)) stored in a uint8_t
        q = _int8(_c_cast_low_byte((x * inv.unsqueeze(1)) + (half + 0.5))).clamp_max_(2 * half - 1) & 0xFF
        return d, q
    w = _legacy_weights(x, qw, sigma2)
    d, L = _make_qx_quants(x.t().contiguous(), half, w.t().contiguous())
    return d, L.t().to(torch.int64)


def _legacy_asym_impl(x: torch.Tensor, qw, sigma2, nmax: int):
    """Scales, minimums and quants of ``quantize_row_q{4,5}_1_impl`` (``nmax`` 15 or 31)."""
    w = _legacy_weights(x, qw, sigma2)
    d, the_min, L = _make_qkx_quants(x.t().contiguous(), w.t().contiguous(), nmax,
                                     -0.9, 0.05, 36, use_mad=False, qkx3=True)
    return d, -the_min, L.t().to(torch.int64)


class Q4_0(KQuantType, name="Q4_0", type_id=2, block_size=32, type_size=18):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        d, q = _legacy_sym_quants(x, qw, sigma2, 8)
        return torch.cat([_fp16_bytes(d), _or_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = _fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        q = (_unpack_nibbles(data[:, 2:18]) - 8).float()
        return d * q


class Q4_1(KQuantType, name="Q4_1", type_id=3, block_size=32, type_size=20):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        if qw is None:      # quantize_row_q4_1_ref
            mn, mx = _first_min(x, 1), _first_max(x, 1)
            d = (mx - mn) / 15.0
            inv = torch.where(d != 0, _cdiv(1.0, d), torch.zeros_like(d))
            q = _int8(_c_cast_low_byte((x - mn.unsqueeze(1)) * inv.unsqueeze(1) + 0.5)).clamp_max_(15) & 0xFF
            m = mn
        else:               # quantize_row_q4_1_impl
            d, m, q = _legacy_asym_impl(x, qw, sigma2, 15)
        return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _or_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = _fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        m = _fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
        q = _unpack_nibbles(data[:, 4:20]).float()
        return d * q + m


class Q5_0(KQuantType, name="Q5_0", type_id=6, block_size=32, type_size=22):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        d, q = _legacy_sym_quants(x, qw, sigma2, 16)
        return torch.cat([_fp16_bytes(d), _pack_q5_high(q), _pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = _fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        q = _unpack_nibbles(data[:, 6:22]) | (_unpack_q5_high(data[:, 2:6]) << 4)
        return d * (q - 16).float()


class Q5_1(KQuantType, name="Q5_1", type_id=7, block_size=32, type_size=24):
    row_sigma2 = True

    def quantize_blocks(self, x, qw, sigma2):
        if qw is None:      # quantize_row_q5_1_ref
            mn, mx = _first_min(x, 1), _first_max(x, 1)
            d = (mx - mn) / 31.0
            inv = torch.where(d != 0, _cdiv(1.0, d), torch.zeros_like(d))
            # (uint8_t)(v + 0.5f) without a clamp, as in llama.cpp
            q = _c_cast_low_byte((x - mn.unsqueeze(1)) * inv.unsqueeze(1) + 0.5)
            m = mn
        else:               # quantize_row_q5_1_impl
            d, m, q = _legacy_asym_impl(x, qw, sigma2, 31)
        return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _pack_q5_high(q),
                          _pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    def dequantize_blocks(self, data):
        d = _fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        m = _fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
        q = _unpack_nibbles(data[:, 8:24]) | (_unpack_q5_high(data[:, 4:8]) << 4)
        return d * q.float() + m


class Q8_0(KQuantType, name="Q8_0", type_id=8, block_size=32, type_size=34):
    def quantize_blocks(self, x, qw, sigma2):
        # llama.cpp's quantize_q8_0 ignores quant_weights: both paths are quantize_row_q8_0_ref
        amax = x.abs().amax(1)
        d = amax / 127.0
        inv = torch.where(d != 0, _cdiv(1.0, d), torch.zeros_like(d))
        q = _c_cast_low_byte(_round_half_away(x * inv.unsqueeze(1))).to(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=1)

    def dequantize_blocks(self, data):
        d = _fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
        q = data[:, 2:34].contiguous().view(torch.int8).float()
        return q * d


# ----------------------------------------------------------------------------------------------
# k-quants (super-blocks of 256)
# ----------------------------------------------------------------------------------------------

def _block_sum_x2(x: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for (l < 256) s += x[l]*x[l];`` per block: ``(nb, 256)`` -> ``(nb,)``."""
    xt = x.t().contiguous()
    return _seqsum(xt * xt)


def _kquant_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` with a per-block sigma2."""
    return qw * _sqrtf(sigma2.unsqueeze(1) + x * x)


def _requant_affine(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, L: torch.Tensor, n: int,
                    nmax: int) -> torch.Tensor:
    """``l = nearest_int((x + dm)/d)`` clamped to ``[0, nmax]`` where ``d != 0``, else the search's L.

    x, L ``(nb, 256)``; d, dm ``(nb, 256 // n)`` (fp16 d times the integer sub-block scale).
    """
    nb = x.shape[0]
    xs = x.reshape(nb, -1, n)
    dd, mm = d.unsqueeze(2), dm.unsqueeze(2)
    l = _nearest_int((xs + mm) / dd).clamp_(0, nmax)
    keep = (dd == 0).expand_as(l)
    return torch.where(keep, L.reshape(nb, -1, n).to(torch.int32), l).reshape(nb, -1)


def _requant_symmetric(x: torch.Tensor, d: torch.Tensor, L: torch.Tensor, n: int, nmax: int) -> torch.Tensor:
    """``l = clamp(nearest_int(x/d), -nmax, nmax-1) + nmax`` where ``d != 0``, else the search's L."""
    nb = x.shape[0]
    xs = x.reshape(nb, -1, n)
    dd = d.unsqueeze(2)
    l = _nearest_int(xs / dd).clamp_(-nmax, nmax - 1).add_(nmax)
    keep = (dd == 0).expand_as(l)
    return torch.where(keep, L.reshape(nb, -1, n).to(torch.int32), l).reshape(nb, -1)


def _max_scale(s: torch.Tensor) -> torch.Tensor:
    """``float m = 0; for (...) if (s > m) m = s;`` over dim 1 (+0.0 unless some s > 0)."""
    m = s.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


class Q2_K(KQuantType, name="Q2_K", type_id=10, block_size=256, type_size=84):
    def quantize_blocks(self, x, qw, sigma2):
        nb = x.shape[0]
        xt = _to_sub(x, 16)
        if qw is None:      # quantize_row_q2_K_ref
            scales, mins, L = _make_qkx_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, use_mad=True, qkx3=False)
            scales, mins = scales.view(nb, 16), mins.view(nb, 16)
            max_scale, max_min = _max_scale(scales), _max_scale(mins)
            has_s, has_m = max_scale > 0, max_min > 0
            inv_s = _cdiv(15.0, max_scale)
            inv_m = _cdiv(15.0, max_min)
            ls = torch.where(has_s.unsqueeze(1), _nearest_int(inv_s.unsqueeze(1) * scales).long(),
                             torch.zeros_like(scales, dtype=torch.int64))
            lm = torch.where(has_m.unsqueeze(1), _nearest_int(inv_m.unsqueeze(1) * mins).long(),
                             torch.zeros_like(mins, dtype=torch.int64))
            sc_bytes = (ls | (lm << 4)) & 255
            d = torch.where(has_s, max_scale / 15.0, torch.zeros_like(max_scale))
            dmin = torch.where(has_m, max_min / 15.0, torch.zeros_like(max_min))
        else:               # quantize_row_q2_K_impl
            sig = _block_sum_x2(x) / float(QK_K)
            w = _to_sub(_kquant_weights(x, qw, sig), 16)
            sw = _seqsum(w)
            scales, mins, L = _make_qkx_quants(xt, w, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
            swt = sw.view(nb, 16).t().contiguous()
            d, Ls = _make_qp_quants(scales.view(nb, 16).t().contiguous(), 15, swt)
            dmin, Lm = _make_qp_quants(mins.view(nb, 16).t().contiguous(), 15, swt)
            sc_bytes = (Ls.t() | (Lm.t() << 4)) & 255
        d16, dmin16 = _fp16(d), _fp16(dmin)
        sub_d = d16.unsqueeze(1) * (sc_bytes & 0xF).float()
        sub_m = dmin16.unsqueeze(1) * (sc_bytes >> 4).float()
        q = _requant_affine(x, sub_d, sub_m, _from_sub(L, nb), 16, 3)
        return torch.cat([sc_bytes.to(torch.uint8), _pack_2bit(q), _fp16_bytes(d), _fp16_bytes(dmin)], dim=1)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        sc = data[:, 0:16].to(torch.int64)
        qs = data[:, 16:80].to(torch.int64).reshape(nb, 2, 1, 32)
        d = _fp16_from_bytes(data[:, 80:82]).unsqueeze(1)
        dmin = _fp16_from_bytes(data[:, 82:84]).unsqueeze(1)
        dl = (d * (sc & 0xF).float()).unsqueeze(2)
        ml = (dmin * (sc >> 4).float()).unsqueeze(2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
        q = ((qs >> shifts) & 3).reshape(nb, 16, 16).float()
        return (dl * q - ml).reshape(nb, QK_K)


class Q3_K(KQuantType, name="Q3_K", type_id=11, block_size=256, type_size=110):
    def quantize_blocks(self, x, qw, sigma2):
        nb = x.shape[0]
        xt = _to_sub(x, 16)
        if qw is None:      # quantize_row_q3_K_ref
            scales, L = _make_q3_quants(xt, 4)
            scales = scales.view(nb, 16)
            _, max_scale = _first_absmax(scales, 1)
            has = max_scale != 0
            iscale = _cdiv(-32.0, max_scale)
            l = _nearest_int(iscale.unsqueeze(1) * scales).long()
            l = ((l + 128) & 255) - 128                     # int8_t
            l = l.clamp(-32, 31) + 32
            l = torch.where(has.unsqueeze(1), l, torch.zeros_like(l))
            sc_bytes = _pack_q3_scales(l)
            sc_bytes = torch.where(has.unsqueeze(1), sc_bytes, torch.zeros_like(sc_bytes))
            d = torch.where(has, _cdiv(1.0, iscale), torch.zeros_like(iscale))
        else:               # quantize_row_q3_K_impl
            sig = (2.0 * _block_sum_x2(x)) / float(QK_K)
            w = _to_sub(_kquant_weights(x, qw, sig), 16)
            sw = _seqsum(w)
            scales, L = _make_qx_quants(xt, 4, w)
            d, Ls = _make_qx_quants(scales.view(nb, 16).t().contiguous(), 32,
                                    sw.view(nb, 16).t().contiguous(), finite=False)
            sc_bytes = _pack_q3_scales(Ls.t().long())
        d16 = _fp16(d)
        sub_d = d16.unsqueeze(1) * _unpack_q3_scales(sc_bytes).float()
        q = _requant_symmetric(x, sub_d, _from_sub(L, nb), 16, 4)
        hmask = _pack_highbits(q >> 2)
        return torch.cat([hmask, _pack_2bit(q & 3), sc_bytes, _fp16_bytes(d)], dim=1)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        hm = data[:, 0:32].to(torch.int64).reshape(nb, 1, 32)
        qs = data[:, 32:96].to(torch.int64).reshape(nb, 2, 1, 32)
        sc = _unpack_q3_scales(data[:, 96:108]).float()
        d = _fp16_from_bytes(data[:, 108:110]).unsqueeze(1)
        dl = (d * sc).unsqueeze(2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
        low = ((qs >> shifts) & 3).reshape(nb, 8, 32)
        high = (hm >> torch.arange(8, dtype=torch.int64).view(1, 8, 1)) & 1
        q = (low - ((1 - high) << 2)).reshape(nb, 16, 16).float()
        return (dl * q).reshape(nb, QK_K)


def _q45k_quantize(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, rmin_ref: float,
                   nstep_ref: int, clamp_impl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared search for Q4_K (nmax 15) and Q5_K (nmax 31): returns (d|dmin bytes, scale bytes, quants)."""
    nb = x.shape[0]
    xt = _to_sub(x, 32)
    if qw is None:          # quantize_row_q{4,5}_K_ref
        av_x = _sqrtf(_seqsum(xt * xt) / 32.0)
        w = xt.abs().add_(av_x)
        scales, mins, L = _make_qkx_quants(xt, w, nmax, rmin_ref, 0.1, nstep_ref, use_mad=False, qkx3=False)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        max_scale, max_min = _max_scale(scales), _max_scale(mins)
        inv_s = torch.where(max_scale > 0, _cdiv(63.0, max_scale), torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, _cdiv(63.0, max_min), torch.zeros_like(max_min))
        ls = (_nearest_int(inv_s.unsqueeze(1) * scales).long() & 255).clamp_max(63)
        lm = (_nearest_int(inv_m.unsqueeze(1) * mins).long() & 255).clamp_max(63)
        d, dmin = max_scale / 63.0, max_min / 63.0
    else:                   # quantize_row_q{4,5}_K_impl
        sig = (2.0 * _block_sum_x2(x)) / float(QK_K)
        w = _to_sub(_kquant_weights(x, qw, sig), 32)
        sw = _seqsum(w)
        scales, mins, L = _make_qkx_quants(xt, w, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        swt = sw.view(nb, 8).t().contiguous()
        d, Ls = _make_qp_quants(scales.view(nb, 8).t().contiguous(), 63, swt)
        dmin, Lm = _make_qp_quants(mins.view(nb, 8).t().contiguous(), 63, swt)
        ls, lm = Ls.t(), Lm.t()
        if clamp_impl:
            ls, lm = ls.clamp_max(63), lm.clamp_max(63)
    sc_bytes = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(sc_bytes)
    sub_d = _fp16(d).unsqueeze(1) * sc.float()
    sub_m = _fp16(dmin).unsqueeze(1) * m.float()
    q = _requant_affine(x, sub_d, sub_m, _from_sub(L, nb), 32, nmax)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin)], dim=1), sc_bytes, q


def _q45k_dequantize(data: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = data.shape[0]
    d = _fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
    dmin = _fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
    sc, m = _unpack_k4_scales(data[:, 4:16])
    dl = (d * sc.float()).unsqueeze(2)
    ml = (dmin * m.float()).unsqueeze(2)
    return (dl * q.reshape(nb, 8, 32).float() - ml).reshape(nb, QK_K)


def _unpack_k4_quants(qs: torch.Tensor) -> torch.Tensor:
    """``qs (nb, 128)`` -> 4-bit quants ``(nb, 256)``: byte ``32*(n/64) + n%32``, nibble ``(n%64)/32``."""
    nb = qs.shape[0]
    q = qs.to(torch.int64).reshape(nb, 4, 1, 32)
    return ((q >> torch.tensor([0, 4], dtype=torch.int64).view(1, 1, 2, 1)) & 0xF).reshape(nb, QK_K)


def _pack_k4_quants(q: torch.Tensor) -> torch.Tensor:
    nb = q.shape[0]
    q = q.reshape(nb, 4, 2, 32)
    return _pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(nb, 128)


class Q4_K(KQuantType, name="Q4_K", type_id=12, block_size=256, type_size=144):
    def quantize_blocks(self, x, qw, sigma2):
        dd, sc_bytes, q = _q45k_quantize(x, qw, 15, -1.0, 20, clamp_impl=False)
        return torch.cat([dd, sc_bytes, _pack_k4_quants(q)], dim=1)

    def dequantize_blocks(self, data):
        return _q45k_dequantize(data, _unpack_k4_quants(data[:, 16:144]))


class Q5_K(KQuantType, name="Q5_K", type_id=13, block_size=256, type_size=176):
    def quantize_blocks(self, x, qw, sigma2):
        dd, sc_bytes, q = _q45k_quantize(x, qw, 31, -0.5, 15, clamp_impl=True)
        qh = _pack_highbits((q >> 4) & 1)
        return torch.cat([dd, sc_bytes, qh, _pack_k4_quants(q & 0xF)], dim=1)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        low = _unpack_k4_quants(data[:, 48:176])
        hm = data[:, 16:48].to(torch.int64).reshape(nb, 1, 32)
        high = ((hm >> torch.arange(8, dtype=torch.int64).view(1, 8, 1)) & 1).reshape(nb, QK_K)
        return _q45k_dequantize(data, low | (high << 4))


class Q6_K(KQuantType, name="Q6_K", type_id=14, block_size=256, type_size=210):
    def quantize_blocks(self, x, qw, sigma2):
        nb = x.shape[0]
        xt = _to_sub(x, 16)
        # quantize_row_q6_K_ref uses x*x as weights; the imatrix path passes quant_weights as is
        scales, L = _make_qx_quants(xt, 32, None if qw is None else _to_sub(qw, 16))
        scales = scales.view(nb, 16)
        max_abs, max_scale = _first_absmax(scales, 1)
        zero_block = max_abs < _GROUP_MAX_EPS
        iscale = _cdiv(-128.0, max_scale)
        d = _cdiv(1.0, iscale)
        sc = _nearest_int(iscale.unsqueeze(1) * scales).long().clamp_max(127)
        sc = ((sc + 128) & 255) - 128                       # int8_t
        sub_d = _fp16(d).unsqueeze(1) * sc.float()
        q = _requant_symmetric(x, sub_d, _from_sub(L, nb), 16, 32)
        q = q.reshape(nb, 2, 4, 32)
        low, high = q & 0xF, q >> 4
        ql = _pack_nibbles(low[:, :, 0:2], low[:, :, 2:4]).reshape(nb, 128)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
        qh = ((high & 3) << shifts).sum(dim=2).to(torch.uint8).reshape(nb, 64)
        out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], dim=1)
        return torch.where(zero_block.unsqueeze(1), torch.zeros_like(out), out)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        ql = data[:, 0:128].to(torch.int64).reshape(nb, 2, 1, 64)
        qh = data[:, 128:192].to(torch.int64).reshape(nb, 2, 1, 32)
        sc = data[:, 192:208].contiguous().view(torch.int8).float()
        d = _fp16_from_bytes(data[:, 208:210]).unsqueeze(1)
        dl = (d * sc).unsqueeze(2)
        low = ((ql >> torch.tensor([0, 4], dtype=torch.int64).view(1, 1, 2, 1)) & 0xF).reshape(nb, 2, 4, 32)
        high = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)) & 3)
        q = ((low | (high << 4)) - 32).reshape(nb, 16, 16).float()
        return (dl * q).reshape(nb, QK_K)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def _row_sigma2(w: torch.Tensor) -> torch.Tensor:
    """``sum_x2 = 0; for (j < n_per_row) sum_x2 += x[j]*x[j]; sigma2 = sum_x2/n_per_row`` per row."""
    xt = w.t().contiguous()
    return _seqsum(xt * xt) / float(w.shape[1])


@functools.lru_cache(maxsize=1)
def _openmp_backend() -> bool:
    return "OpenMP" in torch.__config__.parallel_info()


def _map_chunks(fn: Callable[[int], None], starts: list[int]) -> None:
    """Run ``fn`` on every chunk start (chunks write disjoint outputs), on up to
    ``torch.get_num_threads()`` Python threads.

    The scale searches are long chains of medium-size torch ops. Intra-op (OpenMP) threading
    puts a barrier on every op, and those barriers stall whenever the machine's cores are busy
    (measured on a 2-core machine at load 5: Q4_K at 1.7 Mw/s with 2 OpenMP threads against 12
    single-threaded). So chunks run in parallel instead, each worker with one intra-op thread
    (``torch.set_num_threads`` in a worker sets that thread's OpenMP team size; the caller's own
    setting is restored afterwards). Results do not depend on the thread count.
    """
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1 or not _openmp_backend():
        for r0 in starts:
            fn(r0)
        return
    caller_threads = torch.get_num_threads()
    pending = iter(starts)
    lock = threading.Lock()

    def worker() -> None:
        torch.set_num_threads(1)
        while True:
            with lock:
                r0 = next(pending, None)
            if r0 is None:
                return
            fn(r0)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="kquants") as pool:
            for f in [pool.submit(worker) for _ in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(caller_threads)


def quantize(w: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a float32 matrix to GGML bytes exactly as llama.cpp's ``ggml_quantize_chunk``.

    w: float32 ``(rows, cols)``, ``cols`` a multiple of the type's block size, all finite.
    imatrix: optional float32 ``(cols,)`` importance per input column (mean squared activation);
    None selects llama.cpp's ``quantize_row_*_ref`` path, a tensor its importance-weighted path.
    Returns uint8 ``(rows, cols // block_size * type_size)``, row-major like a GGUF tensor.
    """
    qt = get_type(type_name)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor (rows, cols), got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dtype != torch.float32:
        raise ValueError(f"expected float32 weights, got {w.dtype}")
    rows, cols = w.shape
    if cols % qt.block_size != 0 or cols == 0:
        raise ValueError(f"{qt.name} needs the column count to be a positive multiple of its block size "
                         f"{qt.block_size}; got shape {tuple(w.shape)}")
    nbr = cols // qt.block_size
    out = torch.empty((rows, nbr * qt.type_size), dtype=torch.uint8)
    if rows == 0:
        return out
    w = w.detach().cpu().contiguous()
    lo_hi = torch.aminmax(w)            # NaN propagates through min/max; one cheap pass
    if not (math.isfinite(float(lo_hi.min)) and math.isfinite(float(lo_hi.max))):
        raise ValueError(f"cannot quantize a tensor holding NaN or Inf (shape {tuple(w.shape)})")
    qw_row = None
    if imatrix is not None:
        imatrix = imatrix.detach().cpu().to(torch.float32).reshape(-1)
        if imatrix.numel() != cols:
            raise ValueError(f"imatrix must have one value per column ({cols}), got shape "
                             f"{tuple(imatrix.shape)}")
        if not bool(torch.isfinite(imatrix).all()):
            raise ValueError("imatrix holds NaN or Inf")
        qw_row = imatrix.contiguous()
    sigma2_row = _row_sigma2(w) if (qw_row is not None and qt.row_sigma2) else None
    rows_per_chunk = max(1, _CHUNK_WEIGHTS // cols)

    def run(r0: int) -> None:
        r1 = min(rows, r0 + rows_per_chunk)
        xb = w[r0:r1].reshape(-1, qt.block_size)
        qwb = sg = None
        if qw_row is not None:      # the same per-column importance for every row
            qwb = qw_row.view(1, nbr, qt.block_size).expand(r1 - r0, -1, -1).reshape(-1, qt.block_size)
        if sigma2_row is not None:
            sg = sigma2_row[r0:r1].repeat_interleave(nbr)
        out[r0:r1] = qt.quantize_blocks(xb, qwb, sg).reshape(r1 - r0, -1)

    _map_chunks(run, list(range(0, rows, rows_per_chunk)))
    return out


def dequantize(data: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """Decode GGML bytes to float32 ``shape`` exactly as llama.cpp's ``dequantize_row_*``."""
    qt = get_type(type_name)
    rows, cols = (int(s) for s in shape)
    if cols % qt.block_size != 0:
        raise ValueError(f"{qt.name} needs the column count to be a multiple of its block size "
                         f"{qt.block_size}; got shape {tuple(shape)}")
    nbytes = rows * (cols // qt.block_size) * qt.type_size
    if data.dtype != torch.uint8 or data.numel() != nbytes:
        raise ValueError(f"{qt.name} {tuple(shape)} needs {nbytes} uint8 bytes, got {data.numel()} "
                         f"of {data.dtype}")
    blocks = data.detach().cpu().contiguous().reshape(-1, qt.type_size)
    out = torch.empty((rows * cols // qt.block_size, qt.block_size), dtype=torch.float32)
    step = max(1, _CHUNK_WEIGHTS // qt.block_size)

    def run(b0: int) -> None:
        out[b0:b0 + step] = qt.dequantize_blocks(blocks[b0:b0 + step])

    _map_chunks(run, list(range(0, blocks.shape[0], step)))
    return out.reshape(rows, cols)

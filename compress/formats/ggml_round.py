"""llama.cpp's float arithmetic and scale searches (``ggml-quants.c``), bit-exact in torch.

The building blocks of :mod:`compress.formats.kquants`: C float expressions reproduced
operation by operation, and the searches for a sub-block's scale (``make_qx_quants``,
``make_q3_quants``, ``make_qkx2/3_quants``, ``make_qp_quants``) vectorised over sub-blocks.

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

import math

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))
_MAGIC = 12582912.0                     # 1.5 * 2**23


# ----------------------------------------------------------------------------------------------
# float32 arithmetic helpers that reproduce the C expressions exactly
# ----------------------------------------------------------------------------------------------

def cdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` with IEEE float32 division (``num`` a float32 constant, ``t`` a tensor)."""
    return torch.div(torch.tensor(num, dtype=torch.float32), t)


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``)."""
    return torch.sqrt(t.double()).float()


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """Bit-exact ``nearest_int``: ``(bits(f + 12582912.f) & 0x7fffff) - 0x400000`` as int32.

    Equal to round-half-to-even for ``|f| <= 4194303``; reproduces llama.cpp's result outside.
    """
    v = (f + _MAGIC).view(torch.int32)
    return (v & 0x7FFFFF) - 0x400000


def c_cast_low_byte(t: torch.Tensor) -> torch.Tensor:
    """The low byte (0..255, int64) of a C ``(int8_t)``/``(uint8_t)`` cast of float ``t``.

    GCC on x86-64 converts through ``cvttss2si``: truncation toward zero, and 0x80000000 for NaN
    and out-of-range values (so ``inf`` becomes 0); the narrow type keeps the low byte.
    """
    ok = t.abs() < 2147483648.0
    i = torch.where(ok, t, torch.zeros_like(t)).to(torch.int64)
    return torch.where(ok, i, torch.full_like(i, -(1 << 31))) & 0xFF


def int8(b: torch.Tensor) -> torch.Tensor:
    """Reinterpret low bytes 0..255 as int8 values -128..127."""
    return ((b ^ 0x80) - 0x80)


def fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (round-to-nearest-even) and back to float32."""
    return t.to(torch.float16).to(torch.float32)


def fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float32 ``(N,)`` -> the little-endian fp16 bytes ``(N, 2)`` uint8."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 2)`` -> float32 ``(N,)``."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for (i...) s += t[i];`` over dim 0, in order, in float32."""
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


def seqsum_first(t: torch.Tensor) -> torch.Tensor:
    """``float s = t[0]; for (i = 1...) s += t[i];`` over dim 0, in order, in float32."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


def first_absmax(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``for (...) if (fabsf(x) > amax) { amax = fabsf(x); max = x; }`` starting from 0.

    Returns ``(amax, max)``; ``max`` is +0.0 where every element is zero. A NaN never wins a
    ``>`` comparison, so NaNs are skipped (amax is -1 where all are NaN).
    """
    ax = x.abs().nan_to_num_(nan=-1.0, posinf=math.inf)
    amax, idx = ax.max(dim=dim)
    mx = x.gather(dim, idx.unsqueeze(dim)).squeeze(dim)
    mx = torch.where(amax > 0, mx, torch.zeros_like(mx))
    return amax, mx


def first_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``min = x[0]; for (...) if (x < min) min = x;`` (the first minimal element, sign of zero kept)."""
    idx = x.argmin(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def first_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``max = x[0]; for (...) if (x > max) max = x;`` (the first maximal element)."""
    idx = x.argmax(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def to_sub(x: torch.Tensor, n: int) -> torch.Tensor:
    """Blocks ``(nb, B)`` -> sub-block-major work layout ``(n, nb * B // n)``."""
    return x.reshape(-1, n).t().contiguous()


def from_sub(t: torch.Tensor, nb: int) -> torch.Tensor:
    """Work layout ``(n, S)`` -> blocks ``(nb, B)``."""
    return t.t().reshape(nb, -1)


# ----------------------------------------------------------------------------------------------
# the scale searches of ggml-quants.c, vectorised over sub-blocks; all take (n, S) tensors
# ----------------------------------------------------------------------------------------------

def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None,
                    finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale search.

    x ``(n, S)``; w ``(n, S)`` weights or None for ``x*x``. Returns ``(scale (S,), L (n, S))`` with
    L in ``[0, 2*nmax - 1]`` (float32 holding integers). ``finite=False`` when x may hold inf/NaN
    (scales computed from overflowing sums): quants then use the bit-level ``nearest_int``.
    """
    amax, mx = first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    if w is None:
        w = x * x
    wx = w * x
    lo, hi = float(-nmax), float(nmax - 1)

    def quants(iscale: torch.Tensor) -> torch.Tensor:
        # for finite x, |iscale * x| <= nmax + 1 (iscale = -(nmax + ...)/max): round() is nearest_int()
        if finite:
            return (x * iscale).round_().clamp_(lo, hi)
        return nearest_int(x * iscale).clamp_(int(lo), int(hi)).float()

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l = quants(iscale)
        sumlx = seqsum(wx * l)
        suml2 = seqsum((w * l).mul_(l))
        return sumlx, suml2

    iscale = cdiv(float(-nmax), mx)
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    best_iscale = iscale
    f_nmax, f_tenth = np.float32(nmax), np.float32(0.1)
    for step in range(-9, 10):
        if step == 0:
            continue
        num = float(-(f_nmax + f_tenth * np.float32(step)))
        isc = cdiv(num, mx)
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


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: symmetric scale with coordinate descent.

    Returns ``(scale (S,), L (n, S))``, L in ``[0, 2*nmax - 1]`` (all zero for an all-zero group).
    """
    n = x.shape[0]
    amax, mx = first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    lo, hi = float(-nmax), float(nmax - 1)
    iscale = cdiv(float(-nmax), mx)
    l = (x * iscale).round_().clamp_(lo, hi)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * l)
    suml2 = seqsum((w * l).mul_(l))
    # llama.cpp stops after a pass without changes; a further pass from an unchanged state
    # changes nothing either, so running all five passes everywhere gives the same result.
    for _ in range(5):
        for i in range(n):
            wi, wxi, li = w[i], wx[i], l[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new_l = nearest_int((x[i] * sl2) / slx).clamp_(int(lo), int(hi)).float()
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


def make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool, qkx3: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` (qkx3=False) / ``make_qkx3_quants`` (qkx3=True): scale and min search.

    x, w ``(n, S)``. Returns ``(scale (S,), the_min (S,), L (n, S))``, L in ``[0, nmax]``.
    """
    f_nmax = float(nmax)
    S = x.shape[1]
    # qkx3 feeds -min into an fp16 field (Q4_1/Q5_1 `m`), where the sign of a zero min shows:
    # take llama.cpp's first minimal element there; elsewhere the sign of zero never reaches a byte
    xmin = first_min(x, 0) if qkx3 else x.amin(0)
    mx = x.amax(0)
    mn = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    degenerate = (mx <= mn) if qkx3 else (mx == mn)
    sum_w = seqsum_first(w)
    sum_x = seqsum_first(w * x)

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
            L.copy_(nearest_int(L).clamp_(0, nmax))

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


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: positive scale for a set of scales.

    x, qw ``(n, S)``. Returns ``(scale (S,), L (n, S))`` where L holds the ``uint8_t`` values
    llama.cpp stores (as int64).
    """
    n = x.shape[0]
    mx = torch.zeros_like(x[0])
    for i in range(n):              # max = MAX(max, x[i]) = max > x[i] ? max : x[i] (NaN included)
        mx = torch.where(mx > x[i], mx, x[i])
    zero = mx < GROUP_MAX_EPS
    wx = qw * x
    iscale = cdiv(float(nmax), mx)
    L0 = (nearest_int(x * iscale) & 255).float()
    scale = cdiv(1.0, iscale)
    diff = x - scale * L0
    best_mse = seqsum((qw * diff) * diff)
    best_iscale = iscale
    f_tenth, f_nmax = np.float32(0.1), np.float32(nmax)
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = cdiv(float(f_tenth * np.float32(step) + f_nmax), mx)
        sc = cdiv(1.0, isc)
        l = nearest_int(isc * x).clamp_max_(nmax).float()
        diff = x - sc * l
        mse = seqsum((qw * diff) * diff)
        upd = mse < best_mse
        best_mse = torch.where(upd, mse, best_mse)
        best_iscale = torch.where(upd, isc, best_iscale)
    l = nearest_int(best_iscale * x).clamp_max_(nmax)
    lf = l.float()
    L = (l & 255).float()
    sumlx = seqsum(wx * lf)
    suml2 = seqsum((qw * lf) * lf)
    for _ in range(5):
        for i in range(n):
            wi, wxi, li = qw[i], wx[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new_l = nearest_int((x[i] * sl2) / slx).clamp_max_(nmax).float()
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

"""The optimal-brain-surgeon column sweep (GPTQ's inner loop), shared by every method that
rounds or prunes a weight column by column against a Hessian.

For ``W (N, K)`` and ``H (K, K)`` (``2/n X^T X`` of the layer's input):

1. :func:`prepare`: dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``; with a
   column order (act-order) ``W`` and ``H`` are permuted; a layer no calibration input reached
   (every input dead) gets ``H = I`` instead, its weights kept;
2. :func:`damped_inverse_cholesky`: ``H += damp * mean(diag(H)) * I``, ``U = chol(H^-1)`` (upper),
   with tenfold dampening increases when the factorisation fails;
3. :func:`sweep`: per column ``i`` the grid gives the value the column becomes (``grid.column``),
   ``err = (w_i - q_i) / U[i, i]``, and the error moves onto the columns not yet visited
   (``w_j -= err * U[i, j]``): eagerly inside a lazy block of ``block_size`` columns, onto later
   blocks in one matrix product per block.

What differs between methods is the grid (an integer grid with group scales, a GGML block grid, or
:class:`FloatGrid`: no rounding at all) and an optional keep-mask (:class:`ColumnMask`: pruning);
the sweep knows neither.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch

from ..errors import CompressError

log = logging.getLogger(__name__)


class ColumnGrid(Protocol):
    """What the sweep rounds onto. ``column(i, col, current)`` returns the new value ``(N,)`` of
    visited column ``i`` whose current (error-compensated) weights are ``col``; ``current(end)``
    gives the current weights of visited columns ``[i, end)`` as ``(end - i, N)`` (pending lazy
    updates applied), for grids that fit their parameters on a whole group when it starts."""

    def column(self, i: int, col: torch.Tensor, current: Callable[[int], torch.Tensor]) -> torch.Tensor: ...


class FloatGrid:
    """No rounding: a visited column keeps its current (error-compensated) values. With a mask this
    is SparseGPT's pruning-only sweep."""

    def column(self, i, col, current):
        return col


class ColumnMask(Protocol):
    """Which weights the sweep zeroes. ``block(i1, i2, w1, d)`` is called when the lazy block
    ``[i1, i2)`` starts, with its current weights ``w1 (i2 - i1, N)`` and ``d = diag(U)[i1:i2]``,
    and returns a boolean keep-mask of ``w1``'s shape (or None: keep everything);
    ``column(j, w1, d, keep)`` is called before visiting column ``i1 + j`` and may update ``keep``
    in place from the weights as they are then (N:M masks chosen M columns at a time)."""

    def block(self, i1: int, i2: int, w1: torch.Tensor, d: torch.Tensor) -> "torch.Tensor | None": ...

    def column(self, j: int, w1: torch.Tensor, d: torch.Tensor, keep: torch.Tensor) -> None: ...


class FixedMask:
    """A keep-mask given up front (natural column order ``(N, K)``), e.g. the zeros a pruning step
    left that GPTQ must keep; ``perm`` is the sweep's visiting order, if any."""

    def __init__(self, keep: torch.Tensor, perm: torch.Tensor | None = None):
        k = keep.t()
        self.keep = (k[perm] if perm is not None else k).contiguous()     # (K, N), visiting order

    def block(self, i1, i2, w1, d):
        return self.keep[i1:i2]

    def column(self, j, w1, d, keep) -> None:
        pass


def output_error(w: torch.Tensor, q_w: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer-output proxy error of a compressed weight."""
    d = (w.to(torch.float32) - q_w.to(torch.float32))
    return float(((d @ h.to(device=d.device, dtype=torch.float32)) * d).sum())


def check_inputs(W: torch.Tensor, H: torch.Tensor, block_size: int, damp: float, max_damp_tries: int) -> None:
    if W.dim() != 2:
        raise CompressError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(W.shape)}")
    k = W.shape[1]
    if tuple(H.shape) != (k, k):
        raise CompressError(f"Hessian shape {tuple(H.shape)} does not match the weight's {k} input features")
    if block_size < 1:
        raise CompressError(f"block size must be a positive integer, got {block_size}")
    if damp < 0:
        raise CompressError(f"dampening must be >= 0, got {damp}")
    if max_damp_tries < 0:
        raise CompressError(f"max_damp_tries must be >= 0, got {max_damp_tries}")


def prepare(W: torch.Tensor, H: torch.Tensor, act_order: bool = False):
    """float32 copies of ``W`` and ``H`` with dead inputs neutralised and, with ``act_order``,
    columns permuted by descending ``diag(H)``. Returns ``(w, h, perm or None, dead count)``; when every
    input is dead (none reached the layer) ``h`` is the identity and ``w`` unchanged."""
    w = W.detach().to(torch.float32).clone()
    h = H.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    n_dead = int(dead.sum())
    if n_dead == h.shape[0]:           # no calibration input reached the layer at all (e.g. an expert no
        h = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)   # token was routed to): H = I, which
    elif n_dead:                       # makes the sweep round to nearest and keeps every weight
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    return w, h, perm, n_dead


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of ``h^-1``, or None when ``h`` is not (numerically) positive definite."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not bool(torch.isfinite(chol).all()):
        return None
    # cholesky_solve against the identity: the same inverse as cholesky_inverse, which MKL computes
    # up to 20x slower on some CPUs (121 ms against 6 ms for 576 x 576 on an AMD EPYC)
    hinv = torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), chol)
    del chol                           # K x K each: hold no more of them than needed at once
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    del hinv
    if int(info) != 0 or not bool(torch.isfinite(u).all()) or not bool((torch.diagonal(u) > 0).all()):
        return None
    return u


def damped_inverse_cholesky(h: torch.Tensor, damp: float, max_tries: int, what: str):
    """Upper Cholesky factor of the inverse of ``h`` plus ``damp`` times its mean diagonal; when the
    factorisation fails the dampening is multiplied by 10, up to ``max_tries`` more times (each retry
    logged). Returns ``(factor or None, last dampening, attempts)``."""
    mean_diag = float(torch.diagonal(h).mean())
    cur, u, tries = float(damp), None, 0
    for attempt in range(max_tries + 1):
        tries = attempt + 1
        hd = h.clone()
        hd.diagonal().add_(cur * mean_diag)
        u = _inverse_cholesky(hd)
        del hd
        if u is not None:
            break
        if attempt < max_tries:
            log.warning("%s: Cholesky failed with relative dampening %g; retrying with %g", what, cur, cur * 10)
            cur *= 10
    return u, cur, tries


class _Sweep:
    """State of one sweep: the transposed weights, the errors so far and the current position."""

    def __init__(self, w: torch.Tensor, u: torch.Tensor):
        self.wt = w.t().contiguous()                    # (K, N): row i is (visited) column i
        self.u = u
        self.errt = torch.empty_like(self.wt)
        self.i = self.i1 = self.i2 = 0
        self.w1 = self.wt[:0]

    def current(self, end: int) -> torch.Tensor:
        """Current weights of visited columns ``[i, end)``. Columns inside the lazy block are current
        in ``w1``; columns past it have not yet received the update from this block's already visited
        columns ``[i1, i)``: it is applied to the copy returned here."""
        i, i1, i2 = self.i, self.i1, self.i2
        inside = self.w1[i - i1:min(end, i2) - i1]
        if end <= i2:
            return inside
        outside = self.wt[i2:end]
        if i > i1:
            outside = torch.addmm(outside, self.u[i1:i, i2:end].t(), self.errt[i1:i], alpha=-1.0)
        return torch.cat([inside, outside], dim=0)


def sweep(w: torch.Tensor, u: torch.Tensor, grid: ColumnGrid, block_size: int = 128,
          mask: ColumnMask | None = None) -> tuple[torch.Tensor, float]:
    """The column sweep over ``w (N, K)`` (in visiting order) with ``u = chol(H^-1)`` (upper).

    With ``mask`` (:class:`ColumnMask`), masked weights reach the grid as 0 (a grid must map 0 to
    exactly 0: the integer grids and :class:`FloatGrid` do) and their error is compensated like a
    rounding error. Returns the new weights ``(N, K)`` in visiting order and the loss ``sum err^2 / 2``.
    """
    n, k = w.shape
    st = _Sweep(w, u)
    qt = torch.empty((k, n), dtype=torch.float32, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        st.i1, st.i2 = i1, i2
        st.w1 = w1 = st.wt[i1:i2]                        # view: updates land in wt
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        keep = mask.block(i1, i2, w1, d1) if mask is not None else None
        for j in range(i2 - i1):
            i = st.i = i1 + j
            col = w1[j]
            if keep is not None:
                mask.column(j, w1, d1, keep)
                dq = grid.column(i, col * keep[j], st.current)
            else:
                dq = grid.column(i, col, st.current)
            qt[i] = dq
            e = (col - dq) / u1[j, j]
            st.errt[i] = e
            if j + 1 < i2 - i1:
                w1[j + 1:].addr_(u1[j, j + 1:], e, alpha=-1.0)
        if i2 < k:
            st.wt[i2:].addmm_(u[i1:i2, i2:].t(), st.errt[i1:i2], alpha=-1.0)
    loss = 0.5 * float((st.errt * st.errt).sum())
    return qt.t().contiguous(), loss

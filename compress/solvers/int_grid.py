"""GPTQ (Frantar et al., 2022) onto the integer grid of an :class:`~compress.scheme.IntScheme`:
the pure solve ``gptq_solve(W, H, scheme) -> GPTQResult``.

The sweep is :func:`compress.solvers.obs.sweep`; this module holds the grid. A group's scale and
zero-point are computed when the sweep reaches the group's first (visited) column, on the current,
error-compensated weights of its columns (:func:`grid_params`, or :func:`grid_search` with
``grid="mse"``); per-channel grids (group -1) and ``static_groups`` grids are computed once up front
on the natural column order. ``dequantize_values(q, scales, zeros, g_idx)`` is bit for bit the
weight the sweep used when it propagated the rounding errors (the act-order checkpoint property).

If a Cholesky factorisation fails the relative dampening is multiplied by 10 and the solve retried
(at most ``max_damp_tries`` times); if every try fails the layer falls back to round-to-nearest.
Both are logged and recorded in ``GPTQResult.fallback``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import CompressError
from ..quantizer import dequantize_values, grid_params, grid_search, quantize_rtn, quantize_values
from ..scheme import IntScheme
from .obs import FixedMask, check_inputs, damped_inverse_cholesky, output_error, prepare, sweep

log = logging.getLogger(__name__)

GRIDS = ("minmax", "mse")      # how a group's scale and zero are chosen


@dataclass
class GPTQResult:
    """What :func:`gptq_solve` hands back for one ``(N, K)`` layer.

    q: int32 ``(N, K)`` in ``[0, 2**bits)``, original column order.
    scales: float32 ``(G, N)`` (float16-representable). zeros: int32 ``(G, N)`` in ``[1, 2**bits)``.
    g_idx: int32 ``(K,)``: the group (row of scales/zeros) of each original input column.
    loss: the sweep's ``sum_i sum_n (w - q)^2 / U[i, i]^2 / 2``, which equals
      ``tr((W - Q) H' (W - Q)^T) / 2`` for the dampened Hessian ``H'``; after a round-to-nearest
      fallback, ``tr((W - Q) H (W - Q)^T) / 2`` with the given ``H``.
    damp: the relative dampening finally used. fallback: None, ``"damp-increased:<damp>"`` or ``"rtn"``.
    info: ``output_error`` (``tr((W - Q) H (W - Q)^T)``), ``dead_columns``, ``damp_tries``, ``perm``.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float
    damp: float
    fallback: str | None = None
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return dequantize_values(self.q, self.scales, self.zeros, self.g_idx)


def _grid(w: torch.Tensor, col_w: torch.Tensor | None, scheme: IntScheme, grid: str):
    """Scale and zero per row of ``w (R, C)`` for the chosen grid."""
    if grid == "mse":
        return grid_search(w, scheme.bits, scheme.sym, col_weight=col_w)
    return grid_params(w, scheme.bits, scheme.sym)


class IntGrid:
    """The integer grid as the sweep sees it (columns in visiting order)."""

    def __init__(self, w_nat: torch.Tensor, perm: torch.Tensor | None, scheme: IntScheme, grid: str,
                 static_groups: bool, col_w: torch.Tensor | None):
        n, k = w_nat.shape
        dev = w_nat.device
        self.scheme, self.grid, self.col_w, self.k = scheme, grid, col_w, k
        self.gs = gs = scheme.effective_group(k)
        ng = scheme.groups(k)
        self.q = torch.empty((k, n), dtype=torch.float32, device=dev)   # codes, visiting order
        self.dynamic = scheme.group_size != -1 and not static_groups
        if self.dynamic:
            self.scales = torch.empty((ng, n), dtype=torch.float32, device=dev)
            self.zeros = torch.empty((ng, n), dtype=torch.float32, device=dev)
            g_vis = torch.arange(k, device=dev, dtype=torch.int64) // gs
        else:   # fixed up front on the natural order (per-channel: one group of width k)
            nat_w = col_w if col_w is None or perm is None else col_w[torch.argsort(perm)]
            ss, zs = zip(*(_grid(w_nat[:, c:c + gs], None if nat_w is None else nat_w[c:c + gs], scheme, grid)
                           for c in range(0, k, gs)))
            self.scales, self.zeros = torch.stack(ss), torch.stack(zs)   # (G, N)
            nat = torch.arange(k, device=dev, dtype=torch.int64) // gs
            g_vis = nat[perm] if perm is not None else nat
        self.g_vis = g_vis
        self.g_list = g_vis.tolist()
        self.perm = perm
        self.cur_group = -1
        self.scale = self.zero = None

    def column(self, i, col, current):
        g = self.g_list[i]
        if g != self.cur_group:
            self.cur_group = g
            if self.dynamic:
                end = min(i + self.gs, self.k)
                self.scale, self.zero = _grid(current(end).t(), None if self.col_w is None else self.col_w[i:end],
                                              self.scheme, self.grid)
                self.scales[g], self.zeros[g] = self.scale, self.zero
            else:
                self.scale, self.zero = self.scales[g], self.zeros[g]
        qv = quantize_values(col, self.scale, self.zero, self.scheme.maxq)
        self.q[i] = qv
        return (qv - self.zero) * self.scale                 # exactly dequantize_values' arithmetic

    def result(self):
        """``q (N, K)``, scales, zeros ``(G, N)`` and g_idx, in the original column order."""
        q = self.q.t().to(torch.int32)
        g_idx = torch.empty(self.k, dtype=torch.int32, device=q.device)
        if self.perm is not None:
            out = torch.empty_like(q)
            out[:, self.perm] = q
            q = out
            g_idx[self.perm] = self.g_vis.to(torch.int32)
        else:
            g_idx = self.g_vis.to(torch.int32)
        return q.contiguous(), self.scales.contiguous(), self.zeros.to(torch.int32).contiguous(), g_idx


def gptq_solve(W: torch.Tensor, H: torch.Tensor, scheme: IntScheme, damp: float = 0.01,
               block_size: int = 128, static_groups: bool = False,
               max_damp_tries: int = 5, grid: str = "minmax", keep: torch.Tensor | None = None) -> GPTQResult:
    """Quantize ``W (N, K)`` with GPTQ against the Hessian ``H (K, K)`` (e.g. ``2/n X^T X``).

    Works in float32 on ``W``'s device; ``W`` and ``H`` are not modified. ``damp`` is relative to
    ``mean(diag(H))``. ``static_groups`` (meaningful with a group size and act-order) fixes every
    group's grid up front on the natural column order so that ``g_idx`` stays ``k // group_size``.
    ``grid``: ``"minmax"`` spans each group's current min and max (the reference quantizer);
    ``"mse"`` shrinks that range where it lowers the sweep's own per-column loss, weights
    ``1 / U[i, i]^2`` times the squared rounding error (:func:`grid_search`).
    ``keep`` (boolean ``(N, K)``): weights outside it end exactly 0 (a pruned layer stays pruned).
    """
    check_inputs(W, H, block_size, damp, max_damp_tries)
    scheme.check_layer(W.shape[1])
    if grid not in GRIDS:
        raise CompressError(f"unknown GPTQ grid {grid!r}; choose one of {', '.join(GRIDS)}")
    w0 = W.detach().to(torch.float32)
    h_given = H.detach().to(device=W.device, dtype=torch.float32)
    w, h, perm, n_dead = prepare(W, H, scheme.act_order)
    w_nat = w if perm is None else w[:, torch.argsort(perm)]
    u, cur, tries = damped_inverse_cholesky(h, damp, max_damp_tries, "GPTQ")
    info = {"dead_columns": n_dead, "damp_tries": tries, "perm": perm}
    if u is None:
        log.warning("GPTQ: Cholesky failed after %d tries (last relative dampening %g); "
                    "falling back to round-to-nearest", tries, cur)
        q, scales, zeros, g_idx = quantize_rtn(w0, scheme)
        err = output_error(w0, dequantize_values(q, scales, zeros, g_idx), h_given)
        info["output_error"] = err
        return GPTQResult(q=q, scales=scales, zeros=zeros, g_idx=g_idx, loss=0.5 * err,
                          damp=cur, fallback="rtn", info=info)
    col_w = torch.diagonal(u).reciprocal().square() if grid == "mse" else None
    g = IntGrid(w_nat, perm, scheme, grid, static_groups, col_w)
    _, loss = sweep(w, u, g, block_size, FixedMask(keep.to(w.device), perm) if keep is not None else None)
    q, scales, zeros, g_idx = g.result()
    info["output_error"] = output_error(w0, dequantize_values(q, scales, zeros, g_idx), h_given)
    fallback = "rtn:no-calibration-input" if n_dead == W.shape[1] else f"damp-increased:{cur:g}" if tries > 1 else None
    return GPTQResult(q=q, scales=scales, zeros=zeros, g_idx=g_idx, loss=loss, damp=cur, fallback=fallback,
                      info=info)

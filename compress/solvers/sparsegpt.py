"""SparseGPT (Frantar & Alistarh, 2023) on the shared column sweep: ``sparsegpt_solve(W, H, ...)``.

The mask is chosen by the optimal-brain-surgeon saliency ``w^2 / U[i, i]^2`` on the current
(error-compensated) weights: unstructured, the lowest ``sparsity`` of each lazy block of columns
when the sweep reaches it; N:M, the lowest ``M - N`` of each group of M columns per row when the
sweep reaches the group. Pruned weights' errors move onto the columns not yet visited, like
rounding errors in GPTQ. With an integer scheme the kept weights are rounded onto its grid in the
same sweep (the paper's joint mode), so the result is sparse and quantized at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import CompressError
from ..quantizer import dequantize_values
from ..scheme import IntScheme
from .int_grid import IntGrid
from .masks import keep_mask
from .obs import FloatGrid, check_inputs, damped_inverse_cholesky, output_error, prepare, sweep

log = logging.getLogger(__name__)


class SaliencyMask:
    """SparseGPT's mask, chosen as the sweep goes (see the module doc)."""

    def __init__(self, sparsity: float, nm: tuple[int, int] | None, block_size: int):
        if nm is not None and block_size % nm[1]:
            raise CompressError(f"block size {block_size} must be a multiple of the pattern's M ({nm[1]})")
        self.sparsity, self.nm = sparsity, nm

    def block(self, i1, i2, w1, d):
        keep = torch.ones_like(w1, dtype=torch.bool)
        if self.nm is None:
            keep = keep_mask(w1.square() / d[:, None].square(), self.sparsity)
        return keep

    def column(self, j, w1, d, keep) -> None:
        if self.nm is None or j % self.nm[1]:
            return
        m = self.nm[1]
        score = (w1[j:j + m].square() / d[j:j + m, None].square()).t()          # (N, M)
        keep[j:j + m] = keep_mask(score, nm=self.nm).t()


@dataclass
class SparseResult:
    """``weight``: the pruned (and, with a scheme, dequantized) ``(N, K)`` weight, original column
    order. With a scheme also ``q, scales, zeros, g_idx`` as :class:`~compress.solvers.int_grid.GPTQResult`."""

    weight: torch.Tensor
    loss: float
    damp: float
    fallback: str | None = None
    q: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def sparsegpt_solve(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    scheme: IntScheme | None = None, damp: float = 0.01, block_size: int = 128,
                    max_damp_tries: int = 5, static_groups: bool = False) -> SparseResult:
    """Prune ``W (N, K)`` to ``sparsity`` (or the N:M pattern ``nm``) against the Hessian ``H``,
    updating the kept weights; with ``scheme`` also quantize them (columns in natural order).

    If every Cholesky factorisation fails the layer falls back to magnitude pruning (and
    round-to-nearest with a scheme), recorded in ``fallback``.
    """
    check_inputs(W, H, block_size, damp, max_damp_tries)
    if scheme is not None:
        scheme.check_layer(W.shape[1])
        if scheme.act_order:
            raise CompressError("SparseGPT's joint quantization visits columns in natural order (no act-order)")
    w0 = W.detach().to(torch.float32)
    h_given = H.detach().to(device=W.device, dtype=torch.float32)
    w, h, _, n_dead = prepare(W, H, act_order=False)
    u, cur, tries = damped_inverse_cholesky(h, damp, max_damp_tries, "SparseGPT")
    info = {"dead_columns": n_dead, "damp_tries": tries}
    mask = SaliencyMask(sparsity, nm, block_size)
    if u is None:
        log.warning("SparseGPT: Cholesky failed after %d tries; falling back to magnitude pruning", tries)
        keep = keep_mask(w0.abs(), sparsity, nm)
        pruned = w0 * keep
        res = SparseResult(pruned, 0.0, cur, fallback="magnitude", info=info)
        if scheme is not None:
            from ..quantizer import quantize_rtn
            res.q, res.scales, res.zeros, res.g_idx = quantize_rtn(pruned, scheme)
            res.fallback = "magnitude+rtn"
            res.weight = dequantize_values(res.q, res.scales, res.zeros, res.g_idx)
        res.loss = 0.5 * output_error(w0, res.weight, h_given)
        info["output_error"] = 2 * res.loss
        return res
    grid = IntGrid(w, None, scheme, "minmax", static_groups, None) if scheme is not None else FloatGrid()
    new, loss = sweep(w, u, grid, block_size, mask)
    res = SparseResult(new, loss, cur, fallback=f"damp-increased:{cur:g}" if tries > 1 else None, info=info)
    if scheme is not None:
        res.q, res.scales, res.zeros, res.g_idx = grid.result()
        res.weight = dequantize_values(res.q, res.scales, res.zeros, res.g_idx)
    info["output_error"] = output_error(w0, res.weight, h_given)
    return res

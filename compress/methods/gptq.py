"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column against its Hessian.

Observing is done elsewhere (:class:`calib.stats.HessianAccumulator` through a forward hook);
this module holds the pure solve: ``gptq_solve(W, H, scheme) -> GPTQResult``. Its integer
values, scales, zero-points and ``g_idx`` go straight into :func:`compress.formats.gptq_int.pack`,
and ``dequantize_values(q, scales, zeros, g_idx)`` is bit-for-bit the weight GPTQ used when it
propagated the rounding errors (the act-order checkpoint property).

The algorithm, for ``W (N, K)`` and ``H (K, K)``:

1. dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``;
2. with act-order, columns are visited by descending ``diag(H)``;
3. ``H += damp * mean(diag(H)) * I``; ``U = chol(H^-1)`` (upper);
4. per column ``i``: round onto the grid, ``err = (w_i - q_i) / U[i, i]``, and move the error onto
   the not-yet-quantized columns ``w_j -= err * U[i, j]``; inside a block of ``block_size``
   columns eagerly, onto later blocks in one matrix product per block (lazy batch updates);
5. a group's scale and zero-point are computed with :func:`grid_params` when the group starts,
   on the current (error-updated) weights of its columns; per-channel grids (group -1) and
   ``static_groups`` grids are computed once up front on the natural column order.

If a Cholesky factorisation fails the relative dampening is multiplied by 10 and the solve
retried (at most ``max_damp_tries`` times); if every try fails the layer falls back to
round-to-nearest. Both are logged and recorded in ``GPTQResult.fallback``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import CompressError
from ..quantizer import dequantize_values, grid_params, grid_search, quantize_rtn, quantize_values
from ..scheme import IntScheme

logger = logging.getLogger(__name__)

GRIDS = ("minmax", "mse")      # how a group's scale and zero are chosen (see gptq_solve)


@dataclass
class GPTQResult:
    """What :func:`gptq_solve` hands back for one ``(N, K)`` layer.

    q: int32 ``(N, K)`` in ``[0, 2**bits)``, original column order.
    scales: float32 ``(G, N)`` (float16-representable). zeros: int32 ``(G, N)`` in ``[1, 2**bits)``.
    g_idx: int32 ``(K,)``: the group (row of scales/zeros) of each original input column.
    loss: GPTQ's own report, ``sum_i sum_n (w - q)^2 / U[i, i]^2 / 2``, which equals
      ``tr((W - Q) H' (W - Q)^T) / 2`` for the dampened Hessian ``H'``; after a round-to-nearest
      fallback, ``tr((W - Q) H (W - Q)^T) / 2`` with the given ``H``.
    damp: the relative dampening finally used (the last one tried after a fallback to RTN).
    fallback: None, ``"damp-increased:<damp>"`` or ``"rtn"``.
    info: ``output_error`` (``tr((W - Q) H (W - Q)^T)`` with the given W and H),
      ``dead_columns``, ``damp_tries``, ``perm`` (the act-order visiting order, or None).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float
    damp: float
    fallback: str | None = None
    info: dict = field(default_factory=dict)


def output_error(w: torch.Tensor, q_w: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer-output proxy error of a quantized weight."""
    d = (w.to(torch.float32) - q_w.to(torch.float32))
    return float(((d @ h.to(device=d.device, dtype=torch.float32)) * d).sum())


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of ``h^-1``, or None when ``h`` is not (numerically) positive definite."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not bool(torch.isfinite(chol).all()):
        return None
    hinv = torch.cholesky_inverse(chol)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(u).all()) or not bool((torch.diagonal(u) > 0).all()):
        return None
    return u


def gptq_solve(W: torch.Tensor, H: torch.Tensor, scheme: IntScheme, damp: float = 0.01,
               block_size: int = 128, static_groups: bool = False,
               max_damp_tries: int = 5, grid: str = "minmax") -> GPTQResult:
    """Quantize ``W (N, K)`` with GPTQ against the Hessian ``H (K, K)`` (e.g. ``2/n X^T X``).

    Works in float32 on ``W``'s device; ``W`` and ``H`` are not modified. ``damp`` is relative to
    ``mean(diag(H))``. ``max_damp_tries`` is the number of tenfold increases allowed after the
    first attempt fails. ``static_groups`` (only meaningful with a group size and act-order)
    fixes every group's grid up front on the natural column order so that ``g_idx`` stays
    ``k // group_size``. ``grid``: ``"minmax"`` spans each group's current min and max (the
    reference quantizer); ``"mse"`` shrinks that range where it lowers GPTQ's own per-column loss
    weights ``1 / U[i, i]^2`` times the squared rounding error (:func:`grid_search`).
    """
    if W.dim() != 2:
        raise CompressError(f"GPTQ expects a 2-D weight (out_features, in_features), got shape {tuple(W.shape)}")
    n, k = W.shape
    if tuple(H.shape) != (k, k):
        raise CompressError(f"Hessian shape {tuple(H.shape)} does not match the weight's {k} input features")
    if block_size < 1:
        raise CompressError(f"block size must be a positive integer, got {block_size}")
    if damp < 0:
        raise CompressError(f"dampening must be >= 0, got {damp}")
    if max_damp_tries < 0:
        raise CompressError(f"max_damp_tries must be >= 0, got {max_damp_tries}")
    scheme.check_layer(k)
    if grid not in GRIDS:
        raise CompressError(f"unknown GPTQ grid {grid!r}; choose one of {', '.join(GRIDS)}")

    dev = W.device
    w0 = W.detach().to(torch.float32)
    h_given = H.detach().to(device=dev, dtype=torch.float32)
    h = h_given.clone()
    w = w0.clone()

    diag = torch.diagonal(h)
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    gs = scheme.effective_group(k)
    group_cols = scheme.group_size != -1

    perm = None
    w_nat = w
    if scheme.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    u, cur, tries = damped_inverse_cholesky(h, damp, max_damp_tries, "GPTQ")
    info = {"dead_columns": n_dead, "damp_tries": tries, "perm": perm}

    # column weights of the "mse" grid: GPTQ's loss per column, visiting order
    col_w = None
    if grid == "mse" and u is not None:
        col_w = torch.diagonal(u).reciprocal().square()
    # grids fixed before the loop (natural column order): per-channel always (gs == k), every group
    # with static_groups
    fixed_scale = fixed_zero = None
    if u is not None and (not group_cols or static_groups):
        nat_w = col_w if col_w is None or perm is None else col_w[torch.argsort(perm)]
        ss, zs = zip(*(_grid(w_nat[:, c:c + gs], None if nat_w is None else nat_w[c:c + gs], scheme, grid)
                       for c in range(0, k, gs)))
        fixed_scale, fixed_zero = torch.stack(ss), torch.stack(zs)              # (G, N)

    if u is None:
        logger.warning("GPTQ: Cholesky failed after %d tries (last relative dampening %g); "
                       "falling back to round-to-nearest", tries, cur)
        q, scales, zeros, g_idx = quantize_rtn(w0, scheme)
        err = output_error(w0, dequantize_values(q, scales, zeros, g_idx), h_given)
        info["output_error"] = err
        return GPTQResult(q=q, scales=scales, zeros=zeros, g_idx=g_idx, loss=0.5 * err,
                          damp=cur, fallback="rtn", info=info)

    q_perm, scales, zeros, g_idx, loss = _solve_columns(w, u, scheme, gs, group_cols, perm,
                                                        fixed_scale, fixed_zero, block_size, grid, col_w)
    q = torch.empty_like(q_perm)
    if perm is not None:
        q[:, perm] = q_perm
    else:
        q = q_perm
    info["output_error"] = output_error(w0, dequantize_values(q, scales, zeros, g_idx), h_given)
    fallback = f"damp-increased:{cur:g}" if tries > 1 else None
    return GPTQResult(q=q, scales=scales, zeros=zeros, g_idx=g_idx, loss=loss, damp=cur,
                      fallback=fallback, info=info)


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
        if u is not None:
            break
        if attempt < max_tries:
            logger.warning("%s: Cholesky failed with relative dampening %g; retrying with %g", what, cur, cur * 10)
            cur *= 10
    return u, cur, tries


def _solve_columns(w: torch.Tensor, u: torch.Tensor, scheme: IntScheme, gs: int, group_cols: bool,
                   perm: torch.Tensor | None, fixed_scale: torch.Tensor | None,
                   fixed_zero: torch.Tensor | None, block_size: int, grid: str = "minmax",
                   col_w: torch.Tensor | None = None):
    """The column loop over ``w (N, K)`` (already permuted) with ``u = chol(H^-1)`` (upper).

    Returns ``q`` in the visiting order, scales/zeros ``(G, N)``, g_idx over original columns, loss.
    Works on the transpose so each column is a contiguous row.
    """
    n, k = w.shape
    dev = w.device
    maxq = scheme.maxq
    wt = w.t().contiguous()                                 # (K, N): row i is input column i
    qt = torch.empty((k, n), dtype=torch.float32, device=dev)
    errt = torch.empty((k, n), dtype=torch.float32, device=dev)
    ng = scheme.groups(k)

    dynamic = fixed_scale is None
    if dynamic:
        scales = torch.empty((ng, n), dtype=torch.float32, device=dev)
        zeros = torch.empty((ng, n), dtype=torch.float32, device=dev)
        g_perm = torch.arange(k, device=dev, dtype=torch.int64) // gs  # group of each visited position
    else:
        scales, zeros = fixed_scale, fixed_zero
        nat = torch.arange(k, device=dev, dtype=torch.int64) // gs if group_cols else \
            torch.zeros(k, dtype=torch.int64, device=dev)
        g_perm = nat[perm] if perm is not None else nat
    g_list = g_perm.tolist()

    scale = zero = None
    cur_group = -1
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]                                       # view: updates land in wt
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            i = i1 + j
            g = g_list[i]
            if g != cur_group:
                cur_group = g
                if dynamic:
                    end = min(i + gs, k)
                    scale, zero = _group_grid(wt, w1, errt, u, i, i1, i2, end, scheme, grid,
                                              None if col_w is None else col_w[i:end])
                    scales[g], zeros[g] = scale, zero
                else:
                    scale, zero = scales[g], zeros[g]
            col = w1[j]
            qv = quantize_values(col, scale, zero, maxq)
            dq = (qv - zero) * scale                          # exactly dequantize_values' arithmetic
            qt[i] = qv
            e = (col - dq) / u1[j, j]
            errt[i] = e
            if j + 1 < i2 - i1:
                w1[j + 1:].addr_(u1[j, j + 1:], e, alpha=-1.0)
        if i2 < k:
            # lazy batch update of every later column with this block's errors
            wt[i2:].addmm_(u[i1:i2, i2:].t(), errt[i1:i2], alpha=-1.0)

    loss = 0.5 * float((errt * errt).sum())
    q = qt.t().to(torch.int32)
    g_idx = torch.empty(k, dtype=torch.int32, device=dev)
    if perm is not None:
        g_idx[perm] = g_perm.to(torch.int32)
    else:
        g_idx = g_perm.to(torch.int32)
    return q.contiguous(), scales.contiguous(), zeros.to(torch.int32).contiguous(), g_idx, loss


def _grid(w: torch.Tensor, col_w: torch.Tensor | None, scheme: IntScheme, grid: str):
    """Scale and zero per row of ``w (R, C)`` for the chosen grid."""
    if grid == "mse":
        return grid_search(w, scheme.bits, scheme.sym, col_weight=col_w)
    return grid_params(w, scheme.bits, scheme.sym)


def _group_grid(wt, w1, errt, u, i, i1, i2, end, scheme, grid="minmax", col_w=None):
    """Scale and zero of the group covering visited columns ``[i, end)``, on their current weights.

    Columns inside the current block are current in ``w1``; columns past the block have not yet
    received the lazy update from this block's already-quantized columns ``[i1, i)``: apply it here.
    """
    inside = w1[i - i1:min(end, i2) - i1]
    if end > i2:
        outside = wt[i2:end]
        if i > i1:
            outside = torch.addmm(outside, u[i1:i, i2:end].t(), errt[i1:i], alpha=-1.0)
        cols = torch.cat([inside, outside], dim=0)
    else:
        cols = inside
    return _grid(cols.t(), col_w, scheme, grid)

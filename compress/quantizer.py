"""The integer grid shared by every integer method: scale/zero search and rounding.

Conventions follow the GPTQ reference quantizer: asymmetric grids span [min(w, 0), max(w, 0)];
symmetric grids span [-amax, amax] with a fixed zero-point of 2**(bits-1). Scales are rounded
to float16 *before* the weights are rounded, so the packed checkpoint reproduces exactly the
weights the method evaluated. Asymmetric zero-points are kept >= 1 (see docs/FORMATS.md).
"""
from __future__ import annotations

import torch

from .scheme import IntScheme


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point per row of ``w`` (``(R, C)`` -> two ``(R,)`` tensors).

    Returns float32 scales (already float16-representable) and float32 integer zeros.
    """
    w = w.to(torch.float32)
    return grid_from_range(w.amin(dim=1), w.amax(dim=1), bits, sym)


def grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid :func:`grid_params` builds for rows whose weights span ``[xmin, xmax]``."""
    maxq = (1 << bits) - 1
    xmin = torch.clamp(xmin.to(torch.float32), max=0)
    xmax = torch.clamp(xmax.to(torch.float32), min=0)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        scale = torch.where(amax == 0, torch.ones_like(scale), scale)
        scale = _fp16_round(scale)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
        return scale, zero
    span = xmax - xmin
    empty = span == 0
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = _fp16_round((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale)
    # zero == 0 (all weights >= 0) has no "zero - 1" encoding: move the grid one step down.
    low = zero < 1
    if bool(low.any()):
        scale = torch.where(low, _fp16_round(xmax / (maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    zero = torch.clamp(zero, 1, maxq)
    return scale, zero


def grid_search(w: torch.Tensor, bits: int, sym: bool, col_weight: torch.Tensor | None = None,
                steps: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`grid_params`, but each row's range ``[min, max]`` is shrunk to ``p * [min, max]``
    for ``p`` in ``1, 1 - 1/steps, ..., 1 - max_shrink`` (exclusive) and the ``p`` with the smallest
    rounding error ``sum_c col_weight[c] * |w - dequant(quant(w))|^norm`` is kept per row (``p = 1``
    on ties, so the result is never worse than the min-max grid by that measure).
    ``col_weight (C,)`` defaults to ones.
    """
    w = w.to(torch.float32)
    maxq = (1 << bits) - 1
    xmin, xmax = w.amin(dim=1), w.amax(dim=1)
    best_s, best_z = grid_from_range(xmin, xmax, bits, sym)
    if steps < 1 or max_shrink <= 0:
        return best_s, best_z
    cw = None if col_weight is None else col_weight.to(device=w.device, dtype=torch.float32)[None, :]

    def err(s, z):
        d = (quantize_values(w, s[:, None], z[:, None], maxq) - z[:, None]) * s[:, None] - w
        e = d.abs_().pow_(norm)
        return (e * cw if cw is not None else e).sum(dim=1)

    best = err(best_s, best_z)
    for i in range(1, int(max_shrink * steps)):
        p = 1.0 - i / steps
        s, z = grid_from_range(p * xmin, p * xmax, bits, sym)
        e = err(s, z)
        better = e < best
        best = torch.where(better, e, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _fp16_round(s: torch.Tensor) -> torch.Tensor:
    s = s.to(torch.float16).to(torch.float32)
    tiny = torch.finfo(torch.float16).tiny
    return torch.clamp(s, min=tiny)


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``w`` onto the grid: ``clamp(round(w / scale) + zero, 0, maxq)`` (broadcasting)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def group_index(in_features: int, scheme: IntScheme) -> torch.Tensor:
    """g_idx for the natural column order: column k belongs to group k // group_size."""
    g = scheme.effective_group(in_features)
    return torch.arange(in_features, dtype=torch.int32) // g


def quantize_rtn(w: torch.Tensor, scheme: IntScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a ``(N, K)`` weight.

    Returns ``q (N, K)`` int32, ``scales (G, N)`` float32, ``zeros (G, N)`` int32 and
    ``g_idx (K,)`` int32, ready for :func:`compress.formats.gptq_int.pack`.
    """
    n, k = w.shape
    scheme.check_layer(k)
    gs = scheme.effective_group(k)
    ng = scheme.groups(k)
    w = w.to(torch.float32)
    pad = ng * gs - k
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    blocks = wp.view(n, ng, gs)
    # statistics of the last (narrower) group must ignore the padding: pad with its own first value
    if pad:
        last = blocks[:, -1, : gs - pad]
        blocks = blocks.clone()
        blocks[:, -1, gs - pad:] = last[:, :1]
    scale, zero = grid_params(blocks.reshape(n * ng, gs), scheme.bits, scheme.sym)
    scale = scale.view(n, ng)
    zero = zero.view(n, ng)
    q = quantize_values(wp.view(n, ng, gs), scale[..., None], zero[..., None], scheme.maxq)
    q = q.reshape(n, ng * gs)[:, :k]
    return q.to(torch.int32), scale.t().contiguous(), zero.t().to(torch.int32).contiguous(), group_index(k, scheme)


def dequantize_values(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` float32 weight from integer values, ``(G, N)`` scales/zeros and g_idx."""
    g = g_idx.to(torch.int64)
    s = scales.to(torch.float32).t()[:, g]
    z = zeros.to(torch.float32).t()[:, g]
    return (q.to(torch.float32) - z) * s

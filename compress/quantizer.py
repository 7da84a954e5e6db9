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
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    xmin = torch.clamp(w.amin(dim=1), max=0)
    xmax = torch.clamp(w.amax(dim=1), min=0)
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

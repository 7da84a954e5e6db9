"""AWQ's searches (Lin et al., 2023), as pure functions on weights and statistics.

* :func:`candidate_scales`: ``s = mean|x| ** alpha``, clamped at 1e-4 and normalised by
  ``sqrt(max(s) * min(s))`` (so the scales straddle 1).
* :func:`search_scale`: for ``alpha`` in ``{0, 1/n, ..., (n-1)/n}`` (n = 20), the group's weights
  are scaled (``W * s``, columns), fake-quantized on the scheme's integer grid
  (:func:`fake_quantize`) and scaled back (``/ s``); the alpha with the smallest output error wins.
  ``alpha = 0`` gives ``s = 1`` (no scaling), so the chosen scales are never worse than none on the
  objective. The objective is a callable; :func:`hessian_error` is the linear-output one,
  ``sum_l tr((W_l - W'_l) H (W_l - W'_l)^T)`` with ``H ~ X^T X`` of the group's input.
* :func:`clip_search`: per output row and quantization group, shrink the weight range to
  ``max|w| * (1 - i/n)`` for ``i < max_shrink * n`` and keep the one with the smallest error of
  that group's partial output ``x_g (w_g - q(clip(w_g)))^T``, measured with the diagonal block of
  ``H``. ``i = 0`` is "no clipping".

Applying a scale is the function-preserving transform of :mod:`compress.methods.scaling`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import CompressError
from ..quantizer import dequantize_values, grid_params, quantize_rtn, quantize_values
from ..scheme import IntScheme


# --------------------------------------------------------------------------- quantization grid

def fake_quantize(w: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """``w (N, K)`` rounded to nearest on the scheme's grid and dequantized (float32)."""
    q, s, z, g = quantize_rtn(w, scheme)
    return dequantize_values(q, s, z, g).to(w.device)


def hessian_error(h: torch.Tensor, weights: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], float]:
    """Objective ``sum_l tr((W_l - W'_l) H (W_l - W'_l)^T)`` against the given original weights."""
    h = h.to(torch.float32)
    w0 = [w.detach().to(torch.float32) for w in weights]

    def err(new: list[torch.Tensor]) -> float:
        total = 0.0
        for a, b in zip(w0, new):
            d = a - b.to(a.device, torch.float32)
            total += float(((d @ h.to(d.device)) * d).sum())
        return total

    return err


# --------------------------------------------------------------------------- scale search

def candidate_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.to(torch.float32).pow(alpha).clamp(min=1e-4)
    return s / torch.sqrt(s.max() * s.min())


@dataclass
class ScaleSearch:
    scales: torch.Tensor          # (K,) float32; ones when alpha == 0
    alpha: float
    errors: list[float] = field(default_factory=list)   # objective per alpha candidate

    @property
    def baseline_error(self) -> float:
        """The objective without scaling (alpha = 0)."""
        return self.errors[0]

    @property
    def best_error(self) -> float:
        return min(self.errors)


def search_scale(weights: list[torch.Tensor], x_mean: torch.Tensor, scheme: IntScheme,
                 error_fn: Callable[[list[torch.Tensor]], float], n_grid: int = 20) -> ScaleSearch:
    """Grid search of the per-input-channel scale of a group of linears sharing one input.

    ``weights``: the group's ``(N_l, K)`` weights; ``x_mean``: ``(K,)`` mean ``|x|`` of the input;
    ``error_fn`` gets the effective weights ``q(W_l * s) / s`` and returns the output error.
    """
    k = x_mean.shape[0]
    for w in weights:
        if w.shape[1] != k:
            raise CompressError(f"weight with {w.shape[1]} input features in a group whose input has {k}")
    errors = []
    best = (math.inf, 0.0, None)
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(x_mean, alpha).to(weights[0].device)
        eff = [fake_quantize(w.to(torch.float32) * s, scheme) / s for w in weights]
        e = error_fn(eff)
        if not math.isfinite(e):
            raise CompressError(f"AWQ scale search: non-finite output error at alpha={alpha}")
        errors.append(e)
        if e < best[0]:
            best = (e, alpha, s)
    return ScaleSearch(scales=best[2].cpu(), alpha=best[1], errors=errors)


# --------------------------------------------------------------------------- clipping

@torch.no_grad()
def clip_search(w: torch.Tensor, h: torch.Tensor, scheme: IntScheme, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Best clip range per output row and quantization group: ``(N, G)`` float32.

    For the columns of group g, ``err(n) = d_n H_gg d_n^T`` with ``d = w_g - q(clip(w_g))``: the
    squared error of the group's partial output summed over the calibration tokens.
    """
    n, k = w.shape
    scheme.check_layer(k)
    w = w.to(torch.float32)
    h = h.to(w.device, torch.float32)
    gs = scheme.effective_group(k)
    out = []
    for g0 in range(0, k, gs):
        g1 = min(g0 + gs, k)
        wg = w[:, g0:g1]
        hg = h[g0:g1, g0:g1]
        amax = wg.abs().amax(dim=1, keepdim=True)
        best = amax.clone()
        best_err = torch.full((n,), math.inf, device=w.device)
        for i in range(max(1, int(max_shrink * n_grid))):
            mv = amax * (1 - i / n_grid)
            c = torch.clamp(wg, -mv, mv)
            scale, zero = grid_params(c, scheme.bits, scheme.sym)
            dq = (quantize_values(c, scale[:, None], zero[:, None], scheme.maxq) - zero[:, None]) * scale[:, None]
            d = dq - wg
            err = ((d @ hg) * d).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[:, None], mv, best)
        out.append(best)
    return torch.cat(out, dim=1)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """``w (N, K)`` clamped to ``[-max_val, max_val]`` of each row's group (``max_val (N, G)``)."""
    n, k = w.shape
    g = torch.arange(k, device=w.device) // scheme.effective_group(k)
    if tuple(max_val.shape) != (n, scheme.groups(k)):
        raise CompressError(f"clip ranges of shape {tuple(max_val.shape)} do not fit a {n}x{k} weight "
                            f"with {scheme.groups(k)} groups")
    mv = max_val.to(w.device, w.dtype)[:, g]
    return torch.clamp(w, -mv, mv)


# --------------------------------------------------------------------------- one layer

@dataclass
class AWQLayerResult:
    """AWQ on one linear: the scale, the clip ranges and the quantized scaled weight.

    ``q, qscales, zeros, g_idx`` quantize ``clip(W * s)`` (ready for ``gptq_int.pack``); the layer
    then reads ``x / s`` (``prev`` absorbs the division). :meth:`effective_weight` is the weight
    the *unscaled* input sees: ``dequantize(q) / s``.
    """

    scales: torch.Tensor
    alpha: float
    clip_max: torch.Tensor | None
    q: torch.Tensor
    qscales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    search: ScaleSearch

    def effective_weight(self) -> torch.Tensor:
        return dequantize_values(self.q, self.qscales, self.zeros, self.g_idx) / self.scales.to(self.q.device)


def awq_solve(w: torch.Tensor, h: torch.Tensor, x_mean: torch.Tensor, scheme: IntScheme, n_grid: int = 20,
              max_shrink: float = 0.5, clip: bool = True) -> AWQLayerResult:
    """AWQ for one ``(N, K)`` linear against the Hessian ``h ~ X^T X`` and mean ``|x|`` of its input:
    scale search (linear-output objective), clip search on the scaled weight (with the scaled
    input's Hessian ``h / (s s^T)``), round-to-nearest."""
    w = w.to(torch.float32)
    h = h.to(w.device, torch.float32)
    found = search_scale([w], x_mean, scheme, hessian_error(h, [w]), n_grid)
    s = found.scales.to(w.device)
    ws = w * s
    clip_max = None
    if clip:
        clip_max = clip_search(ws, h / s[:, None] / s[None, :], scheme, n_grid, max_shrink)
        ws = apply_clip(ws, clip_max, scheme)
    q, qs, z, g = quantize_rtn(ws, scheme)
    return AWQLayerResult(scales=s, alpha=found.alpha, clip_max=clip_max, q=q, qscales=qs, zeros=z, g_idx=g,
                          search=found)

"""SmoothQuant (Xiao et al., 2022): migrate activation outliers into the weights, then W8A8.

For a group of linears reading one input ``X (T, K)``, per input channel j::

    s_j = max|X_j| ** alpha / max_l,n |W_l[n, j]| ** (1 - alpha)

(both maxima clamped at 1e-5, ``s`` too). Dividing the input by ``s`` (folded into ``prev``'s
output channels: a norm's weight/bias, or a linear's rows) and multiplying the weight columns by
``s`` is function-preserving (:mod:`compress.methods.scaling`); afterwards activations have
flatter channels and int8 per-token (or per-tensor) quantization loses less. ``alpha`` = 0.5
balances the two ranges; larger alphas move more difficulty into the weights.

The quantization itself (int8 per-output-channel symmetric weights, int8 activations) is the
"w8a8-int8" format (:mod:`compress.formats.w8a8`). The static per-tensor activation scale of a
linear is ``max_j(max|X_j| / s_j) / 127``: the calibration maximum of its smoothed input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import CompressError


@dataclass
class SmoothQuantOptions:
    """alpha: migration strength in [0, 1]. smooth_linear_prev: also smooth groups whose input
    is produced by a linear (down_proj via up_proj's rows, o_proj via v_proj's when the widths
    match; the SmoothQuant paper smooths only the norm-fed q/k/v and gate/up (fc1) groups)."""

    alpha: float = 0.5
    smooth_linear_prev: bool = False

    def __post_init__(self):
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise CompressError(f"--alpha must be in [0, 1], got {self.alpha}")

    def to_dict(self) -> dict:
        return asdict(self)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s (K,)`` from the input's per-channel ``max|x|`` and the group's ``(N_l, K)`` weights."""
    k = act_absmax.shape[0]
    for w in weights:
        if w.shape[1] != k:
            raise CompressError(f"weight with {w.shape[1]} input features in a group whose input has {k}")
    w_max = torch.cat([w.detach().abs().to(torch.float32) for w in weights], dim=0).amax(dim=0)
    a = act_absmax.to(w_max.device, torch.float32).clamp(min=1e-5)
    s = a.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)

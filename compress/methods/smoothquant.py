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

import logging
from dataclasses import dataclass

import torch

from calib.stats import AbsMaxAccumulator

from ..config import MethodConfig, opt
from ..errors import CompressError
from ..formats import w8a8
from ..registry import Method, register
from ..scheme import ACT_SCHEMES, W8A8Scheme
from .scaling import apply_scale, group_can_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothQuantOptions(MethodConfig):
    """alpha: migration strength in [0, 1]. smooth_linear_prev: also smooth groups whose input is
    produced by a linear (down_proj via up_proj's rows, o_proj via v_proj's when the widths match;
    the SmoothQuant paper smooths only the norm-fed q/k/v and gate/up (fc1) groups)."""

    alpha: float = opt(0.5, "SmoothQuant: migration strength in [0, 1].", min=0, max=1)
    act_scheme: str = opt("dynamic", "SmoothQuant: int8 activations per token at run time (dynamic) or with a "
                                     "calibrated per-tensor scale (static).", choices=ACT_SCHEMES)
    smooth_linear_prev: bool = opt(False, "SmoothQuant: also smooth inputs produced by a linear "
                                          "(down_proj via up_proj).")

    def scheme(self, **override) -> W8A8Scheme:
        return W8A8Scheme(**{"act_scheme": self.act_scheme, **override})


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


@register
class SmoothQuant(Method):
    """Statistics: per group, the per-channel max |x| of its input, collected on the float block
    with the earlier blocks already W8A8 (block i+1 sees int8 activations as at inference). They are
    what ``--save-stats`` stores; reloading them reproduces the run for any alpha or act scheme."""

    name = "smoothquant"
    distributed = True
    needs_description = True
    summary = "SmoothQuant migration, then W8A8 (int8 per-channel weights, int8 activations)"
    config = SmoothQuantOptions
    format = w8a8.FORMAT_ID

    def process_block(self, blk) -> None:
        groups = blk.groups()
        smoothed = self._smooth(blk, groups)
        # quantized only now: a later group's smoothing may divide an earlier group's rows (up_proj)
        for g in groups:
            for name in blk.targeted(g):
                scheme = blk.scheme(name)
                scale = w8a8.static_input_scale(smoothed[name].max()) if scheme.act_scheme == "static" else None
                blk.record.add(blk.full(name), w8a8.pack(blk.linear(name).weight.detach(), scale), scheme.to_dict())

    @torch.no_grad()
    def _smooth(self, blk, groups) -> dict:
        """Migrate every group that can be; returns each linear's smoothed input max |x| (K,)."""
        absmax = blk.observe_inputs({g: AbsMaxAccumulator for g in groups})
        smoothed = {}
        for g in groups:
            key = blk.key(g)
            prev = blk.block.get_submodule(g.prev)
            lins = [blk.linear(n) for n in g.linears]
            a = absmax[key].absmax().to(lins[0].weight.device, torch.float32)
            ok, why = group_can_scale(blk.block, g, lins[0].in_features)
            if ok and isinstance(prev, torch.nn.Linear) and not self.cfg.smooth_linear_prev:
                ok, why = False, "input produced by a linear (smooth_linear_prev is off)"
            if ok:
                s = smooth_scales(a, [lin.weight.data for lin in lins], self.cfg.alpha)
                apply_scale(prev, lins, s, blk.arch.norm_offset)
                a = a / s
                blk.record.extra.setdefault("smoothed_groups", []).append(key)
            else:
                log.info("%s: not smoothed: %s", key, why)
            for name in g.linears:
                smoothed[name] = a
        return smoothed

    def check_module(self, full_name, linear, override) -> None:
        self.scheme_for(full_name, override)

    def metadata(self, record=None) -> dict:
        return {**self.cfg.to_dict(), "smoothed_groups": len((record.extra if record else {}).get("smoothed_groups", []))}

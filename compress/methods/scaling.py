"""Function-preserving input-channel scaling, shared by AWQ and SmoothQuant.

For a group of linears that read the output of ``prev`` (a norm, or a linear), dividing ``prev``'s
output channels by ``s`` and multiplying the group's weight columns by ``s`` leaves the float model's
function unchanged. It also holds through an activation between a linear ``prev`` and the group
when the activation is positively homogeneous (ReLU, as OPT's fc1 -> fc2) or when the scaled branch
enters a product linearly (Llama's ``act(gate) * up`` -> down_proj), and through attention for
v_proj -> o_proj (attention is linear in the values).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CompressError


def can_scale(prev: nn.Module, in_features: int) -> tuple[bool, str]:
    """Whether ``prev``'s output channels can absorb a ``(in_features,)`` division; else why not."""
    if isinstance(prev, nn.Linear):
        if prev.out_features != in_features:
            return False, (f"previous linear has {prev.out_features} outputs but the group reads "
                           f"{in_features} inputs (e.g. grouped-query attention)")
        return True, ""
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (in_features,):
        return False, f"{type(prev).__name__} has no per-channel weight of width {in_features}"
    return True, ""


def group_can_scale(block: nn.Module, group, in_features: int) -> tuple[bool, str]:
    """:func:`can_scale` for a described group: never where the description says its input is not
    ``prev``'s output channel for channel (a slice of a fused projection)."""
    if not getattr(group, "scalable", True):
        return False, f"{group.prev} is a fused projection: only part of its output is this group's input"
    return can_scale(block.get_submodule(group.prev), in_features)


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' input columns by ``s``.
    A norm that multiplies by ``(norm_offset + weight)`` (Gemma's, offset 1) gets
    ``weight' = (offset + weight) / s - offset``."""
    ok, why = can_scale(prev, s.shape[0])
    if not ok:
        raise CompressError(f"cannot apply AWQ/SmoothQuant scales: {why}")
    dev = prev.weight.device
    s = s.to(dev, torch.float32)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    elif norm_offset:
        w = (prev.weight.to(torch.float32) + norm_offset) / s - norm_offset
        prev.weight.copy_(w.to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.device, lin.weight.dtype)[None, :])

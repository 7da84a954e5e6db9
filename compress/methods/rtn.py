"""Round-to-nearest: no calibration, every linear quantized on its own onto the integer grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import IntOptions
from ..formats import gptq_int
from ..quantizer import quantize_rtn
from ..registry import Method, register
from ..scheme import IntScheme


def solve(w: torch.Tensor, scheme: IntScheme) -> gptq_int.PackedInt:
    """Quantize one ``(N, K)`` weight onto the integer grid and pack it."""
    q, scales, zeros, g_idx = quantize_rtn(w, scheme)
    return gptq_int.pack(q, scales, zeros, g_idx, scheme.bits)


@dataclass(frozen=True)
class RTNConfig(IntOptions):
    pass


@register
class RTN(Method):
    name = "rtn"
    summary = "round-to-nearest onto the integer grid (no calibration)"
    config = RTNConfig
    calibrated = False
    lm_head = True

    def apply(self, blk, group, stats) -> None:
        for name in blk.targeted(group):
            scheme = blk.scheme(name)
            blk.record.add(blk.full(name), solve(blk.linear(name).weight.detach(), scheme), scheme.to_dict())

    def process_head(self, run, inputs) -> None:
        name = run.arch.lm_head
        scheme = self.scheme_for(name, run.targets.override_for(name))
        run.record.add(name, solve(run.model.get_submodule(name).weight.detach(), scheme), scheme.to_dict())

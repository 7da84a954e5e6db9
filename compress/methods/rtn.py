"""Round-to-nearest: no calibration, every linear quantized on its own."""
from __future__ import annotations

import torch

from ..formats import gptq_int
from ..quantizer import quantize_rtn
from ..scheme import IntScheme


def solve(w: torch.Tensor, scheme: IntScheme) -> gptq_int.PackedInt:
    """Quantize one ``(N, K)`` weight onto the integer grid and pack it."""
    q, scales, zeros, g_idx = quantize_rtn(w, scheme)
    return gptq_int.pack(q, scales, zeros, g_idx, scheme.bits)

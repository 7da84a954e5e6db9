"""Fake-quantized linears for quantization-aware training, and their exact conversion to packed weights.

:class:`FakeQuantLinear` computes with ``(clamp(round(W / s) + z, 0, maxq) - z) * s``: rounding
passes gradients straight through (so ``W``, the scales ``s`` and the zero-points ``z`` all learn,
as in learned step size quantization and EfficientQAT), the scale is rounded to float16 and the
zero-point to an integer in the forward pass (again with straight-through gradients), so the weight
the model trains with is exactly the weight of the packed checkpoint :meth:`FakeQuantLinear.packed`
writes: same codes, same float16 scales, same integer zeros, same float32 arithmetic.

:class:`ScaleTunedLinear` is the second phase (PEQA-style): a packed layer whose integer codes are
frozen and whose scales train; it converts back to a packed layer with the new scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import gptq_int
from ..quantizer import grid_params, grid_search
from ..scheme import IntScheme

_TINY = torch.finfo(torch.float16).tiny


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer in the forward pass, identity gradient."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (and at least its smallest normal) in the forward pass, identity gradient."""
    r = x.detach().clamp(min=_TINY).to(torch.float16).to(torch.float32)
    return x + (r - x).detach()


class FakeQuantLinear(torch.nn.Linear):
    """A linear trained on the integer grid of ``scheme`` (see the module doc).

    Parameters: ``weight (N, K)``, ``scale (N, G)``, ``zero (N, G)`` (not trained on a symmetric grid,
    whose zero is fixed at ``2**(bits-1)``); the bias (if any) is not trained.
    """

    def __init__(self, linear: torch.nn.Linear, scheme: IntScheme, grid: str = "minmax",
                 start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """``grid``: the round-to-nearest start (``minmax`` or ``mse``); or ``start = (weight, scales,
        zeros[, g_idx])``, e.g. a GPTQ solution (its dequantized weight, ``(G, N)`` scales and zeros;
        the group of each column, natural order when not given), which the layer then computes exactly."""
        n, k = linear.weight.shape
        scheme.check_layer(k)
        super().__init__(k, n, bias=linear.bias is not None, device=linear.weight.device, dtype=torch.float32)
        self.scheme = scheme
        w0 = linear.weight if start is None else start[0]
        self.weight = torch.nn.Parameter(w0.detach().to(torch.float32).clone())
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().to(torch.float32).clone(), requires_grad=False)
        gs = scheme.effective_group(k)
        g = torch.arange(k, dtype=torch.int64) // gs if start is None or len(start) < 4 else start[3]
        self.register_buffer("g_idx", g.to(torch.int64).to(self.weight.device))
        if start is not None:
            scale, zero = start[1].t().to(torch.float32), start[2].t().to(torch.float32)
        else:
            scales, zeros = [], []
            for c in range(0, k, gs):
                w = self.weight.detach()[:, c:c + gs]
                s, z = (grid_search(w, scheme.bits, scheme.sym) if grid == "mse" else
                        grid_params(w, scheme.bits, scheme.sym))
                scales.append(s)
                zeros.append(z)
            scale, zero = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)
        self.scale = torch.nn.Parameter(scale.contiguous().clone())
        self.zero = torch.nn.Parameter(zero.contiguous().clone(), requires_grad=not scheme.sym)

    def _group_grid(self):
        """Scales and zero-points per group ``(N, G)`` as the forward pass uses them."""
        z = self.zero if self.scheme.sym else torch.clamp(round_ste(self.zero), 1, self.scheme.maxq)
        return fp16_ste(self.scale), z

    def _codes(self):
        """The codes ``(N, K)`` and the per-column scale and zero they are dequantized with."""
        s, z = (t[:, self.g_idx] for t in self._group_grid())
        return torch.clamp(round_ste(self.weight / s) + z, 0, self.scheme.maxq), s, z

    def quantized_weight(self) -> torch.Tensor:
        q, s, z = self._codes()
        return (q - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def packed(self) -> gptq_int.PackedInt:
        """The packed layer that computes exactly :meth:`quantized_weight`."""
        q = self._codes()[0]
        scales, zeros = self._group_grid()
        return gptq_int.pack(q.to(torch.int32), scales.t().contiguous(), zeros.t().to(torch.int32).contiguous(),
                             self.g_idx.to(torch.int32), self.scheme.bits)

    def quant_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained quantization parameters by name (the zero-point of a symmetric grid is fixed)."""
        return {"scale": self.scale} if self.scheme.sym else {"scale": self.scale, "zero": self.zero}


class ScaleTunedLinear(torch.nn.Module):
    """A packed layer with frozen codes and trainable scales (``scale (G, N)``, float32, rounded to
    float16 in the forward pass)."""

    def __init__(self, packed: gptq_int.PackedInt, bias: torch.Tensor | None):
        super().__init__()
        q, zeros = gptq_int.unpack(packed)            # (N, K) codes, (G, N) zeros
        self.template = packed
        g = packed.g_idx.to(torch.int64)
        self.register_buffer("g_idx", g)
        self.register_buffer("centered", q.to(torch.float32) - zeros.to(torch.float32).t()[:, g])
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.scale = torch.nn.Parameter(packed.scales.to(torch.float32).clone())
        self.in_features, self.out_features = packed.in_features, packed.out_features

    def weight_(self) -> torch.Tensor:
        return self.centered * fp16_ste(self.scale).t()[:, self.g_idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def packed(self) -> gptq_int.PackedInt:
        p = self.template
        return gptq_int.PackedInt(p.qweight, p.qzeros, fp16_ste(self.scale).to(torch.float16).contiguous(),
                                  p.g_idx, p.bits, p.in_features, p.out_features)

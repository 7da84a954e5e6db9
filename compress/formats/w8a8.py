"""The W8A8 layout ("w8a8-int8", format version 1): int8 weights and int8 activations.

Byte-level description: docs/FORMATS.md. Per linear ``(N, K)``:

* ``weight``       int8 ``(N, K)`` in ``[-127, 127]`` (the ``nn.Linear`` layout, row = output channel);
* ``weight_scale`` float32 ``(N,)``: ``W[n, k] ~= weight[n, k] * weight_scale[n]`` (symmetric,
  per output channel, ``scale = max_k |W[n, k]| / 127``; an all-zero row gets scale 1);
* ``input_scale``  float32 ``()`` only for static activations: ``x_q = clamp(round(x / s), -127, 127)``.
  Without it the activations are quantized per token at run time
  (:func:`kernels.reference.quantize_per_token_int8`).

The matmul is a true int8 x int8 -> int32 product (:func:`kernels.dispatch.int8_linear`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_ID = "w8a8-int8"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
QMAX = 127
ACT_SCHEMES = ("dynamic", "static")


@dataclass
class PackedW8A8:
    """A W8A8 linear weight: plain named tensors plus the shape."""

    weight: torch.Tensor                    # int8 (N, K)
    weight_scale: torch.Tensor              # float32 (N,)
    input_scale: torch.Tensor | None        # float32 () for static activations, else None
    in_features: int
    out_features: int

    @property
    def act_scheme(self) -> str:
        return "dynamic" if self.input_scale is None else "static"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"weight": self.weight, "weight_scale": self.weight_scale}
        if self.input_scale is not None:
            t["input_scale"] = self.input_scale
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of ``w (N, K)``: ``(q int8 (N, K), scale float32 (N,))``."""
    w = w.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, scale


def static_input_scale(absmax: float | torch.Tensor) -> torch.Tensor:
    """Per-tensor activation scale from a calibrated abs-max: ``max / 127`` (1 when the max is 0)."""
    m = float(absmax)
    return torch.tensor(m / QMAX if m > 0 else 1.0, dtype=torch.float32)


def quantize_activation_static(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor int8 of ``x (..., K)`` with a fixed scale: ``(x_q int8 (..., K), x_scale float32 (...))``.

    Values beyond the calibrated range saturate at +-127. The per-token scale tensor the int8
    matmul takes is the one scale broadcast over the leading dimensions.
    """
    s = input_scale.to(device=x.device, dtype=torch.float32)
    x_q = torch.clamp(torch.round(x.to(torch.float32) / s), -QMAX, QMAX).to(torch.int8)
    return x_q, s.expand(x.shape[:-1])


def pack(w: torch.Tensor, input_scale: torch.Tensor | None = None) -> PackedW8A8:
    """Quantize a float ``(N, K)`` weight into the layout (``input_scale``: static activations)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    q, scale = quantize_weight(w)
    if input_scale is not None:
        input_scale = input_scale.detach().to(torch.float32).reshape(()).cpu()
        if not bool(torch.isfinite(input_scale)) or float(input_scale) <= 0:
            raise ValueError(f"input_scale must be a positive finite number, got {float(input_scale)}")
    return PackedW8A8(weight=q.cpu().contiguous(), weight_scale=scale.cpu().contiguous(), input_scale=input_scale,
                      in_features=w.shape[1], out_features=w.shape[0])


def from_tensors(t: dict[str, torch.Tensor], in_features: int, out_features: int) -> PackedW8A8:
    return PackedW8A8(weight=t["weight"], weight_scale=t["weight_scale"], input_scale=t.get("input_scale"),
                      in_features=in_features, out_features=out_features)


def check_shapes(p: PackedW8A8, static: bool) -> str | None:
    """The first thing wrong with ``p`` for a layer of its declared shape, or None."""
    n, k = p.out_features, p.in_features
    if p.weight.dtype != torch.int8 or tuple(p.weight.shape) != (n, k):
        return f"weight must be int8 {(n, k)}, got {p.weight.dtype} {tuple(p.weight.shape)}"
    if p.weight_scale.dtype != torch.float32 or tuple(p.weight_scale.shape) != (n,):
        return f"weight_scale must be float32 ({n},), got {p.weight_scale.dtype} {tuple(p.weight_scale.shape)}"
    if static:
        if p.input_scale is None:
            return "input_scale is missing (static activation scheme)"
        if p.input_scale.dtype != torch.float32 or p.input_scale.dim() != 0:
            return f"input_scale must be a float32 scalar, got {p.input_scale.dtype} {tuple(p.input_scale.shape)}"
    elif p.input_scale is not None:
        return "input_scale present but the activation scheme is dynamic"
    return None

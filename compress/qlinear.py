"""Quantized linear modules. They compute from packed weights through ``kernels.dispatch``."""
from __future__ import annotations

import torch
from torch import nn

from kernels import dispatch
from kernels.reference import quantize_per_token_int8

from .formats import gptq_int, w8a8


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored in the GPTQ integer layout (gptq-int v1).

    Buffers: ``qweight`` int32 (ceil(K*bits/32), N), ``qzeros`` int32 (G, ceil(N*bits/32)),
    ``scales`` float16 (G, N), ``g_idx`` int32 (K,), optional ``bias`` (N,).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, groups: int, bias: bool,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.register_buffer("qweight", torch.zeros(gptq_int.packed_words(in_features, bits), out_features,
                                                    dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, gptq_int.packed_words(out_features, bits),
                                                   dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    @classmethod
    def from_packed(cls, p: gptq_int.PackedInt, bias: torch.Tensor | None) -> "QuantLinear":
        m = cls(p.in_features, p.out_features, p.bits, p.scales.shape[0], bias is not None)
        m.qweight.copy_(p.qweight)
        m.qzeros.copy_(p.qzeros)
        m.scales.copy_(p.scales)
        m.g_idx.copy_(p.g_idx)
        if bias is not None:
            m.bias.copy_(bias.detach().to(torch.float32))
        return m

    def packed(self) -> gptq_int.PackedInt:
        return gptq_int.from_tensors({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales,
                                      "g_idx": self.g_idx}, self.bits, self.in_features, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed().dequantize(dtype)

    # On CPU the twin would unpack every weight at every call; for evaluation loops the module
    # keeps the dequantized weight (derived from the packed buffers, rebuilt if they change).
    cache_dequantized_on_cpu = True

    def _cache_key(self):
        return tuple((t.data_ptr(), t._version) for t in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def dequantized_cached(self) -> torch.Tensor:
        """The float32 weight, kept until the packed buffers change (not a parameter: no gradient)."""
        key = self._cache_key()
        cached = self.__dict__.get("_wcache")
        if cached is None or cached[0] != key:
            cached = (key, self.dequantize(torch.float32))
            self.__dict__["_wcache"] = cached
        return cached[1]

    def _apply(self, fn, recurse=True):
        """Moving the module (``.to``, ``.cuda``, to ``meta``) drops the cached weight with the
        buffers it came from."""
        self.__dict__.pop("_wcache", None)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.cache_dequantized_on_cpu and not x.is_cuda and not torch.is_grad_enabled()
                and dispatch.kernel_mode() != "triton"):
            w = self.dequantized_cached()
            dispatch.record("gptq", "torch")
            b = None if self.bias is None else self.bias.to(torch.float32)
            return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)
        return dispatch.gptq_linear(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups={self.scales.shape[0]}, bias={self.bias is not None}")



class W8A8Linear(nn.Module):
    """A linear layer in the W8A8 layout (w8a8-int8 v1): int8 weights and int8 activations.

    Buffers: ``weight`` int8 (N, K), ``weight_scale`` float32 (N,), ``input_scale`` float32 ()
    (static activations only), optional ``bias`` (N,). The forward quantizes ``x`` to int8 (per
    token, or with the static per-tensor scale) and calls :func:`kernels.dispatch.int8_linear`:
    an int8 x int8 -> int32 product (``torch._int_mm`` through the twin on CPU, Triton on CUDA).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, static: bool = False,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if static:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    @property
    def act_scheme(self) -> str:
        return "dynamic" if self.input_scale is None else "static"

    @classmethod
    def from_packed(cls, p: w8a8.PackedW8A8, bias: torch.Tensor | None) -> "W8A8Linear":
        m = cls(p.in_features, p.out_features, bias is not None, static=p.input_scale is not None)
        m.weight.copy_(p.weight)
        m.weight_scale.copy_(p.weight_scale)
        if p.input_scale is not None:
            m.input_scale.copy_(p.input_scale)
        if bias is not None:
            m.bias.copy_(bias.detach().to(torch.float32))
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: torch.Tensor | None = None) -> "W8A8Linear":
        m = cls.from_packed(w8a8.pack(linear.weight.detach(), input_scale), linear.bias)
        return m.to(linear.weight.device)

    def packed(self) -> w8a8.PackedW8A8:
        return w8a8.PackedW8A8(self.weight, self.weight_scale, self.input_scale, self.in_features, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:
            x_q, x_scale = quantize_per_token_int8(x)
        else:
            x_q, x_scale = w8a8.quantize_activation_static(x, self.input_scale)
        return dispatch.int8_linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, out_dtype=x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act={self.act_scheme}, bias={self.bias is not None}")

def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)

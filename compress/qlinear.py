"""Quantized linear modules. They compute from packed weights through ``kernels.dispatch``."""
from __future__ import annotations

import torch
from torch import nn

from kernels import dispatch

from .formats import gptq_int


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.cache_dequantized_on_cpu and not x.is_cuda and not torch.is_grad_enabled()
                and dispatch.kernel_mode() != "triton"):
            key = self._cache_key()
            cached = self.__dict__.get("_wcache")
            if cached is None or cached[0] != key:
                cached = (key, self.dequantize(torch.float32))
                self.__dict__["_wcache"] = cached
            w = cached[1]
            b = None if self.bias is None else self.bias.to(torch.float32)
            return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)
        return dispatch.gptq_linear(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups={self.scales.shape[0]}, bias={self.bias is not None}")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)

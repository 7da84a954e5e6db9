"""GGML models in memory: GGUF-named tensors (bytes or floats) with their types, and the
plain llama.cpp quantization of a whole model's tensors by a type plan (:mod:`ggml_mix`).
The GGUF writer (:mod:`compress.export.gguf`) writes a :class:`GGMLModel`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import CompressError
from . import kquants
from .ggml_mix import FLOAT_TYPES, TensorChoice

@dataclass
class GGMLTensor:
    """One GGUF tensor: ``data`` is float32/float16 ``shape`` or uint8 GGUF rows for quantized types.

    Rows are in the model's (Hugging Face) order; the GGUF writer applies llama.cpp's q/k row
    permutation.
    """

    name: str               # GGUF name
    type: str               # "F32", "F16" or a GGML type name
    shape: tuple[int, ...]  # logical (rows, cols) or (n,)
    data: torch.Tensor
    note: str = ""          # "imatrix", "gptq", "fallback Q4_K->Q5_0", ...

    def meta(self) -> dict:
        """Everything but the data, JSON-able (:meth:`from_meta` rebuilds the tensor)."""
        return {"name": self.name, "type": self.type, "shape": list(self.shape), "note": self.note}

    @classmethod
    def from_meta(cls, meta: dict, data: torch.Tensor) -> "GGMLTensor":
        return cls(meta["name"], meta["type"], tuple(meta["shape"]), data, meta["note"])


@dataclass
class GGMLModel:
    tensors: list[GGMLTensor]
    mix: str
    pure: bool
    method: str
    plan: dict[str, TensorChoice]
    meta: dict = field(default_factory=dict)


def quantize_tensor(w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Float ``(rows, cols)`` -> ``type_name``: uint8 GGUF rows, or float32/float16 values."""
    w = w.detach().to(torch.float32).cpu().contiguous()
    if type_name == "F32":
        return w
    if type_name == "F16":
        return w.to(torch.float16)
    if w.dim() > 2:                   # stacked experts: row by row, as llama.cpp quantizes them
        return quantize_tensor(w.reshape(-1, w.shape[-1]), type_name, importance).reshape(*w.shape[:-1], -1)
    try:
        return kquants.quantize(w, type_name, importance)
    except ValueError as e:
        raise CompressError(str(e)) from None


def decode_tensor(t: GGMLTensor) -> torch.Tensor:
    """The float32 values a GGUF reader gets for ``t``."""
    if t.type in FLOAT_TYPES:
        return t.data.to(torch.float32)
    return kquants.dequantize(t.data, t.type, t.shape)


def _check_importance(name: str, imp: torch.Tensor, cols: int) -> torch.Tensor:
    imp = imp.detach().to(torch.float32).reshape(-1).cpu()
    if imp.numel() != cols:
        raise CompressError(f"the importance matrix entry for {name} has {imp.numel()} values, "
                            f"the tensor has {cols} columns (an imatrix of another model?)")
    return imp


def note(choice: TensorChoice, extra: str = "") -> str:
    parts = [p for p in (extra, f"fallback {choice.wanted}->{choice.type}" if choice.fallback else "") if p]
    return ", ".join(parts)


def quantize_model_rtn(model_tensors: dict[str, torch.Tensor], plan: dict[str, TensorChoice],
                       importance: dict[str, torch.Tensor] | None = None, progress: bool = True) -> list[GGMLTensor]:
    """Quantize GGUF-named float tensors with the planned types (llama.cpp's quantizers, optionally
    importance-weighted by ``importance``: ``{gguf tensor name: (cols,)}``)."""
    from tqdm import tqdm
    out = []
    importance = importance or {}
    for name in tqdm(list(plan), desc="quantize", unit="tensor", disable=not progress, leave=False):
        ch = plan[name]
        w = model_tensors[name]
        if not ch.quantize:
            out.append(GGMLTensor(name, "F32", ch.shape, w.detach().to(torch.float32).cpu().contiguous()))
            continue
        imp = importance.get(name)
        if imp is not None:
            imp = _check_importance(name, imp, ch.shape[-1])
        uses = imp is not None and ch.type not in FLOAT_TYPES + ("Q8_0",)
        out.append(GGMLTensor(name, ch.type, ch.shape, quantize_tensor(w, ch.type, imp),
                              note(ch, "imatrix" if uses else "")))
    return out


def bits_per_weight(tensors: list[GGMLTensor], quantized_only: bool = True) -> float:
    nbytes = params = 0
    for t in tensors:
        if quantized_only and len(t.shape) < 2:
            continue
        nbytes += t.data.numel() * t.data.element_size()
        params += math.prod(t.shape)
    return 8 * nbytes / params if params else float("nan")

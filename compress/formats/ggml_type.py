"""The GGML quantization types' registry: a type is a class that registers itself by name and by
ggml's type id (``class Q4_K(KQuantType, name="Q4_K", type_id=12, ...)``).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

__all__ = ["KQuantType", "TYPES", "get_type", "QK_K"]

QK_K = 256

TYPES: dict[str, "KQuantType"] = {}
_BY_ID: dict[int, "KQuantType"] = {}


class KQuantType:
    """A GGML quantization type: layout constants plus block quantize / dequantize.

    Subclasses register themselves: ``class Q4_K(KQuantType, name="Q4_K", type_id=12, ...)``.
    Ids are ggml's ``enum ggml_type`` values and are never reused.
    """

    name: ClassVar[str]
    type_id: ClassVar[int]
    block_size: ClassVar[int]        # weights per block
    type_size: ClassVar[int]         # bytes per block
    row_sigma2: ClassVar[bool] = False   # imatrix path needs the mean of x^2 over the whole row

    def __init_subclass__(cls, *, name: str, type_id: int, block_size: int, type_size: int, **kw):
        super().__init_subclass__(**kw)
        if name in TYPES or type_id in _BY_ID:
            raise ValueError(f"GGML type {name} / id {type_id} registered twice")
        cls.name, cls.type_id, cls.block_size, cls.type_size = name, type_id, block_size, type_size
        inst = cls()
        TYPES[name] = inst
        _BY_ID[type_id] = inst

    @property
    def bpw(self) -> float:
        """Bits per weight."""
        return self.type_size * 8 / self.block_size

    def __repr__(self) -> str:
        return (f"{self.name}(type_id={self.type_id}, block_size={self.block_size}, "
                f"type_size={self.type_size}, bpw={self.bpw:g})")

    # x: (nb, block_size) float32; qw: (nb, block_size) or None; sigma2: (nb,) or None
    def quantize_blocks(self, x: torch.Tensor, qw: torch.Tensor | None,
                        sigma2: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def get_type(name_or_id: str | int | KQuantType) -> KQuantType:
    """Look a type up by name (``"Q4_K"``, case-insensitive) or ggml type id (``12``)."""
    if isinstance(name_or_id, KQuantType):
        return name_or_id
    if isinstance(name_or_id, (int, np.integer)) and not isinstance(name_or_id, bool):
        t = _BY_ID.get(int(name_or_id))
        if t is None:
            raise ValueError(f"unknown GGML type id {name_or_id}; supported ids: "
                             + ", ".join(f"{v.name}={k}" for k, v in sorted(_BY_ID.items())))
        return t
    if isinstance(name_or_id, str):
        t = TYPES.get(name_or_id.upper())
        if t is None:
            raise ValueError(f"unknown GGML quantization type {name_or_id!r}; supported: "
                             + ", ".join(TYPES))
        return t
    raise ValueError(f"expected a GGML type name or id, got {type(name_or_id).__name__}")

"""Boolean masks packed 8 to a byte along the last dimension, bit ``k % 8`` of byte ``k // 8``
(numpy's ``packbits(bitorder="little")``): the bitmasks of sparse weights and of compact codes."""
from __future__ import annotations

import numpy as np
import torch


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().astype(bool), axis=-1, bitorder="little"))


def unpack_bits(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    arr = np.unpackbits(bits.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(arr.reshape(shape).astype(bool))

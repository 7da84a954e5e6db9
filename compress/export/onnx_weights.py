"""Quantized linear weights as plain integers, and their repacking into ONNX's two layouts:
``com.microsoft::MatMulNBits`` blocks and blocked ``DequantizeLinear`` inputs (see
:mod:`compress.export.onnx` for the formats)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CompressError
from ..formats import gptq_int
from ..qlinear import QuantLinear

MATMULNBITS_BITS = (2, 4, 8)
MATMULNBITS_BLOCKS = (128, 64, 32, 16)


# --------------------------------------------------------------------------- integer weights

@dataclass
class IntWeight:
    """A quantized linear weight as plain integers (the input of the repackers).

    ``q`` int ``(N, K)`` in ``[0, 2**bits)``; ``zeros`` int ``(G, N)``: the actual zero-points
    (the GPTQ v1 layout stores zero - 1; :func:`compress.formats.gptq_int.unpack` adds the 1);
    ``scales`` float32 ``(G, N)``; ``g_idx`` int ``(K,)``. ``W[n, k] = (q[n, k] - zeros[g, n]) *
    scales[g, n]`` with ``g = g_idx[k]``.
    """

    q: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray
    bits: int

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> np.ndarray:
        g = self.g_idx.astype(np.int64)
        z = self.zeros.astype(np.float32)[g].T          # (N, K)
        s = self.scales.astype(np.float32)[g].T
        return (self.q.astype(np.float32) - z) * s


def int_weight(module: QuantLinear) -> IntWeight:
    """The integers, scales and zero-points a :class:`QuantLinear` holds."""
    q, z = gptq_int.unpack(module.packed())
    return IntWeight(q=q.numpy().astype(np.int32), zeros=z.numpy().astype(np.int32),
                     scales=module.scales.to(torch.float32).numpy().copy(),
                     g_idx=module.g_idx.numpy().astype(np.int64), bits=int(module.bits))


def _sorted_columns(g_idx: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Columns sorted by group (stable). Returns (perm or None when already sorted, sorted g_idx)."""
    g = g_idx.astype(np.int64)
    if g.size < 2 or bool(np.all(g[1:] >= g[:-1])):
        return None, g
    perm = np.argsort(g, kind="stable")
    return perm, g[perm]


def _boundary_gcd(g_sorted: np.ndarray) -> int:
    """gcd of the positions where the (sorted) group changes; 0 when there is one group."""
    bounds = np.nonzero(g_sorted[1:] != g_sorted[:-1])[0] + 1
    out = 0
    for b in bounds.tolist():
        out = math.gcd(out, b)
    return out


def _onnx_bits(w: IntWeight, allowed: tuple[int, ...]) -> int:
    """The smallest allowed width >= the checkpoint's that holds every value and zero-point."""
    top = max(int(w.q.max(initial=0)), int(w.zeros.max(initial=0)))
    if int(w.q.min(initial=0)) < 0 or int(w.zeros.min(initial=0)) < 0:
        raise CompressError("negative quantized values or zero-points cannot be exported")
    for b in allowed:
        if b >= w.bits and top < (1 << b):
            return b
    raise CompressError(f"{w.bits}-bit weights with values up to {top} do not fit the supported widths "
                        f"{', '.join(map(str, allowed))}")


def pack_lowfirst(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers in ``[0, 2**bits)`` along the last axis into uint8, lowest bits first.

    ``(..., n)`` -> ``(..., ceil(n * bits / 8))``; a partial last byte is zero-filled.
    """
    if bits == 8:
        return values.astype(np.uint8)
    per = 8 // bits
    n = values.shape[-1]
    pad = (-n) % per
    v = values.astype(np.uint8)
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint8)], axis=-1)
    v = v.reshape(v.shape[:-1] + (-1, per))
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per):
        out |= (v[..., i] << (i * bits)).astype(np.uint8)
    return out


def unpack_lowfirst(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_lowfirst`: ``(..., bytes)`` -> int32 ``(..., n)``."""
    if bits == 8:
        return packed[..., :n].astype(np.int32)
    per = 8 // bits
    parts = [(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(per)]
    v = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))
    return v[..., :n].astype(np.int32)


@dataclass
class MatMulNBitsWeight:
    """One linear in MatMulNBits' layout (ONNX Runtime contrib op, domain com.microsoft).

    ``b`` uint8 ``(N, ceil(K / block), block * bits / 8)``; ``scales`` float32 ``(N, blocks)``;
    ``zero_points`` uint8 ``(N, ceil(blocks * bits / 8))`` (actual zero-points, packed along the
    blocks) or None when every zero-point is MatMulNBits' default ``2**(bits-1)``; ``perm``: the
    input-column order (act-order checkpoints) or None.
    """

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    perm: np.ndarray | None
    bits: int
    block_size: int
    k: int
    n: int
    source_bits: int

    def dequantize(self) -> np.ndarray:
        """The ``(N, K)`` float32 weight in the original column order (the test oracle)."""
        nb = self.b.shape[1]
        q = unpack_lowfirst(self.b, self.bits, self.block_size)               # (N, nb, bs)
        if self.zero_points is None:
            z = np.full((self.n, nb), 1 << (self.bits - 1), np.int32)
        else:
            z = unpack_lowfirst(self.zero_points, self.bits, nb)
        w = (q - z[..., None]).astype(np.float32) * self.scales[..., None]
        w = w.reshape(self.n, nb * self.block_size)[:, : self.k]
        if self.perm is not None:
            out = np.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w


def _block_size(g_sorted: np.ndarray, k: int, blocks: tuple[int, ...], what: str) -> int:
    gcd = _boundary_gcd(g_sorted)
    if gcd == 0:        # one group over the whole row (per-channel): any block, scales repeated
        return next((bs for bs in blocks if bs <= k), blocks[-1])
    for bs in blocks:
        if gcd % bs == 0:
            return bs
    raise CompressError(
        f"{what}: groups of {gcd} columns cannot be written as MatMulNBits blocks (a power of two "
        f"from {blocks[-1]} to {blocks[0]} that divides every group boundary); export with --format qdq "
        f"or quantize with a group size that is a multiple of 16")


def pack_matmulnbits(w: IntWeight, what: str = "layer") -> MatMulNBitsWeight:
    """Repack a quantized weight into MatMulNBits' layout, exactly (see the module docstring)."""
    bits = _onnx_bits(w, MATMULNBITS_BITS)
    perm, g_sorted = _sorted_columns(w.g_idx)
    n, k = w.n, w.k
    bs = _block_size(g_sorted, k, MATMULNBITS_BLOCKS, what)
    nb = -(-k // bs)
    q = w.q if perm is None else w.q[:, perm]
    blk_group = g_sorted[np.minimum(np.arange(nb) * bs, k - 1)]           # (nb,)
    scales = np.ascontiguousarray(w.scales.astype(np.float32)[blk_group].T)  # (N, nb)
    zeros = np.ascontiguousarray(w.zeros[blk_group].T).astype(np.int32)     # (N, nb)
    pad = nb * bs - k
    if pad:   # pad the last block with its zero-point: the padded weights dequantize to 0
        q = np.concatenate([q, np.repeat(zeros[:, -1:], pad, axis=1)], axis=1)
    b = pack_lowfirst(q.reshape(n, nb, bs), bits)
    default = 1 << (bits - 1)
    zp = None if bool(np.all(zeros == default)) else pack_lowfirst(zeros, bits)
    return MatMulNBitsWeight(b=np.ascontiguousarray(b), scales=scales, zero_points=zp, perm=perm, bits=bits,
                             block_size=bs, k=k, n=n, source_bits=w.bits)


@dataclass
class QDQWeight:
    """One linear as opset-21 blocked DequantizeLinear input, transposed for ``MatMul(x, W)``.

    ``values`` int ``(K, N)`` (signed ``q - zero`` for a symmetric grid, else ``q``); ``scales``
    float32 ``(ceil(K / block), N)``; ``zero_points`` ``(blocks, N)`` or None; ``dtype`` one of
    INT4, UINT4, INT8, UINT8 (onnx.TensorProto names); ``perm`` as in MatMulNBitsWeight.
    """

    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    perm: np.ndarray | None
    dtype: str
    block_size: int
    k: int
    n: int
    source_bits: int

    def dequantize(self) -> np.ndarray:
        nb = self.scales.shape[0]
        rows = np.minimum(np.arange(self.k) // self.block_size, nb - 1)
        z = 0 if self.zero_points is None else self.zero_points.astype(np.float32)[rows]
        w = ((self.values.astype(np.float32) - z) * self.scales[rows]).T
        if self.perm is not None:
            out = np.empty_like(w)
            out[:, self.perm] = w
            w = out
        return np.ascontiguousarray(w)


def pack_qdq(w: IntWeight) -> QDQWeight:
    """Repack a quantized weight for blocked DequantizeLinear (exact; any group layout)."""
    bits = _onnx_bits(w, (4, 8))
    perm, g_sorted = _sorted_columns(w.g_idx)
    k = w.k
    # Prefer a block ORT can fuse into MatMulNBits (a power of two 16..128; scales repeated when
    # a group spans several blocks); otherwise the exact group layout (any block size is standard).
    try:
        bs = _block_size(g_sorted, k, MATMULNBITS_BLOCKS, "")
    except CompressError:
        bs = _boundary_gcd(g_sorted)
    nb = -(-k // bs)
    q = (w.q if perm is None else w.q[:, perm]).T                          # (K, N)
    blk_group = g_sorted[np.minimum(np.arange(nb) * bs, k - 1)]
    scales = np.ascontiguousarray(w.scales.astype(np.float32)[blk_group])   # (nb, N)
    zeros = w.zeros[blk_group].astype(np.int32)                              # (nb, N)
    mid = 1 << (w.bits - 1)
    if bool(np.all(zeros == mid)):   # symmetric grid: signed values, no zero-point input
        values = q.astype(np.int32) - mid
        dtype = "INT4" if bits == 4 else "INT8"
        zp = None
    else:
        values = q.astype(np.int32)
        dtype = "UINT4" if bits == 4 else "UINT8"
        zp = zeros
    return QDQWeight(values=np.ascontiguousarray(values), scales=scales, zero_points=zp, perm=perm, dtype=dtype,
                     block_size=bs, k=k, n=w.n, source_bits=w.bits)

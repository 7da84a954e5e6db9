"""Pure-torch reference twins of the kernels.

Every function here has the same signature as its Triton counterpart and is the
definition the kernels are tested against. They run on any device.

GPTQ integer layout (see docs/FORMATS.md, "gptq-int v1"):

* ``qweight``  int32 ``(ceil(K * bits / 32), N)``: for each output column n, the K
  quantized values of that column form a little-endian bit stream; value k occupies
  bits ``[k * bits, (k + 1) * bits)`` of the stream, word ``w`` holds stream bits
  ``[32 w, 32 w + 32)``. For bits 2/4/8 this is the usual "32/bits values per word,
  lowest bits first"; for 3 bits a value may straddle two words (as GPTQ packs it).
* ``qzeros``   int32 ``(G, ceil(N * bits / 32))``: zero-points minus one, packed the
  same way along N (the GPTQ "v1" convention: stored = zero - 1).
* ``scales``   float16 ``(G, N)``.
* ``g_idx``    int32 ``(K,)``: group of each input column.

Dequantized weight: ``W[n, k] = scales[g, n] * (q[k, n] - (qzeros_u[g, n] + 1))`` with
``g = g_idx[k]``; returned in the ``(N, K)`` layout of ``torch.nn.Linear.weight``.
"""
from __future__ import annotations

import torch

_MASK32 = (1 << 32) - 1


def unpack_bitstream(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` values of ``bits`` bits along dim 0 of an int32 tensor.

    ``packed`` has shape ``(W, *rest)``; returns int32 ``(count, *rest)`` with values in
    ``[0, 2**bits)``.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}; expected 2, 3, 4 or 8")
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits)
        shifts = shifts.view((1, per) + (1,) * (packed.dim() - 1))
        vals = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        vals = vals.reshape((packed.shape[0] * per,) + tuple(packed.shape[1:]))
        return vals[:count]
    words = packed.to(torch.int64) & _MASK32
    device = packed.device
    idx = torch.arange(count, device=device, dtype=torch.int64)
    offset = idx * bits
    word = offset // 32
    shift = offset % 32
    view_shape = (count,) + (1,) * (packed.dim() - 1)
    lo = words.index_select(0, word) >> shift.view(view_shape)
    spill = (shift + bits) > 32
    if bool(spill.any()):
        nxt = torch.clamp(word + 1, max=packed.shape[0] - 1)
        hi = words.index_select(0, nxt) << (32 - shift).view(view_shape)
        lo = torch.where(spill.view(view_shape), lo | hi, lo)
    return (lo & ((1 << bits) - 1)).to(torch.int32)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, in_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a GPTQ-layout weight to ``(N, K)`` in ``dtype``."""
    n = scales.shape[1]
    q = unpack_bitstream(qweight, bits, in_features)                     # (K, N)
    z = unpack_bitstream(qzeros.t().contiguous(), bits, n).t() + 1        # (G, N)
    g = g_idx.to(torch.int64)
    s = scales.to(dtype)
    w = (q.to(dtype) - z.index_select(0, g).to(dtype)) * s.index_select(0, g)  # (K, N)
    return w.t().contiguous()


def gptq_linear_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                    scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a GPTQ-layout weight.

    x: ``(M, K)`` float16/bfloat16/float32. Returns ``(M, N)`` in ``x.dtype``;
    accumulates in float32.
    """
    k = x.shape[-1]
    if g_idx.shape[0] != k:
        raise ValueError(f"x has {k} input features but g_idx has {g_idx.shape[0]}")
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, k, torch.float32)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

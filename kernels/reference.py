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


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_gptq_args(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> tuple[int, int, int]:
    """Check that the arguments of a GPTQ-layout linear fit together; return ``(K, N, G)``.

    ``x`` is ``(..., K)``. Raises ValueError naming the first mismatch. Does not read tensor
    values (no device sync): the range of g_idx is checked by the kernels that need it.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}; expected 2, 3, 4 or 8")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (input-feature) dimension; got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D int32; got {qweight.dim()}-D {qweight.dtype}")
    n = qweight.shape[1]
    rows = -(-k * bits // 32)
    if qweight.shape[0] != rows:
        raise ValueError(f"qweight has {qweight.shape[0]} rows; {k} input features at {bits} bits "
                         f"need ceil({k}*{bits}/32) = {rows}")
    if scales.dim() != 2 or scales.dtype not in _FLOAT_DTYPES or scales.shape[1] != n or scales.shape[0] < 1:
        raise ValueError(f"scales must be a float (G, N={n}) tensor with G >= 1; got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    groups = scales.shape[0]
    zcols = -(-n * bits // 32)
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, zcols):
        raise ValueError(f"qzeros must be int32 (G, ceil(N*bits/32)) = ({groups}, {zcols}); got "
                         f"{qzeros.dtype} {tuple(qzeros.shape)}")
    if g_idx.dim() != 1 or g_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"g_idx must be a 1-D int32/int64 tensor; got {g_idx.dim()}-D {g_idx.dtype}")
    if g_idx.shape[0] != k:
        raise ValueError(f"x has {k} input features (last dimension) but g_idx has {g_idx.shape[0]} entries")
    if bias is not None and (bias.dtype not in _FLOAT_DTYPES or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a float ({n},) tensor; got {bias.dtype} {tuple(bias.shape)}")
    _check_same_device(x, qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bias=bias)
    return k, n, groups


def _check_same_device(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


# ---------------------------------------------------------------------------------------------
# W8A8: int8 activations (per-token scales) x int8 weights (per-output-channel scales)
# ---------------------------------------------------------------------------------------------

def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of ``x (..., K)``.

    Returns ``x_q`` int8 ``(..., K)`` in ``[-127, 127]`` and ``x_scale`` float32 ``(...)`` with
    ``x ~= x_q * x_scale[..., None]`` (scale = row abs-max / 127; an all-zero row gets scale 1).
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    x_q = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), -127, 127).to(torch.int8)
    return x_q, scale


def check_int8_args(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[int, int, int]:
    """Check the arguments of a W8A8 linear with 2-D ``x_q``; return ``(M, K, N)``."""
    if x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise ValueError(f"x_q must be 2-D int8 (M, K); got {x_q.dim()}-D {x_q.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"w_q must be 2-D int8 (N, K); got {w_q.dim()}-D {w_q.dtype}")
    m, k = x_q.shape
    n = w_q.shape[0]
    if w_q.shape[1] != k or k == 0:
        raise ValueError(f"x_q has {k} input features but w_q is {tuple(w_q.shape)} (N, K)")
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (m,):
        raise ValueError(f"x_scale must be float32 ({m},) (one scale per token); got {x_scale.dtype} "
                         f"{tuple(x_scale.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale must be float32 ({n},) (one scale per output channel); got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (bias.dtype not in _FLOAT_DTYPES or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a float ({n},) tensor; got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32; got {out_dtype}")
    _check_same_device(x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    return m, k, n


def int8_matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 ``(M, K)`` and ``(N, K)`` as int32 ``(M, N)``.

    Uses ``torch._int_mm`` where the device supports the shape (any shape on CPU in recent
    torch; on CUDA M > 16 and K, N multiples of 8), otherwise a float64 matmul, which is exact
    here (|sum| <= K * 127 * 128 < 2**53).
    """
    m, k = a.shape
    n = b.shape[0]
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        try:
            return torch._int_mm(a.contiguous(), b.t())
        except (RuntimeError, NotImplementedError):
            pass
    return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)


def int8_linear_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W8A8 linear: ``y[m, n] = (sum_k x_q[m, k] w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n]``.

    x_q int8 ``(M, K)``, x_scale float32 ``(M,)``, w_q int8 ``(N, K)`` (``nn.Linear`` layout),
    w_scale float32 ``(N,)``, bias optional ``(N,)``. int32 accumulation (exact), float32
    epilogue, output ``(M, N)`` in ``out_dtype``.
    """
    check_int8_args(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    acc = int8_matmul_ref(x_q, w_q)
    y = acc.to(torch.float32) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)

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


# The exact float32 product. Every |x_q[m, k] * w_q[n, k]| <= 128 * 128 = 2**14 (the largest is
# (-128) * (-128)), so any partial sum over at most 1024 columns has |s| <= 1024 * 2**14 = 2**24.
# float32 has a 24-bit significand: every integer of magnitude <= 2**24 is representable, so each
# addition or fused multiply-add of such integers lands on a representable value and does not round,
# whatever order, blocking or vector width the BLAS uses. (bf16 and TF32 inputs, which oneDNN may
# substitute when the float32 matmul precision is lowered, also hold every int8 value exactly.)
# Each chunk's float32 result is therefore the exact integer; the chunks are summed in float64 (exact
# below 2**53) and converted once. The int32 result equals torch._int_mm's while the full sum fits in
# int32 (|sum| <= K * 2**14 < 2**31, i.e. any K < 131072), the range of torch._int_mm's own output.
INT8_FLOAT_CHUNK = 1024
INT8_MATMULS = ("auto", "intmm", "float")


def int8_matmul_float_ref(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 ``(M, K)`` and ``(N, K)`` by float32 matmuls -> ``(M, N)``.

    K is split into chunks of at most :data:`INT8_FLOAT_CHUNK` (1024) columns; each chunk is one
    float32 matmul whose sums are exact integers (``|sum| <= 1024 * 128 * 128 = 2**24``, see above).
    With one chunk that float32 result is returned as is (``out_dtype=float32``) or converted to
    int32; with several, the chunks are added in float64 (exact below 2**53) and converted once.
    ``out_dtype=int32`` is bit-identical to ``torch._int_mm``; ``out_dtype=float32`` is bit-identical
    to ``torch._int_mm(...).to(float32)`` (one round-to-nearest-even of the same exact integer),
    without the int32 round trip. On CPUs without int8 dot-product instructions (AVX2 only: no
    AVX512-VNNI, AVX-VNNI or AMX) this is many times faster than ``torch._int_mm``.
    """
    if out_dtype not in (torch.int32, torch.float32):
        raise ValueError(f"out_dtype must be torch.int32 or torch.float32; got {out_dtype}")
    m, k = a.shape
    n = b.shape[0]
    af = a.to(torch.float32)
    bf = b.to(torch.float32)
    if k <= INT8_FLOAT_CHUNK:
        acc = af @ bf.t()
    else:
        acc = torch.zeros((m, n), dtype=torch.float64, device=a.device)
        for k0 in range(0, k, INT8_FLOAT_CHUNK):
            k1 = min(k, k0 + INT8_FLOAT_CHUNK)
            acc += af[:, k0:k1] @ bf[:, k0:k1].t()
    return acc.to(out_dtype)


def int8_matmul_ref(a: torch.Tensor, b: torch.Tensor, matmul: str = "auto") -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 ``(M, K)`` and ``(N, K)`` as int32 ``(M, N)``.

    ``matmul`` picks how (every choice gives the same bits):

    * ``"auto"``: ``torch._int_mm`` where the device supports the shape (any shape on CPU in
      recent torch; on CUDA M > 16 and K, N multiples of 8), otherwise a float64 matmul, which is
      exact here (|sum| <= K * 128 * 128 < 2**53).
    * ``"intmm"``: ``torch._int_mm`` (raises where the device does not support the shape).
    * ``"float"``: :func:`int8_matmul_float_ref`, chunked float32 matmuls.

    On CPU, K == 1 always takes the float path: ``torch._int_mm`` returns uninitialised values
    there (seen with torch 2.13 on an AVX512-VNNI CPU, for any M and N > 1).
    """
    if matmul not in INT8_MATMULS:
        raise ValueError(f"matmul={matmul!r} is not one of {', '.join(INT8_MATMULS)}")
    if matmul == "float" or (a.device.type == "cpu" and a.shape[1] == 1):
        return int8_matmul_float_ref(a, b)
    if matmul == "intmm":
        return torch._int_mm(a.contiguous(), b.t())
    m, k = a.shape
    n = b.shape[0]
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        try:
            return torch._int_mm(a.contiguous(), b.t())
        except (RuntimeError, NotImplementedError):
            pass
    return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)


def int8_linear_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16, *,
                    matmul: str = "auto") -> torch.Tensor:
    """W8A8 linear: ``y[m, n] = (sum_k x_q[m, k] w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n]``.

    x_q int8 ``(M, K)``, x_scale float32 ``(M,)``, w_q int8 ``(N, K)`` (``nn.Linear`` layout),
    w_scale float32 ``(N,)``, bias optional ``(N,)``. int32 accumulation (exact), float32
    epilogue, output ``(M, N)`` in ``out_dtype``. ``matmul`` (``"auto"``, ``"intmm"`` or
    ``"float"``) chooses how the exact int32 sums are computed (:func:`int8_matmul_ref`); the
    output is the same bits for every choice.
    """
    check_int8_args(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if matmul == "float":      # float32 sums straight from the matmul: the same bits as int32 -> float32
        acc = int8_matmul_float_ref(x_q, w_q, torch.float32)
    else:
        acc = int8_matmul_ref(x_q, w_q, matmul)
    y = acc.to(torch.float32) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# GGUF / llama.cpp block quants read directly from their bytes (Q4_0 ... Q8_0, Q2_K ... Q6_K)
# ---------------------------------------------------------------------------------------------
# ``data`` is the GGUF tensor of an ``(N, K)`` weight: uint8 ``(N, K / block_size * type_size)``,
# row n holding the blocks of W[n, :] one after another (little-endian fields; d/dmin/m are
# float16). Layouts: /work/shared/docs/REFERENCE.md section 4 and docs/KQUANTS.md. Every product
# in the formulas below is exact in float32 (at most 24 significant bits), so this decoder equals
# llama.cpp's ``dequantize_row_*`` and ``gguf.quants.dequantize`` bit for bit.

#: qtype -> (block_size, type_size); the names are ggml's.
GGUF_BLOCK_TYPES = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}


def _gguf_type(qtype: str) -> tuple[int, int]:
    if not isinstance(qtype, str) or qtype not in GGUF_BLOCK_TYPES:
        raise ValueError(f"unsupported GGUF block type {qtype!r}; expected one of {', '.join(GGUF_BLOCK_TYPES)}")
    return GGUF_BLOCK_TYPES[qtype]


def _f16_at(b: torch.Tensor, off: int) -> torch.Tensor:
    """float32 ``(blocks, 1)`` of the little-endian float16 at byte ``off`` of each block."""
    return b[:, off:off + 2].contiguous().view(torch.float16).to(torch.float32)


def _bits(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """int32 ``(blocks, len(shifts), *b.shape[1:])``: ``b >> s & mask`` for each shift s."""
    sh = torch.tensor(shifts, dtype=torch.int32, device=b.device).view((1, -1) + (1,) * (b.dim() - 1))
    return (b.to(torch.int32).unsqueeze(1) >> sh) & mask


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs of Q4_K/Q5_K from their 12 packed bytes: int32 (blocks, 8)."""
    s = s.to(torch.int32)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, mn


def _decode_blocks(b: torch.Tensor, qtype: str) -> torch.Tensor:
    """float32 ``(blocks, block_size)`` from uint8 ``(blocks, type_size)``."""
    nb = b.shape[0]
    f32 = torch.float32
    if qtype == "Q8_0":
        return _f16_at(b, 0) * b[:, 2:34].contiguous().view(torch.int8).to(f32)
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        qs_off = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[qtype]
        q = _bits(b[:, qs_off:qs_off + 16], [0, 4], 15).reshape(nb, 32)        # n < 16: low nibble
        if qtype in ("Q5_0", "Q5_1"):
            qh_off = 2 if qtype == "Q5_0" else 4                                # u32 qh: bit n is q[n]'s 5th
            h = _bits(b[:, qh_off:qh_off + 4], list(range(8)), 1)               # (nb, bit, byte)
            q = q | (h.transpose(1, 2).reshape(nb, 32) << 4)
        d = _f16_at(b, 0)
        if qtype == "Q4_0":
            return d * (q - 8).to(f32)
        if qtype == "Q5_0":
            return d * (q - 16).to(f32)
        return d * q.to(f32) + _f16_at(b, 2)
    if qtype == "Q2_K":
        sc = b[:, 0:16].to(torch.int32)
        q = _bits(b[:, 16:80].reshape(nb, 2, 32), [0, 2, 4, 6], 3)            # (nb, shift, half, l)
        q = q.transpose(1, 2).reshape(nb, 16, 16).to(f32)                       # n = 128 half + 32 shift + l
        dl = _f16_at(b, 80) * (sc & 15).to(f32)
        ml = _f16_at(b, 82) * (sc >> 4).to(f32)
        return (dl[:, :, None] * q - ml[:, :, None]).reshape(nb, 256)
    if qtype == "Q3_K":
        low = _bits(b[:, 32:96].reshape(nb, 2, 32), [0, 2, 4, 6], 3).transpose(1, 2).reshape(nb, 256)
        h = _bits(b[:, 0:32], list(range(8)), 1).reshape(nb, 256)              # n = 32 bit + l
        q = (low - 4 * (1 - h)).reshape(nb, 16, 16).to(f32)
        s = b[:, 96:108].to(torch.int32)
        lo4 = torch.cat([s[:, 0:8] & 15, s[:, 0:8] >> 4], dim=1)
        hi2 = _bits(s[:, 8:12], [0, 2, 4, 6], 3).reshape(nb, 16)               # j = 4 (j / 4) + j % 4
        sc = ((lo4 | (hi2 << 4)) - 32).to(f32)
        return ((_f16_at(b, 108) * sc)[:, :, None] * q).reshape(nb, 256)
    if qtype in ("Q4_K", "Q5_K"):
        qs_off = 16 if qtype == "Q4_K" else 48
        q = _bits(b[:, qs_off:qs_off + 128].reshape(nb, 4, 32), [0, 4], 15)   # (nb, nibble, chunk, l)
        q = q.transpose(1, 2).reshape(nb, 8, 32)                                 # j = 2 chunk + nibble
        if qtype == "Q5_K":
            q = q | (_bits(b[:, 16:48], list(range(8)), 1) << 4)                # bit j of qh[l]
        sc, mn = _k4_scales(b[:, 4:16])
        dl = _f16_at(b, 0) * sc.to(f32)
        ml = _f16_at(b, 2) * mn.to(f32)
        return (dl[:, :, None] * q.to(f32) - ml[:, :, None]).reshape(nb, 256)
    if qtype == "Q6_K":
        lo = _bits(b[:, 0:128].reshape(nb, 2, 64), [0, 4], 15)                 # (nb, g >> 1, half, 32(g&1) + l)
        lo = lo.transpose(1, 2).reshape(nb, 256)                                 # n = 128 half + 32 g + l
        hi = _bits(b[:, 128:192].reshape(nb, 2, 32), [0, 2, 4, 6], 3).transpose(1, 2).reshape(nb, 256)
        q = ((lo | (hi << 4)) - 32).reshape(nb, 16, 16).to(f32)
        sc = b[:, 192:208].contiguous().view(torch.int8).to(f32)
        return ((_f16_at(b, 208) * sc)[:, :, None] * q).reshape(nb, 256)
    raise ValueError(f"unsupported GGUF block type {qtype!r}")


def dequantize_gguf_ref(data: torch.Tensor, qtype: str, K: int) -> torch.Tensor:
    """Decode the GGUF bytes of an ``(N, K)`` weight: uint8 ``(N, K / bs * ts)`` -> float32 ``(N, K)``.

    Bit-exact with llama.cpp's ``dequantize_row_*`` / ``gguf.quants.dequantize``. Runs on the
    device of ``data``; any strides.
    """
    bs, ts = _gguf_type(qtype)
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"data must be 2-D uint8 (N, K/{bs}*{ts}); got {data.dim()}-D {data.dtype}")
    if K <= 0 or K % bs != 0 or data.shape[1] != K // bs * ts:
        raise ValueError(f"{qtype} data of shape {tuple(data.shape)} does not hold rows of K={K} weights "
                         f"(K must be a positive multiple of {bs}, and each row K/{bs}*{ts} bytes)")
    n = data.shape[0]
    blocks = data.contiguous().reshape(-1, ts)
    return _decode_blocks(blocks, qtype).reshape(n, K)


def check_kquant_args(x: torch.Tensor, data: torch.Tensor, qtype: str,
                      bias: torch.Tensor | None = None) -> tuple[int, int]:
    """Check the arguments of a GGUF-block linear with ``x (..., K)``; return ``(K, N)``.

    Raises ValueError naming the first mismatch: unknown qtype, x dtype, K not a multiple of the
    block size, data not uint8 ``(N, K / block_size * type_size)``, bias shape, devices.
    """
    bs, ts = _gguf_type(qtype)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (input-feature) dimension; got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if k % bs != 0:
        raise ValueError(f"{qtype} packs blocks of {bs} weights: K={k} (x's last dimension) must be a "
                         f"multiple of {bs}")
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"data must be the 2-D uint8 GGUF bytes (N, K/{bs}*{ts}); got "
                         f"{data.dim()}-D {data.dtype}")
    if data.shape[1] != k // bs * ts:
        raise ValueError(f"{qtype} data has {data.shape[1]} bytes per row; K={k} needs {k}/{bs}*{ts} = "
                         f"{k // bs * ts} (is x's last dimension the weight's input dimension?)")
    n = data.shape[0]
    if bias is not None and (bias.dtype not in _FLOAT_DTYPES or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a float ({n},) tensor; got {bias.dtype} {tuple(bias.shape)}")
    _check_same_device(x, data=data, bias=bias)
    return k, n


def kquant_linear_ref(x: torch.Tensor, data: torch.Tensor, qtype: str,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` with W the ``(N, K)`` weight held in GGUF ``qtype`` bytes.

    x ``(M, K)`` float16/bfloat16/float32; data uint8 ``(N, K / block_size * type_size)``; bias
    optional ``(N,)``. Returns ``(M, N)`` in ``x.dtype``; the weight is decoded exactly to float32
    and the product accumulates in float32.
    """
    k, _ = check_kquant_args(x, data, qtype, bias)
    w = dequantize_gguf_ref(data, qtype, k)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

"""Triton weight-only dequant-GEMM for the GPTQ integer layout: ``y = x @ W.T (+ bias)``.

Shapes and layout (fixed; see the ``kernels.reference`` docstring and docs/FORMATS.md):

* ``x``       ``(M, K)`` float16 / bfloat16 / float32, any strides.
* ``qweight`` int32 ``(ceil(K * bits / 32), N)``: per output column a little-endian bit stream
  of the K values; 3-bit values may straddle two int32 words (both words are loaded).
* ``qzeros``  int32 ``(G, ceil(N * bits / 32))``: zero-point minus one, packed the same way along N.
* ``scales``  ``(G, N)`` float16 (bfloat16/float32 also accepted).
* ``g_idx``   int32/int64 ``(K,)``: group of each input column (arbitrary under act-order).
* ``bias``    optional ``(N,)`` float.
* output      ``(M, N)`` in ``x.dtype``; products accumulate in float32.

Bits 2, 3, 4, 8; any group size (the last group may be narrower: ``G = ceil(K / group)``),
per-channel (``G = 1``), symmetric or asymmetric (both live in ``qzeros``).

Two paths, chosen by :func:`path_for` from M:

* ``decode`` (M <= 16): one 16-row tile holds every row of x; the grid is
  ``(N / BLOCK_N, SPLIT_K)`` and each program reduces a contiguous slice of K, adding its
  partial sums into a float32 workspace with atomics (so the sum order, and the last bit
  of the result, may vary between runs on a GPU).
* ``gemm`` (M > 16): a tiled GEMM (``BLOCK_M x BLOCK_N`` output tiles, grouped launch order
  for L2 reuse) that dequantizes a ``BLOCK_K x BLOCK_N`` weight tile per K step.

Both load each packed qweight word once (rows of qweight, coalesced along N), expand the
values in registers, dequantize in float32 and feed ``tl.dot`` with
float16/bfloat16 tiles (float32 inputs use an IEEE float32 dot, no TF32), accumulating in
float32. When g_idx is the natural order ``k // group`` and the group is a multiple of
BLOCK_K, a K tile lies in one group and reads one row of scales/zeros (``UNIFORM``);
otherwise (act-order, small groups) scales and zeros are gathered per input column.

Under ``TRITON_INTERPRET=1`` (CPU tests) one fixed large-tile config is used (the interpreter
cannot autotune), bfloat16 tiles are upcast to float32 before the dot (the interpreter's
bfloat16 arithmetic is wrong) and bfloat16 results are stored as float32 and rounded by torch
(the interpreter truncates float32 -> bfloat16).

The function must equal :func:`kernels.reference.gptq_linear_ref` (see the end of this file).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from .reference import check_gptq_args, gptq_linear_ref
from .tiling import (INTERPRET, decode_configs, decode_output, gemm_configs, grouped_tile, split_k_range,
                     tiled_output)

DECODE_MAX_M = 16   # M up to this uses the decode (split-K) kernel
_GROUP_PAD = 512    # per-channel (G = 1): a "group size" >= K that every BLOCK_K divides


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _unpack_bits(ptrs, next_word, shift, mask, BITS: tl.constexpr):
    """Values of BITS bits that start at bit ``shift`` of the int32 words at ``ptrs`` (a gather:
    used for the zero-points, packed along N).

    For 3 bits a value may spill into the following word (``ptrs + next_word``), which is then
    loaded too. ``>>`` on int32 is arithmetic, so the low part is masked to its own width
    before the spilled high bits are or-ed in.
    """
    maxq = (1 << BITS) - 1
    words = tl.load(ptrs, mask=mask, other=0)
    if 32 % BITS == 0:
        vals = (words >> shift) & maxq
    else:
        low_bits = tl.minimum(32 - shift, BITS)
        vals = (words >> shift) & ((1 << low_bits) - 1)
        spill = low_bits < BITS
        high = tl.load(ptrs + next_word, mask=mask & spill, other=0)
        vals = vals | ((high << low_bits) & maxq)
    return vals


@triton.jit
def _load_q_tile(qw_ptr, k0, offs_n, n_mask, K, stride_qw,
                 BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 ``(BLOCK_K, BLOCK_N)`` quantized values for input rows ``k0 .. k0 + BLOCK_K``.

    Loads each packed word once (rows of qweight, coalesced along N) and expands in registers.
    ``k0`` and BLOCK_K are multiples of 32, so the tile starts on a word boundary: for 2/4/8 bits
    a word holds 32 / BITS values; for 3 bits three words hold 32 values, two of which straddle
    a word boundary (their high bits come from the next word).
    """
    tl.static_assert(BLOCK_K % 32 == 0)
    rows = (K * BITS + 31) // 32                     # rows of qweight
    maxq = (1 << BITS) - 1
    if BITS == 3:
        blk = k0 // 32 + tl.arange(0, BLOCK_K // 32)      # blocks of 32 values in 3 words
        cols = offs_n[None, :]
        w0 = tl.load(qw_ptr + (3 * blk)[:, None] * stride_qw + cols,
                     mask=(3 * blk < rows)[:, None] & n_mask[None, :], other=0)
        w1 = tl.load(qw_ptr + (3 * blk + 1)[:, None] * stride_qw + cols,
                     mask=(3 * blk + 1 < rows)[:, None] & n_mask[None, :], other=0)
        w2 = tl.load(qw_ptr + (3 * blk + 2)[:, None] * stride_qw + cols,
                     mask=(3 * blk + 2 < rows)[:, None] & n_mask[None, :], other=0)
        bit = tl.arange(0, 32) * 3                        # value j of a block starts at bit 3 j
        word = (bit // 32)[None, :, None]
        shift = (bit % 32)[None, :, None]
        low_bits = tl.minimum(32 - shift, 3)              # < 3 for the two straddling values
        w0 = w0[:, None, :]
        w1 = w1[:, None, :]
        w2 = w2[:, None, :]
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
        hi = tl.where(word == 0, w1, w2)                  # the next word (used only on a straddle)
        # int32 >> is arithmetic: keep only the low part's own bits before or-ing in the high bits
        vals = ((lo >> shift) & ((1 << low_bits) - 1)) | ((hi << low_bits) & maxq)
    else:
        # 32 // BITS values per word (inline: a local would lose its constexpr-ness)
        wrow = k0 * BITS // 32 + tl.arange(0, BLOCK_K * BITS // 32)
        words = tl.load(qw_ptr + wrow[:, None] * stride_qw + offs_n[None, :],
                        mask=(wrow < rows)[:, None] & n_mask[None, :], other=0)
        shift = (tl.arange(0, 32 // BITS) * BITS)[None, :, None]
        vals = (words[:, None, :] >> shift) & maxq
    return tl.reshape(vals, (BLOCK_K, BLOCK_N))


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask, k0, K, group_size,
                  stride_qw, stride_qz, stride_s,
                  BITS: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 ``(BLOCK_K, BLOCK_N)`` tile of ``W.T``: ``scale * (q - zero)``.

    Outside the masks the scale loads as 0, so the tile is 0 there (finite, never NaN).
    """
    q = _load_q_tile(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS, BLOCK_K, BLOCK_N)
    nbit = offs_n * BITS
    zword = nbit // 32
    zshift = nbit % 32
    if UNIFORM:
        # the whole K tile lies in group k0 // group_size: one row of zeros and scales
        g = k0 // group_size
        z = _unpack_bits(qz_ptr + g * stride_qz + zword, 1, zshift, n_mask, BITS) + 1
        s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
    else:
        mask = k_mask[:, None] & n_mask[None, :]
        g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
        z = _unpack_bits(qz_ptr + g[:, None] * stride_qz + zword[None, :], 1, zshift[None, :], mask, BITS) + 1
        s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        w = (q - z).to(tl.float32) * s
    return w


_GEMM_SHAPES = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4),
    (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4), (32, 128, 128, 4, 3),
]
_DECODE_SHAPES = [  # BLOCK_N, BLOCK_K, SPLIT_K, warps, stages
    (64, 128, 1, 4, 4), (128, 128, 1, 4, 4), (64, 128, 2, 4, 4), (128, 64, 4, 4, 4),
    (64, 256, 4, 4, 3), (128, 128, 4, 4, 3), (64, 128, 8, 4, 4), (128, 128, 8, 4, 3),
    (256, 64, 8, 8, 3), (64, 64, 16, 4, 4), (32, 128, 16, 2, 4),
]


def _gemm_configs():
    return gemm_configs(_GEMM_SHAPES, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64})


def _decode_configs():
    return decode_configs(_DECODE_SHAPES, {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 2})


def _uniform(meta) -> bool:
    return bool(meta["NATURAL"]) and meta["group_size"] % meta["BLOCK_K"] == 0


@triton.jit
def _k_loop(acc, x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, rows, m_mask, offs_n, n_mask, kb_start, kb_end, K, group_size,
            stride_xm, stride_xk, stride_qw, stride_qz, stride_s,
            BITS: tl.constexpr, FP32_DOT: tl.constexpr, UNIFORM: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc += x[rows, K blocks kb_start..kb_end) @ dequant(W)[those K, offs_n] (the main loop of both kernels)."""
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask, k0, K, group_size,
                          stride_qw, stride_qz, stride_s, BITS, UNIFORM, BLOCK_K, BLOCK_N)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    return acc


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "BITS", "NATURAL"])
@triton.heuristics({"UNIFORM": _uniform})
@triton.jit
def _gptq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr,
                      M, N, K, M_BUCKET, group_size,
                      stride_xm, stride_xk, stride_qw, stride_qz, stride_s, stride_ym,
                      BITS: tl.constexpr, NATURAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      FP32_DOT: tl.constexpr, UNIFORM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row-tiles sweep the N tiles together (weight tiles stay in L2)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows64 = offs_m.to(tl.int64)

    acc = _k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr,
                  rows64, m_mask, offs_n, n_mask, 0, tl.cdiv(K, BLOCK_K), K, group_size,
                  stride_xm, stride_xk, stride_qw, stride_qz, stride_s, BITS, FP32_DOT, UNIFORM, BLOCK_K, BLOCK_N)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_decode_configs(), key=["N", "K", "BITS", "NATURAL"], restore_value=["y_ptr"])
@triton.heuristics({"UNIFORM": _uniform})
@triton.jit
def _gptq_decode_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr,
                        M, N, K, group_size,
                        stride_xm, stride_xk, stride_qw, stride_qz, stride_s, stride_ym,
                        BITS: tl.constexpr, NATURAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        FP32_DOT: tl.constexpr, UNIFORM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr):
    # all M (<= BLOCK_M) rows in one tile; y_ptr is a zero-initialised float32 (M, N)
    # workspace to which every K split adds its partial sum
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    kb_start, kb_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = _k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr,
                  offs_m, m_mask, offs_n, n_mask, kb_start, kb_end, K, group_size,
                  stride_xm, stride_xk, stride_qw, stride_qz, stride_s, BITS, FP32_DOT, UNIFORM, BLOCK_K, BLOCK_N)

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
                  mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_LAYOUT_CACHE: dict[int, tuple] = {}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:   # inference tensors carry no version counter
        return -1


def group_layout(g_idx: torch.Tensor, groups: int) -> tuple[bool, int]:
    """``(natural, group_size)`` of a g_idx: natural when ``g_idx[k] == k // group_size``.

    Also checks that every entry lies in ``[0, groups)`` (a bad g_idx would make the kernel
    read out of bounds). Costs a device sync, so the answer is cached per tensor (and per
    in-place version).
    """
    key = id(g_idx)
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None and hit[0]() is g_idx and hit[1] == _version(g_idx):
        return hit[2]
    k = g_idx.shape[0]
    g = g_idx.to(torch.int64)
    lo, hi, first = torch.stack([g.min(), g.max(), (g == 0).sum()]).tolist()
    if lo < 0 or hi >= groups:
        raise ValueError(f"g_idx values must lie in [0, {groups}) (the rows of scales); got [{lo}, {hi}]")
    natural = False
    if first > 0:
        natural = bool(torch.equal(g, torch.arange(k, device=g.device, dtype=torch.int64) // first))
    result = (natural, int(first) if natural else 0)
    _LAYOUT_CACHE[key] = (weakref.ref(g_idx, lambda _r, key=key: _LAYOUT_CACHE.pop(key, None)),
                          _version(g_idx), result)
    return result


def path_for(m: int) -> str:
    """Which kernel ``gptq_linear_triton`` runs for ``m`` rows: ``"decode"`` or ``"gemm"``."""
    return "decode" if m <= DECODE_MAX_M else "gemm"


def gptq_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                       scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a GPTQ-layout weight; same contract as ``gptq_linear_ref``.

    x ``(M, K)`` float16/bfloat16/float32 -> ``(M, N)`` in ``x.dtype`` (float32 accumulate).
    Tensors must be on CUDA (or on CPU with ``TRITON_INTERPRET=1``). Raises ValueError on
    shapes, dtypes or devices that do not fit together.
    """
    k, n, groups = check_gptq_args(x, qweight, qzeros, scales, g_idx, bits, bias)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K); got shape {tuple(x.shape)} (kernels.dispatch flattens batches)")
    if not (x.is_cuda or INTERPRET):
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {x.device}); on CPU set "
                         "TRITON_INTERPRET=1 before importing kernels, or use gptq_linear_ref")
    m = x.shape[0]
    natural, group_size = group_layout(g_idx, groups)
    if natural and groups == 1:
        group_size = triton.cdiv(k, _GROUP_PAD) * _GROUP_PAD   # every tile is in group 0
    qweight = qweight.contiguous()
    qzeros = qzeros.contiguous()
    scales = scales.contiguous()
    g_idx = g_idx.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if m == 0:
        return x.new_empty((0, n))
    fp32_dot = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
    common = dict(BITS=bits, NATURAL=natural, HAS_BIAS=bias is not None, FP32_DOT=fp32_dot)

    if path_for(m) == "decode":
        ws, grid = decode_output(m, n, x.device)
        _gptq_decode_kernel[grid](
            x, qweight, qzeros, scales, g_idx, bias if bias is not None else ws, ws,
            m, n, k, group_size,
            x.stride(0), x.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0), ws.stride(0),
            BLOCK_M=DECODE_MAX_M, **common)
        return ws if x.dtype == torch.float32 else ws.to(x.dtype)

    y, m_bucket, grid = tiled_output(m, n, x.dtype, x.device)
    _gptq_gemm_kernel[grid](
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else y, y,
        m, n, k, m_bucket, group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0),
        **common)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# The reference this kernel must equal (within float rounding), on any device:
reference = gptq_linear_ref

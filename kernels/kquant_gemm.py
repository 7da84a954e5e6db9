"""Triton dequant-GEMM reading GGUF / llama.cpp block quants from their bytes: ``y = x @ W.T (+ bias)``.

Shapes and layout (the GGUF tensor of an ``(N, K)`` weight, unchanged; see
``kernels.reference.dequantize_gguf_ref`` and docs/KQUANTS.md):

* ``x``     ``(M, K)`` float16 / bfloat16 / float32, any strides.
* ``data``  uint8 ``(N, K / block_size * type_size)``: row n holds the blocks of ``W[n, :]``
  one after another, exactly as in a GGUF file (little-endian; d/dmin/m are float16).
  Each row must be contiguous (``data.stride(1) == 1``; otherwise the launcher copies); the
  row stride and the tensor's start may be any byte: the kernel loads single bytes and builds
  the float16 fields from two of them (``(lo | hi << 8)`` bitcast to float16), so there is no
  alignment requirement and no int16/int32 view of the bytes.
* ``qtype`` one of ``Q4_0 Q4_1 Q5_0 Q5_1 Q8_0`` (blocks of 32) or ``Q2_K Q3_K Q4_K Q5_K Q6_K``
  (super-blocks of 256); K must be a multiple of the block size.
* ``bias``  optional ``(N,)`` float; output ``(M, N)`` in ``x.dtype``, float32 accumulation.

The weight is decoded on the fly in groups of 16 consecutive weights (every type's scales,
sub-block boundaries and bit positions are constant over such a group): a weight tile is held
as ``(BLOCK_N, BLOCK_K / 16, 16)``; per (row, group) the kernel reads the block's float16 d
(and dmin/m), the group's scale (the 6-bit packed scales/mins of Q4_K/Q5_K,
the 4+2-bit scales of Q3_K, the int8 scales of Q6_K, the nibbles of Q2_K), and per weight the
byte holding its low bits (16 consecutive bytes per group) and, for Q3_K/Q5_K/Q6_K/Q5_0/Q5_1,
the byte holding its high bits (hmask/qh). Values are formed exactly in float32 (every product
fits 24 bits, so the tile equals llama.cpp's decode bit for bit), then fed to ``tl.dot`` as
``W_tile (BLOCK_N, BLOCK_K) @ x_tile.T (BLOCK_K, BLOCK_M)``: the weight is the register
operand and the output tile is ``(BLOCK_N, BLOCK_M)``, stored transposed into ``y``.

Two paths, chosen by :func:`path_for` from M (as in :mod:`kernels.gptq_gemm`):

* ``decode`` (M <= 16): one 16-column tile holds every row of x; the grid is
  ``(N / BLOCK_N, SPLIT_K)`` and each program reduces a contiguous slice of K, adding its
  partial sums into a float32 workspace with atomics (the sum order, and the last bit of the
  result, may vary between runs on a GPU).
* ``gemm`` (M > 16): tiled GEMM (``BLOCK_N x BLOCK_M`` output tiles, grouped launch order so
  that consecutive programs share weight tiles in L2).

float16/bfloat16 activations: the decoded tile is rounded to the activation dtype before the
dot (float16 overflows beyond 65504: llama.cpp's CUDA path does the same). float32
activations use an IEEE float32 dot (no TF32).

Under ``TRITON_INTERPRET=1`` (CPU tests) one fixed large-tile config is used (the interpreter
cannot autotune), bfloat16 tiles are upcast to float32 before the dot and bfloat16 results are
stored as float32 and rounded by torch (the interpreter's bfloat16 arithmetic is wrong).

The function must equal :func:`kernels.reference.kquant_linear_ref` (see the end of this file).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .reference import GGUF_BLOCK_TYPES, check_kquant_args, kquant_linear_ref
from .tiling import (INTERPRET, decode_configs, decode_output, gemm_configs, grouped_tile, split_k_range,
                     tiled_output)

DECODE_MAX_M = 16   # M up to this uses the decode (split-K) kernel

#: ggml type ids: the kernels' QTYPE constexpr.
QTYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
             "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
SUPPORTED = tuple(QTYPE_IDS)
assert set(SUPPORTED) == set(GGUF_BLOCK_TYPES)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _u8(ptrs, mask):
    """The bytes at ``ptrs`` as int32 in [0, 255] (0 where masked)."""
    return tl.load(ptrs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptrs, mask):
    """The little-endian float16 at ``ptrs`` (two bytes, any alignment) as float32 (0 where masked)."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptrs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k4_scale_min(blk, j, mask):
    """6-bit scale and min of sub-block ``j`` (0..7) of a Q4_K/Q5_K block (12 bytes at ``blk + 4``):
    j < 4: ``s[j] & 63, s[j+4] & 63``; j >= 4: ``s[j+4] & 15 | (s[j-4] >> 6) << 4``,
    ``s[j+4] >> 4 | (s[j] >> 6) << 4``."""
    a = _u8(blk + 4 + j % 4, mask)
    b = _u8(blk + 8 + j % 4, mask)
    c = _u8(blk + 12 + j % 4, mask)
    lo = j < 4
    sc = tl.where(lo, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(lo, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dequant_tile(w_ptr, offs_n, n_mask, stride_w, g0, K,
                  QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``(BLOCK_N, BLOCK_K)`` tile ``W[offs_n, 16 g0 : 16 g0 + BLOCK_K]``.

    Works on ``(BLOCK_N, BLOCK_K / 16, 16)``: axis 1 is the global index ``gi`` of a group of 16
    weights, axis 2 the position ``l`` inside it; ``t`` is the group's index inside its block,
    ``n = 16 t + l`` the weight's index inside the block. Outside the masks (rows >= N, columns
    >= K) every byte loads as 0, so d = 0 and the tile is 0 there (finite, never NaN).
    """
    gi = g0 + tl.arange(0, BLOCK_K // 16)
    gmask = (n_mask[:, None] & (gi < K // 16)[None, :])[:, :, None]         # (BLOCK_N, G, 1)
    l = tl.arange(0, 16)[None, None, :]                                      # (1, 1, 16)
    row = w_ptr + (offs_n.to(tl.int64) * stride_w)[:, None, None]            # (BLOCK_N, 1, 1)
    if QTYPE >= 10:      # k-quants: super-blocks of 256 = 16 groups
        t = (gi % 16)[None, :, None]
        bidx = (gi // 16).to(tl.int64)[None, :, None]
    else:                # blocks of 32 = 2 groups
        t = (gi % 2)[None, :, None]
        bidx = (gi // 2).to(tl.int64)[None, :, None]

    if QTYPE == 8:       # Q8_0 (34 B): d | int8 qs[32]
        blk = row + bidx * 34
        q = _u8(blk + 2 + 16 * t + l, gmask)
        q = q - ((q >> 7) << 8)                                   # int8
        w = _f16(blk, gmask) * q.to(tl.float32)
    elif QTYPE == 2:     # Q4_0 (18 B): d | qs[16]; n < 16 low nibbles, n >= 16 high
        blk = row + bidx * 18
        q = (_u8(blk + 2 + l, gmask) >> (4 * t)) & 15
        w = _f16(blk, gmask) * (q - 8).to(tl.float32)
    elif QTYPE == 3:     # Q4_1 (20 B): d | m | qs[16]
        blk = row + bidx * 20
        q = (_u8(blk + 4 + l, gmask) >> (4 * t)) & 15
        w = _f16(blk, gmask) * q.to(tl.float32) + _f16(blk + 2, gmask)
    elif QTYPE == 6:     # Q5_0 (22 B): d | qh u32 | qs[16]; 5th bit = bit n of qh
        blk = row + bidx * 22
        q = (_u8(blk + 6 + l, gmask) >> (4 * t)) & 15
        q = q | (((_u8(blk + 2 + 2 * t + l // 8, gmask) >> (l % 8)) & 1) << 4)
        w = _f16(blk, gmask) * (q - 16).to(tl.float32)
    elif QTYPE == 7:     # Q5_1 (24 B): d | m | qh u32 | qs[16]
        blk = row + bidx * 24
        q = (_u8(blk + 8 + l, gmask) >> (4 * t)) & 15
        q = q | (((_u8(blk + 4 + 2 * t + l // 8, gmask) >> (l % 8)) & 1) << 4)
        w = _f16(blk, gmask) * q.to(tl.float32) + _f16(blk + 2, gmask)
    elif QTYPE == 10:    # Q2_K (84 B): scales[16] | qs[64] | d | dmin
        blk = row + bidx * 84
        s = _u8(blk + t, gmask)
        dl = _f16(blk + 80, gmask) * (s & 15).to(tl.float32)
        ml = _f16(blk + 82, gmask) * (s >> 4).to(tl.float32)
        q = (_u8(blk + 16 + 32 * (t // 8) + 16 * (t % 2) + l, gmask) >> (2 * ((t % 8) // 2))) & 3
        w = dl * q.to(tl.float32) - ml
    elif QTYPE == 11:    # Q3_K (110 B): hmask[32] | qs[64] | scales[12] | d
        blk = row + bidx * 110
        low = (_u8(blk + 32 + 32 * (t // 8) + 16 * (t % 2) + l, gmask) >> (2 * ((t % 8) // 2))) & 3
        h = (_u8(blk + 16 * (t % 2) + l, gmask) >> (t // 2)) & 1
        q = low - 4 + 4 * h                                        # -4 where the hmask bit is 0
        lo4 = (_u8(blk + 96 + t % 8, gmask) >> (4 * (t // 8))) & 15
        hi2 = (_u8(blk + 104 + t % 4, gmask) >> (2 * (t // 4))) & 3
        sc = (lo4 | (hi2 << 4)) - 32
        w = (_f16(blk + 108, gmask) * sc.to(tl.float32)) * q.to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:
        if QTYPE == 12:  # Q4_K (144 B): d | dmin | scales[12] | qs[128]
            blk = row + bidx * 144
            qs_off = 16
        else:            # Q5_K (176 B): d | dmin | scales[12] | qh[32] | qs[128]; 5th bit = bit j of qh[l]
            blk = row + bidx * 176
            qs_off = 48
        j = t // 2                                                 # sub-block of 32
        sc, mn = _k4_scale_min(blk, j, gmask)
        dl = _f16(blk, gmask) * sc
        ml = _f16(blk + 2, gmask) * mn
        q = (_u8(blk + qs_off + 32 * (t // 4) + 16 * (t % 2) + l, gmask) >> (4 * (j % 2))) & 15
        if QTYPE == 13:
            q = q | (((_u8(blk + 16 + 16 * (t % 2) + l, gmask) >> j) & 1) << 4)
        w = dl * q.to(tl.float32) - ml
    else:                # Q6_K (210 B): ql[128] | qh[64] | int8 scales[16] | d
        tl.static_assert(QTYPE == 14)
        blk = row + bidx * 210
        half = t // 8
        g = (t % 8) // 2                                           # 32-wide group inside the half
        lo = (_u8(blk + 64 * half + 32 * (g % 2) + 16 * (t % 2) + l, gmask) >> (4 * (g // 2))) & 15
        hi = (_u8(blk + 128 + 32 * half + 16 * (t % 2) + l, gmask) >> (2 * g)) & 3
        q = (lo | (hi << 4)) - 32
        sc = _u8(blk + 192 + t, gmask)
        sc = sc - ((sc >> 7) << 8)                                 # int8
        w = (_f16(blk + 208, gmask) * sc.to(tl.float32)) * q.to(tl.float32)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


def _gemm_configs():
    # the decode is per weight: a program decodes BLOCK_N x BLOCK_K weights per K step. Kept to
    # <= 64 weights and <= 64 accumulators per thread: offline sm_90 builds of larger tiles
    # (triton 3.8, ptxas) spilled registers for Q3_K/Q5_0/Q6_K
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages (BLOCK_N is the dot's row dimension)
        (128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 4, 3),
        (128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (32, 128, 64, 4, 4), (64, 256, 32, 8, 3),
        (32, 64, 64, 4, 4),
    ]
    return gemm_configs(shapes, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128})


def _decode_configs():
    shapes = [  # BLOCK_N, BLOCK_K, SPLIT_K, warps, stages (<= 64 decoded weights per thread)
        (64, 128, 1, 4, 4), (128, 64, 1, 4, 4), (64, 64, 1, 4, 4), (128, 128, 1, 8, 3),
        (64, 128, 2, 4, 4), (64, 64, 4, 4, 4), (128, 64, 4, 4, 4), (128, 128, 4, 8, 3),
        (64, 128, 8, 4, 4), (32, 128, 8, 4, 4), (32, 64, 16, 2, 4), (16, 128, 4, 2, 4),
    ]
    return decode_configs(shapes, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2})


@triton.jit
def _k_loop(acc, x_ptr, w_ptr, rows, m_mask, offs_n, n_mask, kb_start, kb_end, K, stride_xm, stride_xk, stride_w,
            QTYPE: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (the y tile transposed, (BLOCK_N, BLOCK_M)) += dequant(W)[offs_n, K blocks kb_start..kb_end)
    @ x[rows, those K].T (the main loop of both kernels)."""
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=(offs_k < K)[:, None] & m_mask[None, :], other=0.0)   # (BLOCK_K, BLOCK_M)
        w = _dequant_tile(w_ptr, offs_n, n_mask, stride_w, k0 // 16, K, QTYPE, BLOCK_N, BLOCK_K)
        if FP32_DOT:
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    return acc


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "QTYPE"])
@triton.jit
def _kquant_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                        M, N, K, M_BUCKET,
                        stride_xm, stride_xk, stride_w, stride_ym,
                        QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    tl.static_assert(BLOCK_K % 16 == 0)
    # grouped launch order: GROUP_M row-tiles of x sweep the N tiles together (weight tiles stay in L2)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows64 = offs_m.to(tl.int64)

    acc = _k_loop(tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32),          # y tile, transposed
                  x_ptr, w_ptr, rows64, m_mask, offs_n, n_mask, 0, tl.cdiv(K, BLOCK_K), K,
                  stride_xm, stride_xk, stride_w, QTYPE, FP32_DOT, BLOCK_N, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows64[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


@triton.autotune(configs=_decode_configs(), key=["N", "K", "QTYPE"], restore_value=["y_ptr"])
@triton.jit
def _kquant_decode_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                          M, N, K,
                          stride_xm, stride_xk, stride_w, stride_ym,
                          QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SPLIT_K: tl.constexpr):
    # all M (<= BLOCK_M) rows in one tile; y_ptr is a zero-initialised float32 (M, N) workspace
    # to which every K split adds its partial sum
    tl.static_assert(BLOCK_K % 16 == 0)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    kb_start, kb_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = _k_loop(tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32),
                  x_ptr, w_ptr, offs_m, m_mask, offs_n, n_mask, kb_start, kb_end, K,
                  stride_xm, stride_xk, stride_w, QTYPE, FP32_DOT, BLOCK_N, BLOCK_K)

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[:, None]
    tl.atomic_add(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc,
                  mask=n_mask[:, None] & m_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def path_for(m: int) -> str:
    """Which kernel ``kquant_linear_triton`` runs for ``m`` rows: ``"decode"`` or ``"gemm"``."""
    return "decode" if m <= DECODE_MAX_M else "gemm"


def kquant_linear_triton(x: torch.Tensor, data: torch.Tensor, qtype: str,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` with W held in GGUF ``qtype`` bytes; same contract as ``kquant_linear_ref``.

    x ``(M, K)`` float16/bfloat16/float32; data uint8 ``(N, K / block_size * type_size)`` (rows
    contiguous, no alignment needed) -> ``(M, N)`` in ``x.dtype`` (float32 accumulate). Tensors
    must be on CUDA (or on CPU with ``TRITON_INTERPRET=1``). Raises ValueError on an unsupported
    qtype, or shapes, dtypes or devices that do not fit together.
    """
    k, n = check_kquant_args(x, data, qtype, bias)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K); got shape {tuple(x.shape)} (kernels.dispatch flattens batches)")
    if not (x.is_cuda or INTERPRET):
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {x.device}); on CPU set "
                         "TRITON_INTERPRET=1 before importing kernels, or use kquant_linear_ref")
    m = x.shape[0]
    if n == 0:
        return x.new_zeros((m, 0))
    if data.stride(1) != 1:
        data = data.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if m == 0:
        return x.new_empty((0, n))
    fp32_dot = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
    common = dict(QTYPE=QTYPE_IDS[qtype], HAS_BIAS=bias is not None, FP32_DOT=fp32_dot)

    if path_for(m) == "decode":
        ws, grid = decode_output(m, n, x.device)
        _kquant_decode_kernel[grid](
            x, data, bias if bias is not None else ws, ws,
            m, n, k,
            x.stride(0), x.stride(1), data.stride(0), ws.stride(0),
            BLOCK_M=DECODE_MAX_M, **common)
        return ws if x.dtype == torch.float32 else ws.to(x.dtype)

    y, m_bucket, grid = tiled_output(m, n, x.dtype, x.device)
    _kquant_gemm_kernel[grid](
        x, data, bias if bias is not None else y, y,
        m, n, k, m_bucket,
        x.stride(0), x.stride(1), data.stride(0), y.stride(0),
        **common)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# The reference this kernel must equal (within float rounding), on any device:
reference = kquant_linear_ref

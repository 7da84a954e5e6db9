"""Triton W8A8 GEMM (SmoothQuant style): int8 x int8 with int32 accumulation, scaled to float.

``y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])``

* ``x_q``     int8 ``(M, K)``, per-token scales ``x_scale`` float32 ``(M,)``.
* ``w_q``     int8 ``(N, K)`` (the ``nn.Linear`` layout), per-channel scales ``w_scale`` float32 ``(N,)``.
* ``bias``    optional float ``(N,)``.
* output      ``(M, N)`` in ``out_dtype`` (float16 by default, bfloat16 or float32).

One tiled kernel for every M (small-M configs use 16-row tiles). The int32 sum is exact, so
the result equals the reference up to the float32 epilogue's rounding. Under
``TRITON_INTERPRET=1`` one fixed config is used (the interpreter cannot autotune).

The function must equal :func:`kernels.reference.int8_linear_ref` (see the end of this file).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_int8_args, int8_linear_ref
from .tiling import INTERPRET, gemm_configs, grouped_tile, tiled_output


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

def _configs():
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4), (32, 128, 128, 4, 4),
        (16, 128, 256, 4, 3), (16, 64, 256, 4, 4),
    ]
    return gemm_configs(shapes, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64})


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr,
                      M, N, K, M_BUCKET,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
                      HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    # grouped launch order, as in the GPTQ GEMM
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows64 = offs_m.to(tl.int64)
    cols64 = offs_n.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_ptr + rows64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(w_ptr + cols64[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_mask[:, None] & n_mask[None, :], other=0)        # (BLOCK_K, BLOCK_N) of w.T
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def int8_linear_triton(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W8A8 linear ``(M, K) x (N, K) -> (M, N)``; same contract as ``int8_linear_ref``.

    Tensors must be on CUDA (or on CPU with ``TRITON_INTERPRET=1``). Raises ValueError on
    shapes, dtypes or devices that do not fit together.
    """
    m, k, n = check_int8_args(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if not (x_q.is_cuda or INTERPRET):
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {x_q.device}); on CPU set "
                         "TRITON_INTERPRET=1 before importing kernels, or use int8_linear_ref")
    if m == 0 or n == 0:
        return torch.empty((m, n), device=x_q.device, dtype=out_dtype)
    y, m_bucket, grid = tiled_output(m, n, out_dtype, x_q.device)
    x_scale = x_scale.contiguous()
    w_scale = w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _int8_gemm_kernel[grid](
        x_q, w_q, x_scale, w_scale, bias if bias is not None else y, y,
        m, n, k, m_bucket,
        x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), y.stride(0),
        HAS_BIAS=bias is not None)
    return y if y.dtype == out_dtype else y.to(out_dtype)


# The reference this kernel must equal (within float32 epilogue rounding), on any device:
reference = int8_linear_ref

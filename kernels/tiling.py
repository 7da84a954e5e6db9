"""Helpers shared by the GEMM kernels: autotune configurations, launch order, K ranges, outputs."""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def gemm_configs(shapes, interpret: dict) -> list:
    """Tiled-GEMM autotune configurations from ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``
    rows; under the interpreter the single config ``interpret`` (it cannot autotune)."""
    if INTERPRET:
        return [triton.Config(dict(interpret, GROUP_M=8))]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def decode_configs(shapes, interpret: dict) -> list:
    """Split-K decode configurations from ``(BLOCK_N, BLOCK_K, SPLIT_K, warps, stages)`` rows."""
    if INTERPRET:
        return [triton.Config(dict(interpret))]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for bn, bk, sk, w, s in shapes]


def tiled_output(m: int, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, int, object]:
    """The output of a tiled launch, its M bucket (the autotune key) and its 1-D grid. The
    interpreter truncates float32 -> bfloat16 in stores (a GPU rounds to nearest), so there the
    output is float32 and the caller lets torch round it."""
    store = torch.float32 if (INTERPRET and dtype == torch.bfloat16) else dtype
    y = torch.empty((m, n), device=device, dtype=store)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    return y, min(triton.next_power_of_2(m), 4096), grid


def decode_output(m: int, n: int, device) -> tuple[torch.Tensor, object]:
    """The zero-initialised float32 workspace split-K decode launches add into, and their grid."""
    ws = torch.zeros((m, n), device=device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    return ws, grid


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (tile_m, tile_n) in grouped order: GROUP_M row-tiles sweep the
    N tiles together, so the weight tiles they share stay in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def split_k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K blocks (of BLOCK_K) that split ``pid_k`` of SPLIT_K sums over: [start, end)."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    start = pid_k * per_split
    return start, tl.minimum(start + per_split, k_blocks)

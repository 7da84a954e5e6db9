"""Kernel tests: on a machine without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any module defining kernels is imported (``triton.jit``
reads it at decoration time), so it is set here, at import time, and only when CUDA is absent.
"""
import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from compress.formats.gptq_int import pack  # noqa: E402
from compress.quantizer import quantize_rtn  # noqa: E402
from compress.scheme import IntScheme  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"



def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
        pytest.skip("needs a CUDA device")


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ``|y - ref| / |ref|`` in float32."""
    y = y.to(torch.float32)
    ref = ref.to(torch.float32)
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


@functools.lru_cache(maxsize=32)
def _make_gptq(n: int, k: int, bits: int, group: int, sym: bool = False, act_order: bool = False,
              seed: int = 0, device: str = DEVICE):
    """A random ``(N, K)`` weight quantized by round-to-nearest and packed in the GPTQ layout.

    With ``act_order`` the columns are quantized in a random order, as GPTQ's act-order does:
    ``g_idx[perm[i]] = i // group``. Returns the packed weight and the float weight it stands
    for (built from the integer values, independently of the bit-stream packing). Cached:
    callers must not modify the returned tensors in place (clone first).
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scheme = IntScheme(bits=bits, group_size=group, sym=sym)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        qp, scales, zeros, gp = quantize_rtn(w[:, perm], scheme)
        q = torch.empty_like(qp)
        q[:, perm] = qp
        g_idx = torch.empty_like(gp)
        g_idx[perm] = gp
    else:
        q, scales, zeros, g_idx = quantize_rtn(w, scheme)
    p = pack(q, scales, zeros, g_idx, bits)
    s16 = p.scales.to(torch.float32)
    g = g_idx.to(torch.int64)
    w_deq = (q.to(torch.float32) - zeros.to(torch.float32).t()[:, g]) * s16.t()[:, g]
    tensors = {name: t.to(device) for name, t in p.tensors().items()}
    return tensors, w_deq.to(device)


@pytest.fixture
def make_gptq():
    """Factory: ``make_gptq(n, k, bits, group, sym=False, act_order=False, seed=0)``."""
    return _make_gptq


@pytest.fixture
def rel_err():
    return _rel_err


@pytest.fixture
def device():
    return DEVICE

"""The one entry point quantized modules call for packed-weight matmuls.

* :func:`gptq_linear` ``(x (..., K), qweight, qzeros, scales, g_idx, bits, bias=None) -> (..., N)``
* :func:`int8_linear` ``(x_q (..., K), x_scale (...), w_q (N, K), w_scale (N,), bias=None,
  out_dtype=float16) -> (..., N)``
* :func:`kquant_linear` ``(x (..., K), data uint8 (N, K / block_size * type_size), qtype,
  bias=None) -> (..., N)``: W read from its GGUF block bytes (Q4_0 ... Q8_0, Q2_K ... Q6_K)

Leading batch dimensions are flattened to M. The arguments are validated first (ValueError
naming the mismatch: bit width, shapes of qweight/qzeros/scales/g_idx against x, dtypes,
devices), then a path is chosen:

* ``COMPRESS_KERNEL`` unset or ``auto``: the Triton kernel when the tensors are on CUDA and
  triton imports, else the torch twin from :mod:`kernels.reference`; the reason for a
  fallback is logged once (logger ``kernels.dispatch``).
* ``COMPRESS_KERNEL=torch``: always the twin.
* ``COMPRESS_KERNEL=triton``: always the Triton kernel; raises :class:`KernelUnavailableError`
  when it cannot run (triton missing, or CPU tensors without ``TRITON_INTERPRET=1`` set before
  the kernel modules were imported -- that is how the tests drive the kernels on CPU).

Every call is counted by path: :func:`path_counts` returns
``{"triton-gemm": n, "triton-decode": n, "torch": n}`` (the GPTQ kernel takes the decode path
for M <= 16; the int8 kernel has a single GEMM path); ``path_counts("gptq")``,
``path_counts("int8")`` or ``path_counts("kquant")`` counts one op (the GGUF-block kernel also
takes its decode path for M <= 16). :func:`reset_path_counts` clears them.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections import Counter

import torch

from . import reference

log = logging.getLogger(__name__)

ENV_VAR = "COMPRESS_KERNEL"
MODES = ("auto", "torch", "triton")
PATHS = ("triton-gemm", "triton-decode", "torch")
OPS = ("gptq", "int8", "kquant")
_MODULES = {"gptq": "kernels.gptq_gemm", "int8": "kernels.int8_gemm", "kquant": "kernels.kquant_gemm"}

_counts: Counter = Counter()      # (op, path) -> calls
_logged: set[str] = set()


class KernelUnavailableError(RuntimeError):
    """``COMPRESS_KERNEL=triton`` was requested but the Triton kernel cannot run here."""


def record(op: str, path: str) -> None:
    """Count a call that a caller served itself on one of the known paths (e.g. a module
    reusing the twin's dequantized weight on the CPU)."""
    if op not in OPS or path not in PATHS:
        raise ValueError(f"unknown op/path {op!r}/{path!r}")
    _counts[(op, path)] += 1


def path_counts(op: str | None = None) -> dict[str, int]:
    """Calls per path since the last reset, for one op (``"gptq"``/``"int8"``) or all."""
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return {p: sum(c for (o, q), c in _counts.items() if q == p and (op is None or o == op)) for p in PATHS}


def reset_path_counts() -> None:
    """Clear the counters, and the log-once memory (the next fallback is logged again)."""
    _counts.clear()
    _logged.clear()


def _log_once(key: str, msg: str, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg)


def kernel_mode() -> str:
    """The path requested through ``COMPRESS_KERNEL``: ``auto`` (default), ``torch`` or ``triton``."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not one of {', '.join(MODES)}")
    return mode


def _triton_module(op: str):
    """The kernel module for ``op``, or the reason it cannot be imported."""
    try:
        return importlib.import_module(_MODULES[op]), None
    except ImportError as e:   # triton not installed, or a broken install
        return None, f"triton is not importable ({e}); install triton>=3.6"


def _pick(op: str, device: torch.device):
    """The Triton kernel module to use for ``op`` on ``device``, or None for the torch twin."""
    mode = kernel_mode()
    if mode == "torch":
        _log_once(f"{op}:forced-torch", f"{op}: using the torch reference ({ENV_VAR}=torch)")
        return None
    if device.type != "cuda" and mode == "auto":
        _log_once(f"{op}:device:{device.type}",
                  f"{op}: using the torch reference: tensors are on {device.type}, the Triton kernels need CUDA")
        return None
    mod, why = _triton_module(op)
    if mod is None:
        if mode == "triton":
            raise KernelUnavailableError(f"{ENV_VAR}=triton but {why}")
        _log_once(f"{op}:import", f"{op}: using the torch reference: {why}",
                  logging.WARNING if device.type == "cuda" else logging.INFO)
        return None
    if device.type != "cuda" and not mod.INTERPRET:
        raise KernelUnavailableError(
            f"{ENV_VAR}=triton with tensors on {device.type}: the Triton kernels run off-GPU only in the "
            "interpreter; set TRITON_INTERPRET=1 before kernels.gptq_gemm / kernels.int8_gemm are imported")
    return mod


def gptq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a GPTQ-layout weight (layout: :mod:`kernels.reference`).

    x ``(..., K)`` float16/bfloat16/float32 -> ``(..., N)`` in ``x.dtype``.
    """
    k, n, _ = reference.check_gptq_args(x, qweight, qzeros, scales, g_idx, bits, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    mod = _pick("gptq", x.device)
    if mod is None:
        y = reference.gptq_linear_ref(x2, qweight, qzeros, scales, g_idx, bits, bias)
        path = "torch"
    else:
        y = mod.gptq_linear_triton(x2, qweight, qzeros, scales, g_idx, bits, bias)
        path = f"triton-{mod.path_for(x2.shape[0])}"
    _counts[("gptq", path)] += 1
    return y.reshape(*lead, n)


def int8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W8A8 linear (layout: :func:`kernels.reference.int8_linear_ref`).

    x_q int8 ``(..., K)`` with per-token float32 scales ``x_scale`` of shape ``(...)`` (or
    ``(..., 1)``); w_q int8 ``(N, K)``, w_scale float32 ``(N,)`` -> ``(..., N)`` in ``out_dtype``.
    """
    if x_q.dim() < 1:
        raise ValueError("x_q must have at least one dimension (..., K)")
    lead = x_q.shape[:-1]
    if tuple(x_scale.shape) not in (tuple(lead), tuple(lead) + (1,)):
        raise ValueError(f"x_scale must have shape {tuple(lead)} (one scale per token) to match x_q "
                         f"{tuple(x_q.shape)}; got {tuple(x_scale.shape)}")
    x2 = x_q.reshape(-1, x_q.shape[-1])
    s2 = x_scale.reshape(-1)
    _, _, n = reference.check_int8_args(x2, s2, w_q, w_scale, bias, out_dtype)
    mod = _pick("int8", x_q.device)
    if mod is None:
        y = reference.int8_linear_ref(x2, s2, w_q, w_scale, bias, out_dtype)
        path = "torch"
    else:
        y = mod.int8_linear_triton(x2, s2, w_q, w_scale, bias, out_dtype)
        path = "triton-gemm"
    _counts[("int8", path)] += 1
    return y.reshape(*lead, n)


def kquant_linear(x: torch.Tensor, data: torch.Tensor, qtype: str,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` with W ``(N, K)`` held in GGUF block bytes (layout:
    :func:`kernels.reference.dequantize_gguf_ref`).

    x ``(..., K)`` float16/bfloat16/float32; data uint8 ``(N, K / block_size * type_size)``;
    qtype one of ``kernels.reference.GGUF_BLOCK_TYPES`` -> ``(..., N)`` in ``x.dtype``. Raises
    ValueError on an unsupported qtype or a K that is not a multiple of its block size.
    """
    k, n = reference.check_kquant_args(x, data, qtype, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    mod = _pick("kquant", x.device)
    if mod is None:
        y = reference.kquant_linear_ref(x2, data, qtype, bias)
        path = "torch"
    else:
        y = mod.kquant_linear_triton(x2, data, qtype, bias)
        path = f"triton-{mod.path_for(x2.shape[0])}"
    _counts[("kquant", path)] += 1
    return y.reshape(*lead, n)

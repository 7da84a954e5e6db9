"""The one entry point quantized modules call for packed-weight matmuls.

* :func:`gptq_linear` ``(x (..., K), qweight, qzeros, scales, g_idx, bits, bias=None) -> (..., N)``
* :func:`int8_linear` ``(x_q (..., K), x_scale (...), w_q (N, K), w_scale (N,), bias=None,
  out_dtype=float16) -> (..., N)``: int8 x int8 with exact int32 sums
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

The int8 twin on CPU computes its exact int32 sums one of two ways, with the same bits:
``torch._int_mm`` (fast where the CPU has int8 dot-product instructions: AVX512-VNNI, AVX-VNNI,
AMX) or chunked float32 matmuls (:func:`kernels.reference.int8_matmul_float_ref`; exact because
every chunk of at most 1024 columns sums to at most 2**24 in magnitude). Without AVX512-VNNI,
torch runs ``torch._int_mm`` on CPU as a plain loop (oneDNN's AVX2 int8 GEMM can overflow, pytorch
PR 136942): on an AVX2-only CPU ``512 x 576 @ 576 x 1536`` took 881 ms against 19 ms in float32.
``COMPRESS_INT8_CPU`` chooses:

* unset or ``auto``: measured once per process at the first int8 call on CPU -- both run on a
  small ``32 x 512 @ 512 x 256`` product with extreme values (a few milliseconds; tens where
  ``torch._int_mm`` is slow) and must agree bit for bit (else ``intmm`` is kept, with a
  warning); the faster is kept (:func:`int8_cpu_matmul`). The choice and both timings are
  logged once (logger ``kernels.dispatch``).
* ``intmm``: always ``torch._int_mm`` (but K == 1 takes the float path: ``torch._int_mm``
  returns uninitialised values there, see :func:`kernels.reference.int8_matmul_ref`).
* ``float``: always the exact float32 path.

Any other value raises ValueError at the next int8 call.

Every call is counted by path: :func:`path_counts` returns
``{"triton-gemm": n, "triton-decode": n, "torch": n, "torch/intmm": n, "torch/float": n}``
(the GPTQ kernel takes the decode path for M <= 16; the int8 kernel has a single GEMM path).
``torch/intmm`` and ``torch/float`` split the int8 twin's CPU calls by how its sums were computed;
they are part of the ``torch`` count, not in addition to it. ``path_counts("gptq")``,
``path_counts("int8")`` or ``path_counts("kquant")`` counts one op (the GGUF-block kernel also
takes its decode path for M <= 16; only ``"int8"`` has the ``torch/...`` keys).
:func:`reset_path_counts` clears them.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from collections import Counter

import torch

from . import reference

log = logging.getLogger(__name__)

ENV_VAR = "COMPRESS_KERNEL"
MODES = ("auto", "torch", "triton")
PATHS = ("triton-gemm", "triton-decode", "torch")
OPS = ("gptq", "int8", "kquant")
INT8_CPU_ENV = "COMPRESS_INT8_CPU"
INT8_CPU_MODES = ("auto", "intmm", "float")
INT8_CPU_PATHS = ("torch/intmm", "torch/float")     # a split of the int8 op's "torch" count
_INT8_PROBE = (32, 512, 256)                        # M, K, N of the product timed by int8_cpu_matmul
_MODULES = {"gptq": "kernels.gptq_gemm", "int8": "kernels.int8_gemm", "kquant": "kernels.kquant_gemm"}

_counts: Counter = Counter()      # (op, path) -> calls
_logged: set[str] = set()
_int8_cpu_measured: str | None = None   # int8_cpu_matmul's measured choice, once per process


class KernelUnavailableError(RuntimeError):
    """``COMPRESS_KERNEL=triton`` was requested but the Triton kernel cannot run here."""


def record(op: str, path: str) -> None:
    """Count a call that a caller served itself on one of the known paths (e.g. a module
    reusing the twin's dequantized weight on the CPU). An int8 ``torch/...`` path also counts
    as ``torch``."""
    if op not in OPS or not (path in PATHS or (op == "int8" and path in INT8_CPU_PATHS)):
        raise ValueError(f"unknown op/path {op!r}/{path!r}")
    _counts[(op, path)] += 1
    if path in INT8_CPU_PATHS:
        _counts[(op, "torch")] += 1


def path_counts(op: str | None = None) -> dict[str, int]:
    """Calls per path since the last reset, for one op (``"gptq"``/``"int8"``/``"kquant"``) or
    all; the int8 op and the total also have the ``torch/intmm`` / ``torch/float`` split."""
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    paths = PATHS + INT8_CPU_PATHS if op in (None, "int8") else PATHS
    return {p: sum(c for (o, q), c in _counts.items() if q == p and (op is None or o == op)) for p in paths}


def reset_path_counts() -> None:
    """Clear the counters, and the log-once memory (the next fallback is logged again). The
    measured int8 CPU choice (:func:`int8_cpu_matmul`) is kept."""
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


def int8_cpu_mode() -> str:
    """The int8 CPU matmul requested through ``COMPRESS_INT8_CPU``: ``auto`` (default),
    ``intmm`` or ``float``; ValueError on anything else."""
    mode = os.environ.get(INT8_CPU_ENV, "").strip().lower() or "auto"
    if mode not in INT8_CPU_MODES:
        raise ValueError(f"{INT8_CPU_ENV}={os.environ.get(INT8_CPU_ENV)!r} is not one of "
                         f"{', '.join(INT8_CPU_MODES)} (intmm: torch._int_mm; float: exact float32 matmuls; "
                         "auto: the faster, measured once)")
    return mode


def int8_cpu_matmul() -> str:
    """How the int8 twin computes its int32 sums on CPU: ``"intmm"`` or ``"float"``.

    ``COMPRESS_INT8_CPU`` when it names one; otherwise measured once per process and cached.
    """
    global _int8_cpu_measured
    mode = int8_cpu_mode()
    if mode != "auto":
        _log_once(f"int8:cpu:{mode}", f"int8: CPU sums by {mode} ({INT8_CPU_ENV}={mode})")
        return mode
    if _int8_cpu_measured is None:
        choice, msg, level = _measure_int8_cpu()
        log.log(level, msg)
        _int8_cpu_measured = choice
    return _int8_cpu_measured


def _best_ms(fn, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _measure_int8_cpu() -> tuple[str, str, int]:
    """Time ``torch._int_mm`` against the exact float32 path on a small product; return the
    choice, the message to log and its level."""
    m, k, n = _INT8_PROBE
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    a[0] = -128                              # the extreme products, (-128) * (-128) and 127 * -128
    b[0] = -128
    b[1] = 127
    probe = f"{m}x{k} @ {k}x{n}"
    try:
        want = reference.int8_matmul_ref(a, b, "intmm")     # also the warm-up
    except (RuntimeError, NotImplementedError) as e:
        return "float", f"int8: CPU sums by float (torch._int_mm does not run here: {e})", logging.INFO
    got = reference.int8_matmul_float_ref(a, b)
    if not torch.equal(got, want):
        return ("intmm", f"int8: CPU sums by intmm: the float32 path differs from torch._int_mm on a {probe} "
                "probe (unexpected: this torch's float32 matmul does not sum small integers exactly)",
                logging.WARNING)
    t_int = _best_ms(lambda: reference.int8_matmul_ref(a, b, "intmm"))
    t_float = _best_ms(lambda: reference.int8_matmul_float_ref(a, b, torch.float32))
    choice = "float" if t_float < t_int else "intmm"
    return (choice, f"int8: CPU sums by {choice} (measured on a {probe} probe: torch._int_mm {t_int:.2f} ms, "
            f"exact float32 {t_float:.2f} ms; set {INT8_CPU_ENV}=intmm|float to override)", logging.INFO)


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
    int8_cpu_mode()                                  # a bad COMPRESS_INT8_CPU fails on every device
    mod = _pick("int8", x_q.device)
    if mod is None:
        matmul = int8_cpu_matmul() if x_q.device.type == "cpu" else "auto"
        y = reference.int8_linear_ref(x2, s2, w_q, w_scale, bias, out_dtype, matmul=matmul)
        path = "torch" if matmul == "auto" else f"torch/{matmul}"
    else:
        y = mod.int8_linear_triton(x2, s2, w_q, w_scale, bias, out_dtype)
        path = "triton-gemm"
    record("int8", path)
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

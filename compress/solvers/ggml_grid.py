"""GPTQ onto the grids of GGML (llama.cpp) block types (the block codec is
:mod:`compress.formats.ggml_codec`).

* **The grid for the column sweep** (:class:`GGMLGrid`, :func:`gptq_ggml_solve`): when the sweep
  (:func:`compress.solvers.obs.sweep`) reaches the first column of a GGML block, the block's fp16
  scales (and mins) and integer sub-block scales are chosen by llama.cpp's importance-weighted
  search (``kquants.quantize``; importance = the Hessian diagonal, or an importance matrix) on the
  block's current, error-compensated weights; every column is then rounded to the nearest point
  of its grid (codes clamped to the type's range). The result is standard GGUF block bytes whose
  decoding equals the weights the sweep used.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import CompressError
from ..formats import kquants
from ..formats.ggml_codec import _codec, block_grid, pack_codes
from .obs import check_inputs, damped_inverse_cholesky, output_error, prepare, sweep

log = logging.getLogger(__name__)

@dataclass
class KQuantGPTQResult:
    """What :func:`gptq_ggml_solve` returns for one ``(N, K)`` layer.

    data: uint8 ``(N, K / block * type_size)``: GGUF rows. weight: float32 ``(N, K)``, equal to
    ``kquants.dequantize(data, type, (N, K))`` bit for bit: the weights GPTQ's error propagation
    used. loss: ``sum (w - q)^2 / U[i, i]^2 / 2`` (GPTQ's own report). info: ``output_error``
    ``tr((W - Q) H (W - Q)^T)`` with the given H, ``dead_columns``, ``damp_tries``.
    """

    data: torch.Tensor
    weight: torch.Tensor
    loss: float
    damp: float
    fallback: str | None = None
    info: dict = field(default_factory=dict)


@contextmanager
def single_thread():
    """Run torch CPU ops single-threaded inside the block (restored after).

    The column sweep is thousands of small ops; intra-op threads only add synchronisation there,
    and on a busy machine OpenMP's waiting made the sweep ~20x slower (0.8 s vs 18 s for a
    576x576 Q5_0 layer on 2 shared cores)."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _importance(h: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    imp = torch.diagonal(h).clone() if importance is None else importance.to(torch.float32).clone()
    pos = imp[imp > 0]
    floor = float(pos.mean()) * 1e-6 if pos.numel() else 1.0
    return imp.clamp_min(floor)




class GGMLGrid:
    """GGML blocks as the sweep sees them (natural column order: blocks are contiguous)."""

    def __init__(self, n: int, k: int, type_name: str, imp: torch.Tensor):
        self.cd = _codec(type_name)
        self.type_name, self.imp, self.n = type_name, imp, n
        self.blocks = torch.empty((n, k // self.cd.block, self.cd.size), dtype=torch.uint8)
        self.codes = torch.empty((self.cd.block, n), dtype=torch.float32)
        self.tmpl = self.At = self.Mt = None

    def column(self, i, col, current):
        B = self.cd.block
        jj = i % B
        if jj == 0:     # a new block: fit its scales on the current weights of its columns
            self.tmpl = kquants.quantize(current(i + B).t().contiguous(), self.type_name, self.imp[i:i + B])
            A, M = block_grid(self.tmpl, self.type_name)
            self.At, self.Mt = A.t().contiguous(), M.t().contiguous()          # (B, N)
        a, m = self.At[jj], self.Mt[jj]
        c = torch.where(a != 0, torch.round((col + m) / torch.where(a != 0, a, torch.ones_like(a))),
                        torch.zeros_like(col)).clamp_(self.cd.cmin, self.cd.cmax)
        self.codes[jj] = c
        if jj == B - 1:
            self.blocks[:, i // B] = pack_codes(self.tmpl, self.codes.t().to(torch.int64), self.type_name)
        return a * c - m                                                      # the decoder's arithmetic

    def data(self) -> torch.Tensor:
        return self.blocks.reshape(self.n, -1)


def gptq_ggml_solve(W: torch.Tensor, H: torch.Tensor, type_name: str, damp: float = 0.01,
                    block_size: int | None = None, max_damp_tries: int = 5,
                    importance: torch.Tensor | None = None) -> KQuantGPTQResult:
    """GPTQ for ``W (N, K)`` against ``H (K, K)`` onto the grid of a GGML type (see the module doc).

    Lazy batches are ``block_size`` columns (default: 128, or 256 for k-quants), a multiple of the
    GGML block. Cholesky failures raise the dampening tenfold (at most ``max_damp_tries`` times),
    then fall back to plain importance-weighted quantization; both are recorded in ``fallback``.
    """
    with single_thread():
        return _gptq_ggml_solve(W, H, type_name, damp, block_size, max_damp_tries, importance)


def _gptq_ggml_solve(W, H, type_name, damp, block_size, max_damp_tries, importance) -> KQuantGPTQResult:
    cd = _codec(type_name)
    B = cd.block
    L = block_size or max(B, 128)
    check_inputs(W, H, L, damp, max_damp_tries)
    n, k = W.shape
    if k % B:
        raise CompressError(f"{type_name} needs the row length ({k}) to be a multiple of {B}")
    if L % B:
        raise CompressError(f"GPTQ block size {L} must be a multiple of the {type_name} block ({B})")
    w0 = W.detach().to(torch.float32).cpu()
    h_given = H.detach().to(torch.float32).cpu()
    w, h, _, n_dead = prepare(w0, h_given)
    imp = _importance(h_given, importance)
    u, cur, tries = damped_inverse_cholesky(h, damp, max_damp_tries, f"GPTQ-{type_name}")
    info = {"dead_columns": n_dead, "damp_tries": tries}
    if u is None:
        log.warning("GPTQ-%s: Cholesky failed after %d tries; falling back to importance-weighted rounding",
                    type_name, tries)
        data = kquants.quantize(w0, type_name, imp)
        q = kquants.dequantize(data, type_name, (n, k))
        err = output_error(w0, q, h_given)
        info["output_error"] = err
        return KQuantGPTQResult(data, q, 0.5 * err, cur, "rtn", info)
    grid = GGMLGrid(n, k, type_name, imp)
    q, loss = sweep(w, u, grid, L)
    info["output_error"] = output_error(w0, q, h_given)
    fallback = "rtn:no-calibration-input" if n_dead == k else f"damp-increased:{cur:g}" if tries > 1 else None
    return KQuantGPTQResult(grid.data(), q, loss, cur, fallback, info)

"""GPTQ onto the grids of GGML (llama.cpp) block types, and the block codec it needs.

* **Block codec** (``block_grid``, ``block_codes``, ``pack_codes``): for GGUF block bytes of any
  supported type, the per-weight grid ``y = A * c - M`` (``A``, ``M`` float32 computed with the
  decoder's own operations, so ``A * c - M`` is bit for bit what ``kquants.dequantize`` gives) and
  the integer codes ``c``; and the inverse, writing codes into blocks.
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

import numpy as np
import torch

from ..errors import CompressError
from ..formats import kquants
from .obs import check_inputs, damped_inverse_cholesky, output_error, prepare, sweep

log = logging.getLogger(__name__)

# A code field is a list of bit fields; each stores ``nbits`` bits of the stored value
# ``s = c + offset`` (starting at bit ``vshift`` of s) at byte ``byte[n]``, bit ``shift[n]`` of the
# block, for the n-th weight of the block.

@dataclass(frozen=True)
class _Field:
    vshift: int
    nbits: int
    byte: np.ndarray      # (block_size,) int64
    shift: np.ndarray     # (block_size,) int64


@dataclass(frozen=True)
class _Codec:
    name: str
    block: int
    size: int
    cmin: int
    cmax: int
    offset: int           # stored = c + offset
    fields: tuple[_Field, ...]


def _n(block: int) -> np.ndarray:
    return np.arange(block, dtype=np.int64)


def _make_codecs() -> dict[str, _Codec]:
    n32, n256 = _n(32), _n(256)
    nib32 = lambda base: _Field(0, 4, base + n32 % 16, 4 * (n32 // 16))      # noqa: E731
    q5h = lambda base: _Field(4, 1, base + n32 // 8, n32 % 8)                 # noqa: E731  (u32 qh, little-endian)
    two = lambda base: _Field(0, 2, base + 32 * (n256 // 128) + n256 % 32, 2 * ((n256 % 128) // 32))  # noqa: E731
    k4 = lambda base: _Field(0, 4, base + 32 * (n256 // 64) + n256 % 32, 4 * ((n256 % 64) // 32))     # noqa: E731
    hbit = lambda base, vs: _Field(vs, 1, base + n256 % 32, n256 // 32)      # noqa: E731
    h, g, l = n256 // 128, (n256 % 128) // 32, n256 % 32
    return {c.name: c for c in (
        _Codec("Q4_0", 32, 18, -8, 7, 8, (nib32(2),)),
        _Codec("Q4_1", 32, 20, 0, 15, 0, (nib32(4),)),
        _Codec("Q5_0", 32, 22, -16, 15, 16, (nib32(6), q5h(2))),
        _Codec("Q5_1", 32, 24, 0, 31, 0, (nib32(8), q5h(4))),
        _Codec("Q8_0", 32, 34, -128, 127, 256, (_Field(0, 8, 2 + n32, 0 * n32),)),   # two's complement byte
        _Codec("Q2_K", 256, 84, 0, 3, 0, (two(16),)),
        _Codec("Q3_K", 256, 110, -4, 3, 4, (two(32), hbit(0, 2))),
        _Codec("Q4_K", 256, 144, 0, 15, 0, (k4(16),)),
        _Codec("Q5_K", 256, 176, 0, 31, 0, (k4(48), hbit(16, 4))),
        _Codec("Q6_K", 256, 210, -32, 31, 32, (_Field(0, 4, 64 * h + l + 32 * (g & 1), 4 * (g >> 1)),
                                              _Field(4, 2, 128 + 32 * h + l, 2 * g))),
    )}


CODECS = _make_codecs()


def _codec(type_name: str) -> _Codec:
    c = CODECS.get(type_name)
    if c is None:
        raise CompressError(f"no block codec for GGML type {type_name}; supported: {', '.join(CODECS)}")
    return c


def _fp16_at(data: torch.Tensor, a: int) -> torch.Tensor:
    return data[:, a:a + 2].contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes ``(nb, 12)`` -> 6-bit scales and mins ``(nb, 8)`` (get_scale_min_k4)."""
    s = s.to(torch.int64)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, m


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K: 12 bytes ``(nb, 12)`` -> signed 6-bit scales ``(nb, 16)``."""
    s = s.to(torch.int64)
    j = torch.arange(16)
    lo = torch.where(j < 8, s[:, j.clamp(max=7)] & 15, s[:, (j - 8).clamp(min=0)] >> 4)
    hi = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (lo | (hi << 4)) - 32


def block_grid(data: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each weight of GGUF blocks: ``y = A * c - M`` with integer ``c``.

    data: uint8 ``(nb, type_size)``. Returns float32 ``A, M`` ``(nb, block_size)``, computed with
    the decoder's operations (``d * sc``, ``dmin * m``), so that ``A * c - M`` equals the decoded
    weight bit for bit (for Q4_1/Q5_1, ``M = -m`` and ``A*c - (-m) == d*c + m`` exactly).
    """
    cd = _codec(type_name)
    nb = data.shape[0]
    B = cd.block
    if type_name in ("Q4_0", "Q5_0", "Q8_0"):
        d = _fp16_at(data, 0)
        return d[:, None].expand(nb, B).contiguous(), torch.zeros((nb, B))
    if type_name in ("Q4_1", "Q5_1"):
        d, m = _fp16_at(data, 0), _fp16_at(data, 2)
        return d[:, None].expand(nb, B).contiguous(), (-m)[:, None].expand(nb, B).contiguous()
    if type_name == "Q2_K":
        sc = data[:, 0:16].to(torch.int64)
        d, dmin = _fp16_at(data, 80), _fp16_at(data, 82)
        A = d[:, None] * (sc & 15).float()
        M = dmin[:, None] * (sc >> 4).float()
        return A.repeat_interleave(16, 1), M.repeat_interleave(16, 1)
    if type_name == "Q3_K":
        d = _fp16_at(data, 108)
        A = d[:, None] * _q3_scales(data[:, 96:108]).float()
        return A.repeat_interleave(16, 1), torch.zeros((nb, B))
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _fp16_at(data, 0), _fp16_at(data, 2)
        sc, m = _k4_scale_min(data[:, 4:16])
        A = d[:, None] * sc.float()
        M = dmin[:, None] * m.float()
        return A.repeat_interleave(32, 1), M.repeat_interleave(32, 1)
    if type_name == "Q6_K":
        d = _fp16_at(data, 208)
        sc = data[:, 192:208].contiguous().view(torch.int8).float()
        A = d[:, None] * sc
        return A.repeat_interleave(16, 1), torch.zeros((nb, B))
    raise CompressError(f"no block grid for GGML type {type_name}")


def block_codes(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """Integer codes ``c`` ``(nb, block_size)`` int64 of GGUF blocks (``y = A * c - M``)."""
    cd = _codec(type_name)
    d = data.to(torch.int64)
    s = torch.zeros((data.shape[0], cd.block), dtype=torch.int64)
    for f in cd.fields:
        part = (d[:, torch.from_numpy(f.byte)] >> torch.from_numpy(f.shift)) & ((1 << f.nbits) - 1)
        s |= part << f.vshift
    if type_name == "Q8_0":
        return ((s + 128) & 255) - 128
    return s - cd.offset


def pack_codes(template: torch.Tensor, codes: torch.Tensor, type_name: str) -> torch.Tensor:
    """Blocks whose scale fields are ``template``'s and whose codes are ``codes``.

    template: uint8 ``(nb, type_size)``; codes: integer ``(nb, block_size)`` in the type's range.
    """
    cd = _codec(type_name)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < cd.cmin or int(c.max()) > cd.cmax):
        raise ValueError(f"{type_name} codes must lie in [{cd.cmin}, {cd.cmax}]")
    s = (c + cd.offset) & 255 if type_name == "Q8_0" else c + cd.offset
    out = template.to(torch.int64).clone()
    for f in cd.fields:                       # clear every code bit, then OR the new ones in
        mask = torch.zeros(cd.size, dtype=torch.int64)
        mask.index_put_((torch.from_numpy(f.byte),), torch.from_numpy(((1 << f.nbits) - 1) << f.shift),
                        accumulate=True)
        out &= ~mask & 255
    for f in cd.fields:
        part = ((s >> f.vshift) & ((1 << f.nbits) - 1)) << torch.from_numpy(f.shift)
        out.index_add_(1, torch.from_numpy(f.byte), part)
    return out.to(torch.uint8)


def decode_blocks(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """``A * c - M``: equal to ``kquants.dequantize`` of the same blocks (``(nb, block_size)``)."""
    A, M = block_grid(data, type_name)
    return A * block_codes(data, type_name).float() - M


# --------------------------------------------------------------------------------------------
# 3. GPTQ onto GGML grids
# --------------------------------------------------------------------------------------------


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

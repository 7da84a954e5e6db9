"""llama.cpp-compatible GGML quantization formats (Q4_0 ... Q8_0 and the k-quants Q2_K ... Q6_K).

Byte-level description: docs/KQUANTS.md. Each format is a registered class with a stable id equal
to ggml's type id. ``quantize`` produces exactly the bytes llama.cpp's ``ggml_quantize_chunk``
writes: with ``imatrix=None`` the ``quantize_row_*_ref`` path, with an importance matrix the
importance-weighted ``quantize_*(..., quant_weights)`` path. ``dequantize`` decodes exactly as
llama.cpp's ``dequantize_row_*`` (and gguf-py's ``gguf.quants.dequantize``) do.

The bit-exact float arithmetic and scale searches are in :mod:`compress.formats.ggml_round`, the
bit packing in :mod:`compress.formats.ggml_bits`, the registry in :mod:`compress.formats.ggml_type`
and the legacy 32-weight types in :mod:`compress.formats.ggml_legacy`; this module holds the
k-quants and the chunked ``quantize``/``dequantize`` over a whole tensor.
"""
from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .ggml_legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0  # registered before the k-quants, in ggml's order
from .ggml_bits import (pack_nibbles, pack_2bit, pack_highbits, pack_k4_scales, unpack_k4_scales,
    pack_q3_scales, unpack_q3_scales)
from .ggml_round import (cdiv, sqrtf, nearest_int, fp16, fp16_bytes, fp16_from_bytes, seqsum, first_absmax,
    to_sub, from_sub, make_qx_quants, make_q3_quants, make_qkx_quants, make_qp_quants, GROUP_MAX_EPS)
from .ggml_type import QK_K, TYPES, KQuantType, get_type

__all__ = ["KQuantType", "TYPES", "get_type", "quantize", "dequantize", "QK_K",
           "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# Blocks handled per vectorised pass: bounds the memory of the (n, S) work tensors.
_CHUNK_WEIGHTS = 1 << 19


# ----------------------------------------------------------------------------------------------
# k-quants (super-blocks of 256)
# ----------------------------------------------------------------------------------------------

def _block_sum_x2(x: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for (l < 256) s += x[l]*x[l];`` per block: ``(nb, 256)`` -> ``(nb,)``."""
    xt = x.t().contiguous()
    return seqsum(xt * xt)


def _kquant_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` with a per-block sigma2."""
    return qw * sqrtf(sigma2.unsqueeze(1) + x * x)


def _requant_affine(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, L: torch.Tensor, n: int,
                    nmax: int) -> torch.Tensor:
    """``l = nearest_int((x + dm)/d)`` clamped to ``[0, nmax]`` where ``d != 0``, else the search's L.

    x, L ``(nb, 256)``; d, dm ``(nb, 256 // n)`` (fp16 d times the integer sub-block scale).
    """
    nb = x.shape[0]
    xs = x.reshape(nb, -1, n)
    dd, mm = d.unsqueeze(2), dm.unsqueeze(2)
    l = nearest_int((xs + mm) / dd).clamp_(0, nmax)
    keep = (dd == 0).expand_as(l)
    return torch.where(keep, L.reshape(nb, -1, n).to(torch.int32), l).reshape(nb, -1)


def _requant_symmetric(x: torch.Tensor, d: torch.Tensor, L: torch.Tensor, n: int, nmax: int) -> torch.Tensor:
    """``l = clamp(nearest_int(x/d), -nmax, nmax-1) + nmax`` where ``d != 0``, else the search's L."""
    nb = x.shape[0]
    xs = x.reshape(nb, -1, n)
    dd = d.unsqueeze(2)
    l = nearest_int(xs / dd).clamp_(-nmax, nmax - 1).add_(nmax)
    keep = (dd == 0).expand_as(l)
    return torch.where(keep, L.reshape(nb, -1, n).to(torch.int32), l).reshape(nb, -1)


def _max_scale(s: torch.Tensor) -> torch.Tensor:
    """``float m = 0; for (...) if (s > m) m = s;`` over dim 1 (+0.0 unless some s > 0)."""
    m = s.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


class Q2_K(KQuantType, name="Q2_K", type_id=10, block_size=256, type_size=84):
    def quantize_blocks(self, x, qw, sigma2):
        nb = x.shape[0]
        xt = to_sub(x, 16)
        if qw is None:      # quantize_row_q2_K_ref
            scales, mins, L = make_qkx_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, use_mad=True, qkx3=False)
            scales, mins = scales.view(nb, 16), mins.view(nb, 16)
            max_scale, max_min = _max_scale(scales), _max_scale(mins)
            has_s, has_m = max_scale > 0, max_min > 0
            inv_s = cdiv(15.0, max_scale)
            inv_m = cdiv(15.0, max_min)
            ls = torch.where(has_s.unsqueeze(1), nearest_int(inv_s.unsqueeze(1) * scales).long(),
                             torch.zeros_like(scales, dtype=torch.int64))
            lm = torch.where(has_m.unsqueeze(1), nearest_int(inv_m.unsqueeze(1) * mins).long(),
                             torch.zeros_like(mins, dtype=torch.int64))
            sc_bytes = (ls | (lm << 4)) & 255
            d = torch.where(has_s, max_scale / 15.0, torch.zeros_like(max_scale))
            dmin = torch.where(has_m, max_min / 15.0, torch.zeros_like(max_min))
        else:               # quantize_row_q2_K_impl
            sig = _block_sum_x2(x) / float(QK_K)
            w = to_sub(_kquant_weights(x, qw, sig), 16)
            sw = seqsum(w)
            scales, mins, L = make_qkx_quants(xt, w, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
            swt = sw.view(nb, 16).t().contiguous()
            d, Ls = make_qp_quants(scales.view(nb, 16).t().contiguous(), 15, swt)
            dmin, Lm = make_qp_quants(mins.view(nb, 16).t().contiguous(), 15, swt)
            sc_bytes = (Ls.t() | (Lm.t() << 4)) & 255
        d16, dmin16 = fp16(d), fp16(dmin)
        sub_d = d16.unsqueeze(1) * (sc_bytes & 0xF).float()
        sub_m = dmin16.unsqueeze(1) * (sc_bytes >> 4).float()
        q = _requant_affine(x, sub_d, sub_m, from_sub(L, nb), 16, 3)
        return torch.cat([sc_bytes.to(torch.uint8), pack_2bit(q), fp16_bytes(d), fp16_bytes(dmin)], dim=1)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        sc = data[:, 0:16].to(torch.int64)
        qs = data[:, 16:80].to(torch.int64).reshape(nb, 2, 1, 32)
        d = fp16_from_bytes(data[:, 80:82]).unsqueeze(1)
        dmin = fp16_from_bytes(data[:, 82:84]).unsqueeze(1)
        dl = (d * (sc & 0xF).float()).unsqueeze(2)
        ml = (dmin * (sc >> 4).float()).unsqueeze(2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
        q = ((qs >> shifts) & 3).reshape(nb, 16, 16).float()
        return (dl * q - ml).reshape(nb, QK_K)


class Q3_K(KQuantType, name="Q3_K", type_id=11, block_size=256, type_size=110):
    def quantize_blocks(self, x, qw, sigma2):
        nb = x.shape[0]
        xt = to_sub(x, 16)
        if qw is None:      # quantize_row_q3_K_ref
            scales, L = make_q3_quants(xt, 4)
            scales = scales.view(nb, 16)
            _, max_scale = first_absmax(scales, 1)
            has = max_scale != 0
            iscale = cdiv(-32.0, max_scale)
            l = nearest_int(iscale.unsqueeze(1) * scales).long()
            l = ((l + 128) & 255) - 128                     # int8_t
            l = l.clamp(-32, 31) + 32
            l = torch.where(has.unsqueeze(1), l, torch.zeros_like(l))
            sc_bytes = pack_q3_scales(l)
            sc_bytes = torch.where(has.unsqueeze(1), sc_bytes, torch.zeros_like(sc_bytes))
            d = torch.where(has, cdiv(1.0, iscale), torch.zeros_like(iscale))
        else:               # quantize_row_q3_K_impl
            sig = (2.0 * _block_sum_x2(x)) / float(QK_K)
            w = to_sub(_kquant_weights(x, qw, sig), 16)
            sw = seqsum(w)
            scales, L = make_qx_quants(xt, 4, w)
            d, Ls = make_qx_quants(scales.view(nb, 16).t().contiguous(), 32,
                                    sw.view(nb, 16).t().contiguous(), finite=False)
            sc_bytes = pack_q3_scales(Ls.t().long())
        d16 = fp16(d)
        sub_d = d16.unsqueeze(1) * unpack_q3_scales(sc_bytes).float()
        q = _requant_symmetric(x, sub_d, from_sub(L, nb), 16, 4)
        hmask = pack_highbits(q >> 2)
        return torch.cat([hmask, pack_2bit(q & 3), sc_bytes, fp16_bytes(d)], dim=1)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        hm = data[:, 0:32].to(torch.int64).reshape(nb, 1, 32)
        qs = data[:, 32:96].to(torch.int64).reshape(nb, 2, 1, 32)
        sc = unpack_q3_scales(data[:, 96:108]).float()
        d = fp16_from_bytes(data[:, 108:110]).unsqueeze(1)
        dl = (d * sc).unsqueeze(2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
        low = ((qs >> shifts) & 3).reshape(nb, 8, 32)
        high = (hm >> torch.arange(8, dtype=torch.int64).view(1, 8, 1)) & 1
        q = (low - ((1 - high) << 2)).reshape(nb, 16, 16).float()
        return (dl * q).reshape(nb, QK_K)


def _q45k_quantize(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, rmin_ref: float,
                   nstep_ref: int, clamp_impl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared search for Q4_K (nmax 15) and Q5_K (nmax 31): returns (d|dmin bytes, scale bytes, quants)."""
    nb = x.shape[0]
    xt = to_sub(x, 32)
    if qw is None:          # quantize_row_q{4,5}_K_ref
        av_x = sqrtf(seqsum(xt * xt) / 32.0)
        w = xt.abs().add_(av_x)
        scales, mins, L = make_qkx_quants(xt, w, nmax, rmin_ref, 0.1, nstep_ref, use_mad=False, qkx3=False)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        max_scale, max_min = _max_scale(scales), _max_scale(mins)
        inv_s = torch.where(max_scale > 0, cdiv(63.0, max_scale), torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, cdiv(63.0, max_min), torch.zeros_like(max_min))
        ls = (nearest_int(inv_s.unsqueeze(1) * scales).long() & 255).clamp_max(63)
        lm = (nearest_int(inv_m.unsqueeze(1) * mins).long() & 255).clamp_max(63)
        d, dmin = max_scale / 63.0, max_min / 63.0
    else:                   # quantize_row_q{4,5}_K_impl
        sig = (2.0 * _block_sum_x2(x)) / float(QK_K)
        w = to_sub(_kquant_weights(x, qw, sig), 32)
        sw = seqsum(w)
        scales, mins, L = make_qkx_quants(xt, w, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        swt = sw.view(nb, 8).t().contiguous()
        d, Ls = make_qp_quants(scales.view(nb, 8).t().contiguous(), 63, swt)
        dmin, Lm = make_qp_quants(mins.view(nb, 8).t().contiguous(), 63, swt)
        ls, lm = Ls.t(), Lm.t()
        if clamp_impl:
            ls, lm = ls.clamp_max(63), lm.clamp_max(63)
    sc_bytes = pack_k4_scales(ls, lm)
    sc, m = unpack_k4_scales(sc_bytes)
    sub_d = fp16(d).unsqueeze(1) * sc.float()
    sub_m = fp16(dmin).unsqueeze(1) * m.float()
    q = _requant_affine(x, sub_d, sub_m, from_sub(L, nb), 32, nmax)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin)], dim=1), sc_bytes, q


def _q45k_dequantize(data: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = data.shape[0]
    d = fp16_from_bytes(data[:, 0:2]).unsqueeze(1)
    dmin = fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
    sc, m = unpack_k4_scales(data[:, 4:16])
    dl = (d * sc.float()).unsqueeze(2)
    ml = (dmin * m.float()).unsqueeze(2)
    return (dl * q.reshape(nb, 8, 32).float() - ml).reshape(nb, QK_K)


def _unpack_k4_quants(qs: torch.Tensor) -> torch.Tensor:
    """``qs (nb, 128)`` -> 4-bit quants ``(nb, 256)``: byte ``32*(n/64) + n%32``, nibble ``(n%64)/32``."""
    nb = qs.shape[0]
    q = qs.to(torch.int64).reshape(nb, 4, 1, 32)
    return ((q >> torch.tensor([0, 4], dtype=torch.int64).view(1, 1, 2, 1)) & 0xF).reshape(nb, QK_K)


def _pack_k4_quants(q: torch.Tensor) -> torch.Tensor:
    nb = q.shape[0]
    q = q.reshape(nb, 4, 2, 32)
    return pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(nb, 128)


class Q4_K(KQuantType, name="Q4_K", type_id=12, block_size=256, type_size=144):
    def quantize_blocks(self, x, qw, sigma2):
        dd, sc_bytes, q = _q45k_quantize(x, qw, 15, -1.0, 20, clamp_impl=False)
        return torch.cat([dd, sc_bytes, _pack_k4_quants(q)], dim=1)

    def dequantize_blocks(self, data):
        return _q45k_dequantize(data, _unpack_k4_quants(data[:, 16:144]))


class Q5_K(KQuantType, name="Q5_K", type_id=13, block_size=256, type_size=176):
    def quantize_blocks(self, x, qw, sigma2):
        dd, sc_bytes, q = _q45k_quantize(x, qw, 31, -0.5, 15, clamp_impl=True)
        qh = pack_highbits((q >> 4) & 1)
        return torch.cat([dd, sc_bytes, qh, _pack_k4_quants(q & 0xF)], dim=1)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        low = _unpack_k4_quants(data[:, 48:176])
        hm = data[:, 16:48].to(torch.int64).reshape(nb, 1, 32)
        high = ((hm >> torch.arange(8, dtype=torch.int64).view(1, 8, 1)) & 1).reshape(nb, QK_K)
        return _q45k_dequantize(data, low | (high << 4))


class Q6_K(KQuantType, name="Q6_K", type_id=14, block_size=256, type_size=210):
    def quantize_blocks(self, x, qw, sigma2):
        nb = x.shape[0]
        xt = to_sub(x, 16)
        # quantize_row_q6_K_ref uses x*x as weights; the imatrix path passes quant_weights as is
        scales, L = make_qx_quants(xt, 32, None if qw is None else to_sub(qw, 16))
        scales = scales.view(nb, 16)
        max_abs, max_scale = first_absmax(scales, 1)
        zero_block = max_abs < GROUP_MAX_EPS
        iscale = cdiv(-128.0, max_scale)
        d = cdiv(1.0, iscale)
        sc = nearest_int(iscale.unsqueeze(1) * scales).long().clamp_max(127)
        sc = ((sc + 128) & 255) - 128                       # int8_t
        sub_d = fp16(d).unsqueeze(1) * sc.float()
        q = _requant_symmetric(x, sub_d, from_sub(L, nb), 16, 32)
        q = q.reshape(nb, 2, 4, 32)
        low, high = q & 0xF, q >> 4
        ql = pack_nibbles(low[:, :, 0:2], low[:, :, 2:4]).reshape(nb, 128)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)
        qh = ((high & 3) << shifts).sum(dim=2).to(torch.uint8).reshape(nb, 64)
        out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), fp16_bytes(d)], dim=1)
        return torch.where(zero_block.unsqueeze(1), torch.zeros_like(out), out)

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        ql = data[:, 0:128].to(torch.int64).reshape(nb, 2, 1, 64)
        qh = data[:, 128:192].to(torch.int64).reshape(nb, 2, 1, 32)
        sc = data[:, 192:208].contiguous().view(torch.int8).float()
        d = fp16_from_bytes(data[:, 208:210]).unsqueeze(1)
        dl = (d * sc).unsqueeze(2)
        low = ((ql >> torch.tensor([0, 4], dtype=torch.int64).view(1, 1, 2, 1)) & 0xF).reshape(nb, 2, 4, 32)
        high = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int64).view(1, 1, 4, 1)) & 3)
        q = ((low | (high << 4)) - 32).reshape(nb, 16, 16).float()
        return (dl * q).reshape(nb, QK_K)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def _row_sigma2(w: torch.Tensor) -> torch.Tensor:
    """``sum_x2 = 0; for (j < n_per_row) sum_x2 += x[j]*x[j]; sigma2 = sum_x2/n_per_row`` per row."""
    xt = w.t().contiguous()
    return seqsum(xt * xt) / float(w.shape[1])


@functools.lru_cache(maxsize=1)
def _openmp_backend() -> bool:
    return "OpenMP" in torch.__config__.parallel_info()


def _map_chunks(fn: Callable[[int], None], starts: list[int]) -> None:
    """Run ``fn`` on every chunk start (chunks write disjoint outputs), on up to
    ``torch.get_num_threads()`` Python threads.

    The scale searches are long chains of medium-size torch ops. Intra-op (OpenMP) threading
    puts a barrier on every op, and those barriers stall whenever the machine's cores are busy
    (measured on a 2-core machine at load 5: Q4_K at 1.7 Mw/s with 2 OpenMP threads against 12
    single-threaded). So chunks run in parallel instead, each worker with one intra-op thread
    (``torch.set_num_threads`` in a worker sets that thread's OpenMP team size; the caller's own
    setting is restored afterwards). Results do not depend on the thread count.
    """
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1 or not _openmp_backend():
        for r0 in starts:
            fn(r0)
        return
    caller_threads = torch.get_num_threads()
    pending = iter(starts)
    lock = threading.Lock()

    def worker() -> None:
        torch.set_num_threads(1)
        while True:
            with lock:
                r0 = next(pending, None)
            if r0 is None:
                return
            fn(r0)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="kquants") as pool:
            for f in [pool.submit(worker) for _ in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(caller_threads)


def quantize(w: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a float32 matrix to GGML bytes exactly as llama.cpp's ``ggml_quantize_chunk``.

    w: float32 ``(rows, cols)``, ``cols`` a multiple of the type's block size, all finite.
    imatrix: optional float32 ``(cols,)`` importance per input column (mean squared activation);
    None selects llama.cpp's ``quantize_row_*_ref`` path, a tensor its importance-weighted path.
    Returns uint8 ``(rows, cols // block_size * type_size)``, row-major like a GGUF tensor.
    """
    qt = get_type(type_name)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor (rows, cols), got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dtype != torch.float32:
        raise ValueError(f"expected float32 weights, got {w.dtype}")
    rows, cols = w.shape
    if cols % qt.block_size != 0 or cols == 0:
        raise ValueError(f"{qt.name} needs the column count to be a positive multiple of its block size "
                         f"{qt.block_size}; got shape {tuple(w.shape)}")
    nbr = cols // qt.block_size
    out = torch.empty((rows, nbr * qt.type_size), dtype=torch.uint8)
    if rows == 0:
        return out
    w = w.detach().cpu().contiguous()
    lo_hi = torch.aminmax(w)            # NaN propagates through min/max; one cheap pass
    if not (math.isfinite(float(lo_hi.min)) and math.isfinite(float(lo_hi.max))):
        raise ValueError(f"cannot quantize a tensor holding NaN or Inf (shape {tuple(w.shape)})")
    qw_row = None
    if imatrix is not None:
        imatrix = imatrix.detach().cpu().to(torch.float32).reshape(-1)
        if imatrix.numel() != cols:
            raise ValueError(f"imatrix must have one value per column ({cols}), got shape "
                             f"{tuple(imatrix.shape)}")
        if not bool(torch.isfinite(imatrix).all()):
            raise ValueError("imatrix holds NaN or Inf")
        qw_row = imatrix.contiguous()
    sigma2_row = _row_sigma2(w) if (qw_row is not None and qt.row_sigma2) else None
    rows_per_chunk = max(1, _CHUNK_WEIGHTS // cols)

    def run(r0: int) -> None:
        r1 = min(rows, r0 + rows_per_chunk)
        xb = w[r0:r1].reshape(-1, qt.block_size)
        qwb = sg = None
        if qw_row is not None:      # the same per-column importance for every row
            qwb = qw_row.view(1, nbr, qt.block_size).expand(r1 - r0, -1, -1).reshape(-1, qt.block_size)
        if sigma2_row is not None:
            sg = sigma2_row[r0:r1].repeat_interleave(nbr)
        out[r0:r1] = qt.quantize_blocks(xb, qwb, sg).reshape(r1 - r0, -1)

    _map_chunks(run, list(range(0, rows, rows_per_chunk)))
    return out


def dequantize(data: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """Decode GGML bytes to float32 ``shape`` exactly as llama.cpp's ``dequantize_row_*``."""
    qt = get_type(type_name)
    rows, cols = (int(s) for s in shape)
    if cols % qt.block_size != 0:
        raise ValueError(f"{qt.name} needs the column count to be a multiple of its block size "
                         f"{qt.block_size}; got shape {tuple(shape)}")
    nbytes = rows * (cols // qt.block_size) * qt.type_size
    if data.dtype != torch.uint8 or data.numel() != nbytes:
        raise ValueError(f"{qt.name} {tuple(shape)} needs {nbytes} uint8 bytes, got {data.numel()} "
                         f"of {data.dtype}")
    blocks = data.detach().cpu().contiguous().reshape(-1, qt.type_size)
    out = torch.empty((rows * cols // qt.block_size, qt.block_size), dtype=torch.float32)
    step = max(1, _CHUNK_WEIGHTS // qt.block_size)

    def run(b0: int) -> None:
        out[b0:b0 + step] = qt.dequantize_blocks(blocks[b0:b0 + step])

    _map_chunks(run, list(range(0, blocks.shape[0], step)))
    return out.reshape(rows, cols)

"""ONNX export of decoder-only checkpoints, for ONNX Runtime on CPU and edge devices.

``export_onnx(loaded, out_dir, fmt, kv_cache, accuracy_level)`` writes a folder holding
``model.onnx`` (the graph), ``model.onnx.data`` (every large initializer, one external-data file),
the tokenizer files, ``config.json``, ``export_info.json`` and, with the KV cache,
``genai_config.json`` (ONNX Runtime GenAI, :mod:`compress.export.genai`). The graph is built by
hand with ``onnx.helper`` from the architecture (no tracing), so every quantized linear keeps the
exact integers, scales and zero-points of the packed checkpoint. docs/ONNX.md describes the formats.

Formats
-------
``matmulnbits`` (default)
    Each quantized linear becomes ``com.microsoft::MatMulNBits`` (bits 2, 4 or 8; block sizes
    16..128, powers of two). 3-bit checkpoints are promoted to 4-bit losslessly (same values,
    scales and zero-points). Groups that are not a power-of-two block (per-channel, 256, 96, ...)
    are written as the largest power-of-two block that divides every group boundary, with the
    scales and zero-points repeated; a narrower last group is the padded last block MatMulNBits
    supports. Act-order checkpoints (a permuted ``g_idx``) are written with the input columns
    sorted by group and a ``Gather`` that permutes the activations the same way (exact; the
    fast MatMulNBits kernels do not take ``g_idx``). Attention uses the ORT contrib ops
    ``GroupQueryAttention`` (rotary embedding inside, from the model's own cos/sin table) and
    ``SkipSimplifiedLayerNormalization``; q/k/v and gate/up are fused into one MatMulNBits each.
``qdq``
    Standard ONNX only (opset 21): blocked ``DequantizeLinear`` (INT4 / UINT4 / INT8 / UINT8,
    zero-points for asymmetric grids) feeding ``MatMul``; RMSNorm, rotary embedding and attention
    decomposed into standard ops. ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits
    itself; other runtimes run it as written.

Unquantized linears (an fp32 model, or the lm_head) are plain ``MatMul`` / ``Gemm``; a tensor
whose values are all float16-representable (the checkpoint stores them as float16) is written
as float16 with a ``Cast`` (lossless, half the bytes).

Graph inputs/outputs (KV cache): ``input_ids`` int64 (batch, sequence), ``attention_mask`` int64
(batch, total_sequence), ``position_ids`` int64 (batch, sequence),
``past_key_values.{i}.key|value`` float32 (batch, kv_heads, past_sequence, head_dim) ->
``logits`` float32 (batch, sequence, vocab), ``present.{i}.key|value`` (batch, kv_heads,
total_sequence, head_dim). Without the KV cache the past inputs and present outputs are absent.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoint import AtomicFolder
from ..errors import CompressError
from ..formats import gptq_int
from ..qlinear import QuantLinear
from .genai import write_for_export

log = logging.getLogger(__name__)

FORMATS = ("matmulnbits", "qdq")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INFO_FILE = "export_info.json"
EXPORT_FORMAT_VERSION = 1
IR_VERSION = 10              # ONNX Runtime 1.30 rejects the IR version onnx 1.23 writes by default
ONNX_OPSET = 21              # blocked DequantizeLinear with INT4/UINT4
MS_OPSET = 1
MATMULNBITS_BITS = (2, 4, 8)
MATMULNBITS_BLOCKS = (128, 64, 32, 16)
EXTERNAL_MIN_BYTES = 1024    # initializers at least this large go to the external-data file
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# --------------------------------------------------------------------------- integer weights

@dataclass
class IntWeight:
    """A quantized linear weight as plain integers (the input of the repackers).

    ``q`` int ``(N, K)`` in ``[0, 2**bits)``; ``zeros`` int ``(G, N)``: the actual zero-points
    (the GPTQ v1 layout stores zero - 1; :func:`compress.formats.gptq_int.unpack` adds the 1);
    ``scales`` float32 ``(G, N)``; ``g_idx`` int ``(K,)``. ``W[n, k] = (q[n, k] - zeros[g, n]) *
    scales[g, n]`` with ``g = g_idx[k]``.
    """

    q: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray
    bits: int

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> np.ndarray:
        g = self.g_idx.astype(np.int64)
        z = self.zeros.astype(np.float32)[g].T          # (N, K)
        s = self.scales.astype(np.float32)[g].T
        return (self.q.astype(np.float32) - z) * s


def int_weight(module: QuantLinear) -> IntWeight:
    """The integers, scales and zero-points a :class:`QuantLinear` holds."""
    q, z = gptq_int.unpack(module.packed())
    return IntWeight(q=q.numpy().astype(np.int32), zeros=z.numpy().astype(np.int32),
                     scales=module.scales.to(torch.float32).numpy().copy(),
                     g_idx=module.g_idx.numpy().astype(np.int64), bits=int(module.bits))


def _sorted_columns(g_idx: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Columns sorted by group (stable). Returns (perm or None when already sorted, sorted g_idx)."""
    g = g_idx.astype(np.int64)
    if g.size < 2 or bool(np.all(g[1:] >= g[:-1])):
        return None, g
    perm = np.argsort(g, kind="stable")
    return perm, g[perm]


def _boundary_gcd(g_sorted: np.ndarray) -> int:
    """gcd of the positions where the (sorted) group changes; 0 when there is one group."""
    bounds = np.nonzero(g_sorted[1:] != g_sorted[:-1])[0] + 1
    out = 0
    for b in bounds.tolist():
        out = math.gcd(out, b)
    return out


def _onnx_bits(w: IntWeight, allowed: tuple[int, ...]) -> int:
    """The smallest allowed width >= the checkpoint's that holds every value and zero-point."""
    top = max(int(w.q.max(initial=0)), int(w.zeros.max(initial=0)))
    if int(w.q.min(initial=0)) < 0 or int(w.zeros.min(initial=0)) < 0:
        raise CompressError("negative quantized values or zero-points cannot be exported")
    for b in allowed:
        if b >= w.bits and top < (1 << b):
            return b
    raise CompressError(f"{w.bits}-bit weights with values up to {top} do not fit the supported widths "
                        f"{', '.join(map(str, allowed))}")


def pack_lowfirst(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers in ``[0, 2**bits)`` along the last axis into uint8, lowest bits first.

    ``(..., n)`` -> ``(..., ceil(n * bits / 8))``; a partial last byte is zero-filled.
    """
    if bits == 8:
        return values.astype(np.uint8)
    per = 8 // bits
    n = values.shape[-1]
    pad = (-n) % per
    v = values.astype(np.uint8)
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint8)], axis=-1)
    v = v.reshape(v.shape[:-1] + (-1, per))
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per):
        out |= (v[..., i] << (i * bits)).astype(np.uint8)
    return out


def unpack_lowfirst(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_lowfirst`: ``(..., bytes)`` -> int32 ``(..., n)``."""
    if bits == 8:
        return packed[..., :n].astype(np.int32)
    per = 8 // bits
    parts = [(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(per)]
    v = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))
    return v[..., :n].astype(np.int32)


@dataclass
class MatMulNBitsWeight:
    """One linear in MatMulNBits' layout (ONNX Runtime contrib op, domain com.microsoft).

    ``b`` uint8 ``(N, ceil(K / block), block * bits / 8)``; ``scales`` float32 ``(N, blocks)``;
    ``zero_points`` uint8 ``(N, ceil(blocks * bits / 8))`` (actual zero-points, packed along the
    blocks) or None when every zero-point is MatMulNBits' default ``2**(bits-1)``; ``perm``: the
    input-column order (act-order checkpoints) or None.
    """

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    perm: np.ndarray | None
    bits: int
    block_size: int
    k: int
    n: int
    source_bits: int

    def dequantize(self) -> np.ndarray:
        """The ``(N, K)`` float32 weight in the original column order (the test oracle)."""
        nb = self.b.shape[1]
        q = unpack_lowfirst(self.b, self.bits, self.block_size)               # (N, nb, bs)
        if self.zero_points is None:
            z = np.full((self.n, nb), 1 << (self.bits - 1), np.int32)
        else:
            z = unpack_lowfirst(self.zero_points, self.bits, nb)
        w = (q - z[..., None]).astype(np.float32) * self.scales[..., None]
        w = w.reshape(self.n, nb * self.block_size)[:, : self.k]
        if self.perm is not None:
            out = np.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w


def _block_size(g_sorted: np.ndarray, k: int, blocks: tuple[int, ...], what: str) -> int:
    gcd = _boundary_gcd(g_sorted)
    if gcd == 0:        # one group over the whole row (per-channel): any block, scales repeated
        return next((bs for bs in blocks if bs <= k), blocks[-1])
    for bs in blocks:
        if gcd % bs == 0:
            return bs
    raise CompressError(
        f"{what}: groups of {gcd} columns cannot be written as MatMulNBits blocks (a power of two "
        f"from {blocks[-1]} to {blocks[0]} that divides every group boundary); export with --format qdq "
        f"or quantize with a group size that is a multiple of 16")


def pack_matmulnbits(w: IntWeight, what: str = "layer") -> MatMulNBitsWeight:
    """Repack a quantized weight into MatMulNBits' layout, exactly (see the module docstring)."""
    bits = _onnx_bits(w, MATMULNBITS_BITS)
    perm, g_sorted = _sorted_columns(w.g_idx)
    n, k = w.n, w.k
    bs = _block_size(g_sorted, k, MATMULNBITS_BLOCKS, what)
    nb = -(-k // bs)
    q = w.q if perm is None else w.q[:, perm]
    blk_group = g_sorted[np.minimum(np.arange(nb) * bs, k - 1)]           # (nb,)
    scales = np.ascontiguousarray(w.scales.astype(np.float32)[blk_group].T)  # (N, nb)
    zeros = np.ascontiguousarray(w.zeros[blk_group].T).astype(np.int32)     # (N, nb)
    pad = nb * bs - k
    if pad:   # pad the last block with its zero-point: the padded weights dequantize to 0
        q = np.concatenate([q, np.repeat(zeros[:, -1:], pad, axis=1)], axis=1)
    b = pack_lowfirst(q.reshape(n, nb, bs), bits)
    default = 1 << (bits - 1)
    zp = None if bool(np.all(zeros == default)) else pack_lowfirst(zeros, bits)
    return MatMulNBitsWeight(b=np.ascontiguousarray(b), scales=scales, zero_points=zp, perm=perm, bits=bits,
                             block_size=bs, k=k, n=n, source_bits=w.bits)


@dataclass
class QDQWeight:
    """One linear as opset-21 blocked DequantizeLinear input, transposed for ``MatMul(x, W)``.

    ``values`` int ``(K, N)`` (signed ``q - zero`` for a symmetric grid, else ``q``); ``scales``
    float32 ``(ceil(K / block), N)``; ``zero_points`` ``(blocks, N)`` or None; ``dtype`` one of
    INT4, UINT4, INT8, UINT8 (onnx.TensorProto names); ``perm`` as in MatMulNBitsWeight.
    """

    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    perm: np.ndarray | None
    dtype: str
    block_size: int
    k: int
    n: int
    source_bits: int

    def dequantize(self) -> np.ndarray:
        nb = self.scales.shape[0]
        rows = np.minimum(np.arange(self.k) // self.block_size, nb - 1)
        z = 0 if self.zero_points is None else self.zero_points.astype(np.float32)[rows]
        w = ((self.values.astype(np.float32) - z) * self.scales[rows]).T
        if self.perm is not None:
            out = np.empty_like(w)
            out[:, self.perm] = w
            w = out
        return np.ascontiguousarray(w)


def pack_qdq(w: IntWeight) -> QDQWeight:
    """Repack a quantized weight for blocked DequantizeLinear (exact; any group layout)."""
    bits = _onnx_bits(w, (4, 8))
    perm, g_sorted = _sorted_columns(w.g_idx)
    k = w.k
    # Prefer a block ORT can fuse into MatMulNBits (a power of two 16..128; scales repeated when
    # a group spans several blocks); otherwise the exact group layout (any block size is standard).
    try:
        bs = _block_size(g_sorted, k, MATMULNBITS_BLOCKS, "")
    except CompressError:
        bs = _boundary_gcd(g_sorted)
    nb = -(-k // bs)
    q = (w.q if perm is None else w.q[:, perm]).T                          # (K, N)
    blk_group = g_sorted[np.minimum(np.arange(nb) * bs, k - 1)]
    scales = np.ascontiguousarray(w.scales.astype(np.float32)[blk_group])   # (nb, N)
    zeros = w.zeros[blk_group].astype(np.int32)                              # (nb, N)
    mid = 1 << (w.bits - 1)
    if bool(np.all(zeros == mid)):   # symmetric grid: signed values, no zero-point input
        values = q.astype(np.int32) - mid
        dtype = "INT4" if bits == 4 else "INT8"
        zp = None
    else:
        values = q.astype(np.int32)
        dtype = "UINT4" if bits == 4 else "UINT8"
        zp = zeros
    return QDQWeight(values=np.ascontiguousarray(values), scales=scales, zero_points=zp, perm=perm, dtype=dtype,
                     block_size=bs, k=k, n=w.n, source_bits=w.bits)


# --------------------------------------------------------------------------- linears

@dataclass
class _Linear:
    name: str
    k: int
    n: int
    dense: np.ndarray | None = None      # float32 (N, K)
    quant: IntWeight | None = None
    bias: np.ndarray | None = None
    parts: tuple[str, ...] = ()          # the checkpoint's linears fused into this one


def _linear(name: str, module: torch.nn.Module) -> _Linear:
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().to(torch.float32).numpy()
    if isinstance(module, QuantLinear):
        return _Linear(name, module.in_features, module.out_features, quant=int_weight(module), bias=bias)
    if isinstance(module, torch.nn.Linear):
        w = module.weight.detach().to(torch.float32).numpy()
        return _Linear(name, module.in_features, module.out_features, dense=w, bias=bias)
    raise CompressError(f"{name} is a {type(module).__name__}; ONNX export handles nn.Linear and QuantLinear")


def _fuse(parts: list[_Linear], name: str) -> _Linear | None:
    """Concatenate linears that read the same input along N, when their layouts agree exactly."""
    if len({p.k for p in parts}) != 1:
        return None
    k = parts[0].k
    n = sum(p.n for p in parts)
    if any(p.bias is not None for p in parts):
        bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.n, np.float32) for p in parts])
    else:
        bias = None
    if all(p.dense is not None for p in parts):
        return _Linear(name, k, n, dense=np.concatenate([p.dense for p in parts]), bias=bias,
                       parts=tuple(p.name for p in parts))
    if not all(p.quant is not None for p in parts):
        return None
    qs = [p.quant for p in parts]
    first = qs[0]
    if any(q.bits != first.bits or q.scales.shape[0] != first.scales.shape[0]
           or not np.array_equal(q.g_idx, first.g_idx) for q in qs):
        return None
    w = IntWeight(q=np.concatenate([q.q for q in qs]), zeros=np.concatenate([q.zeros for q in qs], axis=1),
                  scales=np.concatenate([q.scales for q in qs], axis=1), g_idx=first.g_idx, bits=first.bits)
    return _Linear(name, k, n, quant=w, bias=bias, parts=tuple(p.name for p in parts))


# --------------------------------------------------------------------------- graph builder

_ONNX_DTYPES = {"INT4": 22, "UINT4": 21, "INT8": 3, "UINT8": 2}


class _Graph:
    """Nodes and initializers; large initializers stream into the external-data file."""

    def __init__(self, data_path: Path):
        import onnx
        self.onnx = onnx
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._used: set[str] = set()
        self._consts: dict = {}
        self._gathers: dict = {}
        self.fp16_stored: set[str] = set()
        self._data_path = data_path
        self._data = open(data_path, "wb")
        self._offset = 0

    def close(self):
        self._data.close()
        if self._offset == 0:
            self._data_path.unlink()

    def fresh(self, base: str) -> str:
        name = base
        i = 1
        while name in self._used:
            name = f"{base}_{i}"
            i += 1
        self._used.add(name)
        return name

    # ---- initializers
    def raw(self, base: str, raw: bytes, data_type: int, dims) -> str:
        t = self.onnx.TensorProto()
        t.name = self.fresh(base)
        t.data_type = data_type
        t.dims.extend(int(d) for d in dims)
        if len(raw) >= EXTERNAL_MIN_BYTES:
            align = 4096 if len(raw) >= (1 << 20) else 64
            pad = (-self._offset) % align
            if pad:
                self._data.write(b"\0" * pad)
                self._offset += pad
            self._data.write(raw)
            for key, value in (("location", DATA_FILE), ("offset", str(self._offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key = key
                e.value = value
            t.data_location = self.onnx.TensorProto.EXTERNAL
            self._offset += len(raw)
        else:
            t.raw_data = raw
        self.inits.append(t)
        return t.name

    def array(self, base: str, a: np.ndarray) -> str:
        a = np.ascontiguousarray(a)
        dt = self.onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
        return self.raw(base, a.tobytes(), dt, a.shape)

    def int4(self, base: str, values: np.ndarray, signed: bool) -> str:
        flat = (values.astype(np.int64) & 0xF).astype(np.uint8).reshape(-1)
        return self.raw(base, pack_lowfirst(flat, 4).tobytes(), _ONNX_DTYPES["INT4" if signed else "UINT4"],
                        values.shape)

    def const_i64(self, values, scalar: bool = False) -> str:
        key = ("i64", scalar, tuple(np.atleast_1d(values).tolist()))
        if key not in self._consts:
            a = np.array(values, dtype=np.int64)
            self._consts[key] = self.array("const_i64", a.reshape(()) if scalar else a.reshape(-1))
        return self._consts[key]

    def const_f32(self, value: float) -> str:
        key = ("f32", float(value))
        if key not in self._consts:
            self._consts[key] = self.array("const_f32", np.array(value, dtype=np.float32))
        return self._consts[key]

    def weight(self, base: str, a: np.ndarray, compact: bool) -> str:
        """A float32 initializer; stored as float16 + Cast when that is lossless (and large)."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        if compact and a.size >= 4096 and np.all(np.isfinite(a)):
            h = a.astype(np.float16)
            if np.array_equal(h.astype(np.float32), a):
                self.fp16_stored.add(base)
                return self.op("Cast", [self.array(base + ".fp16", h)], to=self.onnx.TensorProto.FLOAT)
        return self.array(base, a)

    # ---- nodes
    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", outputs=None, **attrs):
        name = self.fresh(f"{op_type}")
        outs = list(outputs) if outputs is not None else [self.fresh(f"{name}_out{i}") for i in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None,
                                                     **attrs))
        return outs[0] if len(outs) == 1 else outs

    def gather_columns(self, x: str, perm: np.ndarray) -> str:
        key = (x, perm.tobytes())
        if key not in self._gathers:
            idx = self.array("perm", perm.astype(np.int64))
            self._gathers[key] = self.op("Gather", [x, idx], axis=-1)
        return self._gathers[key]


@dataclass
class _Options:
    fmt: str
    accuracy_level: int
    contrib: bool
    compact: bool = True
    layers: list = field(default_factory=list)   # per-linear records for export_info.json


def _emit_linear(g: _Graph, x: str, lin: _Linear, opt: _Options) -> str:
    """``x (..., K) -> (..., N)`` for one (possibly fused) linear."""
    rec = {"name": lin.name, "in_features": lin.k, "out_features": lin.n, "modules": list(lin.parts or (lin.name,))}
    if lin.quant is None:
        y = g.op("MatMul", [x, g.weight(lin.name + ".weight_t", lin.dense.T, opt.compact)])
        rec.update(kind="fp32")
    elif opt.fmt == "matmulnbits":
        p = pack_matmulnbits(lin.quant, lin.name)
        xin = x if p.perm is None else g.gather_columns(x, p.perm)
        ins = [xin, g.array(lin.name + ".qweight", p.b), g.array(lin.name + ".scales", p.scales)]
        if p.zero_points is not None:
            ins.append(g.array(lin.name + ".zero_points", p.zero_points))
        y = g.op("MatMulNBits", ins, domain="com.microsoft", K=p.k, N=p.n, bits=p.bits, block_size=p.block_size,
                 accuracy_level=opt.accuracy_level)
        rec.update(kind="MatMulNBits", bits=p.source_bits, onnx_bits=p.bits, block_size=p.block_size,
                   zero_points=p.zero_points is not None, permuted=p.perm is not None)
    else:
        p = pack_qdq(lin.quant)
        xin = x if p.perm is None else g.gather_columns(x, p.perm)
        if p.dtype in ("INT4", "UINT4"):
            vals = g.int4(lin.name + ".qweight", p.values, p.dtype == "INT4")
        else:
            vals = g.array(lin.name + ".qweight", p.values.astype(np.int8 if p.dtype == "INT8" else np.uint8))
        ins = [vals, g.array(lin.name + ".scales", p.scales)]
        if p.zero_points is not None:
            zp = (g.int4(lin.name + ".zero_points", p.zero_points, False) if p.dtype == "UINT4"
                  else g.array(lin.name + ".zero_points", p.zero_points.astype(np.uint8)))
            ins.append(zp)
        w = g.op("DequantizeLinear", ins, axis=0, block_size=p.block_size)
        y = g.op("MatMul", [xin, w])
        rec.update(kind="DequantizeLinear+MatMul", bits=p.source_bits, onnx_bits=4 if p.dtype.endswith("4") else 8,
                   onnx_type=p.dtype, block_size=p.block_size,
                   zero_points=p.zero_points is not None, permuted=p.perm is not None)
    opt.layers.append(rec)
    if lin.bias is not None:
        y = g.op("Add", [y, g.array(lin.name + ".bias", lin.bias.astype(np.float32))])
    return y


# --------------------------------------------------------------------------- the Llama family

@dataclass
class _LlamaDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    max_pos: int
    tied: bool


def _llama_dims(model, arch) -> _LlamaDims:
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise CompressError(f"ONNX export supports the SiLU MLP of the Llama family; got hidden_act={cfg.hidden_act}")
    sw = getattr(cfg, "sliding_window", None)
    if sw is not None and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)):
        if sw < cfg.max_position_embeddings:
            raise CompressError(f"ONNX export does not implement sliding-window attention (sliding_window={sw})")
    rope = getattr(cfg, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type")) in ("dynamic", "longrope"):
        raise CompressError(f"ONNX export does not implement the position-dependent rope type {rope}")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return _LlamaDims(layers=len(arch.get_blocks(model)), hidden=cfg.hidden_size, heads=heads, kv_heads=kv,
                      head_dim=head_dim, ffn=cfg.intermediate_size, vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps),
                      max_pos=int(cfg.max_position_embeddings),
                      tied=bool(getattr(cfg, "tie_word_embeddings", False)))


def _rope_tables(model, d: _LlamaDims) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_pos, head_dim/2) from the model's own rotary module (any static rope type)."""
    rot = model.model.rotary_emb
    pos = torch.arange(d.max_pos, dtype=torch.long)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = cos[0].to(torch.float32).numpy(), sin[0].to(torch.float32).numpy()
    half = d.head_dim // 2
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise CompressError("ONNX export expects the half-rotation rotary layout (rotate_half)")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _rms_norm_std(g: _Graph, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """RMSNorm in standard ops (the pattern ORT fuses into SimplifiedLayerNormalization)."""
    sq = g.op("Pow", [x, g.const_f32(2.0)])
    var = g.op("ReduceMean", [sq, g.const_i64([-1])], keepdims=1)
    den = g.op("Sqrt", [g.op("Add", [var, g.const_f32(eps)])])
    y = g.op("Div", [x, den])
    return g.op("Mul", [y, g.array(name + ".weight", weight.astype(np.float32))])


def _add_rms_norm(g: _Graph, x: str, residual: str, weight: np.ndarray, eps: float, name: str,
                  contrib: bool) -> tuple[str, str]:
    """``residual + x`` then RMSNorm: returns (normalised, new residual); one fused
    ``SkipSimplifiedLayerNormalization`` with the contrib ops, standard ops otherwise."""
    if contrib:
        outs = g.op("SkipSimplifiedLayerNormalization", [x, residual, g.array(name + ".weight", weight)],
                    n_out=4, domain="com.microsoft", epsilon=eps)
        return outs[0], outs[3]
    residual = g.op("Add", [residual, x])
    return _rms_norm_std(g, residual, weight, eps, name), residual


def _rotate_std(g: _Graph, x: str, cos: str, sin: str, half: int, dim: int) -> str:
    x1 = g.op("Slice", [x, g.const_i64([0]), g.const_i64([half]), g.const_i64([-1])])
    x2 = g.op("Slice", [x, g.const_i64([half]), g.const_i64([dim]), g.const_i64([-1])])
    a = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
    b = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
    return g.op("Concat", [a, b], axis=-1)


def _lm_head_quant(model, d: _LlamaDims, bits: int, block: int) -> IntWeight:
    from ..quantizer import quantize_rtn
    from ..scheme import IntScheme
    w = model.get_output_embeddings().weight.detach().to(torch.float32)
    try:
        scheme = IntScheme(bits=bits, group_size=block, sym=False)
    except CompressError as e:
        raise CompressError(f"lm_head quantization: {e}") from None
    q, scales, zeros, g_idx = quantize_rtn(w, scheme)
    return IntWeight(q=q.numpy(), zeros=zeros.numpy(), scales=scales.numpy(), g_idx=g_idx.numpy().astype(np.int64),
                     bits=bits)


def _build_llama(g: _Graph, loaded, opt: _Options, kv_cache: bool, lm_head_bits: int | None,
                 lm_head_block: int, lm_head_level: int) -> dict:
    from onnx import TensorProto, helper

    model = loaded.model
    arch = loaded.arch
    d = _llama_dims(model, arch)
    blocks = arch.get_blocks(model)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    half = d.head_dim // 2
    group = d.heads // d.kv_heads

    g.inputs += [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
                 helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
                 helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"])]
    g.outputs.append(helper.make_tensor_value_info("logits", f32, ["batch", "sequence", d.vocab]))
    for n in ("input_ids", "attention_mask", "position_ids", "logits"):
        g._used.add(n)
    if kv_cache:
        for i in range(d.layers):
            for kv in ("key", "value"):
                g.inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", f32, ["batch", d.kv_heads, "past_sequence", d.head_dim]))
                g.outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kv}", f32, ["batch", d.kv_heads, "total_sequence", d.head_dim]))
                g._used.update({f"past_key_values.{i}.{kv}", f"present.{i}.{kv}"})

    # ---- embeddings and lm_head weights
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = d.tied and isinstance(head, torch.nn.Linear) and head.weight.data_ptr() == embed.weight.data_ptr()
    head_info: dict = {}
    head_q = None
    if lm_head_bits is not None:
        if isinstance(head, QuantLinear):
            raise CompressError("the checkpoint's lm_head is already quantized; leave lm_head_bits unset")
        if lm_head_bits not in MATMULNBITS_BITS:
            raise CompressError(f"lm_head_bits must be one of {', '.join(map(str, MATMULNBITS_BITS))}, "
                                f"got {lm_head_bits}")
        if lm_head_block not in MATMULNBITS_BLOCKS:
            raise CompressError(f"lm_head_block_size must be one of {', '.join(map(str, MATMULNBITS_BLOCKS))}, "
                                f"got {lm_head_block}")
        head_q = pack_matmulnbits(_lm_head_quant(model, d, lm_head_bits, lm_head_block), "lm_head")
        head_b = g.array("lm_head.qweight", head_q.b)

    emb_w = embed.weight.detach().to(torch.float32).numpy()
    if head_q is not None and tied:
        nb = head_q.b.shape[1]
        zp = (head_q.zero_points if head_q.zero_points is not None
              else pack_lowfirst(np.full((d.vocab, nb), 1 << (head_q.bits - 1), np.int32), head_q.bits))
        zp3 = pack_lowfirst(unpack_lowfirst(zp, head_q.bits, nb)[..., None], head_q.bits)   # (V, nb, 1)
        x = g.op("GatherBlockQuantized", [head_b, "input_ids", g.array("embed.scales", head_q.scales[..., None]),
                                          g.array("embed.zero_points", zp3)],
                 domain="com.microsoft", bits=head_q.bits, block_size=head_q.block_size, gather_axis=0,
                 quantize_axis=2)
        x = g.op("Reshape", [x, g.const_i64([0, 0, nb * head_q.block_size])])
        if nb * head_q.block_size != d.hidden:
            x = g.op("Slice", [x, g.const_i64([0]), g.const_i64([d.hidden]), g.const_i64([-1])])
        emb_name = None
        head_info["embedding"] = f"GatherBlockQuantized {head_q.bits}-bit (shares lm_head.qweight)"
    else:
        emb_name = g.weight("embed_tokens.weight", emb_w, opt.compact)
        x = g.op("Gather", [emb_name, "input_ids"], axis=0)
        head_info["embedding"] = "Gather fp32" + (" (stored as fp16, lossless)"
                                                  if "embed_tokens.weight" in g.fp16_stored else "")

    # ---- positions, masks
    ids_shape = g.op("Shape", ["input_ids"])
    mask_shape = g.op("Shape", ["attention_mask"])
    total = g.op("Gather", [mask_shape, g.const_i64(1, scalar=True)], axis=0)
    cos_np, sin_np = _rope_tables(model, d)
    cos_t = g.array("rope.cos", cos_np)
    sin_t = g.array("rope.sin", sin_np)
    # ORT's GroupQueryAttention needs head_dim % 16 == 0; otherwise attention is standard ops.
    gqa = opt.contrib and d.head_dim % 16 == 0
    if gqa:
        lens = g.op("ReduceSum", ["attention_mask", g.const_i64([1])], keepdims=0)
        seqlens_k = g.op("Cast", [g.op("Sub", [lens, g.const_i64(1, scalar=True)])], to=TensorProto.INT32)
        total_i32 = g.op("Cast", [total], to=TensorProto.INT32)
    else:
        seq = g.op("Gather", [ids_shape, g.const_i64(1, scalar=True)], axis=0)
        past = g.op("Sub", [total, seq])
        q_pos = g.op("Range", [past, total, g.const_i64(1, scalar=True)])
        k_pos = g.op("Range", [g.const_i64(0, scalar=True), total, g.const_i64(1, scalar=True)])
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const_i64([0])]),
                                      g.op("Unsqueeze", [q_pos, g.const_i64([1])])])             # (T, S)
        pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const_i64([1, 2, 3])])], to=TensorProto.BOOL)
        allowed = g.op("And", [causal, pad])                                                        # (B,1,1,T,S)
        mask_bias = g.op("Where", [allowed, g.const_f32(0.0), g.const_f32(float(np.finfo(np.float32).min))])
        cos_g = g.op("Unsqueeze", [g.op("Gather", [cos_t, "position_ids"], axis=0), g.const_i64([1])])  # (B,1,T,h)
        sin_g = g.op("Unsqueeze", [g.op("Gather", [sin_t, "position_ids"], axis=0), g.const_i64([1])])
    scaling = float(d.head_dim ** -0.5)

    residual = None
    pending = None   # output of the previous sub-block, not yet added to the residual
    for i, blk in enumerate(blocks):
        pre = f"model.layers.{i}"
        attn = blk.self_attn
        mlp = blk.mlp
        in_w = blk.input_layernorm.weight.detach().to(torch.float32).numpy()
        # ---- input norm (+ residual add of the previous MLP)
        if residual is None:
            h = _rms_norm_std(g, x, in_w, d.eps, f"{pre}.input_layernorm")
            residual = x
        else:
            h, residual = _add_rms_norm(g, pending, residual, in_w, d.eps, f"{pre}.input_layernorm", opt.contrib)
        # ---- attention
        q_l = _linear(f"{pre}.self_attn.q_proj", attn.q_proj)
        k_l = _linear(f"{pre}.self_attn.k_proj", attn.k_proj)
        v_l = _linear(f"{pre}.self_attn.v_proj", attn.v_proj)
        qkv = _fuse([q_l, k_l, v_l], f"{pre}.self_attn.qkv_proj")
        past_k = f"past_key_values.{i}.key" if kv_cache else ""
        past_v = f"past_key_values.{i}.value" if kv_cache else ""
        pres_k = f"present.{i}.key" if kv_cache else g.fresh(f"{pre}.present_key")
        pres_v = f"present.{i}.value" if kv_cache else g.fresh(f"{pre}.present_value")
        if gqa:
            if qkv is not None:
                ins = [_emit_linear(g, h, qkv, opt), "", ""]
            else:
                ins = [_emit_linear(g, h, q_l, opt), _emit_linear(g, h, k_l, opt), _emit_linear(g, h, v_l, opt)]
            a = g.op("GroupQueryAttention", ins + [past_k, past_v, seqlens_k, total_i32, cos_t, sin_t, "position_ids"],
                     domain="com.microsoft", outputs=[g.fresh(f"{pre}.attn"), pres_k, pres_v],
                     num_heads=d.heads, kv_num_heads=d.kv_heads, do_rotary=1, rotary_interleaved=0,
                     scale=scaling)[0]
        else:
            if qkv is not None:
                sizes = g.const_i64([q_l.n, k_l.n, v_l.n])
                q, k, v = g.op("Split", [_emit_linear(g, h, qkv, opt), sizes], n_out=3, axis=-1)
            else:
                q, k, v = (_emit_linear(g, h, lin, opt) for lin in (q_l, k_l, v_l))
            q = g.op("Transpose", [g.op("Reshape", [q, g.const_i64([0, 0, d.heads, d.head_dim])])], perm=[0, 2, 1, 3])
            k = g.op("Transpose", [g.op("Reshape", [k, g.const_i64([0, 0, d.kv_heads, d.head_dim])])],
                     perm=[0, 2, 1, 3])
            v = g.op("Transpose", [g.op("Reshape", [v, g.const_i64([0, 0, d.kv_heads, d.head_dim])])],
                     perm=[0, 2, 1, 3])
            q = _rotate_std(g, q, cos_g, sin_g, half, d.head_dim)
            k = _rotate_std(g, k, cos_g, sin_g, half, d.head_dim)
            if kv_cache:
                k = g.op("Concat", [past_k, k], axis=2, outputs=[pres_k])
                v = g.op("Concat", [past_v, v], axis=2, outputs=[pres_v])
            q5 = g.op("Reshape", [q, g.const_i64([0, d.kv_heads, group, -1, d.head_dim])])      # (B,KH,G,T,D)
            k5 = g.op("Transpose", [g.op("Unsqueeze", [k, g.const_i64([2])])], perm=[0, 1, 2, 4, 3])  # (B,KH,1,D,S)
            v5 = g.op("Unsqueeze", [v, g.const_i64([2])])                                       # (B,KH,1,S,D)
            s = g.op("Mul", [g.op("MatMul", [q5, k5]), g.const_f32(scaling)])
            p = g.op("Softmax", [g.op("Add", [s, mask_bias])], axis=-1)
            o = g.op("Reshape", [g.op("MatMul", [p, v5]), g.const_i64([0, d.heads, -1, d.head_dim])])
            a = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const_i64([0, 0, d.heads * d.head_dim])])
        attn_out = _emit_linear(g, a, _linear(f"{pre}.self_attn.o_proj", attn.o_proj), opt)
        # ---- post-attention norm (+ residual add)
        post_w = blk.post_attention_layernorm.weight.detach().to(torch.float32).numpy()
        h, residual = _add_rms_norm(g, attn_out, residual, post_w, d.eps, f"{pre}.post_attention_layernorm",
                                    opt.contrib)
        # ---- MLP
        gate_l = _linear(f"{pre}.mlp.gate_proj", mlp.gate_proj)
        up_l = _linear(f"{pre}.mlp.up_proj", mlp.up_proj)
        gu = _fuse([gate_l, up_l], f"{pre}.mlp.gate_up_proj")
        if gu is not None:
            gate, up = g.op("Split", [_emit_linear(g, h, gu, opt), g.const_i64([gate_l.n, up_l.n])], n_out=2, axis=-1)
        else:
            gate, up = _emit_linear(g, h, gate_l, opt), _emit_linear(g, h, up_l, opt)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        pending = _emit_linear(g, act, _linear(f"{pre}.mlp.down_proj", mlp.down_proj), opt)

    # ---- final norm and lm_head
    norm_w = model.get_submodule(arch.final_norm).weight.detach().to(torch.float32).numpy()
    h, _ = _add_rms_norm(g, pending, residual, norm_w, d.eps, "model.norm", opt.contrib)
    if head_q is not None:
        ins = [h, head_b, g.array("lm_head.scales", head_q.scales)]
        if head_q.zero_points is not None:
            ins.append(g.array("lm_head.zero_points", head_q.zero_points))
        g.op("MatMulNBits", ins, domain="com.microsoft", outputs=["logits"], K=d.hidden, N=d.vocab, bits=head_q.bits,
             block_size=head_q.block_size, accuracy_level=lm_head_level)
        head_info["lm_head"] = (f"MatMulNBits {head_q.bits}-bit block {head_q.block_size} accuracy level "
                                f"{lm_head_level} (RTN asym at export)")
    elif tied and emb_name is not None:
        flat = g.op("Reshape", [h, g.const_i64([-1, d.hidden])])
        y = g.op("Gemm", [flat, emb_name], transB=1)
        logits_shape = g.op("Concat", [g.op("Slice", [ids_shape, g.const_i64([0]), g.const_i64([2])]),
                                       g.const_i64([d.vocab])], axis=0)
        g.op("Reshape", [y, logits_shape], outputs=["logits"])
        head_info["lm_head"] = "Gemm transB over the tied embedding"
    else:
        lin = _linear(arch.lm_head, head)
        y = _emit_linear(g, h, lin, opt)
        g.op("Identity", [y], outputs=["logits"])
        head_info["lm_head"] = "quantized (checkpoint)" if lin.quant is not None else "MatMul fp32"

    return {"family": "llama", "model_type": model.config.model_type, "num_layers": d.layers, "hidden_size": d.hidden,
            "num_heads": d.heads, "num_kv_heads": d.kv_heads, "head_dim": d.head_dim, "vocab_size": d.vocab,
            "max_position_embeddings": d.max_pos, "tied_embeddings": tied,
            "lm_head_accuracy_level": lm_head_level if head_q is not None else None,
            "attention": "GroupQueryAttention" if gqa else "standard ops",
            "norms": "SkipSimplifiedLayerNormalization" if opt.contrib else "standard ops", **head_info}


# --------------------------------------------------------------------------- the public entry point

def export_onnx(loaded, out_dir, fmt: str = "matmulnbits", kv_cache: bool = True, accuracy_level: int = 0, *,
                lm_head_bits: int | None = None, lm_head_block_size: int = 32,
                lm_head_accuracy_level: int | None = None, contrib_ops: bool | None = None,
                check: bool = True) -> dict:
    """Export a model (a packed checkpoint or an unquantized one) to an ONNX folder.

    ``loaded``: a :class:`compress.models.Loaded` or anything :func:`compress.models.load` takes.
    ``fmt``: ``"matmulnbits"`` (ONNX Runtime contrib ops) or ``"qdq"`` (standard opset-21 ops).
    ``kv_cache``: past/present KV inputs and outputs for token-by-token generation; False gives a
    plain logits model. ``accuracy_level``: MatMulNBits' attribute (0 keeps fp32 activations;
    4 quantizes activations to int8 inside the kernel: faster, not exact).
    ``lm_head_bits`` (4 or 8, matmulnbits only): also quantize the lm_head (round-to-nearest,
    asymmetric, blocks of ``lm_head_block_size``); with tied embeddings the embedding lookup then
    reads the same quantized table (GatherBlockQuantized). This changes the numbers compared with
    the checkpoint; the default keeps the lm_head as stored. ``lm_head_accuracy_level``: the
    lm_head node's accuracy level (default: 4 for an 8-bit lm_head, because ONNX Runtime 1.30 has
    no fast fp32-activation kernel for 8-bit MatMulNBits on CPU; else ``accuracy_level``).
    ``contrib_ops`` (matmulnbits only;
    default True): GroupQueryAttention / SkipSimplifiedLayerNormalization instead of standard ops.

    Writes atomically; returns what ``export_info.json`` records, plus ``out``, ``size_bytes``
    and ``seconds``. Raises CompressError on unsupported models or options.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise CompressError(f"ONNX format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise CompressError(f"accuracy level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, "
                            f"got {accuracy_level}")
    if fmt == "qdq":
        if lm_head_bits is not None:
            raise CompressError("lm_head quantization is implemented for the matmulnbits format only")
        if contrib_ops:
            raise CompressError("the qdq format uses standard ONNX ops only (contrib_ops must be off)")
    contrib = (fmt == "matmulnbits") if contrib_ops is None else bool(contrib_ops)
    if lm_head_accuracy_level is None:
        lm_head_accuracy_level = 4 if lm_head_bits == 8 else accuracy_level
    if lm_head_accuracy_level not in ACCURACY_LEVELS:
        raise CompressError(f"lm_head accuracy level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, "
                            f"got {lm_head_accuracy_level}")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'compress-suite[onnx]'") from None

    if not hasattr(loaded, "model"):
        from .. import models
        loaded = models.load(str(loaded))
    family = loaded.arch.family
    model_type = getattr(loaded.model.config, "model_type", None)
    if family != "llama" or model_type not in SUPPORTED_MODEL_TYPES:
        raise CompressError(f"ONNX export supports the Llama family (model types {', '.join(SUPPORTED_MODEL_TYPES)}); "
                            f"{loaded.source} is {model_type!r} ({family})")
    packed_format = (loaded.quant or {}).get("format")
    if loaded.kind == "packed" and packed_format != gptq_int.FORMAT_ID:
        raise CompressError(f"ONNX export reads {gptq_int.FORMAT_ID} checkpoints and unquantized models; "
                            f"{loaded.source} is a {packed_format} checkpoint")
    out_dir = Path(out_dir)
    opt = _Options(fmt=fmt, accuracy_level=int(accuracy_level), contrib=contrib)
    with AtomicFolder(out_dir) as tmp:
        g = _Graph(tmp / DATA_FILE)
        try:
            with torch.no_grad():
                meta = _build_llama(g, loaded, opt, kv_cache, lm_head_bits, lm_head_block_size,
                                    int(lm_head_accuracy_level))
        finally:
            g.close()
        graph = onnx.helper.make_graph(g.nodes, "compress_decoder", g.inputs, g.outputs, g.inits)
        opsets = [onnx.helper.make_opsetid("", ONNX_OPSET)]
        if any(n.domain == "com.microsoft" for n in g.nodes):
            opsets.append(onnx.helper.make_opsetid("com.microsoft", MS_OPSET))
        proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                       producer_name="compress-suite", producer_version=__version__)
        onnx.save_model(proto, str(tmp / MODEL_FILE))
        if check:
            try:
                onnx.checker.check_model(str(tmp / MODEL_FILE))
            except onnx.checker.ValidationError as e:
                raise CompressError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        else:
            copy_tokenizer(Path(loaded.path), tmp)
        cfg = loaded.model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        gen = getattr(loaded.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        info = _export_info(loaded, opt, kv_cache, meta, lm_head_bits, lm_head_block_size, g,
                            {o.domain or "ai.onnx": o.version for o in opsets})
        info["genai_config"] = (write_for_export(tmp, loaded, opt.fmt, opt.accuracy_level, meta, info, MODEL_FILE)
                                if kv_cache else None)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    if fmt == "matmulnbits" and accuracy_level < 4 and 8 in info["onnx_bits"]:
        log.warning("8-bit MatMulNBits at accuracy level %d: exact, but ONNX Runtime 1.30 on CPU dequantizes the "
                    "whole 8-bit weight at every call on this path (slower than fp32); accuracy_level=4 is the "
                    "fast 8-bit path", accuracy_level)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.name in (MODEL_FILE, DATA_FILE))
    return {**info, "out": str(out_dir), "size_bytes": size, "seconds": round(time.perf_counter() - t0, 3)}


def _export_info(loaded, opt: _Options, kv_cache: bool, meta: dict, lm_head_bits, lm_head_block, g: _Graph,
                 opsets: dict) -> dict:
    import onnx
    quant = [r for r in opt.layers if r["kind"] != "fp32"]
    bits = sorted({r["bits"] for r in quant})
    onnx_bits = sorted({r["onnx_bits"] for r in quant})
    blocks = sorted({r["block_size"] for r in quant})
    notes = []
    if 3 in bits:
        notes.append("3-bit weights are stored as 4-bit (same values, scales and zero-points; lossless)")
    if any(r["permuted"] for r in quant):
        notes.append("act-order layers: input columns sorted by group, activations permuted by a Gather")
    if opt.fmt == "qdq" and 2 in bits:
        notes.append("2-bit weights are stored as 4-bit DequantizeLinear inputs (lossless)")
    if lm_head_bits is not None:
        notes.append(f"lm_head quantized to {lm_head_bits} bits at export (round-to-nearest, asymmetric, "
                     f"block {lm_head_block}): not in the checkpoint")
    scheme = loaded.quant.get("scheme") if loaded.quant else None
    io_in = [v.name for v in g.inputs]
    io_out = [v.name for v in g.outputs]
    return {
        "export_format": "compress-onnx", "export_format_version": EXPORT_FORMAT_VERSION,
        "format": opt.fmt, "kv_cache": kv_cache, "accuracy_level": opt.accuracy_level, "contrib_ops": opt.contrib,
        "bits": bits, "onnx_bits": onnx_bits, "block_size": blocks[0] if len(blocks) == 1 else blocks,
        "quantized_linears": sum(len(r["modules"]) for r in quant),
        "fp32_linears": sum(len(r["modules"]) for r in opt.layers if r["kind"] == "fp32"),
        "onnx_matmuls": len(opt.layers),
        "lm_head_bits": lm_head_bits, "lm_head_block_size": lm_head_block if lm_head_bits else None,
        "lm_head_accuracy_level": meta.get("lm_head_accuracy_level"),
        "source": str(loaded.source), "source_path": str(loaded.path), "source_kind": loaded.kind,
        "source_scheme": scheme, "source_label": loaded.scheme_label,
        "model": meta, "inputs": io_in, "outputs": io_out,
        "files": {"model": MODEL_FILE, "data": DATA_FILE if (Path(g._data_path).exists()) else None},
        "ir_version": IR_VERSION, "opsets": opsets,
        "notes": notes, "layers": opt.layers,
        "package_version": __version__, "onnx_version": onnx.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def file_sizes(out_dir) -> dict:
    """Bytes of the graph and its external data in an exported folder."""
    out_dir = Path(out_dir)
    sizes = {p.name: p.stat().st_size for p in (out_dir / MODEL_FILE, out_dir / DATA_FILE) if p.exists()}
    sizes["total"] = sum(sizes.values())
    return sizes


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of ``src`` (used when the loaded model carries no tokenizer object)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "chat_template.jinja"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)

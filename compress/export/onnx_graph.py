"""The ONNX graph under construction (nodes, initializers streamed to the external-data file) and
the emitters every decoder shares: a (fused) linear in either format, RMSNorm with or without the
residual add, the half rotation of rotary embeddings."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CompressError
from ..qlinear import QuantLinear
from .onnx_weights import IntWeight, int_weight, pack_lowfirst, pack_matmulnbits, pack_qdq

DATA_FILE = "model.onnx.data"
EXTERNAL_MIN_BYTES = 1024    # initializers at least this large go to the external-data file


# --------------------------------------------------------------------------- linears

@dataclass
class Linear:
    name: str
    k: int
    n: int
    dense: np.ndarray | None = None      # float32 (N, K)
    quant: IntWeight | None = None
    bias: np.ndarray | None = None
    parts: tuple[str, ...] = ()          # the checkpoint's linears fused into this one


def linear_of(name: str, module: torch.nn.Module) -> Linear:
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().to(torch.float32).numpy()
    if isinstance(module, QuantLinear):
        return Linear(name, module.in_features, module.out_features, quant=int_weight(module), bias=bias)
    if isinstance(module, torch.nn.Linear):
        w = module.weight.detach().to(torch.float32).numpy()
        return Linear(name, module.in_features, module.out_features, dense=w, bias=bias)
    raise CompressError(f"{name} is a {type(module).__name__}; ONNX export handles nn.Linear and QuantLinear")


def fuse(parts: list[Linear], name: str) -> Linear | None:
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
        return Linear(name, k, n, dense=np.concatenate([p.dense for p in parts]), bias=bias,
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
    return Linear(name, k, n, quant=w, bias=bias, parts=tuple(p.name for p in parts))


# --------------------------------------------------------------------------- graph builder

ONNX_DTYPES = {"INT4": 22, "UINT4": 21, "INT8": 3, "UINT8": 2}


class Graph:
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
        return self.raw(base, pack_lowfirst(flat, 4).tobytes(), ONNX_DTYPES["INT4" if signed else "UINT4"],
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
class Options:
    fmt: str
    accuracy_level: int
    contrib: bool
    compact: bool = True
    layers: list = field(default_factory=list)   # per-linear records for export_info.json


def emit_linear(g: Graph, x: str, lin: Linear, opt: Options) -> str:
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


def rms_norm(g: Graph, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """RMSNorm in standard ops (the pattern ORT fuses into SimplifiedLayerNormalization)."""
    sq = g.op("Pow", [x, g.const_f32(2.0)])
    var = g.op("ReduceMean", [sq, g.const_i64([-1])], keepdims=1)
    den = g.op("Sqrt", [g.op("Add", [var, g.const_f32(eps)])])
    y = g.op("Div", [x, den])
    return g.op("Mul", [y, g.array(name + ".weight", weight.astype(np.float32))])


def add_rms_norm(g: Graph, x: str, residual: str, weight: np.ndarray, eps: float, name: str,
                  contrib: bool) -> tuple[str, str]:
    """``residual + x`` then RMSNorm: returns (normalised, new residual); one fused
    ``SkipSimplifiedLayerNormalization`` with the contrib ops, standard ops otherwise."""
    if contrib:
        outs = g.op("SkipSimplifiedLayerNormalization", [x, residual, g.array(name + ".weight", weight)],
                    n_out=4, domain="com.microsoft", epsilon=eps)
        return outs[0], outs[3]
    residual = g.op("Add", [residual, x])
    return rms_norm(g, residual, weight, eps, name), residual


def rotate_half(g: Graph, x: str, cos: str, sin: str, half: int, dim: int) -> str:
    x1 = g.op("Slice", [x, g.const_i64([0]), g.const_i64([half]), g.const_i64([-1])])
    x2 = g.op("Slice", [x, g.const_i64([half]), g.const_i64([dim]), g.const_i64([-1])])
    a = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
    b = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
    return g.op("Concat", [a, b], axis=-1)

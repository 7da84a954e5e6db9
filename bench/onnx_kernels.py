"""Single ONNX Runtime nodes on SmolLM2's linear shapes: an fp32 MatMul against MatMulNBits at 4
and 8 bits, blocks of 32 and 128, accuracy levels 0 and 4, for one row of activations (a decode
step) and 512 (a prefill). Run through ``python bench/onnx_cpu.py --kernels --out ...``."""
from __future__ import annotations

import statistics
import time

import numpy as np


KERNEL_SHAPES = [(576, 960, "qkv"), (576, 3072, "gate+up"), (1536, 576, "down"), (576, 49152, "lm_head")]


def kernel_bench(threads: int, ms=(1, 512), reps: int = 30) -> dict:
    """Median time of one fp32 MatMul and of MatMulNBits (bits 4/8, blocks 32/128, accuracy levels 0/4)
    on random weights of SmolLM2's shapes, for M rows of activations (1: a decode step, 512: a
    prefill); at M=1 the weights are cache-resident except the lm_head's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def session(node, inits, k):
        g = helper.make_graph([node], "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def median_ms(sess, k, m):
        x = rng.standard_normal((1, m, k)).astype(np.float32)
        for _ in range(3):
            sess.run(None, {"x": x})
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            ts.append(time.perf_counter() - t0)
        return 1000 * statistics.median(ts)

    rows = []
    for m in ms:
        for k, n, what in KERNEL_SHAPES:
            w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
            row = {"m": m, "shape": f"{k}x{n}", "what": what,
                   "fp32_ms": median_ms(session(helper.make_node("MatMul", ["x", "W"], ["y"]), [w], k), k, m)}
            for bits in (4, 8):
                for bs in (32, 128):
                    nb = -(-k // bs)
                    b = numpy_helper.from_array(rng.integers(0, 256, (n, nb, bs * bits // 8)).astype(np.uint8), "B")
                    sc = numpy_helper.from_array((rng.random((n, nb)) * 0.01).astype(np.float32), "s")
                    zp = numpy_helper.from_array(rng.integers(0, 256, (n, -(-nb * bits // 8))).astype(np.uint8), "z")
                    for acc in (0, 4):
                        node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft",
                                                K=k, N=n, bits=bits, block_size=bs, accuracy_level=acc)
                        row[f"int{bits}_b{bs}_acc{acc}_ms"] = median_ms(session(node, [b, sc, zp], k), k, m)
            rows.append(row)
    return {"threads": threads, "m": list(ms), "rows": rows, "onnxruntime": ort.__version__}


def kernel_table(data: dict) -> str:
    keys = [k for k in data["rows"][0] if k.endswith("_ms")]
    lines = [f"one node, M rows of activations, {data['threads']} threads, {data['cpu']}, load average "
             f"{data['load_average_start'][0]:.1f} -> {data['load_average_end'][0]:.1f}; ms", "",
             "| M | shape | " + " | ".join(k[:-3] for k in keys) + " |", "| ---: | --- |" + " ---: |" * len(keys)]
    for r in data["rows"]:
        lines.append(f"| {r.get('m', 1)} | {r['shape']} ({r['what']}) | " + " | ".join(f"{r[k]:.3f}" for k in keys)
                     + " |")
    return "\n".join(lines)

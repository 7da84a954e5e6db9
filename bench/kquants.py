"""Throughput of the llama.cpp-compatible GGML quantizers (compress.formats.kquants).

For every type: quantize a random N(0, 1) float32 matrix (default 4096 x 4096) without and with
an importance matrix, and dequantize the result; million weights per second, best of N runs
(wall clock). Optionally times llama.cpp's own ``ggml_quantize_chunk`` on the same data and
machine (``--ggml-lib``; the library the tests build, e.g.
``~/.cache/compress/oracle/ggml-base-0.3.36/libggml-base.so``), because on a shared machine only
a same-moment comparison means much. Every results file records the run (bench/runinfo.py: the
command, package and torch versions, threads, CPU and its int8 features, load average at start
and end) for the same reason.

    python bench/kquants.py --out bench/results/kquants-throughput.json

The model-level part (llama.cpp type mixes on SmolLM2: perplexity, KL divergence, size, with and
without an importance matrix, and GPTQ onto the GGML grids) is ``python bench/kquants.py model``,
in bench/kquants_model.py.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.formats import kquants  # noqa: E402
from runinfo import finish, run_info  # noqa: E402  (bench/ is on sys.path: this script's folder)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class _GGML:
    """Just enough of llama.cpp's ggml-base through ctypes to time ``ggml_quantize_chunk``."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                 ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, w: np.ndarray, type_id: int, imatrix: np.ndarray | None) -> np.ndarray:
        rows, cols = w.shape
        out = np.empty((rows, self.lib.ggml_row_size(type_id, cols)), dtype=np.uint8)
        self.lib.ggml_quantize_chunk(type_id, w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                     None if imatrix is None else imatrix.ctypes.data)
        return out


def throughput(types: list[str], rows: int = 4096, cols: int = 4096, repeats: int = 3,
               seed: int = 0, ggml_lib: str | None = None, log=print) -> list[dict]:
    """Quantize / dequantize throughput per type, in million weights per second (best of ``repeats``).

    Returns one record per type: ``quantize_mw_s``, ``quantize_imatrix_mw_s``, ``dequantize_mw_s``
    (and ``llama_cpp_quantize_mw_s`` / ``llama_cpp_quantize_imatrix_mw_s`` with ``ggml_lib``),
    plus whether our bytes equal llama.cpp's on this matrix when it was timed too.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    imatrix = torch.rand(cols, generator=gen).square_().add_(1e-3)   # mean squared activations
    w_np, im_np = w.numpy(), imatrix.numpy()
    ggml = _GGML(ggml_lib) if ggml_lib else None
    n = w.numel() / 1e6
    records = []
    for name in types:
        qt = kquants.get_type(name)
        rec: dict = {"type": name, "type_id": qt.type_id, "bpw": qt.bpw}
        q = kquants.quantize(w, name)
        rec["quantize_mw_s"] = n / _best_of(lambda: kquants.quantize(w, name), repeats)
        q_im = kquants.quantize(w, name, imatrix)
        rec["quantize_imatrix_mw_s"] = n / _best_of(lambda: kquants.quantize(w, name, imatrix), repeats)
        rec["dequantize_mw_s"] = n / _best_of(lambda: kquants.dequantize(q, name, (rows, cols)), repeats)
        if ggml is not None:
            rec["llama_cpp_quantize_mw_s"] = n / _best_of(lambda: ggml.quantize(w_np, qt.type_id, None), repeats)
            rec["llama_cpp_quantize_imatrix_mw_s"] = n / _best_of(
                lambda: ggml.quantize(w_np, qt.type_id, im_np), repeats)
            rec["bytes_equal_llama_cpp"] = bool(np.array_equal(q.numpy(), ggml.quantize(w_np, qt.type_id, None)))
            rec["bytes_equal_llama_cpp_imatrix"] = bool(
                np.array_equal(q_im.numpy(), ggml.quantize(w_np, qt.type_id, im_np)))
        log(_row(rec))
        records.append(rec)
    return records


_COLUMNS = [("type", "type", "{}"), ("bpw", "bpw", "{:g}"), ("quantize_mw_s", "quantize", "{:.1f}"),
            ("quantize_imatrix_mw_s", "quantize+imatrix", "{:.1f}"), ("dequantize_mw_s", "dequantize", "{:.1f}"),
            ("llama_cpp_quantize_mw_s", "llama.cpp", "{:.1f}"),
            ("llama_cpp_quantize_imatrix_mw_s", "llama.cpp+imatrix", "{:.1f}")]


def _row(rec: dict) -> str:
    return "| " + " | ".join(fmt.format(rec[k]) if k in rec else "-" for k, _, fmt in _COLUMNS) + " |"


def _header() -> str:
    return ("| " + " | ".join(h for _, h, _ in _COLUMNS) + " |\n|" + "---|" * len(_COLUMNS))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["model"]:                  # the model-level part: bench/kquants_model.py
        from kquants_model import model_level
        return model_level(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(kquants.TYPES), help="comma-separated GGML type names")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--ggml-lib", default=None, help="libggml-base shared library to time llama.cpp too")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kquants-throughput.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    for t in types:
        kquants.get_type(t)                     # fail early on a typo
    info = run_info("bench/kquants.py", argv)
    print(f"{args.rows}x{args.cols} float32 N(0,1), million weights/s, best of {args.repeats}, "
          f"torch threads {info['threads']}, load average {info['load_average_start'][0]:.2f}")
    print(_header())
    records = throughput(types, args.rows, args.cols, args.repeats, ggml_lib=args.ggml_lib)
    result = {
        "benchmark": "kquants-throughput",
        "shape": [args.rows, args.cols],
        "repeats": args.repeats,
        "unit": "million weights per second (wall clock, best of repeats)",
        "platform": platform.platform(),
        "llama_cpp_lib": args.ggml_lib,
        "throughput": records,
        **finish(info),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

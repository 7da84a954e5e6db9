"""Benchmark the Triton kernels against torch's float16 matmul (cuBLAS) on one CUDA device.

    PYTHONPATH=. python bench/kernels.py [--quick] [--reps 100] [--m 1,16,128] [--shapes 4096x4096]

For every weight shape ``(N, K)`` and batch size M, times (CUDA events around each call, the L2
cache flushed before each, median of ``--reps`` after warm-up and autotuning):

* ``fp16``: ``x @ W.T`` with a float16 ``(N, K)`` weight (cuBLAS), the baseline;
* ``int4-g128-sym``, ``int4-g128-asym``, ``int4-g128-act``, ``int3-g128``, ``int8-g128``: the GPTQ
  dequant-GEMM (``kernels.gptq_gemm``; the decode kernel for M <= 16);
* ``w8a8``: the int8 GEMM (``kernels.int8_gemm``) on already-quantized activations;
* ``gguf-q4_k``, ``gguf-q5_k``, ``gguf-q6_k``, ``gguf-q8_0``: the GGUF block-quant dequant-GEMM
  (``kernels.kquant_gemm``; the decode kernel for M <= 16) reading the llama.cpp block bytes.

Each row reports time, TFLOP/s (2 M N K / t), GB/s (weight + activation + output bytes / t),
the speedup over fp16 and the share of the memory-bandwidth roofline, the bandwidth of a large
device-to-device copy measured in the same run (``bytes / t / copy GB/s``). Each kernel's output
is also checked against its torch twin (``rel_err``). Results go to
``bench/results/kernels-<device-name-slug>.json`` with what bench/runinfo.py records about the run
(command, versions, threads, CPU, load average at start and end); a table is printed.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path and "kernels" would name this file
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench.runinfo import finish, run_info  # noqa: E402  (bench/ is off sys.path here: see above)
from compress.formats.gptq_int import pack_bitstream  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]   # (N, K)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512]
VARIANTS = {   # name: (bits, group, sym, act_order)
    "int4-g128-sym": (4, 128, True, False),
    "int4-g128-asym": (4, 128, False, False),
    "int4-g128-act": (4, 128, False, True),
    "int3-g128": (3, 128, False, False),
    "int8-g128": (8, 128, False, False),
    "w8a8": None,
    # a str: the GGUF block type read by kernels.kquant_gemm (K must be a multiple of its block size)
    "gguf-q4_k": "Q4_K",
    "gguf-q5_k": "Q5_K",
    "gguf-q6_k": "Q6_K",
    "gguf-q8_0": "Q8_0",
}
# byte offsets of the float16 fields (d, dmin) in a block of each GGUF type benchmarked
_GGUF_F16 = {"Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208]), "Q8_0": (34, [0])}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Timer:
    """Median time of a CUDA callable: CUDA events around each call, L2 flushed before each."""

    def __init__(self, reps: int, warmup: int):
        self.reps = reps
        self.warmup = warmup
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
        self.flush = torch.empty(max(2 * l2, 256 << 20), dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e-3   # seconds


def copy_bandwidth(timer: Timer, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))   # src and dst are freed when this function returns
    return 2 * nbytes / t


def random_gptq(n: int, k: int, bits: int, group: int, sym: bool, act_order: bool, gen: torch.Generator):
    """A random GPTQ-layout weight: every bit pattern is a valid packed value, so the words are drawn
    directly (no quantizer needed). Scales ~ 1e-2 keep float16 outputs in range."""
    groups = -(-k // group)
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (-(-k * bits // 32), n), generator=gen, dtype=torch.int64)
    qweight = qweight.to(torch.int32)
    if sym:   # stored zero - 1 = 2**(bits-1) - 1 in every slot
        z = torch.full((groups, n), (1 << (bits - 1)) - 1, dtype=torch.int64)
    else:
        z = torch.randint(0, 1 << bits, (groups, n), generator=gen, dtype=torch.int64)
    qzeros = pack_bitstream(z.t().contiguous(), bits).t().contiguous()
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.005).to(torch.float16)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // group).to(torch.int32)
    return [t.cuda() for t in (qweight, qzeros, scales, g_idx)]


def random_gguf(n: int, k: int, qtype: str, gen: torch.Generator) -> torch.Tensor:
    """Random GGUF block bytes for an (N, K) weight: every byte random except the float16 d/dmin
    fields, set to finite values ~ 1e-4 (so float16 outputs stay in range). The kernel's work does
    not depend on the values."""
    ts, fields = _GGUF_F16[qtype]
    bs = 32 if qtype == "Q8_0" else 256
    data = torch.randint(0, 256, (n, k // bs, ts), generator=gen, dtype=torch.uint8)
    for off in fields:
        d = ((torch.rand(n, k // bs, generator=gen) + 0.5) * 1e-4).to(torch.float16)
        data[:, :, off:off + 2] = d.unsqueeze(-1).view(torch.uint8)
    return data.reshape(n, -1).cuda()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--m", default=",".join(map(str, MS)), help="comma-separated batch sizes")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,...")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="M in {1, 16, 128}, first two shapes, 30 reps")
    ap.add_argument("--out", default=None, help="results file (default bench/results/kernels-<device>.json)")
    args = ap.parse_args(argv)
    info = run_info("bench/kernels.py", sys.argv[1:] if argv is None else list(argv))

    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device and none is present (torch.cuda.is_available() is "
              "False); the Triton kernels are only timed on a GPU.", file=sys.stderr)
        return 2

    import triton

    from kernels.gptq_gemm import gptq_linear_triton, path_for
    from kernels.int8_gemm import int8_linear_triton
    from kernels.kquant_gemm import kquant_linear_triton
    from kernels.kquant_gemm import path_for as kquant_path_for
    from kernels.reference import gptq_linear_ref, int8_linear_ref, kquant_linear_ref, quantize_per_token_int8

    ms = [int(v) for v in args.m.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.quick:
        ms, shapes, args.reps = [1, 16, 128], shapes[:2], min(args.reps, 30)

    device = torch.cuda.get_device_name(0)
    timer = Timer(args.reps, args.warmup)
    copy_bw = copy_bandwidth(timer)
    print(f"{device}: device-to-device copy {copy_bw / 1e9:.0f} GB/s; torch {torch.__version__}, "
          f"triton {triton.__version__}")

    gen = torch.Generator().manual_seed(0)
    rows = []
    started = time.time()
    for n, k in shapes:
        w16 = (torch.randn(n, k, generator=gen) * 0.02).to(torch.float16).cuda()
        weights = {}
        for name in variants:
            spec = VARIANTS[name]
            if spec is None:
                w_q, w_s = quantize_per_token_int8(w16.float())
                weights[name] = (w_q, w_s)
            elif isinstance(spec, str):
                weights[name] = random_gguf(n, k, spec, gen)
            else:
                weights[name] = random_gptq(n, k, *spec, gen)
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(torch.float16).cuda()
            base_bytes = (n * k + m * k + m * n) * 2
            t16 = timer(lambda: x @ w16.t())
            flops = 2 * m * n * k
            rows.append(dict(kernel="fp16", path="cublas", n=n, k=k, m=m, time_us=t16 * 1e6,
                             tflops=flops / t16 / 1e12, gbps=base_bytes / t16 / 1e9, speedup=1.0,
                             roofline=base_bytes / t16 / copy_bw, rel_err=0.0))
            for name in variants:
                if VARIANTS[name] is None:
                    w_q, w_s = weights[name]
                    x_q, x_s = quantize_per_token_int8(x)
                    fn = lambda: int8_linear_triton(x_q, x_s, w_q, w_s)  # noqa: E731
                    ref = int8_linear_ref(x_q, x_s, w_q, w_s)
                    nbytes = n * k + m * k + m * 4 + n * 4 + m * n * 2
                    path = "triton-gemm"
                elif isinstance(VARIANTS[name], str):
                    qtype, data = VARIANTS[name], weights[name]
                    fn = lambda: kquant_linear_triton(x, data, qtype)  # noqa: E731
                    ref = kquant_linear_ref(x, data, qtype)
                    nbytes = data.numel() + (m * k + m * n) * 2
                    path = "triton-" + kquant_path_for(m)
                else:
                    bits = VARIANTS[name][0]
                    qw, qz, s, g = weights[name]
                    fn = lambda: gptq_linear_triton(x, qw, qz, s, g, bits)  # noqa: E731
                    ref = gptq_linear_ref(x, qw, qz, s, g, bits)
                    nbytes = sum(t.numel() * t.element_size() for t in (qw, qz, s, g)) + (m * k + m * n) * 2
                    path = "triton-" + path_for(m)
                err = rel_err(fn(), ref)
                t = timer(fn)
                rows.append(dict(kernel=name, path=path, n=n, k=k, m=m, time_us=t * 1e6,
                                 tflops=flops / t / 1e12, gbps=nbytes / t / 1e9, speedup=t16 / t,
                                 roofline=nbytes / t / copy_bw, rel_err=err))
            done = [r for r in rows if r["n"] == n and r["k"] == k and r["m"] == m]
            for r in done:
                print(f"{r['kernel']:>15} {r['path']:>13} N={n:>5} K={k:>5} M={m:>4} {r['time_us']:9.1f} us "
                      f"{r['tflops']:7.2f} TFLOP/s {r['gbps']:7.0f} GB/s x{r['speedup']:5.2f} "
                      f"roofline {100 * r['roofline']:5.1f}%  err {r['rel_err']:.1e}", flush=True)

    out = Path(args.out) if args.out else _ROOT / "bench" / "results" / f"kernels-{slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=device, triton=triton.__version__, copy_gbps=copy_bw / 1e9, reps=args.reps,
                  timing="CUDA events per call, L2 flushed before each, median", seconds=time.time() - started,
                  notes="w8a8 times the int8 GEMM on already-quantized activations (quantization excluded); "
                        "GB/s counts packed weight + scales/zeros/g_idx + activations + output; "
                        "gguf-* rows read random GGUF block bytes (the kernel's work does not depend on values)",
                  rows=rows, **finish(info))
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Perplexity / KL divergence of post-training quantization settings on a real model.

Quantizes the model with each setting into a packed checkpoint (through the same API the CLI
uses), loads the checkpoints back, and evaluates all of them against the unquantized model in one
pass over the protocol's windows (in chunks of ``--eval-chunk`` variants, to bound memory). Writes
a JSON results file and prints a Markdown table. Calibrated methods draw ``--nsamples`` windows of
``--seqlen`` tokens from WikiText-2 validation (``--seed``); every row records its quantization
wall time (calibration and solve; ``wall_seconds`` adds loading and writing the checkpoint).

    python bench/ptq.py --suite rtn --out bench/results/ptq-rtn-smollm2.json
    python bench/ptq.py --suite gptq --out bench/results/ptq-gptq-smollm2.json
    python bench/ptq.py --suite awq --out bench/results/ptq-awq-smollm2.json
    python bench/ptq.py --suite smoothquant --out bench/results/ptq-smoothquant-smollm2.json
    python bench/ptq.py --suite awq --only "awq int4" --max-windows 4      # a quick look at some rows
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib.data import CalibSpec  # noqa: E402
from compress import __version__, api, models  # noqa: E402
from compress.methods.awq import AWQOptions  # noqa: E402
from compress.methods.smoothquant import SmoothQuantOptions  # noqa: E402
from compress.pipeline import GPTQOptions  # noqa: E402
from compress.scheme import IntScheme, W8A8Scheme  # noqa: E402
from evals.data import PROTOCOLS, data_dir, read_text  # noqa: E402
from evals.perplexity import evaluate_many, tokenize, windows  # noqa: E402

# (label, method, scheme kwargs, method options): method options are keyword arguments of
# api.quantize: {"gptq": GPTQOptions kwargs, "awq": AWQOptions kwargs, "smoothquant":
# SmoothQuantOptions kwargs}; smoothquant's scheme kwargs build a W8A8Scheme.
SUITES = {
    "rtn": [
        ("rtn int8 per-channel sym", "rtn", dict(bits=8, group_size=-1, sym=True), {}),
        ("rtn int8 g128 sym", "rtn", dict(bits=8, group_size=128, sym=True), {}),
        ("rtn int8 g128 asym", "rtn", dict(bits=8, group_size=128, sym=False), {}),
        ("rtn int4 g128 sym", "rtn", dict(bits=4, group_size=128, sym=True), {}),
        ("rtn int4 g128 asym", "rtn", dict(bits=4, group_size=128, sym=False), {}),
        ("rtn int3 g128 sym", "rtn", dict(bits=3, group_size=128, sym=True), {}),
        ("rtn int3 g128 asym", "rtn", dict(bits=3, group_size=128, sym=False), {}),
    ],
}

# settings off the model's Q4_1 g32 grid (docs/REFERENCE.md section 2): (bits, group, which grids)
_GPTQ_SETTINGS = [(8, -1, (True,)), (4, -1, (True, False)), (4, 128, (True, False)), (3, 128, (True, False)),
                  (2, 64, (True, False))]


def _desc(bits: int, group: int, sym: bool) -> str:
    return f"int{bits} {'per-channel' if group == -1 else f'g{group}'} {'sym' if sym else 'asym'}"


def _gptq_suite():
    """RTN and GPTQ with act-order at every setting and grid; GPTQ without act-order at 4-bit g128."""
    rows = []
    for bits, group, grids in _GPTQ_SETTINGS:
        for sym in grids:
            kw = dict(bits=bits, group_size=group, sym=sym)
            rows.append((f"rtn {_desc(bits, group, sym)}", "rtn", kw, {}))
            orders = (False, True) if (bits, group, sym) == (4, 128, False) else (True,)
            for act_order in orders:
                rows.append((f"gptq {_desc(bits, group, sym)}{' act-order' if act_order else ''}", "gptq",
                             dict(kw, act_order=act_order), {"gptq": dict(damp=0.01)}))
    return rows


SUITES["gptq"] = _gptq_suite()
# compared with the gptq suite's rows of the same settings (same windows, same calibration draw)
SUITES["awq"] = [
    ("awq int4 g128 asym", "awq", dict(bits=4, group_size=128, sym=False), {"awq": dict(objective="module")}),
    ("awq int3 g128 asym", "awq", dict(bits=3, group_size=128, sym=False), {"awq": dict(objective="module")}),
    ("awq+gptq int4 g128 asym act-order", "awq+gptq", dict(bits=4, group_size=128, sym=False, act_order=True),
     {"awq": dict(objective="module"), "gptq": dict(damp=0.01)}),
    ("awq+gptq int3 g128 asym act-order", "awq+gptq", dict(bits=3, group_size=128, sym=False, act_order=True),
     {"awq": dict(objective="module"), "gptq": dict(damp=0.01)}),
    # the faster objective (linear outputs through the Hessian): what it costs in quality
    ("awq int4 g128 asym linear-objective", "awq", dict(bits=4, group_size=128, sym=False),
     {"awq": dict(objective="linear")}),
]
SUITES["smoothquant"] = [
    ("rtn int8 per-channel sym (weights only)", "rtn", dict(bits=8, group_size=-1, sym=True), {}),
    ("smoothquant w8a8 dynamic a0.5", "smoothquant", dict(act_scheme="dynamic"), {"smoothquant": dict(alpha=0.5)}),
    ("smoothquant w8a8 static a0.5", "smoothquant", dict(act_scheme="static"), {"smoothquant": dict(alpha=0.5)}),
    # also smoothing down_proj through up_proj's rows: static per-tensor scales need it on SmolLM2
    ("smoothquant w8a8 dynamic a0.5 smooth-down", "smoothquant", dict(act_scheme="dynamic"),
     {"smoothquant": dict(alpha=0.5, smooth_linear_prev=True)}),
    ("smoothquant w8a8 static a0.8 smooth-down", "smoothquant", dict(act_scheme="static"),
     {"smoothquant": dict(alpha=0.8, smooth_linear_prev=True)}),
]
SUITES["all"] = list({r[0]: r for name in ("rtn", "gptq", "awq", "smoothquant") for r in SUITES[name]}.values())

_OPTIONS = {"gptq": GPTQOptions, "awq": AWQOptions, "smoothquant": SmoothQuantOptions}


def build(method: str, scheme_kw: dict, opts: dict):
    """The scheme and the api.quantize keyword arguments of one suite row."""
    scheme = W8A8Scheme(**scheme_kw) if method == "smoothquant" else IntScheme(**scheme_kw)
    return scheme, {k: _OPTIONS[k](**v) for k, v in opts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--suite", choices=sorted(SUITES), default="rtn")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="wt2-quick")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (calibrated methods)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw")
    ap.add_argument("--only", action="append", default=None,
                    help="keep the rows whose label contains this text (repeatable)")
    ap.add_argument("--eval-chunk", type=int, default=6, help="variants evaluated (held in memory) per pass")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    suite = [r for r in SUITES[args.suite] if not args.only or any(o in r[0] for o in args.only)]
    if not suite:
        ap.error(f"--only {args.only} matches no row of suite {args.suite}")
    calib = CalibSpec("wikitext2", args.nsamples, args.seqlen, args.seed)

    proto = PROTOCOLS[args.protocol]
    text = read_text(data_dir(args.data_dir) / proto.file)
    base = models.load(args.model)
    tokens = tokenize(base.tokenizer, text)
    limit = proto.max_windows if args.max_windows is None else args.max_windows
    wins = windows(tokens, proto.seqlen, limit)

    rows = []
    outs = {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, kw, opts in suite:
            scheme, method_kwargs = build(method, kw, opts)
            if method in api.CALIBRATED:
                method_kwargs.update(calib=calib, data_dir=data_dir(args.data_dir))
            out = Path(tmp) / label.replace(" ", "_").replace("+", "-")
            t0 = time.perf_counter()
            info = api.quantize_to_folder(args.model, scheme, out, method=method, progress=False, **method_kwargs)
            wall = time.perf_counter() - t0
            outs[label] = out
            rows.append({"label": label, "method": method, "scheme": scheme.to_dict(), "options": opts,
                         "calibration": calib.to_dict() if method in api.CALIBRATED else None,
                         "quantize_seconds": info["seconds"], "wall_seconds": round(wall, 3),
                         "fallbacks": len(info.get("fallbacks") or {}),
                         "size_bytes": (out / "model.safetensors").stat().st_size})
            print(f"quantized {label} in {info['seconds']:.1f} s", file=sys.stderr)
        chunk = max(1, args.eval_chunk)
        for start in range(0, len(rows), chunk):
            variants = {}
            for r in rows[start:start + chunk]:
                loaded = models.load(str(outs[r["label"]]))
                variants[r["label"]] = loaded.model
                r["bits_per_weight"] = api.weight_stats(loaded.model)["bits_per_weight"]
            res = evaluate_many(variants, wins, base.model)
            results.setdefault("__base__", res.pop("__base__"))
            results.update(res)
            del variants
    b = results.pop("__base__")
    for r in rows:
        res = results[r["label"]]
        r.update(ppl=res.ppl, kld=res.kld, kld_max=res.kld_max, top1=res.top1, eval_seconds=res.seconds)
    data = {
        "model": args.model, "protocol": args.protocol, "windows": b.windows, "tokens": b.tokens,
        "base": {"label": "fp32", "ppl": b.ppl, "eval_seconds": b.seconds},
        "rows": rows, "package_version": __version__, "torch": torch.__version__,
        "machine": platform.machine(), "threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/ptq.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(table(data))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n")


def table(data: dict) -> str:
    lines = [f"{data['model']}, {data['protocol']} ({data['windows']} windows, {data['tokens']} tokens)", "",
             "| setting | ppl | KLD | top-1 agree | bits/weight | quantize s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| fp32 | {data['base']['ppl']:.2f} | | | 32 | |"]
    for r in data["rows"]:
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['kld']:.4f} | {100 * r['top1']:.1f}% | "
                     f"{r['bits_per_weight']:.3f} | {r['quantize_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Perplexity / KL divergence of post-training quantization settings on a real model.

Quantizes the model with each setting into a packed checkpoint (through the same API the CLI
uses), loads the checkpoints back, and evaluates all of them against the unquantized model in one
pass over the protocol's windows (in chunks of ``--eval-chunk`` variants, to bound memory). Writes
a JSON results file and prints a Markdown table. Calibrated methods draw ``--nsamples`` windows of
``--seqlen`` tokens from WikiText-2 validation (``--seed``); every row records its quantization
wall time (calibration and solve; ``wall_seconds`` adds loading and writing the checkpoint).

    python bench/ptq.py --suite rtn --eval-chunk 7 --out bench/results/ptq-rtn-smollm2.json
    python bench/ptq.py --suite compare-gptq --eval-chunk 8 --out bench/results/ptq-compare-gptq-smollm2.json
    python bench/ptq.py --suite compare-awq-sq --eval-chunk 8 --out bench/results/ptq-compare-awq-sq-smollm2.json
    python bench/ptq.py --suite compare-gptq-mse --eval-chunk 8 --out bench/results/ptq-compare-gptq-mse-smollm2.json
    python bench/ptq.py --suite compare-awq-mse --eval-chunk 8 --out bench/results/ptq-compare-awq-mse-smollm2.json
    python bench/ptq.py --table bench/results/ptq-rtn-smollm2.json bench/results/ptq-compare-*.json
    python bench/ptq.py --suite awq --only "awq int4" --max-windows 4      # a quick look at some rows

The compare suites hold the rows of the README's comparison (settings of the reference table the
rtn suite does not cover; the -mse suites repeat their GPTQ and awq+gptq rows with ``--grid mse``);
the gptq, awq and smoothquant suites sweep more settings and options. ``compare-llmcompressor``
runs llm-compressor's GPTQ (its own virtual environment: ``bench/peers/setup.sh llmcompressor``)
beside ours on the same calibration and evaluation windows, in the same run.

Every results file records the exact command, the package version, the thread count, the CPU and
the load average (bench/runinfo.py); every number in it was measured by that run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib.data import CalibSpec, calibration_windows  # noqa: E402
from compress import api, models  # noqa: E402
from compress.registry import get as get_method  # noqa: E402
from evals.data import PROTOCOLS, data_dir, read_text  # noqa: E402
from evals.perplexity import evaluate_many, tokenize, windows  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from runinfo import finish, run_info  # noqa: E402

PEER = "llm-compressor"
# (label, method, scheme fields, method options by group): flattened into the keyword arguments of
# api.quantize_to_folder (the method's config fields); method PEER runs llm-compressor's GPTQ.
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
# the rows of the README's method comparison: every setting of the reference table that the rtn
# suite does not already cover, each calibrated method at the settings it is compared at
SUITES["compare-gptq"] = [
    ("rtn int4 per-channel asym", "rtn", dict(bits=4, group_size=-1, sym=False), {}),
    ("gptq int4 per-channel asym act-order", "gptq", dict(bits=4, group_size=-1, sym=False, act_order=True),
     {"gptq": dict(damp=0.01)}),
    ("gptq int4 g128 asym act-order", "gptq", dict(bits=4, group_size=128, sym=False, act_order=True),
     {"gptq": dict(damp=0.01)}),
    ("gptq int4 g128 asym", "gptq", dict(bits=4, group_size=128, sym=False, act_order=False),
     {"gptq": dict(damp=0.01)}),
    ("gptq int4 g128 sym act-order", "gptq", dict(bits=4, group_size=128, sym=True, act_order=True),
     {"gptq": dict(damp=0.01)}),
    ("gptq int3 g128 asym act-order", "gptq", dict(bits=3, group_size=128, sym=False, act_order=True),
     {"gptq": dict(damp=0.01)}),
    ("rtn int2 g64 asym", "rtn", dict(bits=2, group_size=64, sym=False), {}),
    ("gptq int2 g64 asym act-order", "gptq", dict(bits=2, group_size=64, sym=False, act_order=True),
     {"gptq": dict(damp=0.01)}),
]
SUITES["compare-awq-sq"] = [
    ("awq int4 g128 asym", "awq", dict(bits=4, group_size=128, sym=False), {"awq": dict(objective="module")}),
    ("awq int3 g128 asym", "awq", dict(bits=3, group_size=128, sym=False), {"awq": dict(objective="module")}),
    ("awq+gptq int3 g128 asym act-order", "awq+gptq", dict(bits=3, group_size=128, sym=False, act_order=True),
     {"awq": dict(objective="module"), "gptq": dict(damp=0.01)}),
    ("smoothquant w8a8 dynamic a0.5", "smoothquant", dict(act_scheme="dynamic"), {"smoothquant": dict(alpha=0.5)}),
]


def _with_mse_grid(rows):
    """The GPTQ-solved rows of ``rows`` again with the searched grid (``--grid mse``), labels + " mse"."""
    return [(f"{label} mse", method, kw, dict(opts, gptq=dict(opts["gptq"], grid="mse")))
            for label, method, kw, opts in rows if "gptq" in opts]


# the comparison's GPTQ and awq+gptq settings again with the searched grid (--grid mse)
SUITES["compare-gptq-mse"] = _with_mse_grid(SUITES["compare-gptq"])
SUITES["compare-awq-mse"] = _with_mse_grid(SUITES["compare-awq-sq"])
SUITES["all"] = list({r[0]: r for name in ("rtn", "gptq", "awq", "smoothquant") for r in SUITES[name]}.values())

# perplexities measured on this model with the same protocol and calibration by the GPTQ authors'
# code (RTN: their quantizer; GPTQ: their algorithm), by row label
REFERENCE_PPL = {
    "rtn int8 per-channel sym": 30.00,
    "rtn int4 per-channel asym": 52.10, "rtn int4 per-channel sym": 60.02,
    "gptq int4 per-channel asym act-order": 40.99,
    "rtn int4 g128 asym": 39.66, "rtn int4 g128 sym": 45.87,
    "gptq int4 g128 asym act-order": 37.40, "gptq int4 g128 asym": 38.73, "gptq int4 g128 sym act-order": 38.60,
    "rtn int3 g128 asym": 145.90, "rtn int3 g128 sym": 622.9, "gptq int3 g128 asym act-order": 79.96,
    "rtn int2 g64 asym": 483212, "gptq int2 g64 asym act-order": 12343,
}
# our GPTQ with the searched grid (--grid mse) against the reference GPTQ of the same setting
REFERENCE_PPL.update({f"{k} mse": v for k, v in list(REFERENCE_PPL.items()) if k.startswith("gptq ")})

# llm-compressor's GPTQ beside ours at the setting it accepts on SmolLM2 (group 64: it refuses
# group 128, 576 not being a multiple of it): its defaults (static act-order: grids fixed from the
# unquantized weights, columns by decreasing Hessian diagonal; dampening 0.01, blocks of 128), ours
# with the same options, ours at our defaults, and ours with the searched grid
SUITES["compare-llmcompressor"] = [
    ("llm-compressor gptq int4 g64 asym (its defaults: act-order static)", PEER,
     dict(bits=4, group_size=64, sym=False), {"gptq": dict(act_order="static", damp=0.01)}),
    ("gptq int4 g64 asym (our defaults: act-order, static groups, one pass)", "gptq",
     dict(bits=4, group_size=64, sym=False), {}),
    ("gptq int4 g64 asym act-order static-groups true-sequential", "gptq", dict(bits=4, group_size=64, sym=False),
     {"gptq": dict(true_sequential=True)}),
    ("gptq int4 g64 asym act-order static-groups mse", "gptq", dict(bits=4, group_size=64, sym=False),
     {"gptq": dict(grid="mse")}),
]
# a representative subset of the README's table, re-run after changes to the method code
SUITES["port-check"] = [r for r in SUITES["rtn"] + SUITES["compare-gptq"] + SUITES["compare-gptq-mse"]
                        + SUITES["compare-awq-sq"]
                        if r[0] in ("rtn int4 g128 asym", "gptq int4 g128 asym act-order",
                                    "gptq int3 g128 asym act-order mse", "smoothquant w8a8 dynamic a0.5")]


# The rows of the other suites were measured with GPTQ's earlier defaults (no act-order unless the
# label says so, groups fitted during the sweep, true-sequential): they say so explicitly.
_PINNED = {"static_groups": False, "true_sequential": True}
for _name, _rows in SUITES.items():
    if _name != "compare-llmcompressor":
        SUITES[_name] = [(label, method, {"act_order": False, **kw} if "gptq" in method else kw,
                          dict(opts, gptq={**_PINNED, **opts["gptq"]}) if "gptq" in opts else opts)
                         for label, method, kw, opts in _rows]


def options(scheme_kw: dict, opts: dict) -> dict:
    """One row's keyword arguments for api.quantize_to_folder (scheme fields and method options)."""
    out = dict(scheme_kw)
    for group in opts.values():
        out.update(group)
    return out


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
    ap.add_argument("--eval-chunk", type=int, default=6,
                    help="rows quantized, then evaluated together (held in memory), per pass; results are "
                         "written after every pass")
    ap.add_argument("--peer-venv", type=Path, default=None,
                    help="llm-compressor's virtual environment (default: ~/.cache/compress/peers/llmcompressor)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, metavar="RESULTS.json",
                    help="print one Markdown table of earlier results files (rows merged, with the reference "
                         "perplexities) and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(merged_table(args.table))
        return
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

    info = run_info("bench/ptq.py", argv)
    rows, base_res = [], None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        peers = [r for r in suite if r[1] == PEER]
        if peers:
            calib_windows = calibration_windows(base.tokenizer, calib, data_dir(args.data_dir))
            rows += [peer_row(row, args, calib_windows, wins, work) for row in peers]
        ours = [r for r in suite if r[1] != PEER]
        chunk = max(1, args.eval_chunk)
        for start in range(0, len(ours), chunk):
            part = [quantize_row(row, args, calib, work) for row in ours[start:start + chunk]]
            variants = {}
            for r in part:
                loaded = models.load(r.pop("_path"))
                variants[r["label"]] = loaded.model
                r["bits_per_weight"] = api.weight_stats(loaded.model)["bits_per_weight"]
            res = evaluate_many(variants, wins, base.model)
            base_res = base_res or res["__base__"]
            del variants
            for r in part:
                p = res[r["label"]]
                r.update(ppl=p.ppl, kld=p.kld, kld_max=p.kld_max, top1=p.top1, eval_seconds=p.seconds)
            rows += part
            data = _result(args, base_res, rows, finish(info))
            if args.out:      # after every pass, so a long run keeps what it has measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))


def quantize_row(row, args, calib: CalibSpec, work: Path) -> dict:
    """Quantize one suite row into ``work``: the row's record, with its path."""
    label, method, kw, opts = row
    kwargs = options(kw, opts)
    calibrated = get_method(method).calibrated
    if calibrated:
        kwargs.update(calib=calib, data_dir=data_dir(args.data_dir))
    out = work / label.replace(" ", "_").replace("+", "-")
    load = os.getloadavg()
    t0 = time.perf_counter()
    rep = api.quantize_to_folder(args.model, out, method, progress=False, **kwargs)
    wall = time.perf_counter() - t0
    rec = {"label": label, "method": method, "scheme": kw, "options": opts,
           "calibration": calib.to_dict() if calibrated else None,
           "quantize_seconds": rep["compress_seconds"], "wall_seconds": round(wall, 3),
           "load_average": [round(x, 2) for x in (*load, *os.getloadavg())],
           "fallbacks": len(rep.get("fallbacks") or {}),
           "size_bytes": (out / "model.safetensors").stat().st_size}
    print(f"quantized {label} in {rep['compress_seconds']:.1f} s", file=sys.stderr, flush=True)
    return dict(rec, _path=str(out))


def peer_row(row, args, calib_windows, eval_windows, work: Path) -> dict:
    """llm-compressor's GPTQ on the same calibration windows, evaluated on the same windows in its
    own environment (perplexity only: its model is not loaded here)."""
    from bench.peers.llmcompressor import run_llmcompressor, write_windows
    label, _, kw, opts = row
    wpath = write_windows(work / "peer-windows.safetensors", calib_windows, eval_windows)
    folder = models.load(args.model).path
    load = os.getloadavg()
    res = run_llmcompressor(args.peer_venv, folder, wpath, work / "peer.json", threads=torch.get_num_threads(),
                                 eval_base=False, **options(kw, opts))
    print(f"{label}: {res['seconds_quantize']:.1f} s, ppl {res['ppl']:.3f}", file=sys.stderr, flush=True)
    return {"label": label, "method": PEER, "scheme": kw, "options": opts,
            "calibration": args_calib(args), "quantize_seconds": res["seconds_quantize"],
            "load_average": [round(x, 2) for x in (*load, *os.getloadavg())],
            "ppl": res["ppl"], "kld": None, "top1": None, "bits_per_weight": None, "peer": res}


def args_calib(args) -> dict:
    return CalibSpec("wikitext2", args.nsamples, args.seqlen, args.seed).to_dict()


def _result(args, b, rows: list, info: dict) -> dict:
    return {
        "model": args.model, "protocol": args.protocol, "windows": b.windows, "tokens": b.tokens,
        "base": {"label": "fp32", "ppl": b.ppl, "eval_seconds": b.seconds},
        "rows": rows, "machine": platform.machine(), **info,
    }


def _order(r: dict):
    sc = r["scheme"]
    method_rank = {"rtn": 0, "gptq": 1, "awq": 2, "awq+gptq": 3, "smoothquant": 4, PEER: 5}[r["method"]]
    if r["method"] == "smoothquant":
        return (1, 0, 0, 0, method_rank, r["label"])
    return (0, -sc["bits"], sc["group_size"] != -1, sc["group_size"], method_rank, r["label"])


def merged_table(paths) -> str:
    """The rows of several results files (same model and protocol) in one table, by setting."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    ref = files[0]
    for f in files[1:]:
        if (f["model"], f["protocol"], f["windows"]) != (ref["model"], ref["protocol"], ref["windows"]):
            raise SystemExit(f"results files disagree on model/protocol/windows: {paths}")
    return table(files, f"; from {', '.join(Path(p).name for p in paths)}")


def table(files, source: str = "") -> str:
    """Markdown table of one results dict or several (rows merged by label), with the reference
    perplexities, ordered by setting."""
    files = [files] if isinstance(files, dict) else files
    ref = files[0]
    rows = {}
    for f in files:
        for r in f["rows"]:
            rows.setdefault(r["label"], r)
    # the reference numbers are for the whole wt2-quick protocol only
    refs = REFERENCE_PPL if (ref["protocol"], ref["windows"]) == ("wt2-quick", 64) else {}
    lines = [f"{ref['model']}, {ref['protocol']} ({ref['windows']} windows, {ref['tokens']} tokens){source}", "",
             "| setting | ppl | reference ppl | KLD | top-1 agree | bits/weight | quantize s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| fp32 | {ref['base']['ppl']:.2f} | {'29.93' if refs else ''} | | | 32 | |"]
    for r in sorted(rows.values(), key=_order):
        want = refs.get(r["label"])
        kld = "" if r.get("kld") is None else f"{r['kld']:.4f}"
        top1 = "" if r.get("top1") is None else f"{100 * r['top1']:.1f}%"
        bpw = "" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.3f}"
        lines.append(f"| {r['label']} | {r['ppl']:,.2f} | {'' if want is None else f'{want:,.2f}'} | {kld} | "
                     f"{top1} | {bpw} | {r['quantize_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

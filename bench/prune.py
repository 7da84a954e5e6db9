"""Pruning on a real model: perplexity, time and file size of our pruning methods, side by side with
llm-compressor's (its SparseGPTModifier, WandaPruningModifier and MagnitudePruningModifier, in its own
virtual environment: ``bench/peers/setup.sh llmcompressor``) on the same calibration and evaluation
windows, in the same run; and structured pruning with both importance measures, with the CPU
prefill and decode speed of the smaller model against the unpruned one (measured alternately).

    python bench/prune.py --suite compare --max-windows 16 --out bench/results/prune-compare-smollm2.json
    python bench/prune.py --suite quality --max-windows 16 --out bench/results/prune-quality-smollm2.json
    python bench/prune.py --suite quality --max-windows 16 --only "dense float16" --only "50% (float16)" \
        --only "+lm_head" --out bench/results/prune-lm-head-smollm2.json
    python bench/prune.py --suite structured --max-windows 16 --out bench/results/prune-structured-smollm2.json
    python bench/prune.py --table bench/results/prune-*.json

Every row is a recipe run through the same code as ``compress prune``/``compress run`` (calibration:
``--nsamples`` windows of ``--seqlen`` tokens of WikiText-2 validation, ``--seed``); its output is
loaded back and evaluated against the unpruned model on the first ``--max-windows`` windows of the
protocol. ``prune_seconds`` is the step's wall time (calibration and solve), for the peer the
``oneshot`` call. File sizes are those of the written ``model.safetensors``. Every results file
records the exact command, package version, thread count, CPU and load average (bench/runinfo.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib.data import CalibSpec, calibration_windows  # noqa: E402
from compress import models, session  # noqa: E402
from compress.recipe import Recipe  # noqa: E402
from evals.data import PROTOCOLS, data_dir, read_text  # noqa: E402
from evals.perplexity import evaluate_many, tokenize, windows  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from runinfo import finish, run_info  # noqa: E402

PEER = "llm-compressor"
STRUCT = dict(heads=0.25, mlp=0.25, layers=2)

# (label, steps): each step a recipe step; a step {"peer": ...} runs llm-compressor's modifier
SUITES = {
    "compare": [
        (f"{who} {m} {what}", [({"peer": m} if who == PEER else {"method": m}) | opt])
        for what, opt in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}))
        for m in ("magnitude", "wanda", "sparsegpt") for who in ("ours", PEER)
        if not (who == PEER and m == "magnitude" and "pattern" in opt)    # it has no N:M magnitude mask
    ],
    "quality": [
        ("dense float16 (no pruning)", []),
        ("rtn int4 g128 asym (dense)", [{"method": "rtn", "bits": 4, "group_size": 128}]),
        ("sparsegpt 50% then rtn int4 g128", [{"method": "sparsegpt", "sparsity": 0.5},
                                              {"method": "rtn", "bits": 4, "group_size": 128}]),
        ("sparsegpt 50% + int4 g128 joint", [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 128}]),
        ("sparsegpt 2:4 + int4 g128 joint", [{"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 128}]),
        ("sparsegpt 50% (float16)", [{"method": "sparsegpt", "sparsity": 0.5}]),
        ("sparsegpt 50% +lm_head (float16)", [{"method": "sparsegpt", "sparsity": 0.5, "lm_head": True}]),
        ("wanda 50% +lm_head (float16)", [{"method": "wanda", "sparsity": 0.5, "lm_head": True}]),
    ] + [(f"{m} {int(100 * s)}% {p}", [{"method": m, "sparsity": s, "profile": p}])
         for s in (0.6, 0.7) for m in ("wanda", "sparsegpt") for p in ("uniform", "owl")],
    "structured": [
        (f"structured heads 0.25 mlp 0.25 layers 2 ({imp})", [{"method": "structured", "importance": imp, **STRUCT}])
        for imp in ("activation", "gradient")
    ],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--suite", choices=sorted(SUITES), default="compare")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="wt2-quick")
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", default=None, help="keep rows whose label contains this text")
    ap.add_argument("--speed-tokens", type=int, default=64, help="structured: tokens decoded for the speed test")
    ap.add_argument("--peer-venv", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, metavar="RESULTS.json")
    args = ap.parse_args(argv)
    if args.table:
        print("\n\n".join(table(json.loads(Path(p).read_text())) for p in args.table))
        return
    torch.manual_seed(0)
    suite = [r for r in SUITES[args.suite] if not args.only or any(o in r[0] for o in args.only)]
    calib = CalibSpec("wikitext2", args.nsamples, args.seqlen, args.seed)
    proto = PROTOCOLS[args.protocol]
    base = models.load(args.model)
    wins = windows(tokenize(base.tokenizer, read_text(data_dir(args.data_dir) / proto.file)), proto.seqlen,
                   args.max_windows)
    info = run_info("bench/prune.py", argv)
    base_res = evaluate_many({}, wins, base.model, progress=False)["__base__"]
    data = {"model": args.model, "protocol": args.protocol, "windows": int(wins.shape[0]),
            "tokens": base_res.tokens, "suite": args.suite, "calibration": calib.to_dict(),
            "base": {"ppl": base_res.ppl, "eval_seconds": base_res.seconds}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, steps in suite:
            if steps and "peer" in steps[0]:
                cw = calibration_windows(base.tokenizer, calib, data_dir(args.data_dir))
                row = peer_row(label, steps[0], args, cw, wins, work)
            else:
                row = our_row(label, steps, args, calib, work, base)
                loaded = models.load(row.pop("_path"))
                p = evaluate_many({label: loaded.model}, wins, base.model, progress=False)[label]
                row.update(ppl=p.ppl, kld=p.kld, top1=p.top1, eval_seconds=p.seconds)
                if args.suite == "structured":
                    row["base_speed"], row["speed"] = speeds(base.model, loaded.model, args.speed_tokens)
                del loaded
            data["rows"].append(row)
            print(f"{label}: ppl {row['ppl']:.3f}, {row['prune_seconds']:.1f} s", file=sys.stderr, flush=True)
            if args.out:          # after every row, so a long run keeps what it has measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({**data, **finish(info)}, indent=2) + "\n")
    data.update(finish(info))
    print(table(data))


def our_row(label, steps, args, calib: CalibSpec, work: Path, base) -> dict:
    out = work / f"row{len(list(work.iterdir()))}"
    load = os.getloadavg()
    t0 = time.perf_counter()
    if steps:
        from compress.registry import get
        calibrated = any(get(st["method"]).calibrated for st in steps)
        recipe = Recipe.from_dict({"calibration": calib.to_dict() if calibrated else {}, "steps": steps})
        rep = session.run(recipe, args.model, out, args.data_dir, progress=False)
        seconds = rep["compress_seconds"]
        extra = rep["output"].get("structured")
    else:                                           # the dense float16 file the others are measured against
        from compress.checkpoint import save_dense
        save_dense(base, out, "float16", {})
        seconds, extra = 0.0, None
    row = {"label": label, "steps": steps, "prune_seconds": round(seconds, 3),
           "wall_seconds": round(time.perf_counter() - t0, 3),
           "load_average": [round(x, 2) for x in (*load, *os.getloadavg())],
           "size_bytes": (out / "model.safetensors").stat().st_size, "_path": str(out)}
    if extra:
        row["structured"] = {k: extra[k] for k in ("widths_after", "parameters_before", "parameters_after",
                                                   "removed_layers")}
    return row


def peer_row(label, step, args, calib_windows, eval_windows, work: Path) -> dict:
    from bench.peers.llmcompressor import run_llmcompressor, write_windows
    wpath = write_windows(work / "peer-windows.safetensors", calib_windows, eval_windows)
    load = os.getloadavg()
    opts = {"sparsity": step.get("sparsity"), "pattern": step.get("pattern")}
    res = run_llmcompressor(args.peer_venv, models.load(args.model).path, wpath, work / "peer.json",
                            modifier=step["peer"], threads=torch.get_num_threads(), eval_base=False, **opts)
    return {"label": label, "steps": [step], "peer": res, "prune_seconds": res["seconds_quantize"],
            "load_average": [round(x, 2) for x in (*load, *os.getloadavg())], "ppl": res["ppl"],
            "sparsity_measured": res.get("sparsity_check")}


@torch.no_grad()
def speeds(base, pruned, new_tokens: int, prompt_tokens: int = 512, repeats: int = 3) -> tuple[dict, dict]:
    """Prefill tokens/s (one ``prompt_tokens`` forward pass) and decode tokens/s (``new_tokens``
    greedy steps through the KV cache) of ``base`` and ``pruned`` on the CPU in float32, measured
    alternately (base, pruned, base, ...) so that both see the same machine load; the median of
    ``repeats`` each."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, prompt_tokens), generator=g)
    runs = {0: ([], []), 1: ([], [])}
    for _ in range(repeats):
        for which, model in enumerate((base, pruned)):
            pre, dec = runs[which]
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            pre.append(prompt_tokens / (time.perf_counter() - t0))
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            dec.append(new_tokens / (time.perf_counter() - t0))

    def summary(which, model):
        pre, dec = runs[which]
        return {"prefill_tokens_per_s": sorted(pre)[len(pre) // 2], "decode_tokens_per_s": sorted(dec)[len(dec) // 2],
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                "parameters": sum(p.numel() for p in model.parameters())}
    return summary(0, base), summary(1, pruned)


def table(data: dict) -> str:
    base = data.get("base") or {}
    lines = [f"{data['model']}, {data['protocol']} (first {data['windows']} windows, {data['tokens']} tokens), "
             f"calibration {data['calibration']['nsamples']} x {data['calibration']['seqlen']}, "
             f"{data['threads']} threads; unpruned ppl {base.get('ppl', float('nan')):.2f}", ""]
    if data["suite"] == "structured":
        lines += ["| setting | parameters | ppl | prune s | prefill tok/s (unpruned) | decode tok/s (unpruned) | "
                  "prefill speed-up | decode speed-up |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in data["rows"]:
            s, b = r["speed"], r["base_speed"]
            lines.append(f"| {r['label']} | {b['parameters'] / 1e6:.1f}M -> {s['parameters'] / 1e6:.1f}M | {r['ppl']:.2f} | "
                         f"{r['prune_seconds']:.1f} | {s['prefill_tokens_per_s']:.0f} ({b['prefill_tokens_per_s']:.0f}) | "
                         f"{s['decode_tokens_per_s']:.1f} ({b['decode_tokens_per_s']:.1f}) | "
                         f"{s['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x | "
                         f"{s['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x |")
        return "\n".join(lines)
    lines += ["| setting | ppl | KLD | prune s | file MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        kld = "" if r.get("kld") is None else f"{r['kld']:.4f}"
        size = "" if r.get("size_bytes") is None else f"{r['size_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['label']} | {r['ppl']:,.2f} | {kld} | {r['prune_seconds']:.1f} | {size} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

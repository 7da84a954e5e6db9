"""Training on a real model: quantization-aware training against post-training quantization, and
distillation healing a structured-pruned model.

    python bench/train.py --suite qat --out bench/results/train-qat-smollm2.json
    python bench/train.py --suite qat-kquant --nsamples 64 --out bench/results/train-qat-kquant-smollm2.json
    python bench/train.py --suite distill --out bench/results/train-distill-smollm2.json
    python bench/train.py --table bench/results/train-*.json

``qat``: round-to-nearest, GPTQ with the MSE grid, ``compress qat`` block-wise from GPTQ's solution,
and GPTQ's solution followed by end-to-end training of the scales, at 3-bit g128 and 2-bit g64 asymmetric; each row records its training
steps, the tokens it trained on and its wall time. ``qat-kquant``: the same on the GGML grids of
llama.cpp type mixes (``Q2_K``, ``Q3_K_M``): GPTQ on those grids, then QAT from its solution into a GGUF
file. ``distill``: the pruning issue's structured
setting (25% of heads, 25% of MLP channels, 2 blocks, activation importance), then ``compress
distill`` with the unpruned model as the teacher (white-box, forward KL; with ``--black-box`` also
black-box on as many teacher-generated sequences as there are training windows) for ``--kd-steps``; the
decode speed of the pruned model against the unpruned one (both float32, measured alternately) is
the same after distillation (the shapes do not change) and is measured once.

Every model is evaluated on the first ``--max-windows`` windows of the protocol against the unpruned,
unquantized model (KL divergence, top-1 agreement). Training text: WikiText-2 validation
(calibration windows drawn with ``--seed``); the evaluation text is the test split. Every results
file records the exact command, package version, thread count, CPU and load average
(bench/runinfo.py), and is rewritten after every row.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import models, session  # noqa: E402
from compress.recipe import Recipe  # noqa: E402
from evals.data import PROTOCOLS, data_dir, read_text  # noqa: E402
from evals.perplexity import evaluate_many, tokenize, windows  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from prune import STRUCT, speeds  # noqa: E402
from runinfo import finish, run_info  # noqa: E402

GRIDS = (("3-bit g128", {"bits": 3, "group_size": 128}), ("2-bit g64", {"bits": 2, "group_size": 64}))


def qat_rows(args) -> list[tuple[str, dict]]:
    """Per grid: round-to-nearest; GPTQ with the MSE grid (QAT's start); block-wise reconstruction
    from GPTQ's solution; GPTQ's solution then end-to-end training of the scales (``--e2e-steps``)."""
    rows = []
    for name, grid in GRIDS:
        rows.append((f"rtn {name}", {"method": "rtn", **grid}))
        rows.append((f"gptq-mse {name} (where qat starts)", {"method": "gptq", **grid, "grid": "mse"}))
        qat = {"method": "qat", **grid, "block_epochs": args.block_epochs, "block_lr": args.block_lr,
               "scale_lr": args.scale_lr, "batch": args.batch}
        rows.append((f"qat {name} block-wise ({args.block_epochs} epochs)", {**qat, "e2e_steps": 0}))
        if args.e2e_steps:
            rows.append((f"qat {name} gptq + e2e {args.e2e_steps} steps",
                         {**qat, "blockwise": False, "e2e_steps": args.e2e_steps, "e2e_lr": args.e2e_lr}))
    return rows


MIXES = ("Q2_K", "Q3_K_M")


def qat_kquant_rows(args) -> list[tuple[str, dict]]:
    """Per llama.cpp type mix: GPTQ on its grids (kquant-gptq, where QAT starts), then QAT on the same
    grids from that solution: end-to-end training of the sub-block scales and mins (``--e2e-steps``),
    on next-token cross-entropy and on the fp32 model's distribution (``teacher``)."""
    rows = []
    for mix in MIXES:
        rows.append((f"kquant-gptq {mix} (where qat starts)", {"method": "kquant-gptq", "type": mix}))
        if args.e2e_steps:
            rows.append((f"qat-kquant {mix} gptq + e2e {args.e2e_steps} steps",
                         {"method": "qat-kquant", "type": mix, "blockwise": False, "e2e_steps": args.e2e_steps,
                          "e2e_lr": args.e2e_lr, "batch": args.batch}))
            rows.append((f"qat-kquant {mix} gptq + e2e {args.e2e_steps} steps, teacher fp32",
                         {"method": "qat-kquant", "type": mix, "blockwise": False, "e2e_steps": args.e2e_steps,
                          "e2e_lr": args.e2e_lr, "batch": args.batch, "teacher": args.model}))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--suite", choices=("qat", "qat-kquant", "distill", "lora"), default="qat")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="wt2-quick")
    ap.add_argument("--max-windows", type=int, default=None, help="default: the whole protocol")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block-epochs", type=int, default=1)
    ap.add_argument("--block-lr", type=float, default=1e-5)
    ap.add_argument("--scale-lr", type=float, default=1e-5)
    ap.add_argument("--e2e-steps", type=int, default=40)
    ap.add_argument("--e2e-lr", type=float, default=1e-4)
    ap.add_argument("--kd-steps", type=int, default=200)
    ap.add_argument("--kd-lr", type=float, default=5e-5)
    ap.add_argument("--kd-batch", type=int, default=8)
    ap.add_argument("--black-box", action="store_true", help="distill: also black-box, same steps and tokens")
    ap.add_argument("--exports", action="store_true",
                    help="qat: also export every QAT checkpoint to ONNX (accuracy level 0) and GGUF and evaluate both")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-steps", type=int, default=40)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    ap.add_argument("--only", action="append", default=None, help="keep rows whose label contains this text")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, metavar="RESULTS.json")
    args = ap.parse_args(argv)
    if args.table:
        print("\n\n".join(table(json.loads(Path(p).read_text())) for p in args.table))
        return
    torch.manual_seed(0)
    proto = PROTOCOLS[args.protocol]
    base = models.load(args.model)
    wins = windows(tokenize(base.tokenizer, read_text(data_dir(args.data_dir) / proto.file)), proto.seqlen,
                   args.max_windows or proto.max_windows)
    info = run_info("bench/train.py", argv)
    base_res = evaluate_many({}, wins, base.model, progress=False)["__base__"]
    calib = {"source": "wikitext2", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
    data = {"model": args.model, "protocol": args.protocol, "windows": int(wins.shape[0]), "tokens": base_res.tokens,
            "suite": args.suite, "calibration": calib, "base": {"ppl": base_res.ppl}, "rows": []}

    def save():
        """Rewrite the results file (after every row, and when a recorded row grows)."""
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**data, **finish(info)}, indent=2) + "\n")

    def record(row, path=None, model=None):
        """Evaluate the model in ``path`` (or ``model``), append ``row``, save; returns the model."""
        model = models.load(str(path)).model if model is None else model
        p = evaluate_many({row["label"]: model}, wins, base.model, progress=False)[row["label"]]
        row.update(ppl=p.ppl, kld=p.kld, top1=p.top1)
        data["rows"].append(row)
        print(f"{row['label']}: ppl {p.ppl:.3f}, {row['seconds']:.0f} s", file=sys.stderr, flush=True)
        save()
        return model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.suite in ("qat", "qat-kquant"):
            for label, step in (qat_rows if args.suite == "qat" else qat_kquant_rows)(args):
                if args.only and not any(o in label for o in args.only):
                    continue
                out = work / (label.replace(" ", "_") + (".gguf" if "kquant" in step["method"] else ""))
                rep, seconds = _compress(step, calib, args, out)
                row = {"label": label, "step": step, "seconds": seconds, **_qat_counts(rep, args)}
                if out.suffix == ".gguf":
                    row["output"] = {k: v for k, v in (rep.get("output") or {}).items() if k != "out"}
                record(row, out)
                if args.exports and step["method"] == "qat":
                    row["exports"] = _exports(out, wins, base.model)
                    save()
        elif args.suite == "lora":
            _lora_suite(args, calib, work, record)
        else:
            pruned = work / "structured"
            rep, seconds = _compress({"method": "structured", "importance": "activation", **STRUCT}, calib, args, pruned)
            small = record({"label": "structured " + ", ".join(f"{k} {v}" for k, v in STRUCT.items()),
                            "seconds": seconds, "structured": rep["output"].get("structured")}, pruned)
            data["base_speed"], data["pruned_speed"] = speeds(base.model, small, 64)
            del small
            from compress.distill import DistillOptions, distill
            from compress.train.loop import TrainSpec
            spec = TrainSpec(steps=args.kd_steps, lr=args.kd_lr, batch=args.kd_batch, seed=args.seed)
            opts = DistillOptions(nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=0)
            t0 = time.perf_counter()
            res = distill(args.model, str(pruned), work / "distilled", spec, opts, args.data_dir, progress=False)
            record({"label": f"structured + white-box distillation ({args.kd_steps} steps)",
                    "seconds": time.perf_counter() - t0, "steps": spec.steps, "tokens": res["tokens"],
                    "loss_first": res["loss_first"], "loss_last": res["loss_last"]}, work / "distilled")
            if args.black_box:        # the same steps and tokens, on text the teacher generated
                bb = DistillOptions(nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=0, generate=args.nsamples)
                t0 = time.perf_counter()
                res = distill(args.model, str(pruned), work / "black-box", spec, bb, args.data_dir, progress=False)
                record({"label": f"structured + black-box distillation ({args.kd_steps} steps, {args.nsamples} "
                                 "generated sequences)", "seconds": time.perf_counter() - t0, "steps": spec.steps,
                        "tokens": res["tokens"], "loss_first": res["loss_first"], "loss_last": res["loss_last"]},
                       work / "black-box")
    data.update(finish(info))
    print(table(data))


def _compress(step: dict, calib: dict, args, out: Path) -> tuple[dict, float]:
    from compress.registry import get
    recipe = Recipe.from_dict({"calibration": calib if get(step["method"]).calibrated else {}, "steps": [step]})
    t0 = time.perf_counter()
    rep = session.run(recipe, args.model, out, args.data_dir, progress=False)
    return rep, time.perf_counter() - t0


def _exports(ckpt: Path, wins, base) -> dict:
    """Perplexity of ``ckpt`` exported to ONNX (MatMulNBits, accuracy level 0, run by ONNX Runtime) and
    to GGUF (its integers mapped onto GGML blocks, read back by transformers' GGUF loader), both in
    one pass over the windows."""
    from compress.api import export_gguf
    from compress.export.onnx import export_onnx
    from compress.runtime_onnx import OnnxCausalLM
    onnx_dir, gguf_file = ckpt.with_name(ckpt.name + "-onnx"), ckpt.with_name(ckpt.name + ".gguf")
    export_onnx(str(ckpt), onnx_dir, accuracy_level=0, kv_cache=False)
    g = export_gguf(str(ckpt), gguf_file, progress=False)
    res = evaluate_many({"onnx": OnnxCausalLM(onnx_dir), "gguf": models.load(str(gguf_file)).model}, wins, base,
                        progress=False)
    out = {"onnx": {"ppl": res["onnx"].ppl, "kld": res["onnx"].kld, "top1": res["onnx"].top1, "accuracy_level": 0},
           "gguf": {"ppl": res["gguf"].ppl, "kld": res["gguf"].kld, "top1": res["gguf"].top1,
                    "mapping": g.get("mapping")}}
    print(f"  exports: onnx ppl {out['onnx']['ppl']:.3f}, gguf ppl {out['gguf']['ppl']:.3f}", file=sys.stderr,
          flush=True)
    return out


def _lora_suite(args, calib: dict, work: Path, record) -> None:
    """GPTQ with the MSE grid at 3-bit g128 (the packed start), then ``compress lora`` on it for
    ``--lora-steps``: the adapter applied to the frozen checkpoint, and merged and re-quantized."""
    from compress.train import lora
    from compress.train.loop import TrainSpec
    from calib.data import CalibSpec
    start = work / "gptq"
    step = {"method": "gptq", **GRIDS[0][1], "grid": "mse"}
    rep, seconds = _compress(step, calib, args, start)
    record({"label": f"gptq-mse {GRIDS[0][0]} (where lora starts)", "step": step, "seconds": seconds}, start)
    spec = TrainSpec(steps=args.lora_steps, lr=args.lora_lr, batch=args.batch, seed=args.seed)
    cs = CalibSpec("wikitext2", args.nsamples, args.seqlen, args.seed)
    opts = lora.LoRAOptions(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    t0 = time.perf_counter()
    res = lora.run(str(start), work / "adapter", spec, opts, cs, eval_windows=0, data_dir=args.data_dir,
                   progress=False)
    label = f"gptq-mse {GRIDS[0][0]} + lora r{args.lora_rank} {args.lora_steps} steps"
    row = {"label": label + " (adapter)", "seconds": time.perf_counter() - t0, "steps": res["steps"],
           "tokens": res["tokens"], "loss_first": res["loss_first"], "loss_last": res["loss_last"],
           "output": res["output"]}
    loaded = models.load(str(start))
    layers = lora.load_adapter(loaded.model, work / "adapter")
    record(row, model=loaded.model.eval())
    t0 = time.perf_counter()               # the same adapter merged and re-quantized on the checkpoint's grid
    merged = lora.save_merged(loaded, layers, work / "merged", {"method": "lora", "from": "the adapter above"})
    record({"label": label + " merged, re-quantized", "seconds": time.perf_counter() - t0, "output": merged},
           work / "merged")


def _qat_counts(rep: dict, args) -> dict:
    """Optimizer steps and tokens of a QAT row (block-wise: per block, tokens through one block)."""
    extra = rep["steps"][0].get("extra") or {}
    blocks = extra.get("qat_blocks") or {}
    e2e = extra.get("qat_e2e") or {}
    block_steps = sum(b["steps"] for b in blocks.values())
    out = {"block_steps": block_steps, "block_tokens": block_steps * args.batch * args.seqlen,
           "e2e_steps": e2e.get("steps", 0), "e2e_tokens": e2e.get("steps", 0) * args.batch * args.seqlen}
    if blocks:
        out["block_mse"] = {k: [b["mse_init"], b["mse_trained"]] for k, b in blocks.items()}
    if e2e:
        out["e2e_loss"] = [e2e["loss_first"], e2e["loss_last"]]
    return out


def table(data: dict) -> str:
    lines = [f"{data['model']}, {data['protocol']} (first {data['windows']} windows, {data['tokens']} tokens), "
             f"training windows {data['calibration']['nsamples']} x {data['calibration']['seqlen']} of WikiText-2 "
             f"validation, {data['threads']} threads ({data['cpu']}); unquantized ppl {data['base']['ppl']:.2f}", "",
             "| setting | ppl | KLD | top-1 | steps | tokens | wall s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        if "block_steps" in r:
            steps = f"{r['block_steps']} + {r['e2e_steps']}" if r["e2e_steps"] else f"{r['block_steps']}"
            tokens = f"{r['block_tokens']:,} + {r['e2e_tokens']:,}" if r["e2e_steps"] else f"{r['block_tokens']:,}"
        else:
            steps, tokens = str(r.get("steps", "")), f"{r['tokens']:,}" if r.get("tokens") else ""
        lines.append(f"| {r['label']} | {r['ppl']:,.2f} | {r['kld']:.4f} | {100 * r['top1']:.1f}% | {steps} | {tokens} | "
                     f"{r['seconds']:.0f} |")
    for r in data["rows"]:
        if r.get("exports"):
            o, g = r["exports"]["onnx"], r["exports"]["gguf"]
            lines += ["", f"{r['label']}, exported: ONNX (MatMulNBits, accuracy level 0, ONNX Runtime) ppl "
                          f"{o['ppl']:.3f} ({100 * (o['ppl'] / r['ppl'] - 1):+.3f}%), GGUF (read by transformers) ppl "
                          f"{g['ppl']:.3f} ({100 * (g['ppl'] / r['ppl'] - 1):+.3f}%) against {r['ppl']:.3f} in torch"]
    if data.get("pruned_speed"):
        b, s = data["base_speed"], data["pruned_speed"]
        lines += ["", f"decode {s['decode_tokens_per_s']:.1f} tok/s against {b['decode_tokens_per_s']:.1f} unpruned "
                      f"({s['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x), prefill "
                      f"{s['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x (float32, measured alternately)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

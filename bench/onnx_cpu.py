"""ONNX Runtime on CPU: prefill time, decode speed, file size and parity of exported models.

Quantizes the model with round-to-nearest and, for a checkpoint that is 4-bit throughout, with
GPTQ and ``--lm-head`` (through the API the CLI uses), exports ONNX variants (fp32, 4-bit g128 at
accuracy levels 0 and 4, with and without a quantized lm_head, the qdq format, 8-bit g128) and
measures them side by side with torch fp32 eager in one run, at batch 1 on ``--threads`` threads;
``--genai`` variants are also timed through ONNX Runtime GenAI's own generator on the same folder. Timings are interleaved (every variant once per round, ``--rounds`` rounds,
median reported) because the CPU is shared. Also measures perplexity on a few wt2-quick windows for
each ONNX model next to the torch model of the same checkpoint, and the KL divergence between them.
Every run quantizes and exports afresh (nothing is reused from an earlier run) and the results file
records the run (bench/runinfo.py: command, versions, threads, CPU, load average at start and end).
Writes a JSON results file and prints a Markdown table.

    python bench/onnx_cpu.py --out bench/results/onnx-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib.data import CalibSpec  # noqa: E402
from compress import api, models  # noqa: E402
from compress.export.onnx import export_onnx, file_sizes  # noqa: E402
from compress.runtime_onnx import OnnxCausalLM  # noqa: E402
from evals.data import PROTOCOLS, data_dir, read_text  # noqa: E402
from evals.perplexity import evaluate_many, tokenize, windows  # noqa: E402
from runinfo import finish, run_info  # noqa: E402  (bench/ is on sys.path: this script's folder)
import genai_builder  # noqa: E402
from onnx_kernels import kernel_bench, kernel_table  # noqa: E402
from onnx_memory import peak_rss_mib  # noqa: E402

# name -> (registered method, api.quantize_to_folder keyword options: the method's own options,
# lm_head, calib for a calibrated method); None: the unquantized model
CHECKPOINTS = {
    "fp32": None,
    "int4-g128": ("rtn", {"bits": 4, "group_size": 128, "sym": False}),
    "int8-g128": ("rtn", {"bits": 8, "group_size": 128, "sym": True}),
    # the settings ONNX Runtime GenAI's model builder uses by default for the CPU (symmetric blocks of 32)
    "int4-g32-sym": ("rtn", {"bits": 4, "group_size": 32, "sym": True}),
    # everything 4-bit in the checkpoint: GPTQ (act-order with static groups, so g_idx stays in natural
    # order and the export needs no column gathers) on every linear and on the lm_head (--lm-head)
    "gptq-int4-g128-head": ("gptq", {"bits": 4, "group_size": 128, "sym": False, "act_order": True,
                                     "static_groups": True, "grid": "mse", "lm_head": True,
                                     "calib": CalibSpec("wikitext2", 32, 512, 0)}),
}
# (label, checkpoint, export kwargs)
VARIANTS = [
    ("onnx fp32", "fp32", dict(fmt="matmulnbits")),
    ("onnx int4 g128 acc0", "int4-g128", dict(fmt="matmulnbits", accuracy_level=0)),
    ("onnx int4 g128 acc4", "int4-g128", dict(fmt="matmulnbits", accuracy_level=4)),
    # lm_head (tied embedding) quantized at export, 8-bit blocks of 32; its node runs at accuracy level 4
    ("onnx int4 g128 acc0 +lm_head int8", "int4-g128", dict(fmt="matmulnbits", accuracy_level=0, lm_head_bits=8)),
    ("onnx int4 g128 acc4 +lm_head int8", "int4-g128", dict(fmt="matmulnbits", accuracy_level=4, lm_head_bits=8)),
    # everything 4-bit: the lm_head too (4-bit blocks of 32)
    ("onnx int4 g128 acc4 +lm_head int4", "int4-g128", dict(fmt="matmulnbits", accuracy_level=4, lm_head_bits=4)),
    ("onnx int4 g128 qdq", "int4-g128", dict(fmt="qdq")),
    # the prefill target: a 4-bit file whose weights ONNX Runtime expands to fp32 when it loads it
    ("onnx int4 g128 target prefill", "int4-g128", dict(target="prefill")),
    # the checkpoint's own 4-bit lm_head (GPTQ against the final norm's output), exported as it is
    ("onnx int4 g128 gptq+lm_head acc0", "gptq-int4-g128-head", dict(fmt="matmulnbits", accuracy_level=0)),
    ("onnx int4 g128 gptq+lm_head acc4", "gptq-int4-g128-head", dict(fmt="matmulnbits", accuracy_level=4)),
    ("onnx int4 g128 gptq+lm_head target prefill", "gptq-int4-g128-head", dict(target="prefill")),
    # like for like with the builder's defaults: 4-bit symmetric blocks of 32, the lm_head 4-bit, level 4
    ("onnx int4 g32 sym acc4 +lm_head int4", "int4-g32-sym", dict(fmt="matmulnbits", accuracy_level=4, lm_head_bits=4)),
    ("onnx int8 g128 acc0", "int8-g128", dict(fmt="matmulnbits", accuracy_level=0)),
    ("onnx int8 g128 acc4", "int8-g128", dict(fmt="matmulnbits", accuracy_level=4)),
]
TORCH_LABEL = "torch fp32 eager"
GENAI = "genai: "                       # rows timed through ONNX Runtime GenAI's generator


class TorchRunner:
    """torch eager with the Hugging Face KV cache, the same calls as the ORT runner."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, ids):
        out = self.model(input_ids=ids, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    @torch.no_grad()
    def step(self, tok, past):
        out = self.model(input_ids=tok, use_cache=True, past_key_values=past)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values


class OrtRunner:
    """ONNX Runtime with the KV cache updated in place (``OnnxCausalLM.decoder``, what ``generate``
    uses) when the export allows it and ``in_place``; otherwise past in, longer present out."""

    def __init__(self, model: OnnxCausalLM, room: int, in_place: bool = True):
        self.model = model
        self.room = room            # positions kept free after the prompt
        self.in_place = in_place and model.in_place_kv

    def prefill(self, ids):
        if self.in_place:
            dec = self.model.decoder(ids.shape[1] + self.room)
            return torch.from_numpy(dec(ids)[:, -1].argmax(-1)[:, None]), dec
        out = self.model(input_ids=ids, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    def step(self, tok, past):
        if self.in_place:
            return torch.from_numpy(past(tok)[:, -1].argmax(-1)[:, None]), past
        out = self.model(input_ids=tok, use_cache=True, past_key_values=past)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values


class GenaiRunner:
    """ONNX Runtime GenAI's own generator on the same exported folder (its genai_config.json; the
    session's intra-op threads set to ``threads``): prefill is ``append_tokens`` of the prompt,
    each step ``generate_next_token`` (greedy)."""

    def __init__(self, path, threads: int, room: int):
        import onnxruntime_genai as og
        self.og = og
        config = og.Config(str(path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.room = room

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + self.room, do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(ids.numpy().astype(np.int32))
        return None, gen

    def step(self, tok, gen):
        gen.generate_next_token()
        return None, gen


def time_prefill(runner, ids) -> float:
    t0 = time.perf_counter()
    runner.prefill(ids)
    return time.perf_counter() - t0


def time_decode(runner, prompt, n: int) -> float:
    """Tokens per second over ``n`` greedy steps after prefilling ``prompt`` (prefill not timed)."""
    tok, past = runner.prefill(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        tok, past = runner.step(tok, past)
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill timing")
    ap.add_argument("--decode", type=int, default=64, help="tokens generated per decode timing")
    ap.add_argument("--short-prompt", type=int, default=16, help="prompt length before the short-context decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv", choices=["in-place", "concat"], default="in-place",
                    help="ONNX KV cache during decode: one buffer updated in place (GroupQueryAttention exports), "
                         "or past in / longer present out (a copy of the cache per token)")
    ap.add_argument("--ppl-windows", type=int, default=4, help="wt2-quick windows for ORT-vs-torch perplexity")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="write checkpoints and exports here and leave them for inspection (default: a temporary "
                         "folder); every run writes them afresh, nothing there is reused")
    ap.add_argument("--only", default=None, help="comma-separated variant labels or substrings of labels: run only "
                                                 "those variants (a full label matches that variant alone)")
    ap.add_argument("--genai", default="onnx fp32,onnx int4 g128 acc0,onnx int4 g128 acc4,"
                                       "onnx int4 g128 target prefill,onnx int4 g32 sym acc4 +lm_head int4",
                    help="comma-separated variants also timed through ONNX Runtime GenAI's generator "
                         "(onnxruntime-genai; empty: none)")
    ap.add_argument("--builder", default=",".join(v[0] for v in genai_builder.VARIANTS),
                    help="comma-separated ONNX Runtime GenAI model-builder int4 exports of the float model, timed "
                         "through its generator beside ours (bench/genai_builder.py; empty: none)")
    ap.add_argument("--builder-python", default=sys.executable,
                    help="the Python that runs the builder (onnxruntime-genai with the transformers it needs)")
    ap.add_argument("--kernels", action="store_true",
                    help="only time single MatMul / MatMulNBits nodes on SmolLM2's shapes (M=1 and 512) and exit")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)         # ONNX Runtime sessions get the same count
    info = run_info("bench/onnx_cpu.py", sys.argv[1:] if argv is None else list(argv))
    if args.kernels:
        data = kernel_bench(args.threads)
        data.update(finish(info))
        print(kernel_table(data))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
        return
    torch.manual_seed(0)

    proto = PROTOCOLS["wt2-quick"]
    base = models.load(args.model)
    tokens = tokenize(base.tokenizer, read_text(data_dir(args.data_dir) / proto.file))
    wins = windows(tokens, proto.seqlen, args.ppl_windows)
    variants = [v for v in VARIANTS if args.only is None or selected(v[0], args.only)]

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)

    # ---- checkpoints and exports
    loaded = {"fp32": base}
    torch_sizes = {"fp32": sum(f.stat().st_size for f in Path(base.path).glob("*.safetensors"))}
    checkpoints = {}
    for name, spec in CHECKPOINTS.items():
        if spec is None or not any(v[1] == name for v in variants):
            continue
        method, opts = spec
        out = work / name
        t0 = time.perf_counter()
        # always quantized afresh; restart=True discards (never resumes) an interrupted run's work folder
        report = api.quantize_to_folder(args.model, out, method, progress=False, data_dir=args.data_dir,
                                        restart=True, **opts)
        wall = time.perf_counter() - t0
        print(f"quantized {name} in {wall:.1f} s", file=sys.stderr)
        checkpoints[name] = {"method": method,
                             "options": {k: (v.to_dict() if k == "calib" else v) for k, v in opts.items()},
                             "compress_seconds": report["compress_seconds"], "wall_seconds": wall,
                             "fallbacks": report["fallbacks"]}
        loaded[name] = models.load(str(out))
        torch_sizes[name] = (out / "model.safetensors").stat().st_size
    rows = []
    for label, ck, kw in variants:
        out = work / label.replace(" ", "_").replace("+", "")
        ex = export_onnx(loaded[ck], out, kv_cache=True, **kw)
        print(f"exported {label} in {ex['seconds']:.1f} s", file=sys.stderr)
        rows.append({"label": label, "checkpoint": ck, "export": kw, "path": str(out),
                     "files": file_sizes(out), "size_bytes": file_sizes(out)["total"],
                     "lm_head": ex["model"].get("lm_head"), "embedding": ex["model"].get("embedding"),
                     "attention": ex["model"].get("attention")})

    builder = {}                     # label -> build record; built folders are timed through GenAI
    for label, extra in genai_builder.VARIANTS:
        if label not in (args.builder or "").split(",") or (args.only and not selected(label, args.only)):
            continue
        out = work / ("builder_" + str(len(builder)))
        builder[label] = genai_builder.build(args.builder_python, Path(base.path), out, extra, work / "builder_cache")
        builder[label]["path"] = str(out)
        state = (f"in {builder[label]['seconds']:.1f} s" if builder[label]["built"]
                 else f"not built: {builder[label]['error']}")
        print(f"ONNX Runtime GenAI builder: {label} {state}", file=sys.stderr)

    # ---- timing, interleaved
    runners = {r["label"]: OrtRunner(OnnxCausalLM(r["path"], threads=args.threads), args.decode + 1,
                                     args.kv == "in-place") for r in rows}
    for r in rows:
        r["kv_cache"] = "in place" if runners[r["label"]].in_place else "concatenated"
    genai = [r for r in rows if r["label"] in (args.genai or "").split(",")]
    built = {label: b for label, b in builder.items() if b["built"]}
    genai_version = None
    if genai or built:
        import onnxruntime_genai as og
        for r in genai:
            runners[GENAI + r["label"]] = GenaiRunner(r["path"], args.threads, args.decode + 1)
        for label, b in built.items():
            runners[GENAI + label] = GenaiRunner(b["path"], args.threads, args.decode + 1)
        genai_version = og.__version__
    runners[TORCH_LABEL] = TorchRunner(base.model)
    gen = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, base.model.config.vocab_size, (1, args.prefill), generator=gen)
    short_ids = long_ids[:, : args.short_prompt]
    for r in runners.values():       # warm-up (session initialisation, first-call allocations)
        r.prefill(short_ids)
    times = {k: {"prefill_s": [], "decode_short_tok_s": [], "decode_long_tok_s": []} for k in runners}
    for rnd in range(args.rounds):
        for label, runner in runners.items():
            times[label]["prefill_s"].append(time_prefill(runner, long_ids))
            times[label]["decode_short_tok_s"].append(time_decode(runner, short_ids, args.decode))
            times[label]["decode_long_tok_s"].append(time_decode(runner, long_ids, args.decode))
        print(f"timing round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    # ---- peak memory of each ONNX folder in a fresh process, over the same process doing nothing
    baseline = peak_rss_mib(None, args.threads, args.prefill)
    for r in rows:
        r["peak_rss_mib"] = peak_rss_mib(r["path"], args.threads, args.prefill)
        r["model_rss_mib"] = r["peak_rss_mib"] - baseline

    # ---- perplexity: each ONNX model against the torch model of its own checkpoint
    by_ck: dict[str, dict] = {}
    for r in rows:
        by_ck.setdefault(r["checkpoint"], {})[r["label"]] = runners[r["label"]].model
    ppl_torch = {}
    for ck, group in by_ck.items():
        res = evaluate_many(group, wins, loaded[ck].model, progress=False)
        ppl_torch[ck] = res.pop("__base__").ppl
        for r in rows:
            if r["label"] in res:
                x = res[r["label"]]
                r.update(ppl=x.ppl, torch_ppl=ppl_torch[ck], ppl_rel_diff=x.ppl / ppl_torch[ck] - 1,
                         kld_vs_torch=x.kld, kld_max_vs_torch=x.kld_max, top1_vs_torch=x.top1)
    quant_vs_fp32 = {}
    q_models = {ck: loaded[ck].model for ck in by_ck if ck != "fp32"}
    if q_models:
        res = evaluate_many(q_models, wins, base.model, progress=False)
        fp = res.pop("__base__")
        ppl_torch["fp32"] = fp.ppl
        quant_vs_fp32 = {ck: {"ppl": x.ppl, "kld_vs_fp32": x.kld} for ck, x in res.items()}
    builder_ppl = {}                 # the builder quantizes the float model: compared with fp32 torch
    if built:
        res = evaluate_many({label: genai_builder.BuilderModel(Path(b["path"]), args.threads)
                             for label, b in built.items()}, wins, base.model, progress=False)
        ppl_torch["fp32"] = res.pop("__base__").ppl
        builder_ppl = res

    # ---- summary
    fp32_row = next((r for r in rows if r["label"] == "onnx fp32"), None)
    for label in runners:
        med = {k: statistics.median(v) for k, v in times[label].items()}
        med.update({f"best_{k}": (min(v) if k == "prefill_s" else max(v)) for k, v in times[label].items()})
        row = next((r for r in rows if r["label"] == label), None)
        if row is None and label[len(GENAI):] in built:     # the builder's own export, run by GenAI
            b = built[label[len(GENAI):]]
            x = builder_ppl[label[len(GENAI):]]
            files = file_sizes(Path(b["path"]))
            row = {"label": label, "checkpoint": "fp32, quantized by the builder", "size_bytes": files["total"],
                   "runtime": f"onnxruntime-genai {genai_version}", "files": files, "builder": b,
                   "ppl": x.ppl, "torch_ppl": ppl_torch["fp32"], "ppl_rel_diff": x.ppl / ppl_torch["fp32"] - 1,
                   "kld_vs_torch": x.kld, "kld_max_vs_torch": x.kld_max, "top1_vs_torch": x.top1}
            rows.append(row)
        if row is None and label.startswith(GENAI):         # GenAI on an exported folder: its size and ppl
            src = next(r for r in rows if r["label"] == label[len(GENAI):])
            row = {"label": label, "checkpoint": src["checkpoint"], "size_bytes": src["size_bytes"],
                   "runtime": f"onnxruntime-genai {genai_version}", "files": src["files"]}
            rows.append(row)
        if row is None:
            row = {"label": label, "checkpoint": "fp32", "size_bytes": torch_sizes["fp32"],
                   "ppl": ppl_torch.get("fp32"), "files": {"model.safetensors": torch_sizes["fp32"]}}
            rows.append(row)
        row.update(med)
        row["timings"] = times[label]
    if fp32_row is not None:
        for r in rows:
            r["size_vs_onnx_fp32"] = r["size_bytes"] / fp32_row["size_bytes"]
            r["decode_short_speedup"] = r["decode_short_tok_s"] / fp32_row["decode_short_tok_s"]
            r["decode_long_speedup"] = r["decode_long_tok_s"] / fp32_row["decode_long_tok_s"]
            r["prefill_speedup"] = fp32_row["prefill_s"] / r["prefill_s"]
    targets = {}
    if fp32_row is not None:
        for r in rows:
            if r["label"].startswith("onnx int4"):
                targets[r["label"]] = {"decode_short_2.5x": r["decode_short_speedup"] >= 2.5,
                                       "decode_long_2.5x": r["decode_long_speedup"] >= 2.5,
                                       "size_0.3x": r["size_vs_onnx_fp32"] <= 0.3}
    data = {
        "model": args.model, "threads": args.threads, "batch": 1, "prefill_tokens": args.prefill,
        "decode_tokens": args.decode, "short_prompt": args.short_prompt, "rounds": args.rounds, "kv": args.kv,
        "ppl_protocol": f"wt2-quick, first {wins.shape[0]} windows of {proto.seqlen} tokens",
        "ppl_windows": wins.shape[0],
        "rss_baseline_mib": baseline,
        "rows": rows, "quantized_torch_vs_fp32": quant_vs_fp32, "targets": targets, "checkpoints": checkpoints,
        "genai_builder": builder,
        "machine": platform.machine(), "onnxruntime": _ort_version(),
        **finish(info),
    }
    print(table(data))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    if tmp is not None:
        tmp.cleanup()


def selected(label: str, only: str) -> bool:
    """``--only``: a full label selects that label alone, anything else every label containing it."""
    wanted = only.split(",")
    if label in wanted:
        return True
    labels = {v[0] for v in VARIANTS} | {v[0] for v in genai_builder.VARIANTS}
    return any(s in label for s in wanted if s not in labels)


def table(data: dict) -> str:
    flags = ", ".join(data.get("cpu_flags") or []) or "no AVX2"
    lines = [f"{data['model']} on {data['cpu']} ({flags}), {data['threads']} threads, batch 1; prefill {data['prefill_tokens']} "
             f"tokens; decode {data['decode_tokens']} tokens after a {data['short_prompt']}-token / "
             f"{data['prefill_tokens']}-token prompt; median (best) of {data['rounds']} interleaved rounds; "
             f"load average {data['load_average_start'][0]:.1f} -> {data['load_average_end'][0]:.1f}; ONNX KV cache "
             f"{data.get('kv', 'concat')}",
             f"perplexity: {data['ppl_protocol']}; KL(torch || ORT) of the same checkpoint (for the GenAI "
             f"builder's own exports: of the fp32 torch model they are quantized from)",
             "memory: peak resident MiB of a fresh process running one prefill, less the same process without a "
             "model", "",
             "| variant | file MB | x fp32 file | memory MiB | prefill s | decode tok/s (short) | x fp32 "
             "| decode tok/s (512) | x fp32 | ppl | torch ppl | ppl diff | KL vs torch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def f(v, spec):
        return "" if v is None else format(v, spec)
    for r in data["rows"]:
        lines.append(
            f"| {r['label']} | {r['size_bytes'] / 1e6:.1f} | {f(r.get('size_vs_onnx_fp32'), '.3f')} | "
            f"{f(r.get('model_rss_mib'), '.0f')} | "
            f"{r['prefill_s']:.2f} ({r['best_prefill_s']:.2f}) | {r['decode_short_tok_s']:.1f} "
            f"({r['best_decode_short_tok_s']:.1f}) | {f(r.get('decode_short_speedup'), '.2f')} | "
            f"{r['decode_long_tok_s']:.1f} ({r['best_decode_long_tok_s']:.1f}) | {f(r.get('decode_long_speedup'), '.2f')} | "
            f"{f(r.get('ppl'), '.3f')} | "
            f"{f(r.get('torch_ppl'), '.3f')} | {f(100 * r['ppl_rel_diff'] if 'ppl_rel_diff' in r else None, '+.3f')}"
            f"{'%' if 'ppl_rel_diff' in r else ''} | {f(r.get('kld_vs_torch'), '.2e')} |")
    for label, b in (data.get("genai_builder") or {}).items():
        if not b["built"]:
            lines += ["", f"ONNX Runtime GenAI builder, {label}: not built ({b['error']})"]
    if data["quantized_torch_vs_fp32"]:
        lines += ["", "torch checkpoints vs fp32 (same windows): " + ", ".join(
            f"{k}: ppl {v['ppl']:.3f}, KL {v['kld_vs_fp32']:.4f}" for k, v in data["quantized_torch_vs_fp32"].items())]
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


if __name__ == "__main__":
    main()

r"""Model level: llama.cpp type mixes on SmolLM2 (perplexity, KL divergence, size)

    python bench/kquants.py model --out bench/results/kquants-smollm2.json
    python bench/kquants.py model --max-windows 4 --imatrix-nsamples 16 --gptq-nsamples 16 \
        --only "Q4_K_M,Q4_K_M +imatrix,Q3_K_M gptq" --out /tmp/kquants-quick.json     # a quick look

Every variant is written as a GGUF by the same API the CLI uses (`compress quantize --method
kquant|kquant-gptq --type ...`, i.e. api.quantize_to_folder), afresh on every run (no file,
imatrix or timing is reused from an earlier run), read back (our bit-exact decoders, q/k rows
un-permuted: the weights transformers' GGUF loader gives) and evaluated against the fp32 model on
wt2-quick (or its first --max-windows windows) in groups of --eval-chunk models sharing one pass
of the base model.
With --llama-cpp-bin (a folder holding llama-perplexity and llama-quantize), llama.cpp also
scores every GGUF (llama-perplexity --kl-divergence against an F32 GGUF of the same model,
-c 512) and quantizes the F32 GGUF itself with llama-quantize (same mixes, same imatrix file)
for a side-by-side in llama.cpp's own evaluator.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runinfo import finish, run_info  # noqa: E402  (bench/ is on sys.path: this script's folder)


# (label, mix, pure, imatrix, method); method: a registered GGUF method (kquant, kquant-gptq)
MODEL_VARIANTS = [
    ("Q8_0 pure", "Q8_0", True, False, "kquant"),
    ("Q6_K pure", "Q6_K", True, False, "kquant"),
    ("Q6_K pure +imatrix", "Q6_K", True, True, "kquant"),
    ("Q4_K_M", "Q4_K_M", False, False, "kquant"),
    ("Q4_K_M +imatrix", "Q4_K_M", False, True, "kquant"),
    ("Q4_K_S", "Q4_K_S", False, False, "kquant"),
    ("Q4_K_S +imatrix", "Q4_K_S", False, True, "kquant"),
    ("Q3_K_L", "Q3_K_L", False, False, "kquant"),
    ("Q3_K_L +imatrix", "Q3_K_L", False, True, "kquant"),
    ("Q3_K_M", "Q3_K_M", False, False, "kquant"),
    ("Q3_K_M +imatrix", "Q3_K_M", False, True, "kquant"),
    ("Q2_K", "Q2_K", False, False, "kquant"),
    ("Q2_K +imatrix", "Q2_K", False, True, "kquant"),
    ("Q4_K_M gptq", "Q4_K_M", False, False, "kquant-gptq"),
    ("Q3_K_M gptq", "Q3_K_M", False, False, "kquant-gptq"),
]
# (Q8_0 ignores an importance matrix in llama.cpp, so "Q8_0 pure +imatrix" would repeat "Q8_0 pure".)

LLAMA_CPP_TARGETS = {   # llama.cpp's own KLD vs F32 (llama-perplexity -c 512 --chunks 64), measured on this model with its own tools
    "Q4_K_M": 0.0563, "Q4_K_M +imatrix": 0.0351, "Q3_K_M": 0.1429, "Q3_K_M +imatrix": 0.0902,
    "Q2_K": 0.4305, "Q2_K +imatrix": 0.2765, "Q3_K_M gptq": 0.0767}


def _slug(label: str) -> str:
    return label.replace(" +", "-").replace(" ", "-").lower()


def _types_by_kind(tensors: list[dict]) -> dict:
    """{"attn_v": {"Q8_0": 14, "Q5_0": 16}, ...}: which types each kind of matrix got."""
    out: dict = {}
    for t in tensors:
        if len(t["shape"]) < 2:
            continue
        parts = t["name"].split(".")
        kind = parts[2] if parts[0] == "blk" else parts[0]
        out.setdefault(kind, {})
        out[kind][t["type"]] = out[kind].get(t["type"], 0) + 1
    return out


def _load_gguf_model(base_model, path: Path):
    """A copy of ``base_model`` holding the GGUF's weights (decoded as transformers' loader does)."""
    import copy

    from compress.formats.gguf_tensors import read_gguf_weights
    m = copy.deepcopy(base_model)
    state = read_gguf_weights(path)
    missing, unexpected = m.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and m.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if m.config.tie_word_embeddings:
        m.tie_weights()
    return m.eval()


def _llama_perplexity(binary: Path, model: Path, text: Path, base_kld: Path, chunks: int, make_base: bool) -> dict:
    import re
    import subprocess
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(chunks), "-t",
           str(max(1, (os.cpu_count() or 2)))]
    cmd += ["--kl-divergence-base", str(base_kld)] + ([] if make_base else ["--kl-divergence"])
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        return {"error": out[-500:], "command": " ".join(cmd)}
    res = {"command": " ".join(cmd)}
    for key, pat in (("ppl", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), ("kld", r"Mean\s+KLD:\s*([\d.]+)"),
                     ("top1", r"Same top p:\s*([\d.]+)"), ("ppl_final", r"Final estimate: PPL = ([\d.]+)")):
        m = re.search(pat, out)
        if m:
            res[key] = float(m.group(1))
    if "top1" in res:
        res["top1"] /= 100.0
    return res


def model_level(argv) -> int:
    ap = argparse.ArgumentParser(prog="bench/kquants.py model",
                                 description="llama.cpp type mixes on a real model: perplexity, KL divergence, size")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="data folder (default: $COMPRESS_DATA_DIR)")
    ap.add_argument("--protocol", default="wt2-quick")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--imatrix-nsamples", type=int, default=128)
    ap.add_argument("--imatrix-seqlen", type=int, default=512)
    ap.add_argument("--gptq-nsamples", type=int, default=128)
    ap.add_argument("--gptq-seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated variant labels (default: all)")
    ap.add_argument("--eval-chunk", type=int, default=4, help="models evaluated per pass over the windows")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the GGUFs and the imatrix are written, and left for inspection (default: "
                         "<cache>/bench/kquants); every run writes them afresh, nothing there is reused")
    ap.add_argument("--llama-cpp-bin", type=Path, default=None,
                    help="folder with llama-perplexity and llama-quantize: score with llama.cpp too")
    ap.add_argument("--llama-chunks", type=int, default=64)
    ap.add_argument("--no-ours", action="store_true",
                    help="skip our evaluator (with --llama-cpp-bin: llama.cpp's scores only)")
    ap.add_argument("--llama-imatrix-chunks", type=int, default=None,
                    help="also run llama-imatrix (-c 512, this many chunks of wikitext-2/valid.txt) and quantize "
                         "the +imatrix variants with llama-quantize and that file: llama.cpp end to end")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kquants-smollm2.json")
    args = ap.parse_args(argv)
    info = run_info("bench/kquants.py", ["model", *argv])

    from calib.data import CalibSpec
    from compress import api, models
    from compress.export.gguf import inspect_gguf
    from evals.data import PROTOCOLS, data_dir

    variants = MODEL_VARIANTS
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in {v[0] for v in MODEL_VARIANTS}]
        if unknown:
            ap.error(f"unknown variants {unknown}; known: {[v[0] for v in MODEL_VARIANTS]}")
        variants = [v for v in MODEL_VARIANTS if v[0] in want]
    workdir = args.workdir or (models.cache_dir() / "bench" / "kquants")
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    im_path = None
    im_info = None
    if any(v[3] for v in variants):
        im_path = workdir / f"imatrix-{args.model}-{args.imatrix_nsamples}x{args.imatrix_seqlen}-s{args.seed}.gguf"
        print(f"importance matrix: {args.imatrix_nsamples} windows of {args.imatrix_seqlen} tokens ...", flush=True)
        im_info = api.compute_imatrix(args.model, im_path, CalibSpec("wikitext2", args.imatrix_nsamples,
                                                                     args.imatrix_seqlen, args.seed),
                                      args.data_dir, progress=False)

    records = []
    for label, mix, pure, use_im, method in variants:
        out = workdir / f"{args.model}-{_slug(label)}.gguf"
        print(f"quantize {label} ...", flush=True)
        step = {"type": mix, "pure": pure}
        calib = None
        if method == "kquant":
            if use_im:
                step["imatrix"] = str(im_path)     # an option of kquant only
        else:                                      # kquant-gptq: calibrated, its own Hessian (no imatrix)
            calib = CalibSpec("wikitext2", args.gptq_nsamples, args.gptq_seqlen, args.seed)
        t0 = time.perf_counter()
        # restart=True: a work folder an interrupted earlier run left beside `out` is discarded, not resumed
        report = api.quantize_to_folder(args.model, out, method, progress=False, calib=calib,
                                        data_dir=args.data_dir, restart=True, **step)
        wall = time.perf_counter() - t0
        g = inspect_gguf(out)
        records.append({
            "label": label, "mix": mix, "pure": pure, "imatrix": use_im, "method": method, "file": str(out),
            "size_bytes": g["size_bytes"], "bits_per_weight_matrices": g["bits_per_weight_matrices"],
            "bits_per_weight_file": 8 * g["size_bytes"] / g["parameters"], "type_counts": g["type_counts"],
            "types_by_tensor_kind": _types_by_kind(g["tensors"]),
            "quantize_seconds": report["compress_seconds"],      # calibration + quantization (no load, no write)
            "quantize_wall_seconds": wall,                       # load + quantize + write
            "fallbacks": report["fallbacks"],                    # per-tensor numerical fallbacks of the solver
            "plan_fallbacks": report["output"].get("fallbacks"),  # tensors whose planned type did not fit
            "command": (f"compress quantize {args.model} --method {method} --type {mix}" + (" --pure" if pure else "")
                        + (f" --imatrix {im_path.name}" if use_im else "")
                        + (f" --nsamples {args.gptq_nsamples} --seqlen {args.gptq_seqlen} --seed {args.seed}"
                           if calib is not None else "")
                        + f" -o {out.name}"),
        })

    # our evaluator: fp32 activations, the GGUF weights decoded exactly
    proto = PROTOCOLS[args.protocol]
    n_windows, base_ppl = (None, None) if args.no_ours else _evaluate_ours(args, records, proto)

    # llama.cpp's evaluator and quantizer, when built
    llama = None
    if args.llama_cpp_bin is not None:
        lp, lq = args.llama_cpp_bin / "llama-perplexity", args.llama_cpp_bin / "llama-quantize"
        if not (lp.is_file() and lq.is_file()):
            ap.error(f"{args.llama_cpp_bin} lacks llama-perplexity or llama-quantize")
        import subprocess
        f32 = workdir / f"{args.model}-f32.gguf"
        api.export_gguf(args.model, f32, "F32", progress=False)
        # llama.cpp's evaluator reads the raw file (the reference numbers were measured on it)
        text_file = data_dir(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
        base_kld = workdir / f"{args.model}-f32-c512-{args.llama_chunks}.kld"
        llama = {"base": _llama_perplexity(lp, f32, text_file, base_kld, args.llama_chunks, make_base=True),
                 "ours": {}, "llama_cpp_quantize": {}}
        for r in records:
            print(f"llama-perplexity {r['label']} ...", flush=True)
            r["llama_cpp_eval"] = _llama_perplexity(lp, Path(r["file"]), text_file, base_kld, args.llama_chunks, False)
        for label, mix, pure, use_im, method in variants:
            if method != "kquant":
                continue
            out = workdir / f"{args.model}-{_slug(label)}-llamacpp.gguf"
            cmd = [str(lq)] + (["--pure"] if pure else []) + (["--imatrix", str(im_path)] if use_im else []) \
                + [str(f32), str(out), mix]
            p = subprocess.run(cmd, capture_output=True, text=True)
            rec = {"label": label, "command": " ".join(cmd), "file": str(out)}
            if p.returncode != 0:
                rec["error"] = (p.stdout + p.stderr)[-500:]
            else:
                g = inspect_gguf(out)
                rec.update(size_bytes=g["size_bytes"], bits_per_weight_matrices=g["bits_per_weight_matrices"],
                           type_counts=g["type_counts"],
                           llama_cpp_eval=_llama_perplexity(lp, out, text_file, base_kld, args.llama_chunks, False))
            llama["llama_cpp_quantize"][label] = rec
        if args.llama_imatrix_chunks:
            llama["llama_cpp_imatrix"] = _llama_cpp_end_to_end(args, variants, f32, lp, text_file, base_kld, workdir)

    result = {
        "benchmark": "kquants-smollm2", "model": args.model, "protocol": args.protocol,
        "protocol_description": proto.description, "windows": n_windows, "max_windows": args.max_windows,
        "quick": args.max_windows is not None and args.max_windows < (proto.max_windows or 10**9),
        "evaluator": None if args.no_ours else
        "ours: fp32 activations, GGUF weights decoded bit-exactly; KLD = mean KL(fp32 || quantized)",
        "base_ppl": base_ppl,
        "imatrix": None if im_path is None else {"file": im_path.name, "nsamples": args.imatrix_nsamples,
                                                 "seqlen": args.imatrix_seqlen, "seed": args.seed,
                                                 "source": "wikitext-2/valid.txt", "info": im_info},
        "gptq_calibration": {"nsamples": args.gptq_nsamples, "seqlen": args.gptq_seqlen, "seed": args.seed},
        "llama_cpp_targets_kld": LLAMA_CPP_TARGETS,
        "variants": records, "llama_cpp": llama,
        "platform": platform.platform(), "seconds": time.perf_counter() - t_start,
        **finish(info),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, args.out)
    if base_ppl is not None:
        print(f"base (fp32) ppl {base_ppl:.4f} on {n_windows} windows")
    print("| variant | bpw (matrices) | MiB | ppl | KLD | top-1 | llama.cpp target KLD |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        tgt = LLAMA_CPP_TARGETS.get(r["label"])
        ours = (f"{r['ppl']:.4f} | {r['kld']:.5f} | {100 * r['top1']:.2f}%" if "ppl" in r else "- | - | -")
        print(f"| {r['label']} | {r['bits_per_weight_matrices']:.3f} | {r['size_bytes'] / 2**20:.1f} | {ours} | "
              f"{'-' if tgt is None else tgt} |")
    if llama is not None:
        print(f"\nllama.cpp's evaluator (llama-perplexity -c 512 --chunks {args.llama_chunks}, KLD vs the F32 GGUF):")
        print("| variant | KLD, our file | KLD, llama-quantize's file | files byte-identical |")
        print("|---|---|---|---|")
        for r in records:
            theirs = llama["llama_cpp_quantize"].get(r["label"], {})
            same = _same_tensors(Path(r["file"]), Path(theirs["file"])) if theirs.get("file") and "error" not in theirs else None
            theirs["byte_identical_to_ours"] = same
            kl_t = (theirs.get("llama_cpp_eval") or {}).get("kld")
            print(f"| {r['label']} | {r['llama_cpp_eval'].get('kld')} | {'-' if kl_t is None else kl_t} | "
                  f"{'-' if same is None else same} |")
        e2e = llama.get("llama_cpp_imatrix")
        if e2e and "error" not in e2e:
            print(f"\nllama.cpp end to end (llama-imatrix --chunks {args.llama_imatrix_chunks}, llama-quantize):")
            for label, rec in e2e["variants"].items():
                print(f"| {label} | {(rec.get('llama_cpp_eval') or {}).get('kld')} |")
        result.update(finish(info))
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def _llama_cpp_end_to_end(args, variants, f32: Path, lp: Path, text_file: Path, base_kld: Path, workdir: Path):
    """llama-imatrix on the calibration text, then llama-quantize with its file, scored by llama-perplexity."""
    import subprocess

    from compress.export.gguf import inspect_gguf
    from evals.data import data_dir
    li, lq = args.llama_cpp_bin / "llama-imatrix", args.llama_cpp_bin / "llama-quantize"
    im = workdir / f"{args.model}-llama-imatrix-c512-{args.llama_imatrix_chunks}.gguf"
    calib_text = data_dir(args.data_dir) / "wikitext-2" / "valid.txt"
    cmd = [str(li), "-m", str(f32), "-f", str(calib_text), "-c", "512", "--chunks", str(args.llama_imatrix_chunks),
           "-o", str(im), "-t", str(max(1, os.cpu_count() or 2))]
    print("llama-imatrix ...", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = {"imatrix_command": " ".join(cmd), "imatrix_seconds": time.perf_counter() - t0, "variants": {}}
    if p.returncode != 0:
        out["error"] = (p.stdout + p.stderr)[-500:]
        return out
    for label, mix, pure, use_im, method in variants:
        if method != "kquant" or not use_im:
            continue
        dest = workdir / f"{args.model}-{_slug(label)}-llamacpp-own-imatrix.gguf"
        q = [str(lq)] + (["--pure"] if pure else []) + ["--imatrix", str(im), str(f32), str(dest), mix]
        r = subprocess.run(q, capture_output=True, text=True)
        rec = {"command": " ".join(q), "file": str(dest)}
        if r.returncode != 0:
            rec["error"] = (r.stdout + r.stderr)[-500:]
        else:
            g = inspect_gguf(dest)
            rec.update(size_bytes=g["size_bytes"], bits_per_weight_matrices=g["bits_per_weight_matrices"],
                       llama_cpp_eval=_llama_perplexity(lp, dest, text_file, base_kld, args.llama_chunks, False))
        out["variants"][label] = rec
    return out


def _evaluate_ours(args, records: list[dict], proto) -> tuple[int, float]:
    """Our evaluator on every record (fp32 activations, the GGUF weights decoded exactly), in
    groups of --eval-chunk models sharing one pass of the base model: (windows, base ppl)."""
    from compress import models
    from evals.data import data_dir, read_text
    from evals.perplexity import evaluate_many, tokenize, windows

    base = models.load(args.model)
    tokens = tokenize(base.tokenizer, read_text(data_dir(args.data_dir) / proto.file))
    limit = proto.max_windows if args.max_windows is None else min(args.max_windows, proto.max_windows or args.max_windows)
    wins = windows(tokens, proto.seqlen, limit)
    base_ppl = None
    for i in range(0, len(records), args.eval_chunk):
        chunk = records[i:i + args.eval_chunk]
        print(f"evaluate {', '.join(r['label'] for r in chunk)} on {wins.shape[0]} windows ...", flush=True)
        mods = {r["label"]: _load_gguf_model(base.model, Path(r["file"])) for r in chunk}
        res = evaluate_many(mods, wins, base.model, progress=False)
        for r in chunk:
            p = res[r["label"]]
            r.update(ppl=p.ppl, kld=p.kld, kld_max=p.kld_max, top1=p.top1, eval_seconds=p.seconds)
            base_ppl = p.base_ppl
        del mods
    return int(wins.shape[0]), base_ppl


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUFs hold the same tensors (names, types, bytes)."""
    import numpy as np
    from gguf import GGUFReader
    ta = {t.name: t for t in GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in GGUFReader(str(b)).tensors}
    return set(ta) == set(tb) and all(ta[n].tensor_type == tb[n].tensor_type
                                      and np.array_equal(np.array(ta[n].data), np.array(tb[n].data)) for n in ta)

"""Perplexity / KL divergence of post-training quantization settings on a real model.

Quantizes the model with each setting into a packed checkpoint (through the same API the CLI
uses), loads the checkpoints back, and evaluates all of them against the unquantized model in one
pass over the protocol's windows. Writes a JSON results file and prints a Markdown table.

    python bench/ptq.py --suite rtn --out bench/results/ptq-rtn-smollm2.json
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

from compress import __version__, api, models  # noqa: E402
from compress.scheme import IntScheme  # noqa: E402
from evals.data import PROTOCOLS, data_dir, read_text  # noqa: E402
from evals.perplexity import evaluate_many, tokenize, windows  # noqa: E402

# (label, method, scheme kwargs)
SUITES = {
    "rtn": [
        ("rtn int8 per-channel sym", "rtn", dict(bits=8, group_size=-1, sym=True)),
        ("rtn int8 g128 sym", "rtn", dict(bits=8, group_size=128, sym=True)),
        ("rtn int8 g128 asym", "rtn", dict(bits=8, group_size=128, sym=False)),
        ("rtn int4 g128 sym", "rtn", dict(bits=4, group_size=128, sym=True)),
        ("rtn int4 g128 asym", "rtn", dict(bits=4, group_size=128, sym=False)),
        ("rtn int3 g128 sym", "rtn", dict(bits=3, group_size=128, sym=True)),
        ("rtn int3 g128 asym", "rtn", dict(bits=3, group_size=128, sym=False)),
    ],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--suite", choices=sorted(SUITES), default="rtn")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="wt2-quick")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    proto = PROTOCOLS[args.protocol]
    text = read_text(data_dir(args.data_dir) / proto.file)
    base = models.load(args.model)
    tokens = tokenize(base.tokenizer, text)
    limit = proto.max_windows if args.max_windows is None else args.max_windows
    wins = windows(tokens, proto.seqlen, limit)

    rows = []
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, kw in SUITES[args.suite]:
            scheme = IntScheme(**kw)
            out = Path(tmp) / label.replace(" ", "_")
            info = api.quantize_to_folder(args.model, scheme, out, method=method, progress=False)
            loaded = models.load(str(out))
            variants[label] = loaded.model
            stats = api.weight_stats(loaded.model)
            rows.append({"label": label, "method": method, "scheme": scheme.to_dict(),
                         "quantize_seconds": info["seconds"], "bits_per_weight": stats["bits_per_weight"],
                         "size_bytes": (out / "model.safetensors").stat().st_size})
            print(f"quantized {label} in {info['seconds']:.1f} s", file=sys.stderr)
        results = evaluate_many(variants, wins, base.model)
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

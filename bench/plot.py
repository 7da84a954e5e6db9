"""Quality against size from benchmark results files: perplexity and KL divergence of every row
against its bits per weight and its file size, the Pareto front marked (evals/plot.py).

    python bench/plot.py bench/results/ptq-rtn-smollm2.json bench/results/ptq-compare-*.json \\
        --title "SmolLM2-135M, post-training quantization" --out docs/img/ptq-smollm2.png
    python bench/plot.py bench/results/kquants-smollm2.json --out docs/img/kquants-smollm2.png

Reads the row lists of bench/ptq.py, bench/prune.py and bench/train.py (``rows``) and of
bench/kquants.py (``variants``, bits per weight of the whole file); rows without a file size
(a peer's row, a training row) are left out and counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals.plot import plot  # noqa: E402


def points(files: list[Path]) -> tuple[list[dict], int]:
    out, skipped, seen = [], 0, set()
    for f in files:
        data = json.loads(Path(f).read_text())
        for r in data.get("rows") or data.get("variants") or []:
            bpw = r.get("bits_per_weight") or r.get("bits_per_weight_file")
            if not r.get("size_bytes") or r.get("ppl") is None or r["label"] in seen:
                skipped += 1
                continue
            seen.add(r["label"])
            out.append({"label": r["label"], "ppl": r["ppl"], "kld": r.get("kld"), "bits_per_weight": bpw,
                        "size_bytes": r["size_bytes"]})
    return out, skipped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    pts, skipped = points(args.results)
    plot(pts, args.out, args.title)
    print(f"wrote {args.out}: {len(pts)} points ({skipped} rows without a file size or repeated left out)")


if __name__ == "__main__":
    main()

"""Comparison reports over evaluation JSON files, with a regression gate."""
from __future__ import annotations

import json
from pathlib import Path


class ReportError(Exception):
    """A results file that cannot be read or compared."""


REQUIRED = ("model", "scheme", "protocol", "ppl")


def read_run(path: Path) -> dict:
    try:
        run = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReportError(f"results file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ReportError(f"results file {path} is not valid JSON") from None
    if not isinstance(run, dict) or any(k not in run for k in REQUIRED):
        raise ReportError(f"results file {path} is not an evaluation result (needs {', '.join(REQUIRED)})")
    run["_file"] = str(path)
    return run


def is_base(run: dict) -> bool:
    return run.get("quantized") is False


def build(runs: list[dict]) -> dict:
    """Rows with deltas to the unquantized base run of the same protocol (if one is given)."""
    bases = {}
    for r in runs:
        if is_base(r):
            bases.setdefault(r["protocol"], r)
    rows = []
    for r in runs:
        b = bases.get(r["protocol"])
        row = {
            "file": r["_file"], "model": r["model"], "scheme": r["scheme"], "protocol": r["protocol"],
            "ppl": r["ppl"], "tokens": r.get("tokens"), "kld": r.get("kld"), "top1": r.get("top1"),
            "size_bytes": r.get("size_bytes"), "bits_per_weight": r.get("bits_per_weight"),
            "seconds": r.get("seconds"),
            "base_ppl": b["ppl"] if b else r.get("base_ppl"),
        }
        bp = row["base_ppl"]
        row["ppl_increase_pct"] = None if bp is None else 100.0 * (r["ppl"] - bp) / bp
        rows.append(row)
    return {"rows": rows}


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(data: dict) -> str:
    lines = ["| model | scheme | protocol | ppl | Δppl vs base | KLD | top-1 agree | bits/weight | seconds |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        delta = "" if r["ppl_increase_pct"] is None else f"{r['ppl_increase_pct']:+.2f}%"
        top1 = "" if r["top1"] is None else f"{100 * r['top1']:.2f}%"
        lines.append(f"| {r['model']} | {r['scheme']} | {r['protocol']} | {r['ppl']:.3f} | {delta} | "
                     f"{_fmt(r['kld'], '.5f')} | {top1} | {_fmt(r['bits_per_weight'], '.3f')} | "
                     f"{_fmt(r['seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def regressions(data: dict, max_increase_pct: float) -> list[dict]:
    return [r for r in data["rows"] if r["ppl_increase_pct"] is not None and r["ppl_increase_pct"] > max_increase_pct]

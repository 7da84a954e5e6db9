"""The README's table of model families and what works for each, filled from tests/test_families.py.

Each family test records, once its assertions have passed, whether a capability works for the
family or is refused with a one-line error (:func:`record`). With ``COMPRESS_FAMILY_TABLE=FILE``
set, the test session writes what was recorded to FILE (tests/conftest.py); then

    python -m tests.family_table FILE README.md

renders it between the README's ``<!-- families:begin -->`` and ``<!-- families:end -->`` lines.
``make families`` does both.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS: dict[str, dict[str, str]] = {}           # family -> capability -> "yes" | "refused"
COLUMNS = ("RTN", "GPTQ", "AWQ", "SmoothQuant", "2:4 pruning", "structured pruning", "GGUF", "k-quants",
           "GPTQ on k-quants", "ONNX")
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def record(family: str, capability: str, works: bool) -> None:
    if capability not in COLUMNS:
        raise ValueError(f"unknown capability {capability!r}")
    RESULTS.setdefault(family, {})[capability] = "yes" if works else "refused"


def render(results: dict) -> str:
    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for fam in sorted(results):
        lines.append(f"| `{fam}` | " + " | ".join(results[fam].get(c, "not run") for c in COLUMNS) + " |")
    return "\n".join(lines)


def update(readme: Path, results: dict) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render(results)}\n{END}{tail}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m tests.family_table RESULTS.json README.md")
    update(Path(sys.argv[2]), json.loads(Path(sys.argv[1]).read_text()))

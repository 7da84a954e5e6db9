"""llama.cpp's own tools, when they are built (docs/GGUF.md says how): where they are, and the
types ``llama-quantize --dry-run`` picks for a GGUF's tensors."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- .*type =\s*(\w+),.*?(?:\((\w+)\))?\s*$")


def llama_bin(name: str) -> Path | None:
    root = Path(os.environ.get("COMPRESS_CACHE_DIR", Path.home() / ".cache" / "compress"))
    p = root / "llamacpp" / "build" / "bin" / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def dry_run_types(lq: Path, src: Path, mix: str, tmp: Path, pure: bool = False,
                  imatrix: Path | None = None) -> dict[str, str]:
    """``{tensor name: GGML type}`` as ``llama-quantize --dry-run`` would write ``src`` with ``mix``."""
    cmd = [str(lq), "--allow-requantize", "--dry-run"] + (["--pure"] if pure else []) \
        + (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(tmp / "dry.gguf"), mix]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-1500:]
    got = {}
    for line in (p.stdout + p.stderr).splitlines():
        m = _LINE.match(line)
        if m:
            got[m.group(1)] = (m.group(3) or m.group(2)).upper()
    assert got, (p.stdout + p.stderr)[-1500:]
    return got

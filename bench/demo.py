"""The first thing a new user runs: ``make demo`` in a fresh clone of this repository (its
committed HEAD) with an empty model cache, timed command by command.

    python bench/demo.py --out bench/results/demo.json

The clone and the cache are temporary folders; the package index and pip's own download cache
are whatever the machine has (as for a user). Each line make prints is stamped as it arrives, so
a step's time runs from its command line to the next one; ``total_seconds`` is make's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from runinfo import finish, run_info  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    info = run_info("bench/demo.py", argv)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        clone, cache = Path(tmp) / "clone", Path(tmp) / "cache"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = dict(os.environ, COMPRESS_CACHE_DIR=str(cache), COMPRESS_DATA_DIR=str(Path(args.data_dir).resolve()))
        env.pop("VIRTUAL_ENV", None)
        t0 = time.perf_counter()
        proc = subprocess.Popen(["make", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        steps, lines = [], []
        for line in proc.stdout:
            now = time.perf_counter() - t0
            lines.append(line.rstrip("\n"))
            if line.startswith((".venv/bin/", "python3 -m venv", "touch ")):
                steps.append({"command": line.strip(), "start": round(now, 2)})
        rc = proc.wait()
        total = time.perf_counter() - t0
    for a, b in zip(steps, steps[1:] + [{"start": total}]):
        a["seconds"] = round(b["start"] - a["start"], 2)
    data = {"commit": head, "exit_code": rc, "total_seconds": round(total, 2),
            "steps": [s for s in steps if not s["command"].startswith("touch ")],
            "report": [line for line in lines if line.startswith("|")], **finish(info)}
    text = json.dumps(data, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    for s in data["steps"]:
        print(f"{s['seconds']:8.1f} s  {s['command'][:100]}")
    print(f"{total:8.1f} s  make demo (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())

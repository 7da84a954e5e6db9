"""Peak resident memory of an exported ONNX folder run by ONNX Runtime, each in a fresh process.

``peak_rss_mib(folder, threads, tokens)`` loads the folder with ``OnnxCausalLM`` (the session config
it was exported with: a prefill-target folder is expanded to fp32 at load), runs one prefill of
``tokens`` tokens and reports the process's peak resident set (Linux: VmHWM); ``peak_rss_mib(None, ...)`` does the
same imports and nothing else, the baseline to subtract.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from compress.runtime_onnx import OnnxCausalLM
import onnxruntime
path, threads, tokens = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if path != "-":
    model = OnnxCausalLM(path, threads=threads)
    model(input_ids=torch.ones(1, tokens, dtype=torch.long), use_cache=False)
# VmHWM: the peak of this process's own address space (ru_maxrss would also count the parent's
# memory at fork, which Linux carries over exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": hwm / 1024}))
"""


def peak_rss_mib(folder, threads: int, tokens: int) -> float:
    """Peak RSS in MiB of a fresh process that runs one prefill of ``folder`` (None: imports only)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(folder) if folder else "-", str(threads),
                          str(tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

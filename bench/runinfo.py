"""What every results file records about the run that wrote it: the exact command, the package
version, the thread count, the CPU and the load average (a timing is only comparable with others
of the same run and machine state)."""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's int8 dot-product features (they decide which int8 path is fast)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return sorted(have & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return []


def run_info(script: str, argv: list[str] | None = None) -> dict:
    import torch

    from compress import __version__
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python", script] + [shlex.quote(a) for a in args]),
        "package_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finish(info: dict) -> dict:
    """``info`` with the load average at the end of the run."""
    return dict(info, load_average_end=[round(x, 2) for x in os.getloadavg()])

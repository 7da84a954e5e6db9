"""Memory preflight: the peak memory of a compression run, estimated from the checkpoint's tensor
headers, ``config.json`` and the recipe before any weight is read, checked against the memory
available (or ``--max-memory``), so that a run that cannot fit is refused in a second instead of
being killed by the OS half-way.

The estimate (CPU, float32 compute, the whole model resident):

* weights: every tensor of the checkpoint as float32;
* calibration activations: the block inputs of every window (``nsamples x seqlen x hidden``
  float32), held twice while a block's outputs replace its inputs; beyond the runner's in-memory
  budget (8 GiB) they spill to disk, so at most twice that;
* per window inside a block: attention scores (``heads x seqlen^2``) and the MLP's intermediate
  activations (3 x ``seqlen x intermediate``);
* statistics: GPTQ-style Hessians of the widest input (``K^2`` float32, with the solver's
  working copies, 4 of them);
* a whole-model pass (structured pruning, OWL): the logits of one window (``seqlen x vocab``,
  3 copies); with gradients (structured ``--importance gradient``) also the weights' gradients
  and every block's saved activations;
* the interpreter, torch and the tokenizer: a fixed 0.6 GiB.

It is an estimate, meant to be on the safe side by tens of percent, not a measurement.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressError

GiB = 1 << 30
FIXED = int(0.6 * GiB)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"8G"``, ``"512MB"``, ``"1.5g"`` or a number of bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise CompressError(f"--max-memory must be a size such as 8GiB or 512MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by a cgroup (v2) limit if any."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import psutil
        avail = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def checkpoint_numel(folder: Path, blocks: str | None = None) -> int:
    """Elements of every tensor in the folder's safetensors files, from their (checked) headers
    alone. With ``blocks`` (the decoder blocks' path, a streamed run) only those resident at once:
    everything outside the blocks plus the largest block."""
    from .models import check_safetensors, safetensors_files
    shapes = {}
    for f in safetensors_files(Path(folder)):
        shapes.update({k: v.get("shape", []) for k, v in check_safetensors(f).items() if k != "__metadata__"})
    return _resident(shapes, re.escape(f"{blocks}.") + r"(\d+)\." if blocks else None)


def gguf_numel(layout, stream: bool) -> int:
    """:func:`checkpoint_numel` of a GGUF file, from its (checked) tensor table."""
    return _resident({t.name: t.dims for t in layout.tensors}, r"blk\.(\d+)\." if stream else None)


def gguf_sizes(layout) -> dict:
    """The ``config.json`` sizes :func:`estimate` reads, from a GGUF header."""
    kv = layout.kv
    arch = kv["general.architecture"]
    keys = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
            "num_attention_heads": "attention.head_count", "num_hidden_layers": "block_count"}
    config = {k: kv[f"{arch}.{g}"] for k, g in keys.items() if f"{arch}.{g}" in kv}
    tokens = kv.get("tokenizer.ggml.tokens")
    config["vocab_size"] = getattr(tokens, "count", 0)
    return config


def _resident(shapes: dict, block_pattern: str | None) -> int:
    total, per_block = 0, {}
    for k, shape in shapes.items():
        n = math.prod(int(d) for d in shape)
        m = re.match(block_pattern, k) if block_pattern else None
        if m:
            per_block[m.group(1)] = per_block.get(m.group(1), 0) + n
        else:
            total += n
    return total + max(per_block.values(), default=0)


@dataclass
class Estimate:
    parts: dict            # name -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)


def estimate(config: dict, numel: int, steps, calib, budget: int, procs: int = 1) -> Estimate:
    """Peak bytes of running ``steps`` (recipe steps) on a model of ``numel`` elements whose
    ``config.json`` is ``config``; ``calib``: the calibration spec (None without calibration).
    With ``procs`` processes each holds the model, its statistics and one window in a block, and
    the calibration activations are split between them."""
    from .arch import text_config
    config = text_config(config)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)          # n_*: GPT-2's keys
    inter = int(config.get("intermediate_size") or config.get("ffn_dim") or config.get("n_inner") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 1)
    vocab = int(config.get("vocab_size") or 0)
    parts = {"weights": 4 * numel, "runtime": FIXED}
    if calib is not None:
        n, seq = calib.nsamples, calib.seqlen
        parts["calibration activations"] = 2 * min(4 * n * seq * hidden, budget)
        parts["one window in a block"] = 4 * (heads * seq * seq + 3 * seq * inter + 4 * seq * hidden)
        parts["statistics"] = 4 * 4 * max(hidden, inter) ** 2
        cfgs = [s.config for s in steps]
        whole = any(s.cls.whole_model or getattr(c, "profile", None) == "owl" for s, c in zip(steps, cfgs))
        if whole:
            parts["one window through the model"] = 4 * 3 * seq * vocab
        if any(getattr(c, "importance", None) == "gradient" for c in cfgs):
            parts["gradients"] = 4 * numel
            parts["saved activations"] = 4 * layers * (heads * seq * seq + 4 * seq * inter + 8 * seq * hidden)
    if procs > 1:
        parts = {k: v if k == "calibration activations" else v * procs for k, v in parts.items()}
    return Estimate(parts)


def check(config: dict, numel: int, steps, calib, max_memory: int | None, budget: int,
          procs: int = 1, streamed: bool = False) -> Estimate:
    """Print the estimate for a model of ``numel`` resident elements; refuse a run that does not fit
    in ``max_memory`` (else the available memory) with a one-line error naming the estimate, the
    limit and what would make it fit."""
    import sys
    from calib.dist import is_main
    est = estimate(config, numel, steps, calib, budget, procs)
    limit = max_memory if max_memory is not None else available_bytes()
    what = "--max-memory" if max_memory is not None else "the available memory"
    if is_main():
        who = f" ({procs} processes)" if procs > 1 else ""
        print(f"memory: estimated peak{who} {est.total / GiB:.2f} GiB ({est.describe()}), {what} {limit / GiB:.2f} GiB",
              file=sys.stderr, flush=True)
    if est.total > limit:
        hint = "a machine with more memory"
        acts = est.parts.get("calibration activations", 0)
        if calib is not None and acts:
            spare = limit - (est.total - acts)
            fit = int(calib.nsamples * spare / acts) if spare > 0 else 0
            if fit >= 1:
                hint = (f"fewer or shorter calibration windows (--nsamples {fit} at --seqlen {calib.seqlen} "
                        f"would fit), or {hint}")
        if not streamed:
            hint = f"--stream (one block of weights in memory at a time), {hint}"
        raise CompressError(f"this run needs about {est.total / GiB:.2f} GiB ({est.describe()}) but {what} is "
                            f"{limit / GiB:.2f} GiB: use {hint}")
    return est


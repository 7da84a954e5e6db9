"""Calibrated quantization of a whole model: the sequential runner plus a per-layer solver.

A method here observes statistics for each group of linears that share an input (through
forward hooks while the runner replays the block), then solves each linear as a pure function.
Inside a block the groups are processed in execution order ("true sequential"): the statistics
of a later group are collected with the earlier groups already quantized.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calib.runner import DEFAULT_BUDGET, run_sequential
from calib.stats import AbsMaxAccumulator, HessianAccumulator, load_stats, save_stats

from .errors import CompressError
from .formats import gptq_int, w8a8
from .methods.awq import (AWQOptions, AWQSearch, MeanAbsAccumulator, apply_clip, clip_search, hessian_error,
                          load_search, save_search, search_scale)
from .methods.gptq import gptq_solve, output_error
from .methods.scaling import apply_scale, can_scale
from .methods.smoothquant import SmoothQuantOptions, smooth_scales
from .quantizer import dequantize_values, quantize_rtn
from .qlinear import QuantLinear, W8A8Linear, set_submodule
from .scheme import IntScheme, W8A8Scheme

log = logging.getLogger(__name__)


@dataclass
class GPTQOptions:
    damp: float = 0.01
    block_size: int = 128
    static_groups: bool = False

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise CompressError(f"--damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise CompressError(f"--block-size must be positive, got {self.block_size}")


@dataclass
class RunRecord:
    """What a calibrated run did, for the checkpoint metadata and the report."""

    packed: dict = field(default_factory=dict)        # full linear name -> PackedInt (PackedW8A8 for W8A8)
    losses: dict = field(default_factory=dict)        # full linear name -> solver loss
    fallbacks: dict = field(default_factory=dict)     # full linear name -> fallback taken
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)         # method-specific summary (AWQ alphas, smoothed groups)


def group_key(arch, i: int, group) -> str:
    """Statistics key of a group of linears sharing one input: its first linear's full name."""
    return f"{arch.blocks}.{i}.{group.linears[0]}"


def _solve_into(block, name: str, full: str, H: torch.Tensor, scheme: IntScheme, opts: GPTQOptions, rec: RunRecord):
    lin = block.get_submodule(name)
    w = lin.weight.data
    res = gptq_solve(w.to(torch.float32), H.to(w.device, torch.float32), scheme, damp=opts.damp,
                     block_size=opts.block_size, static_groups=opts.static_groups)
    rec.packed[full] = gptq_int.pack(res.q.cpu(), res.scales.cpu(), res.zeros.cpu(), res.g_idx.cpu(), scheme.bits)
    rec.losses[full] = float(res.loss)
    if res.fallback:
        log.warning("%s: %s", full, res.fallback)
        rec.fallbacks[full] = res.fallback
    # later groups and blocks must see exactly the weights the checkpoint will hold
    lin.weight.data = dequantize_values(res.q, res.scales, res.zeros, res.g_idx).to(w.device, w.dtype)


def gptq_model(loaded, scheme: IntScheme, windows: torch.Tensor | None, opts: GPTQOptions,
               save_stats_path: Path | None = None, load_stats_path: Path | None = None,
               device: str = "cpu", budget: int = DEFAULT_BUDGET, progress: bool = True) -> RunRecord:
    """GPTQ over every decoder-block linear; replaces them by QuantLinear modules in place."""
    model, arch = loaded.model, loaded.arch
    rec = RunRecord()
    t0 = time.perf_counter()
    stats = {}
    if load_stats_path is not None:
        try:
            stats = load_stats(load_stats_path)
        except (ValueError, OSError) as e:
            raise CompressError(f"cannot load statistics from {load_stats_path}: {e}") from None
        nblocks = len(arch.get_blocks(model))
        need = [group_key(arch, i, g) for i in range(nblocks) for g in arch.groups]
        missing = [k for k in need if k not in stats]
        if missing:
            raise CompressError(f"{load_stats_path} has no statistics for {missing[0]} (and {len(missing) - 1} more)")
        for i, block in enumerate(arch.get_blocks(model)):
            for g in arch.groups:
                H = stats[group_key(arch, i, g)].hessian()
                for name in g.linears:
                    _solve_into(block, name, f"{arch.blocks}.{i}.{name}", H, scheme, opts, rec)
    else:
        if windows is None:
            raise CompressError("GPTQ needs calibration windows")

        def process(i, block, inputs):
            for g in arch.groups:
                first = block.get_submodule(g.linears[0])
                acc = HessianAccumulator(first.in_features)
                h = first.register_forward_hook(acc.hook)
                try:
                    inputs.run(block, stop_at=block.get_submodule(g.linears[-1]))
                finally:
                    h.remove()
                key = group_key(arch, i, g)
                if save_stats_path is not None:
                    stats[key] = acc
                for name in g.linears:
                    _solve_into(block, name, f"{arch.blocks}.{i}.{name}", acc.hessian(), scheme, opts, rec)
                if save_stats_path is None:
                    del acc

        run_sequential(model, arch, windows, process, budget=budget, device=device, progress=progress, desc="gptq")
        if save_stats_path is not None:
            save_stats(save_stats_path, stats)
    replace_with_packed(model, rec)
    rec.seconds = time.perf_counter() - t0
    return rec


def replace_with_packed(model: torch.nn.Module, rec: RunRecord) -> None:
    for full, packed in rec.packed.items():
        lin = model.get_submodule(full)
        if isinstance(lin, (QuantLinear, W8A8Linear)):
            continue      # already swapped in (W8A8: inside the block, so the runner replays it)
        cls = W8A8Linear if isinstance(packed, w8a8.PackedW8A8) else QuantLinear
        set_submodule(model, full, cls.from_packed(packed, lin.bias))

"""Calibrated quantization of a whole model: the sequential runner plus a per-layer solver.

A method here observes statistics for each group of linears that share an input (through
forward hooks while the runner replays the block), then solves each linear as a pure function.
Inside a block the groups are processed in execution order ("true sequential"): the statistics
of a later group are collected with the earlier groups already quantized.
"""
from __future__ import annotations

import dataclasses
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
from .methods.gptq import GRIDS, gptq_solve, output_error
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
    grid: str = "minmax"

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise CompressError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
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
                     block_size=opts.block_size, static_groups=opts.static_groups, grid=opts.grid)
    rec.packed[full] = gptq_int.pack(res.q.cpu(), res.scales.cpu(), res.zeros.cpu(), res.g_idx.cpu(), scheme.bits)
    rec.losses[full] = float(res.loss)
    if res.fallback:
        log.warning("%s: %s", full, res.fallback)
        rec.fallbacks[full] = res.fallback
    # later groups and blocks must see exactly the weights the checkpoint will hold
    lin.weight.data = dequantize_values(res.q, res.scales, res.zeros, res.g_idx).to(w.device, w.dtype)


def gptq_model(loaded, scheme: IntScheme, windows: torch.Tensor | None, opts: GPTQOptions,
               save_stats_path: Path | None = None, load_stats_path: Path | None = None,
               device: str = "cpu", budget: int = DEFAULT_BUDGET, progress: bool = True,
               lm_head: bool = False) -> RunRecord:
    """GPTQ over every decoder-block linear (and the lm_head with ``lm_head``, against the Hessian
    of the final norm's output; see :func:`untie_lm_head`); replaces them by QuantLinear modules
    in place."""
    model, arch = loaded.model, loaded.arch
    rec = RunRecord()
    t0 = time.perf_counter()
    stats = {}
    if lm_head:
        untie_lm_head(loaded)
    if load_stats_path is not None:
        try:
            stats = load_stats(load_stats_path)
        except (ValueError, OSError) as e:
            raise CompressError(f"cannot load statistics from {load_stats_path}: {e}") from None
        nblocks = len(arch.get_blocks(model))
        need = [group_key(arch, i, g) for i in range(nblocks) for g in arch.groups]
        need += [arch.lm_head] if lm_head else []
        missing = [k for k in need if k not in stats]
        if missing:
            raise CompressError(f"{load_stats_path} has no statistics for {missing[0]} (and {len(missing) - 1} more)")
        for i, block in enumerate(arch.get_blocks(model)):
            for g in arch.groups:
                H = stats[group_key(arch, i, g)].hessian()
                for name in g.linears:
                    _solve_into(block, name, f"{arch.blocks}.{i}.{name}", H, scheme, opts, rec)
        if lm_head:
            _solve_into(model, arch.lm_head, arch.lm_head, stats[arch.lm_head].hessian(), scheme, opts, rec)
    else:
        if windows is None:
            raise CompressError("GPTQ needs calibration windows")

        def process(i, block, inputs):
            for g in arch.groups:
                acc = inputs.group_hessian(block, g.linears)
                key = group_key(arch, i, g)
                if save_stats_path is not None:
                    stats[key] = acc
                for name in g.linears:
                    _solve_into(block, name, f"{arch.blocks}.{i}.{name}", acc.hessian(), scheme, opts, rec)
                if save_stats_path is None:
                    del acc

        def process_head(inputs):
            head = model.get_submodule(arch.lm_head)
            norm = model.get_submodule(arch.final_norm)
            width = norm.weight.shape[0] if getattr(norm, "weight", None) is not None else head.in_features
            if width != head.in_features:
                raise CompressError(f"--lm-head with GPTQ: {arch.lm_head} does not read {arch.final_norm}'s output "
                                    f"({head.in_features} vs {width} features; a projection sits between)")
            acc = inputs.hessian_after(norm, head.in_features)
            if save_stats_path is not None:
                stats[arch.lm_head] = acc
            _solve_into(model, arch.lm_head, arch.lm_head, acc.hessian(), scheme, opts, rec)

        run_sequential(model, arch, windows, process, budget=budget, device=device, progress=progress, desc="gptq",
                       process_head=process_head if lm_head else None)
        if save_stats_path is not None:
            save_stats(save_stats_path, stats)
    replace_with_packed(model, rec)
    rec.seconds = time.perf_counter() - t0
    return rec


def untie_lm_head(loaded) -> None:
    """Give the lm_head its own weight when it shares the input embedding's, so that it can be
    quantized while the embedding lookup keeps the unquantized table (the checkpoint then stores
    both: the embedding in the storage dtype, the lm_head packed). No-op when already separate."""
    model, arch = loaded.model, loaded.arch
    head = model.get_submodule(arch.lm_head)
    if not isinstance(head, torch.nn.Linear):
        raise CompressError(f"{arch.lm_head} is a {type(head).__name__}, not a linear layer")
    emb = model.get_input_embeddings()
    if head.weight.data_ptr() == emb.weight.data_ptr() or getattr(model.config, "tie_word_embeddings", False):
        new = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                              device=head.weight.device, dtype=head.weight.dtype)
        new.weight.data = head.weight.data.clone()
        if head.bias is not None:
            new.bias.data = head.bias.data.clone()
        set_submodule(model, arch.lm_head, new)
        model.config.tie_word_embeddings = False


def replace_with_packed(model: torch.nn.Module, rec: RunRecord) -> None:
    for full, packed in rec.packed.items():
        lin = model.get_submodule(full)
        if isinstance(lin, (QuantLinear, W8A8Linear)):
            continue      # already swapped in (W8A8: inside the block, so the runner replays it)
        cls = W8A8Linear if isinstance(packed, w8a8.PackedW8A8) else QuantLinear
        set_submodule(model, full, cls.from_packed(packed, lin.bias))


# --------------------------------------------------------------------------- AWQ
#
# Per block, two phases (both driven by the arch description's groups, in execution order):
#
# 1. scales: one pass of the float block collects, for every group, the mean |x| of its input
#    and what its objective needs (the Hessian of the input, or the inputs and outputs of the
#    module consuming the group); then group by group the scale is searched and applied to the
#    float block (earlier groups' scales already applied; the transform is function-preserving,
#    so the recorded data stay valid). A group whose ``prev`` cannot absorb the scale is skipped.
# 2. quantization, true-sequential: group by group the block is replayed (earlier groups already
#    quantized), the Hessian of the group's (scaled) input is collected, each linear's clip range
#    is searched and applied, then the linear is quantized: round-to-nearest (awq) or GPTQ with
#    that Hessian (awq+gptq) into gptq-int.
#
# The scales are searched before any linear of the block is quantized because a later group's
# scale divides an earlier group's linear (up_proj rows for down_proj); dividing a quantized
# weight's rows would break its grid.


def _scheme_key(scheme: IntScheme) -> dict:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym}


def _inspect_name(group) -> str | None:
    """Block-relative name of the module consuming a group of several linears (their lowest
    common parent, e.g. ``self_attn`` for q/k/v, ``mlp`` for gate/up), or None."""
    if len(group.linears) < 2:
        return None
    parents = [n.split(".")[:-1] for n in group.linears]
    common = []
    for parts in zip(*parents):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common) or None


class _ModuleRecorder:
    """Forward hook (with kwargs) keeping a module's inputs and output for the first ``limit`` windows."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.calls: list = []
        self.windows = 0

    def hook(self, module, args, kwargs, output):
        if self.limit is not None and self.windows >= self.limit:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        b = out.shape[0]
        take = b if self.limit is None else min(b, self.limit - self.windows)

        def cut(v):
            return v[:take] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b and take < b else v

        self.calls.append((tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}, cut(out).detach()))
        self.windows += take

    def error_fn(self, module, linears):
        """Objective: squared error of the module's output with the linears' weights replaced."""
        def err(new):
            old = [lin.weight.data for lin in linears]
            total = 0.0
            try:
                for lin, w in zip(linears, new):
                    lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)
                with torch.no_grad():
                    for args, kwargs, ref in self.calls:
                        y = module(*args, **kwargs)
                        y = y[0] if isinstance(y, (tuple, list)) else y
                        total += float(((y.to(torch.float32) - ref.to(torch.float32)) ** 2).sum())
            finally:
                for lin, w in zip(linears, old):
                    lin.weight.data = w
            return total
        return err


@torch.no_grad()
def _awq_scale_block(i: int, block, inputs, arch, scheme: IntScheme, opts: AWQOptions, search: AWQSearch) -> None:
    means, hessians, recorders, handles = {}, {}, {}, []
    scalable = {gi: can_scale(block.get_submodule(g.prev), block.get_submodule(g.linears[0]).in_features)
                for gi, g in enumerate(arch.groups)}
    try:
        for gi, g in enumerate(arch.groups):
            if not scalable[gi][0]:
                continue
            first = block.get_submodule(g.linears[0])
            means[gi] = MeanAbsAccumulator(first.in_features)
            handles.append(first.register_forward_hook(means[gi].hook))
            name = _inspect_name(g) if opts.objective == "module" else None
            if name is not None:
                recorders[gi] = (name, _ModuleRecorder(opts.search_windows))
                handles.append(block.get_submodule(name).register_forward_hook(recorders[gi][1].hook, with_kwargs=True))
            else:
                hessians[gi] = HessianAccumulator(first.in_features)
                handles.append(first.register_forward_hook(hessians[gi].hook))
        inputs.run(block)
    finally:
        for h in handles:
            h.remove()
    for gi, g in enumerate(arch.groups):
        key = group_key(arch, i, g)
        prev = block.get_submodule(g.prev)
        lins = [block.get_submodule(n) for n in g.linears]
        ok, why = scalable[gi]
        if not ok:
            log.info("%s: AWQ scaling skipped: %s", key, why)
            search.alphas[key] = None
        else:
            weights = [lin.weight.data for lin in lins]
            if gi in recorders:
                name, r = recorders[gi]
                err = r.error_fn(block.get_submodule(name), lins)
            else:
                err = hessian_error(hessians[gi].hessian(), weights)
            res = search_scale(weights, means[gi].mean(), scheme, err, opts.n_grid)
            apply_scale(prev, lins, res.scales)
            search.scales[key] = res.scales
            search.alphas[key] = res.alpha
            log.info("%s: AWQ alpha %.2f (error %.4g -> %.4g)", key, res.alpha, res.baseline_error, res.best_error)
        recorders.pop(gi, None)
        hessians.pop(gi, None)


@torch.no_grad()
def _awq_finish_linear(block, name: str, full: str, H: torch.Tensor | None, clip: torch.Tensor | None,
                       scheme: IntScheme, gptq: GPTQOptions | None, rec: RunRecord) -> None:
    lin = block.get_submodule(name)
    w = lin.weight.data
    if clip is not None:
        lin.weight.data = apply_clip(w, clip, scheme).to(w.dtype)
    if gptq is not None:
        _solve_into(block, name, full, H, scheme, gptq, rec)
        return
    q, s, z, g = quantize_rtn(lin.weight.data, scheme)
    rec.packed[full] = gptq_int.pack(q.cpu(), s.cpu(), z.cpu(), g.cpu(), scheme.bits)
    dq = dequantize_values(q, s, z, g)
    if H is not None:
        rec.losses[full] = 0.5 * output_error(w, dq, H)
    lin.weight.data = dq.to(w.device, w.dtype)


def _awq_quantize_block(i: int, block, inputs, arch, scheme: IntScheme, opts: AWQOptions, gptq: GPTQOptions | None,
                        skip: set, search: AWQSearch, rec: RunRecord, keep_hessians: bool) -> None:
    for g in arch.groups:
        key = group_key(arch, i, g)
        H = inputs.group_hessian(block, g.linears).hessian()
        if keep_hessians:
            search.hessians[key] = H.cpu()
        for name in g.linears:
            full = f"{arch.blocks}.{i}.{name}"
            clip = None
            if opts.clip and name not in skip:
                clip = clip_search(block.get_submodule(name).weight.data, H, scheme, opts.n_grid, opts.max_shrink)
                search.clips[full] = clip.cpu()
            _awq_finish_linear(block, name, full, H, clip, scheme, gptq, rec)


def _load_awq_search(path: Path, scheme: IntScheme, arch, nblocks: int, need_hessians: bool) -> AWQSearch:
    try:
        search = load_search(path)
    except (ValueError, OSError) as e:
        raise CompressError(f"cannot load AWQ search results from {path}: {e}") from None
    if search.scheme != _scheme_key(scheme):
        raise CompressError(f"{path} was searched for {search.scheme}, not for {_scheme_key(scheme)}: "
                            "scales and clip ranges depend on the grid")
    need = [group_key(arch, i, g) for i in range(nblocks) for g in arch.groups]
    missing = [k for k in need if k not in search.alphas]
    if missing:
        raise CompressError(f"{path} has no AWQ results for {missing[0]} (and {len(missing) - 1} more)")
    if need_hessians:
        missing = [k for k in need if k not in search.hessians]
        if missing:
            raise CompressError(f"{path} has no Hessians (needed by awq+gptq) for {missing[0]}: "
                                "save them with --method awq+gptq --save-stats")
    return search


def awq_model(loaded, scheme: IntScheme, windows: torch.Tensor | None, opts: AWQOptions | None = None,
              gptq: GPTQOptions | None = None, save_stats_path: Path | None = None,
              load_stats_path: Path | None = None, device: str = "cpu", budget: int = DEFAULT_BUDGET,
              progress: bool = True) -> RunRecord:
    """AWQ scaling and clipping, then round-to-nearest (``gptq=None``) or GPTQ on the transformed
    weights; replaces every decoder-block linear by a QuantLinear (gptq-int) in place.

    With ``load_stats_path`` the saved scales, clip ranges (and Hessians, for GPTQ) are applied
    without calibration data.
    """
    opts = opts or AWQOptions()
    if opts.clip is None:
        opts = dataclasses.replace(opts, clip=gptq is None)
    model, arch = loaded.model, loaded.arch
    rec = RunRecord()
    t0 = time.perf_counter()
    skip = set(opts.clip_skip if opts.clip_skip is not None else arch.qk_linears)
    blocks = arch.get_blocks(model)
    if load_stats_path is not None:
        search = _load_awq_search(load_stats_path, scheme, arch, len(blocks), gptq is not None)
        if opts.clip and not search.clips:
            raise CompressError(f"{load_stats_path} holds no clip ranges (searched without clipping); "
                                "quantize without clipping (AWQOptions(clip=False), --no-awq-clip) or search again")
        for i, block in enumerate(blocks):
            for g in arch.groups:
                key = group_key(arch, i, g)
                if key in search.scales:
                    apply_scale(block.get_submodule(g.prev), [block.get_submodule(n) for n in g.linears],
                                search.scales[key])
            for g in arch.groups:
                H = search.hessians.get(group_key(arch, i, g))
                for name in g.linears:
                    full = f"{arch.blocks}.{i}.{name}"
                    clip = search.clips.get(full) if opts.clip else None
                    _awq_finish_linear(block, name, full, H, clip, scheme, gptq, rec)
    else:
        if windows is None:
            raise CompressError("AWQ needs calibration windows")
        search = AWQSearch(scheme=_scheme_key(scheme), options=opts.to_dict())
        keep_h = save_stats_path is not None and gptq is not None

        def process(i, block, inputs):
            _awq_scale_block(i, block, inputs, arch, scheme, opts, search)
            _awq_quantize_block(i, block, inputs, arch, scheme, opts, gptq, skip, search, rec, keep_h)

        run_sequential(model, arch, windows, process, budget=budget, device=device, progress=progress,
                       desc="awq+gptq" if gptq is not None else "awq")
        if save_stats_path is not None:
            save_search(save_stats_path, search)
    replace_with_packed(model, rec)
    rec.extra["awq_alphas"] = dict(search.alphas)
    rec.extra["awq_options"] = opts.to_dict()
    rec.seconds = time.perf_counter() - t0
    return rec


def awq_scale_model(loaded, scheme: IntScheme, windows: torch.Tensor, opts: AWQOptions | None = None,
                    device: str = "cpu", budget: int = DEFAULT_BUDGET, progress: bool = True) -> AWQSearch:
    """Only AWQ's scale search and transform (no clipping, no quantization): the float model
    computes the same function afterwards. Returns the scales and alphas found."""
    opts = opts or AWQOptions()
    search = AWQSearch(scheme=_scheme_key(scheme), options=opts.to_dict())
    run_sequential(loaded.model, loaded.arch, windows,
                   lambda i, block, inputs: _awq_scale_block(i, block, inputs, loaded.arch, scheme, opts, search),
                   budget=budget, device=device, progress=progress, desc="awq-scale")
    return search


# --------------------------------------------------------------------------- SmoothQuant

@torch.no_grad()
def _smooth_block(i: int, block, arch, opts: SmoothQuantOptions, absmax: dict, rec: RunRecord) -> dict:
    """Smooth every group of the block that can be; returns each linear's smoothed input max |x| (K,)."""
    smoothed = {}
    for g in arch.groups:
        key = group_key(arch, i, g)
        prev = block.get_submodule(g.prev)
        lins = [block.get_submodule(n) for n in g.linears]
        a = absmax[key].to(lins[0].weight.device, torch.float32)
        ok, why = can_scale(prev, lins[0].in_features)
        if ok and isinstance(prev, torch.nn.Linear) and not opts.smooth_linear_prev:
            ok, why = False, "input produced by a linear (smooth_linear_prev is off)"
        if ok:
            s = smooth_scales(a, [lin.weight.data for lin in lins], opts.alpha)
            apply_scale(prev, lins, s)
            a = a / s
            rec.extra.setdefault("smoothed_groups", []).append(key)
        else:
            log.info("%s: not smoothed: %s", key, why)
        for name in g.linears:
            smoothed[name] = a
    return smoothed


@torch.no_grad()
def _w8a8_block(i: int, block, arch, scheme: W8A8Scheme, smoothed: dict, rec: RunRecord) -> None:
    """Swap the block's linears for W8A8Linear modules (static scale: the smoothed input's max / 127)."""
    for g in arch.groups:
        for name in g.linears:
            scale = w8a8.static_input_scale(smoothed[name].max()) if scheme.act_scheme == "static" else None
            q = W8A8Linear.from_float(block.get_submodule(name), scale)
            set_submodule(block, name, q)
            rec.packed[f"{arch.blocks}.{i}.{name}"] = q.packed()


def _absmax_block(i: int, block, inputs, arch) -> dict:
    """Per group, the per-channel max |x| of its input over every stored window (one block pass)."""
    accs, handles = {}, []
    try:
        for g in arch.groups:
            first = block.get_submodule(g.linears[0])
            accs[group_key(arch, i, g)] = acc = AbsMaxAccumulator(first.in_features)
            handles.append(first.register_forward_hook(acc.hook))
        inputs.run(block)
    finally:
        for h in handles:
            h.remove()
    return accs


def smooth_model(loaded, windows: torch.Tensor, opts: SmoothQuantOptions | None = None, device: str = "cpu",
                 budget: int = DEFAULT_BUDGET, progress: bool = True) -> RunRecord:
    """Only the SmoothQuant migration (no quantization): the float model computes the same function."""
    opts = opts or SmoothQuantOptions()
    rec = RunRecord()
    arch = loaded.arch

    def process(i, block, inputs):
        accs = _absmax_block(i, block, inputs, arch)
        _smooth_block(i, block, arch, opts, {k: a.absmax() for k, a in accs.items()}, rec)

    run_sequential(loaded.model, arch, windows, process, budget=budget, device=device, progress=progress,
                   desc="smooth")
    return rec


def smoothquant_model(loaded, scheme: W8A8Scheme, windows: torch.Tensor | None, opts: SmoothQuantOptions | None = None,
                      save_stats_path: Path | None = None, load_stats_path: Path | None = None,
                      device: str = "cpu", budget: int = DEFAULT_BUDGET, progress: bool = True) -> RunRecord:
    """SmoothQuant migration then W8A8 (w8a8-int8); replaces the block linears by W8A8Linear in place.

    Statistics: per group, the per-channel max |x| of its input (collected on the float block with
    the earlier blocks already W8A8, so block i+1 sees int8 activations as at inference). They are
    what ``--save-stats`` stores; reloading them reproduces the run for any alpha or act scheme.
    """
    opts = opts or SmoothQuantOptions()
    if not isinstance(scheme, W8A8Scheme):
        raise CompressError("SmoothQuant writes W8A8 (8-bit per-channel symmetric weights); got " + scheme.describe())
    model, arch = loaded.model, loaded.arch
    rec = RunRecord()
    t0 = time.perf_counter()
    blocks = arch.get_blocks(model)
    if load_stats_path is not None:
        try:
            stats = load_stats(load_stats_path)
        except (ValueError, OSError) as e:
            raise CompressError(f"cannot load statistics from {load_stats_path}: {e}") from None
        need = [group_key(arch, i, g) for i in range(len(blocks)) for g in arch.groups]
        missing = [k for k in need if k not in stats]
        if missing:
            raise CompressError(f"{load_stats_path} has no statistics for {missing[0]} (and {len(missing) - 1} more)")
        wrong = [k for k in need if not isinstance(stats[k], AbsMaxAccumulator)]
        if wrong:
            raise CompressError(f"{load_stats_path}: {wrong[0]} holds {stats[wrong[0]].kind} statistics, "
                                "SmoothQuant needs activation abs-max (save them with --method smoothquant)")
        for i, block in enumerate(blocks):
            absmax = {group_key(arch, i, g): stats[group_key(arch, i, g)].absmax() for g in arch.groups}
            _w8a8_block(i, block, arch, scheme, _smooth_block(i, block, arch, opts, absmax, rec), rec)
    else:
        if windows is None:
            raise CompressError("SmoothQuant needs calibration windows")
        saved = {}

        def process(i, block, inputs):
            accs = _absmax_block(i, block, inputs, arch)
            if save_stats_path is not None:
                saved.update(accs)
            smoothed = _smooth_block(i, block, arch, opts, {k: a.absmax() for k, a in accs.items()}, rec)
            # quantized only now: a later group's smoothing may divide an earlier group's rows (up_proj)
            _w8a8_block(i, block, arch, scheme, smoothed, rec)

        run_sequential(model, arch, windows, process, budget=budget, device=device, progress=progress,
                       desc="smoothquant")
        if save_stats_path is not None:
            save_stats(save_stats_path, saved)
    replace_with_packed(model, rec)
    rec.seconds = time.perf_counter() - t0
    return rec

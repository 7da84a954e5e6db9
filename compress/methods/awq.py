"""AWQ (Lin et al., 2023): activation-aware scaling as a function-preserving transform, plus a
weight-clipping search, then round-to-nearest (``awq``) or GPTQ (``awq+gptq``).

Per block, two phases over the groups of linears sharing an input (the architecture description's
groups, in execution order):

1. scales: one pass of the float block collects, for every group, the mean |x| of its input and
   what its objective needs (the inputs and output of the module consuming the group, or the
   Hessian of the input); then group by group the scale is searched and applied to the float block
   (:func:`~compress.solvers.awq_search.search_scale`, :func:`~compress.methods.scaling.apply_scale`).
   A group whose ``prev`` cannot absorb the scale is skipped. The scales are searched before any
   linear of the block is quantized because a later group's scale divides an earlier group's
   linear (up_proj rows for down_proj); dividing a quantized weight's rows would break its grid.
2. quantization, true-sequential: group by group the Hessian of the (scaled) input is collected
   with the earlier groups quantized, each linear's clip range is searched and applied, then the
   linear is quantized: round-to-nearest, or GPTQ with that Hessian.

``--save-stats`` keeps the Hessians, scales (``<group>/awq_scales``), alphas and clip ranges
(``<linear>/awq_clip``); ``--load-stats`` applies them without calibration data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from calib.stats import HessianAccumulator, MeanAbsAccumulator

from ..config import IntOptions, opt
from ..errors import CompressError
from ..formats import gptq_int
from ..quantizer import dequantize_values, quantize_rtn
from ..registry import Method, register
from ..solvers.awq_search import apply_clip, clip_search, hessian_error, search_scale
from ..solvers.obs import output_error
from .gptq import GPTQOptions, block_hessians, gptq_into
from .scaling import apply_scale, group_can_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQOptions(IntOptions):
    """Search settings (the AWQ reference's defaults, except where noted).

    clip None (default) clips for ``awq`` and not before GPTQ (``awq+gptq``): the clip ranges are
    chosen for round-to-nearest, and clipping before GPTQ removes weight mass that GPTQ then cannot
    compensate (it measured worse on SmolLM2). ``clip_skip``: linears (block-relative names) never
    clipped; None takes the architecture's ``qk_linears`` (AWQ skips them too).
    """

    objective: str = opt("module", "AWQ: scale-search error at the output of the module consuming the group "
                                   "(attention, MLP) or of the linears themselves (faster).",
                         choices=("module", "linear"), flag="--awq-objective")
    clip: bool | None = opt(None, "AWQ: search and apply weight clipping [default: on for awq, off for awq+gptq].",
                            flag="--awq-clip/--no-awq-clip")
    n_grid: int = opt(20, "AWQ: alpha candidates i/n for i < n (and clip steps of 1/n).", min=1,
                      flag="--awq-n-grid")
    max_shrink: float = opt(0.5, "AWQ: the clip search tries ranges down to (1 - this) of the max.", min=0, max=1,
                            open_max=True, flag="--awq-max-shrink")
    search_windows: int = opt(8, "AWQ: calibration windows the module objective re-runs for each alpha.", min=1,
                              flag="--awq-search-windows")
    clip_skip: tuple | None = None


@dataclass(frozen=True)
class AWQGPTQOptions(AWQOptions, GPTQOptions):
    pass


def _consumer(group) -> str | None:
    """Block-relative name of the module consuming a group of several linears (their lowest common
    parent, e.g. ``self_attn`` for q/k/v, ``mlp`` for gate/up), or None."""
    if len(group.linears) < 2:
        return None
    parents = [n.split(".")[:-1] for n in group.linears]
    common = []
    for parts in zip(*parents):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common) or None


class ModuleRecorder:
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


@register
class AWQ(Method):
    name = "awq"
    needs_description = True
    summary = "AWQ scaling and clipping, then round-to-nearest"
    config = AWQOptions
    use_gptq = False

    def clip_on(self) -> bool:
        return self.cfg.clip if self.cfg.clip is not None else not self.use_gptq

    def process_block(self, blk) -> None:
        groups = blk.groups()
        self._scale(blk, groups)
        skip = set(self.cfg.clip_skip if self.cfg.clip_skip is not None else blk.arch.qk_linears)
        hessians = block_hessians(blk, self.cfg) if self.use_gptq else ((g, blk.hessian(g).hessian()) for g in groups)
        for g, H in hessians:
            for name in blk.targeted(g):
                self._quantize(blk, name, H, name not in skip)

    @torch.no_grad()
    def _scale(self, blk, groups) -> None:
        scalable = {g: group_can_scale(blk.block, g, blk.linear(g.linears[0]).in_features) for g in groups}
        means, hessians, recorders, handles = {}, {}, {}, []
        if blk.stats.loaded is None:
            try:
                for g in groups:
                    if not scalable[g][0]:
                        continue
                    first = blk.linear(g.linears[0])
                    means[g] = MeanAbsAccumulator(first.in_features)
                    handles.append(first.register_forward_hook(means[g].hook))
                    consumer = _consumer(g) if self.cfg.objective == "module" else None
                    if consumer is not None:
                        recorders[g] = (consumer, ModuleRecorder(self.cfg.search_windows))
                        handles.append(blk.block.get_submodule(consumer).register_forward_hook(
                            recorders[g][1].hook, with_kwargs=True))
                    else:
                        hessians[g] = HessianAccumulator(first.in_features)
                        handles.append(first.register_forward_hook(hessians[g].hook))
                blk.inputs.run(blk.block)
            finally:
                for h in handles:
                    h.remove()
        alphas = blk.record.extra.setdefault("awq_alphas", {})
        for g in groups:
            key = blk.key(g)
            prev = blk.block.get_submodule(g.prev)
            lins = [blk.linear(n) for n in g.linears]
            ok, why = scalable[g]
            if not ok:
                log.info("%s: AWQ scaling skipped: %s", key, why)
                alphas[key] = None
                continue
            scheme = blk.scheme(blk.targeted(g)[0])
            grid = torch.tensor([scheme.bits, scheme.group_size, int(scheme.sym)])
            if blk.stats.loaded is not None:
                s, alpha = blk.stats.get(f"{key}/awq_scales"), float(blk.stats.get(f"{key}/awq_alpha"))
                saved = blk.stats.get(f"{key}/awq_grid")
                if not torch.equal(saved, grid):
                    b, gs, sym = saved.tolist()
                    raise CompressError(f"{blk.stats.source}: the AWQ scales of {key} were searched for "
                                        f"int{b} g{gs} {'sym' if sym else 'asym'}, not for {scheme.describe()}: "
                                        "scales depend on the grid")
            else:
                weights = [lin.weight.data for lin in lins]
                if g in recorders:
                    name, r = recorders.pop(g)
                    err = r.error_fn(blk.block.get_submodule(name), lins)
                else:
                    err = hessian_error(hessians.pop(g).hessian(), weights)
                res = search_scale(weights, means.pop(g).mean(), scheme, err, self.cfg.n_grid)
                s, alpha = res.scales, res.alpha
                log.info("%s: AWQ alpha %.2f (error %.4g -> %.4g)", key, alpha, res.baseline_error, res.best_error)
            apply_scale(prev, lins, s, blk.arch.norm_offset)
            blk.stats.put(f"{key}/awq_scales", s.cpu())
            blk.stats.put(f"{key}/awq_alpha", torch.tensor(alpha))
            blk.stats.put(f"{key}/awq_grid", grid)
            alphas[key] = alpha

    @torch.no_grad()
    def _quantize(self, blk, name: str, H: torch.Tensor, clip_allowed: bool) -> None:
        lin, full, scheme = blk.linear(name), blk.full(name), blk.scheme(name)
        w = lin.weight.data
        if self.clip_on() and clip_allowed:
            clip = blk.stats.get(f"{full}/awq_clip")
            if clip is None:
                clip = clip_search(w, H, scheme, self.cfg.n_grid, self.cfg.max_shrink)
            blk.stats.put(f"{full}/awq_clip", clip.cpu())
            lin.weight.data = apply_clip(w, clip, scheme).to(w.dtype)
        if self.use_gptq:
            gptq_into(blk.record, blk.block, name, full, H, scheme, self.cfg, keep_zeros=full in blk.pruned)
            return
        q, s, z, g = quantize_rtn(lin.weight.data, scheme)
        dq = dequantize_values(q, s, z, g)
        blk.record.add(full, gptq_int.pack(q.cpu(), s.cpu(), z.cpu(), g.cpu(), scheme.bits), scheme.to_dict(),
                       0.5 * output_error(w, dq, H))
        lin.weight.data = dq.to(w.device, w.dtype)

    def metadata(self, record=None) -> dict:
        alphas = [a for a in (record.extra.get("awq_alphas", {}) if record else {}).values() if a is not None]
        return {**self.cfg.to_dict(), "clip": self.clip_on(), "scaled_groups": len(alphas),
                "mean_alpha": round(sum(alphas) / len(alphas), 4) if alphas else None}


@register
class AWQGPTQ(AWQ):
    name = "awq+gptq"
    summary = "AWQ scaling, then GPTQ on the scaled weights"
    config = AWQGPTQOptions
    use_gptq = True

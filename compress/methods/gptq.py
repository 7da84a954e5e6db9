"""GPTQ (Frantar et al., 2022): each linear quantized column by column against the Hessian of its
input, collected while the runner replays the block (true-sequential: a group's Hessian is
collected with the block's earlier groups already quantized). The solve is
:func:`compress.solvers.int_grid.gptq_solve` on the shared column sweep."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import IntOptions, opt
from ..formats import gptq_int
from ..registry import Method, register
from ..solvers.int_grid import GRIDS, gptq_solve


@dataclass(frozen=True)
class GPTQOptions(IntOptions):
    """GPTQ's options (also taken by awq+gptq)."""

    act_order: bool = opt(True, "GPTQ: quantize columns by decreasing Hessian diagonal (g_idx).",
                          flag="--act-order/--no-act-order")
    static_groups: bool = opt(True, "GPTQ: fix group grids before the column sweep (g_idx stays in natural "
                                    "order); off: each group's grid is fitted when the sweep reaches it.",
                              flag="--static-groups/--no-static-groups")
    damp: float = opt(0.01, "GPTQ: dampening, relative to the mean Hessian diagonal.", min=0, max=1,
                      open_min=True, open_max=True)
    block_size: int = opt(128, "GPTQ: columns per lazy batch update.", min=1)
    grid: str = opt("minmax", "GPTQ: each group's grid spans its min and max, or the shrunken range with the "
                              "least loss-weighted rounding error (mse).", choices=GRIDS)
    true_sequential: bool = opt(False, "GPTQ: collect each group's Hessian with the block's earlier groups already "
                                       "quantized (about 1.4x the time); off: every group's Hessian from one pass of "
                                       "the block as the previous blocks left it, as llm-compressor does.",
                                flag="--true-sequential/--no-true-sequential")


def block_hessians(blk, cfg: GPTQOptions):
    """Yield ``(group, H)`` for the block's groups in execution order: each collected just before it
    is solved (true-sequential), or all from one pass of the block as it was."""
    from calib.stats import HessianAccumulator
    groups = blk.groups()
    if cfg.true_sequential:
        for g in groups:
            yield g, blk.hessian(g).hessian()
        return
    accs = blk.observe_inputs({g: HessianAccumulator for g in groups})
    for g in groups:
        yield g, accs[blk.key(g)].hessian()


def gptq_into(record, module: torch.nn.Module, name: str, full: str, H: torch.Tensor, scheme,
              cfg: GPTQOptions, keep_zeros: bool = False) -> None:
    """Solve ``module.<name>`` against ``H``, record the packed result under ``full``, and leave the
    quantized values in its weight so that later groups and blocks see them. ``keep_zeros``: the
    layer was pruned by an earlier step; its zeros stay exactly zero."""
    lin = module.get_submodule(name) if name else module
    w = lin.weight.data
    keep = (w != 0) if keep_zeros else None
    res = gptq_solve(w.to(torch.float32), H.to(w.device, torch.float32), scheme, damp=cfg.damp,
                     block_size=cfg.block_size, static_groups=cfg.static_groups, grid=cfg.grid, keep=keep)
    record.add(full, gptq_int.pack(res.q.cpu(), res.scales.cpu(), res.zeros.cpu(), res.g_idx.cpu(), scheme.bits),
               scheme.to_dict(), res.loss, res.fallback)
    lin.weight.data = res.dequantize().to(w.device, w.dtype)


@register
class GPTQ(Method):
    name = "gptq"
    distributed = True
    summary = "GPTQ onto the integer grid, against each layer's input Hessian"
    config = GPTQOptions
    lm_head = True

    def process_block(self, blk) -> None:
        for group, H in block_hessians(blk, self.cfg):
            blk.solve_each(blk.targeted(group), lambda name, H=H: gptq_into(
                blk.record, blk.block, name, blk.full(name), H, blk.scheme(name), self.cfg,
                keep_zeros=blk.full(name) in blk.pruned))

    def process_head(self, run, inputs) -> None:
        name = run.arch.lm_head
        from calib.stats import HessianAccumulator
        gptq_into(run.record, run.model, name, name, run.head_stats(inputs, HessianAccumulator).hessian(),
                  self.scheme_for(name, run.targets.override_for(name)), self.cfg, keep_zeros=run.head_pruned())

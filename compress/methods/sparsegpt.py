"""SparseGPT (Frantar & Alistarh, 2023): each linear pruned column by column against the Hessian
of its input, the kept weights updated to compensate (the shared optimal-brain-surgeon sweep,
:func:`compress.solvers.sparsegpt.sparsegpt_solve`). With ``--bits`` the kept weights are also
rounded onto the integer grid in the same sweep, and the output is a packed checkpoint whose
pruned weights are exact zeros."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..errors import CompressError
from ..formats import gptq_int
from ..registry import register
from ..solvers.masks import parse_pattern
from ..solvers.sparsegpt import sparsegpt_solve
from .gptq import block_hessians
from .pruning import JointOptions, PruneMethod


@dataclass(frozen=True)
class SparseGPTOptions(JointOptions):
    damp: float = opt(0.01, "Dampening, relative to the mean Hessian diagonal.", min=0, max=1,
                      open_min=True, open_max=True)
    block_size: int = opt(128, "Columns per lazy batch update (a multiple of the pattern's M).", min=1)
    true_sequential: bool = opt(False, "Collect each group's Hessian with the block's earlier groups already pruned; "
                                       "off: every group's Hessian from one pass of the block.",
                                flag="--true-sequential/--no-true-sequential")

    def check(self) -> None:
        super().check()
        nm = parse_pattern(self.pattern)
        if nm is not None and self.block_size % nm[1]:
            raise CompressError(f"--block-size {self.block_size} must be a multiple of the pattern's M ({nm[1]})")


@register
class SparseGPT(PruneMethod):
    name = "sparsegpt"
    distributed = True
    summary = "OBS pruning against each layer's input Hessian, kept weights updated; --bits prunes and quantizes at once"
    config = SparseGPTOptions

    def process_block(self, blk) -> None:
        for group, H in block_hessians(blk, self.cfg):
            blk.solve_each(blk.targeted(group), lambda name, H=H: self._solve(blk, name, H))

    def _solve(self, blk, name: str, H) -> None:
        sc = self.layer_scheme(blk, name)
        res = self._sweep(blk.linear(name).weight.data, H, sc)
        packed = None
        if sc.quant is not None:
            packed = gptq_int.pack(res.q.cpu(), res.scales.cpu(), res.zeros.cpu(), res.g_idx.cpu(), sc.quant.bits)
        self.record_layer(blk, name, res.weight, sc, res.loss, res.fallback, packed)

    def prune_head(self, run, inputs, w, sc):
        from calib.stats import HessianAccumulator
        res = self._sweep(w, run.head_stats(inputs, HessianAccumulator).hessian(), sc)
        return res.weight, res.loss

    def _sweep(self, w, H, sc):
        return sparsegpt_solve(w.float(), H.to(w.device), sc.sparsity, sc.nm, sc.quant, damp=self.cfg.damp,
                               block_size=self.cfg.block_size)

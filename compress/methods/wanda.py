"""Wanda (Sun et al., 2024): pruning by weights and activations. A weight's score is
``|W[n, k]| * ||x_k||`` (the norm of its input column over the calibration tokens); each output row
loses its lowest-scoring fraction (or the lowest M - N of every M with a pattern). No weight
update. The input norms of all the block's linears come from one pass of the block as the
previous (already pruned) blocks leave it, as in the reference implementation."""
from __future__ import annotations

from dataclasses import dataclass

from calib.stats import ImportanceAccumulator

from ..registry import register
from ..solvers.masks import keep_mask
from .pruning import PruneMethod, PruneOptions


@dataclass(frozen=True)
class WandaOptions(PruneOptions):
    pass


@register
class Wanda(PruneMethod):
    name = "wanda"
    distributed = True
    summary = "weights times input-activation norms, pruned per output row (calibrated, no weight update)"
    config = WandaOptions

    def process_block(self, blk) -> None:
        groups = blk.groups()
        accs = blk.observe_inputs({g: ImportanceAccumulator for g in groups})
        for g in groups:
            norm = accs[blk.key(g)].importance().sqrt()
            for name in blk.targeted(g):
                sc = self.layer_scheme(blk, name)
                self.record_layer(blk, name, _pruned(blk.linear(name).weight.detach(), norm, sc), sc)

    def prune_head(self, run, inputs, w, sc):
        return _pruned(w, run.head_stats(inputs, ImportanceAccumulator).importance().sqrt(), sc), None


def _pruned(w, norm, sc):
    """``w`` without the lowest ``|W| * ||x||`` scores of each output row (``norm``: the input norms)."""
    return w * keep_mask(w.abs().float() * norm.to(w.device)[None, :], sc.sparsity, sc.nm, per_row=True)

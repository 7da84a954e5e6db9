"""Magnitude pruning: no calibration, each linear loses its smallest weights by absolute value
(the lowest fraction of the whole layer, or the lowest M - N of every M with a pattern). The
baseline the calibrated methods are measured against."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CompressError
from ..registry import register
from ..solvers.masks import keep_mask
from .pruning import PruneMethod, PruneOptions


@dataclass(frozen=True)
class MagnitudeOptions(PruneOptions):
    def check(self) -> None:
        super().check()
        if self.profile != "uniform":
            raise CompressError(f"--profile {self.profile} measures activations: use wanda or sparsegpt "
                                "(magnitude pruning reads no calibration data)")


@register
class Magnitude(PruneMethod):
    name = "magnitude"
    summary = "smallest weights by absolute value set to zero (no calibration)"
    config = MagnitudeOptions
    calibrated = False

    def apply(self, blk, group, stats) -> None:
        for name in blk.targeted(group):
            sc = self.layer_scheme(blk, name)
            self.record_layer(blk, name, _pruned(blk.linear(name).weight.detach(), sc), sc)

    def prune_head(self, run, inputs, w, sc):
        return _pruned(w, sc), None


def _pruned(w, sc):
    """``w`` without its smallest weights by absolute value (of the whole layer, or per N:M group)."""
    return w * keep_mask(w.abs(), sc.sparsity, sc.nm)

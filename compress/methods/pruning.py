"""What every pruning method shares: its options (sparsity, N:M pattern, layer profile, optional
joint quantization), the scheme of one module, outlier-weighted layerwise sparsity (OWL), and how a
pruned layer is recorded. The methods themselves are ``magnitude.py``, ``wanda.py`` and
``sparsegpt.py``.

OWL (Yin et al., 2024): one dense pass over the calibration windows measures, per decoder block,
the fraction of the block's weights whose Wanda score ``|W| * ||x||`` exceeds ``M`` times the
block's mean score. Blocks with more outliers are pruned less: the ratios are scaled into
``[0, 2 * lambda]``, centred, and the block's sparsity is ``target - (ratio - mean)``, so the
model-wide mean stays the target. The per-block sparsities are recorded in the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GROUP_HELP, MethodConfig, opt
from ..errors import CompressError
from ..registry import Method
from ..scheme import INT_BITS, IntScheme
from ..solvers.masks import check_pattern_fits, parse_pattern, pattern_sparsity, sparsity_of

PROFILES = ("uniform", "owl")
DEFAULT_SPARSITY = 0.5


@dataclass(frozen=True)
class PruneScheme:
    """How one module is pruned: the fraction of zeros (or an N:M pattern) and, for joint pruning
    and quantization, the integer scheme of the kept weights."""

    sparsity: float
    nm: tuple[int, int] | None = None
    quant: IntScheme | None = None

    def describe(self) -> str:
        s = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{100 * self.sparsity:.1f}%"
        return s + (f" + {self.quant.describe()}" if self.quant else "")


@dataclass(frozen=True)
class PruneOptions(MethodConfig):
    sparsity: float | None = opt(None, f"Fraction of the weights set to zero [default: {DEFAULT_SPARSITY}, or the "
                                       "pattern's].", min=0, max=1, open_min=True, open_max=True)
    pattern: str | None = opt(None, "N:M semi-structured sparsity: at most N nonzero weights in every M consecutive "
                                    "weights of a row (2:4, 4:8).")
    profile: str = opt("uniform", "Sparsity per decoder block: the same everywhere, or outlier-weighted (owl: "
                                  "blocks with more activation outliers keep more weights; the mean stays --sparsity).",
                       choices=PROFILES)
    owl_lambda: float = opt(0.08, "OWL: block sparsities range over target +- this.", min=0, max=0.5)
    owl_m: float = opt(5.0, "OWL: a weight is an outlier when its score exceeds this times the block's mean score.",
                       min=0, open_min=True)

    def check(self) -> None:
        nm = parse_pattern(self.pattern)
        if nm is not None and self.sparsity is not None and abs(self.sparsity - pattern_sparsity(nm)) > 1e-9:
            raise CompressError(f"--sparsity {self.sparsity} disagrees with --pattern {self.pattern}, which sets "
                                f"{pattern_sparsity(nm):g} (give one of them)")
        if nm is not None and self.profile != "uniform":
            raise CompressError(f"--profile {self.profile} varies the sparsity per block; --pattern {self.pattern} "
                                "fixes it (use one of them)")
        self.scheme()

    @property
    def target(self) -> float:
        nm = parse_pattern(self.pattern)
        return pattern_sparsity(nm) if nm else (DEFAULT_SPARSITY if self.sparsity is None else self.sparsity)

    def quant_scheme(self, **override) -> IntScheme | None:
        return None

    def scheme(self, **override) -> PruneScheme:
        """This module's scheme; an override may change ``sparsity``/``pattern`` (and the joint
        quantization's ``bits``/``group_size``/``sym``)."""
        prune = {k: override.pop(k) for k in ("sparsity", "pattern") if k in override}
        pattern = prune.get("pattern", self.pattern)
        nm = parse_pattern(pattern)
        sparsity = prune.get("sparsity")
        if sparsity is None:
            sparsity = pattern_sparsity(nm) if nm else self.target
        elif not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise CompressError(f"sparsity must be in (0, 1), got {sparsity!r}")
        elif nm is not None and abs(sparsity - pattern_sparsity(nm)) > 1e-9:
            raise CompressError(f"sparsity {sparsity} disagrees with pattern {pattern}")
        quant = self.quant_scheme(**override)
        if override and quant is None:
            raise CompressError(f"unknown scheme field(s) {', '.join(override)} for pruning (sparsity, pattern)")
        return PruneScheme(float(sparsity), nm, quant)


@dataclass(frozen=True)
class JointOptions(PruneOptions):
    """Pruning options plus the integer grid the kept weights may be rounded onto in the same pass."""

    bits: int | None = opt(None, "Also quantize the kept weights to this many bits in the same sweep (joint mode).",
                           choices=INT_BITS)
    group_size: int = opt(128, GROUP_HELP)
    sym: bool = opt(False, "Symmetric or asymmetric grid.", flag="--sym/--asym")

    def quant_scheme(self, **override) -> IntScheme | None:
        if self.bits is None and "bits" not in override:
            return None
        d = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        d.update(override)
        override.clear()
        return IntScheme(**d)


class PruneMethod(Method):
    """Base of the pruning methods: the per-module scheme (with the block's OWL sparsity), the
    checks, and recording a pruned (and possibly quantized) layer."""

    kind = "prune"
    format = "gptq-int"
    lm_head = True
    unties_head = False

    @classmethod
    def writes(cls, cfg) -> str | None:
        return cls.format if getattr(cfg, "bits", None) is not None else None

    def check_module(self, full_name: str, linear: torch.nn.Linear, override: dict) -> None:
        sc = self.scheme_for(full_name, dict(override))
        check_pattern_fits(sc.nm, linear.in_features, full_name)
        if sc.quant is not None:
            sc.quant.check_layer(linear.in_features, full_name)

    def scheme_for(self, full_name: str, override: dict):
        return self.cfg.scheme(**dict(override))

    def begin(self, run) -> None:
        if self.cfg.profile == "owl":
            saved = run.record.extra.get("block_sparsity")      # a resumed run keeps the ratios it measured
            run.state["block_sparsity"] = saved or owl_sparsities(run, self.cfg)
            run.record.extra["block_sparsity"] = run.state["block_sparsity"]

    def layer_scheme(self, blk, name: str) -> PruneScheme:
        """The scheme of block-relative ``name``: with OWL, the block's sparsity unless an override
        sets one."""
        override = blk.targets.override_for(blk.full(name))
        sc = self.scheme_for(blk.full(name), override)
        per_block = blk.run_state.get("block_sparsity")
        if per_block is not None and "sparsity" not in override:
            sc = PruneScheme(per_block[blk.i], sc.nm, sc.quant)
        return sc

    def record_layer(self, blk, name: str, weight: torch.Tensor, sc: PruneScheme, loss: float | None = None,
                     fallback: str | None = None, packed=None) -> None:
        """Put the pruned ``weight`` into the block and record its measured sparsity (and the packed
        result of joint quantization)."""
        record_pruned(blk.record, blk.linear(name), blk.full(name), weight, sc, loss, fallback, packed)

    @classmethod
    def check_head(cls, cfg) -> None:
        if getattr(cfg, "bits", None) is not None:
            raise CompressError("--lm-head prunes the lm_head in float; with --bits, quantize it in a later "
                                "step (a recipe's gptq or rtn step with lm_head: true keeps its zeros)")

    def process_head(self, run, inputs) -> None:
        """Prune the lm_head with this method. A tied lm_head is the embedding table: the one matrix
        is pruned for both uses (and stored, and recorded, under the embedding's name)."""
        name = run.arch.lm_head
        head = run.model.get_submodule(name)
        sc = self.scheme_for(name, run.targets.override_for(name))
        weight, loss = self.prune_head(run, inputs, head.weight.detach(), sc)
        record_pruned(run.record, head, run.tied_table() or name, weight, sc, loss)

    def prune_head(self, run, inputs, w: torch.Tensor, sc: PruneScheme) -> tuple[torch.Tensor, float | None]:
        """The pruned lm_head weight ``w`` (and its loss, if the method measures one)."""
        raise NotImplementedError

    def metadata(self, record=None) -> dict:
        d = self.cfg.to_dict()
        if record is not None and record.extra.get("block_sparsity"):
            d["block_sparsity"] = record.extra["block_sparsity"]
        return d


def record_pruned(record, lin: torch.nn.Linear, full: str, weight: torch.Tensor, sc: PruneScheme,
                  loss: float | None = None, fallback: str | None = None, packed=None) -> None:
    """Put ``weight`` into ``lin`` (a tied table is the same parameter: it changes too) and record its measured
    sparsity and pattern under ``full`` (and the packed result of joint quantization)."""
    lin.weight.data = weight.to(lin.weight.device, lin.weight.dtype)
    record.extra.setdefault("sparsity", {})[full] = round(sparsity_of(lin.weight.data), 6)
    if sc.nm is not None:
        record.extra.setdefault("pattern", {})[full] = f"{sc.nm[0]}:{sc.nm[1]}"
    if packed is not None:
        record.add(full, packed, sc.quant.to_dict(), loss, fallback)
    else:
        record.note(full, loss, fallback)


def owl_sparsities(run, cfg: PruneOptions) -> list[float]:
    """Per decoder block sparsity from one dense pass over the calibration windows (module doc)."""
    from calib.runner import run_sequential
    from calib.stats import ImportanceAccumulator
    if run.windows is None:
        raise CompressError("--profile owl needs calibration windows")
    model, arch = run.model, run.arch
    ratios: list[float] = [0.0] * len(arch.get_blocks(model))

    def process(i, block, inputs):
        names = [n for n in arch.block_linears if run.targets.selects(f"{arch.blocks}.{i}.{n}")
                 and isinstance(block.get_submodule(n), torch.nn.Linear)]
        watch = {n: (block.get_submodule(n), lambda k=block.get_submodule(n).in_features: ImportanceAccumulator(k))
                 for n in names}
        accs = inputs.accumulate(block, watch) if names else {}
        if names:
            scores = torch.cat([(block.get_submodule(n).weight.detach().abs().float()
                                 * accs[n].importance().sqrt()[None, :]).flatten() for n in names])
            ratios[i] = float((scores > cfg.owl_m * scores.mean()).float().mean())

    stream = run.loaded.stream            # a streamed model's blocks are read for this pass and put away
    run_sequential(model, arch, run.windows, process, device=run.device, progress=run.progress, desc="owl",
                   before_block=stream.load_block if stream is not None else None,
                   after_block=(lambda i, _: stream.drop_block(arch.get_blocks(model)[i])) if stream is not None else None)
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0:
        return [cfg.target] * len(ratios)
    r = (r - r.min()) / spread * (2 * cfg.owl_lambda)
    sparsity = cfg.target - (r - r.mean())
    if float(sparsity.min()) <= 0 or float(sparsity.max()) >= 1:
        raise CompressError(f"--owl-lambda {cfg.owl_lambda} takes a block's sparsity outside (0, 1) around "
                            f"{cfg.target}; lower it")
    return [round(float(s), 6) for s in sparsity]

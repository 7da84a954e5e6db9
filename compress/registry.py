"""The method registry: every compression method is one class in one file that registers itself.

A method declares

* ``name``, a one-line ``summary`` and its ``config`` (a frozen :class:`~compress.config.MethodConfig`);
* ``calibrated``: whether it needs calibration windows (the sequential runner replays each decoder
  block over them), ``output``: ``"packed"`` (a packed checkpoint folder) or ``"gguf"`` (a file);
* what it observes while the runner replays a block and how it applies its result to the block:
  :meth:`Method.process_block` (by default, for each group of linears sharing an input in
  execution order, :meth:`Method.observe` then :meth:`Method.apply`).

The runner (:mod:`compress.runners.sequential`) knows no method: it hands each block to the method
through a :class:`BlockContext`, swaps the packed modules the method recorded into the block, saves
progress, and moves on. The CLI's ``--method`` choices, its options and the check that an option
belongs to the chosen method, ``api.quantize`` and recipes all read this registry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .config import MethodConfig, Targets
from .errors import CompressError

log = logging.getLogger(__name__)

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not getattr(cls, "name", None) or not getattr(cls, "config", None):
        raise TypeError(f"{cls.__name__} needs a name and a config class")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


_BUILT_IN = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant", "kquant", "kquant-gptq",
             "magnitude", "wanda", "sparsegpt", "structured", "qat", "qat-kquant")   # the order shown


def _load_all() -> None:
    """Import every module of :mod:`compress.methods`: each method registers itself on import, so a
    new method is one new file there."""
    import importlib
    import pkgutil

    from . import methods as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def methods(kind: str | None = None) -> dict[str, type["Method"]]:
    """Every registered method (of ``kind``, "quantize" or "prune", if given): the built-in ones in
    a fixed order, then the others as registered."""
    _load_all()
    rank = {n: i for i, n in enumerate(_BUILT_IN)}
    names = sorted(REGISTRY, key=lambda n: (rank.get(n, len(rank)), list(REGISTRY).index(n)))
    return {n: REGISTRY[n] for n in names if kind is None or REGISTRY[n].kind == kind}


def get(name: str) -> type["Method"]:
    _load_all()
    if name not in REGISTRY:
        raise CompressError(f"unknown method '{name}'; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def option_fields(kind: str | None = None) -> dict:
    """Every method's config fields by name (the first declaration of a shared name)."""
    out = {}
    for m in methods(kind).values():
        for f in m.config.option_fields():
            out.setdefault(f.name, f)
    return out


def owners(option: str, kind: str | None = None) -> list[str]:
    """Names of the methods (of ``kind``) that take config field ``option``."""
    return [n for n, m in methods(kind).items() if option in {f.name for f in m.config.option_fields()}]


@dataclass
class RunRecord:
    """What one compression step did: per full module name the packed result (PackedInt,
    PackedW8A8, or a GGMLTensor for GGUF output), the scheme it used, the solver's loss and any
    numerical fallback; ``extra`` holds method-specific results (JSON-able)."""

    packed: dict = field(default_factory=dict)
    schemes: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def add(self, name: str, packed, scheme: dict | None = None, loss: float | None = None,
            fallback: str | None = None) -> None:
        self.packed[name] = packed
        if scheme is not None:
            self.schemes[name] = scheme
        self.note(name, loss, fallback)

    def note(self, name: str, loss: float | None = None, fallback: str | None = None) -> None:
        """Record a module's solver loss and numerical fallback (logged)."""
        if loss is not None:
            self.losses[name] = float(loss)
        if fallback:
            log.warning("%s: %s", name, fallback)
            self.fallbacks[name] = fallback

    def summary(self) -> dict:
        return {"schemes": self.schemes, "losses": self.losses, "fallbacks": self.fallbacks, "extra": self.extra}


class StatsBook:
    """Statistics by key: those loaded from a ``--load-stats`` file (then nothing is observed), and
    those kept for ``--save-stats``."""

    def __init__(self, loaded: dict | None = None, keep: bool = False, source: str = ""):
        self.loaded = loaded
        self.kept: dict = {} if keep else None
        self.source = source

    def get(self, key: str, kind: type | None = None):
        if self.loaded is None:
            return None
        if key not in self.loaded:
            raise CompressError(f"{self.source} has no statistics for {key}")
        v = self.loaded[key]
        if kind is not None and not isinstance(v, kind):
            what = getattr(v, "kind", type(v).__name__)
            raise CompressError(f"{self.source}: {key} holds {what} statistics, this method needs "
                                f"{getattr(kind, 'kind', kind.__name__)} (saved by another method?)")
        return v

    def put(self, key: str, value) -> None:
        if self.kept is not None:
            self.kept[key] = value


@dataclass
class BlockContext:
    """One decoder block as a method sees it."""

    i: int
    block: torch.nn.Module
    inputs: object                   # calib.runner.BlockInputs, or None (not calibrated / statistics loaded)
    arch: object
    targets: Targets
    method: "Method"
    record: RunRecord
    stats: StatsBook
    run_state: dict = field(default_factory=dict)   # the method's own state for the whole step
    pruned: frozenset = frozenset()  # full names of the linears an earlier step pruned (their zeros stay)

    def full(self, name: str) -> str:
        return f"{self.arch.blocks}.{self.i}.{name}"

    def key(self, group) -> str:
        """Statistics key of a group of linears sharing one input: its first linear's full name."""
        return self.full(group.linears[0])

    def targeted(self, group) -> list[str]:
        """The group's linears this step compresses (block-relative names): selected by the targets
        and still float (a module compressed by an earlier step is left alone)."""
        out = []
        for n in group.linears:
            if self.targets.selects(self.full(n)) and isinstance(self.block.get_submodule(n), torch.nn.Linear):
                out.append(n)
        return out

    def groups(self) -> list:
        return [g for g in self.arch.groups if self.targeted(g)]

    def scheme(self, name: str):
        return self.method.scheme_for(self.full(name), self.targets.override_for(self.full(name)))

    def linear(self, name: str) -> torch.nn.Linear:
        return self.block.get_submodule(name)

    def solve_each(self, names: list[str], solve) -> None:
        """``solve(name)`` for each linear of ``names``, solves that are independent of each other;
        under torch.distributed they are shared between the processes
        (:func:`compress.runners.sequential.solve_each`)."""
        from .runners.sequential import solve_each
        solve_each(self, names, solve)

    def hessian(self, group):
        """The Hessian accumulator of the group's input, collected with the block as it is now
        (earlier groups already compressed), or loaded."""
        from calib.stats import HessianAccumulator
        key = self.key(group)
        acc = self.stats.get(key, HessianAccumulator)
        if acc is None:
            acc = self.inputs.group_hessian(self.block, list(group.linears))
        self.stats.put(key, acc)
        return acc

    def observe_inputs(self, factories: dict) -> dict:
        """One pass of the block with an accumulator on each group's input: ``factories`` maps a
        group to an accumulator class; returns ``{group key: accumulator}`` (loaded ones when
        statistics were loaded)."""
        if self.stats.loaded is not None:
            return {self.key(g): self.stats.get(self.key(g), cls) for g, cls in factories.items()}
        watch = {}
        for g, cls in factories.items():
            first = self.linear(g.linears[0])
            watch[self.key(g)] = (first, lambda cls=cls, k=first.in_features: cls(k))
        out = self.inputs.accumulate(self.block, watch)
        for k, acc in out.items():
            self.stats.put(k, acc)
        return out


class Method:
    """Base of every compression method (see the module doc)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[str] = "quantize"          # "quantize", "prune" or "qat" (the CLI command that offers it)
    config: ClassVar[type[MethodConfig]] = MethodConfig
    calibrated: ClassVar[bool] = True
    output: ClassVar[str] = "packed"          # "packed" or "gguf"
    format: ClassVar[str] = "gptq-int"        # packed format written ("gptq-int", "w8a8-int8", "gguf")
    lm_head: ClassVar[bool] = False           # can also compress the lm_head
    unties_head: ClassVar[bool] = True        # a tied lm_head gets its own weight first (pruning: no)
    # works on the whole model at once and may change its shape (structured pruning): the runner
    # calls run_model instead of walking the blocks; such a step is a recipe's only compression
    # step, and it does not resume (it is one pass over the windows)
    whole_model: ClassVar[bool] = False
    # needs the family's description (rescale partners, widths, llama.cpp names): refused on the
    # generic path, which knows only the blocks and the linears in them
    needs_description: ClassVar[bool] = False
    # observes only through accumulators merged across processes (BlockContext.observe_inputs,
    # hessian, BlockInputs.accumulate), so its calibration can be split between processes
    distributed: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    @classmethod
    def writes(cls, cfg: MethodConfig) -> str | None:
        """The packed format a step with ``cfg`` writes, or None when it leaves the weights float
        (pruning alone)."""
        return cls.format

    @classmethod
    def check_head(cls, cfg: MethodConfig) -> None:
        """Refuse options with which this method cannot compress the lm_head (``--lm-head``)."""

    def scheme_for(self, full_name: str, override: dict):
        """The scheme of one module (the config's, changed by an override)."""
        return self.cfg.scheme(**override)

    def check_module(self, full_name: str, linear: torch.nn.Linear, override: dict) -> None:
        """Refuse a module this method cannot compress (before any work starts)."""
        self.scheme_for(full_name, override).check_layer(linear.in_features, full_name)

    def check_model(self, loaded, targets) -> None:
        """Refuse a model (or targets) this method cannot work on, before any work starts."""

    def run_model(self, run) -> None:
        """The whole step, for a ``whole_model`` method (it may replace ``run.loaded.model``)."""
        raise NotImplementedError

    def begin(self, run) -> None:
        """Called once before the first block (``run``: the runner's :class:`~compress.runners.sequential.StepRun`)."""

    def process_block(self, blk: BlockContext) -> None:
        for g in blk.groups():
            self.apply(blk, g, self.observe(blk, g))

    def observe(self, blk: BlockContext, group):
        return None

    def apply(self, blk: BlockContext, group, stats) -> None:
        raise NotImplementedError

    def process_head(self, run, inputs) -> None:
        """Compress the lm_head (``inputs``: the last block's outputs, or None without calibration)."""
        raise CompressError(f"--lm-head is not supported by {self.name}")

    def finish(self, run) -> None:
        """Called once after the last block (and the head)."""

    def metadata(self, record: RunRecord | None = None) -> dict:
        """What the checkpoint records about this method's options (and its results in ``record``)."""
        return self.cfg.to_dict()

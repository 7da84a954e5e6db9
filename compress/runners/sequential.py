"""Run one compression step over a model, block by block, for any registered method.

Calibrated methods go through the sequential runner (:func:`calib.runner.run_sequential`): the
inputs of block i are captured, the method observes and compresses the block, the packed modules
it recorded are swapped into the block, and the block's outputs become block i+1's inputs, so
block i+1 sees what it will see at inference. Methods without calibration (or with loaded
statistics) walk the blocks the same way without inputs. After every block the progress is saved
in the run's work folder (:mod:`compress.resume`), so a killed run continues from there.

Under ``torch.distributed`` (``torchrun``, or ``--nproc``) each process replays its share of the
windows and the statistics are merged in a fixed order (:mod:`calib.dist`); the independent
solves of a block (:meth:`~compress.registry.BlockContext.solve_each`) are shared round robin
and each result is sent from the process that computed it, so every process holds the same block
before the next one starts, and the bytes do not depend on the number of processes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from calib import dist
from calib.runner import DEFAULT_BUDGET, run_sequential

from ..errors import CompressError
from ..formats import gptq_int, w8a8
from ..formats.ggml_model import GGMLTensor
from ..qlinear import QuantLinear, W8A8Linear, set_submodule
from ..registry import BlockContext, Method, RunRecord, StatsBook

log = logging.getLogger(__name__)


@dataclass
class StepRun:
    """What a method sees of the run: the model, its description, the step's targets and record."""

    loaded: object
    targets: object
    method: Method
    record: RunRecord
    stats: StatsBook
    lm_head: bool = False
    device: str = "cpu"
    progress: bool = True
    state: dict = field(default_factory=dict)      # method-private state kept across begin/finish
    windows: torch.Tensor | None = None            # the calibration windows (None without calibration)
    pruned: frozenset = frozenset()                # linears earlier steps pruned (their zeros must stay)
    work: object = None                            # the run's compress.resume.WorkFolder (None: no resume)
    step_index: int = 0

    @property
    def model(self):
        return self.loaded.model

    @property
    def arch(self):
        return self.loaded.arch

    def untie_lm_head(self) -> None:
        """Give a tied lm_head its own weight so it can be compressed while the embedding lookup
        keeps the unquantized table. No-op when it is already separate."""
        model, arch = self.model, self.arch
        head = model.get_submodule(arch.lm_head)
        if not isinstance(head, torch.nn.Linear):
            return
        emb = model.get_input_embeddings()
        if head.weight.data_ptr() == emb.weight.data_ptr() or getattr(model.config, "tie_word_embeddings", False):
            new = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                                  device=head.weight.device, dtype=head.weight.dtype)
            new.weight.data = head.weight.data.clone()
            if head.bias is not None:
                new.bias.data = head.bias.data.clone()
            set_submodule(model, arch.lm_head, new)
            model.config.tie_word_embeddings = False

    def head_stats(self, inputs, acc_cls):
        """The statistic ``acc_cls`` (a :mod:`calib.stats` accumulator) of the lm_head's input: the
        final norm's output over the last block's outputs (kept with ``--save-stats``, or loaded)."""
        model, arch = self.model, self.arch
        acc = self.stats.get(arch.lm_head, acc_cls)
        if acc is None:
            head = model.get_submodule(arch.lm_head)
            norm = model.get_submodule(arch.final_norm)
            width = norm.weight.shape[0] if getattr(norm, "weight", None) is not None else head.in_features
            if width != head.in_features:
                raise CompressError(f"--lm-head: {arch.lm_head} does not read {arch.final_norm}'s output "
                                    f"({head.in_features} vs {width} features; a projection sits between)")
            if inputs is None:
                raise CompressError(f"--lm-head with {self.method.name} needs calibration windows")
            acc = inputs.stats_after(norm, lambda: acc_cls(head.in_features))
        self.stats.put(arch.lm_head, acc)
        return acc

    def tied_table(self) -> str | None:
        """The embedding module whose weight the lm_head shares (None when it has its own)."""
        head = self.model.get_submodule(self.arch.lm_head).weight
        return next((n for n in self.arch.embeddings if getattr(self.model.get_submodule(n), "weight", None) is head),
                    None)

    def head_pruned(self) -> bool:
        """Whether an earlier step pruned the lm_head (or the embedding table it shared then)."""
        return self.arch.lm_head in self.pruned or any(e in self.pruned for e in self.arch.embeddings)


def packed_module(packed, bias):
    """The module that computes from a packed result (None for results that stay float in the
    model, e.g. GGML tensors written to a GGUF)."""
    if isinstance(packed, gptq_int.PackedInt):
        return QuantLinear.from_packed(packed, bias)
    if isinstance(packed, w8a8.PackedW8A8):
        return W8A8Linear.from_packed(packed, bias)
    return None


def swap_packed(root: torch.nn.Module, prefix: str, record: RunRecord) -> None:
    """Replace every float linear under ``prefix`` that ``record`` holds a packed result for."""
    for full, packed in record.packed.items():
        if not full.startswith(prefix):
            continue
        rel = full[len(prefix):]
        lin = root.get_submodule(rel) if rel else root
        if not isinstance(lin, torch.nn.Linear):
            continue
        new = packed_module(packed, lin.bias)
        if new is not None:
            set_submodule(root, rel, new.to(lin.weight.device))


def solve_each(blk: BlockContext, names: list[str], solve) -> None:
    """``solve(name)`` for each of ``names`` (block-relative linears whose solves are independent:
    each changes only its own weight and its record entries). Under torch.distributed each process
    solves its round-robin share and every result is sent from its owner to the others, in
    ``names`` order, so every process ends with the same weights and record."""
    rank, size = dist.world()
    if size == 1:
        for name in names:
            solve(name)
        return
    for j, name in enumerate(names):
        if dist.owner_of(j) == rank:
            solve(name)
    for j, name in enumerate(names):
        _share_entry(blk, name, dist.owner_of(j))


def _share_entry(blk: BlockContext, name: str, src: int) -> None:
    """Send linear ``name``'s weight and record entries from rank ``src`` to every process."""
    rec, full, lin = blk.record, blk.full(name), blk.linear(name)
    tensors = meta = None
    if dist.world()[0] == src:
        tensors, meta = {"weight": lin.weight.data}, {}
        p = rec.packed.get(full)
        if isinstance(p, gptq_int.PackedInt):
            tensors.update(p.tensors())
            meta["packed"] = {"kind": "int", "bits": p.bits, "in": p.in_features, "out": p.out_features}
        elif isinstance(p, GGMLTensor):
            tensors["data"] = p.data
            meta["packed"] = {"kind": "ggml", **p.meta()}
        elif p is not None:
            raise CompressError(f"{full}: a {type(p).__name__} result cannot be shared between processes")
        meta.update(scheme=rec.schemes.get(full), loss=rec.losses.get(full), fallback=rec.fallbacks.get(full),
                    extra={k: v[full] for k, v in rec.extra.items() if isinstance(v, dict) and full in v})
    tensors, meta = dist.broadcast_tensors(tensors, meta, src)
    lin.weight.data = tensors["weight"].to(lin.weight.device, lin.weight.dtype)
    # every process re-inserts the entries in the same order
    for d in (rec.packed, rec.schemes, rec.losses, rec.fallbacks):
        d.pop(full, None)
    pk = meta.get("packed")
    if pk and pk["kind"] == "int":
        rec.packed[full] = gptq_int.from_tensors(tensors, pk["bits"], pk["in"], pk["out"])
    elif pk:
        rec.packed[full] = GGMLTensor.from_meta(pk, tensors["data"])
    if meta["scheme"] is not None:
        rec.schemes[full] = meta["scheme"]
    if meta["loss"] is not None:
        rec.losses[full] = meta["loss"]
    if meta["fallback"]:
        rec.fallbacks[full] = meta["fallback"]
    for k, v in meta["extra"].items():
        rec.extra.setdefault(k, {}).pop(full, None)
        rec.extra[k][full] = v


def run_step(run: StepRun, windows: torch.Tensor | None, work=None, step_index: int = 0,
             budget: int = DEFAULT_BUDGET) -> RunRecord:
    """Run ``run.method`` over every block (and the lm_head with ``run.lm_head``); returns the record.

    ``work`` (a :class:`compress.resume.WorkFolder` or None) saves progress after every block and
    tells where to start.
    """
    run.windows, run.work, run.step_index = windows, work, step_index
    if run.method.whole_model:
        if run.method.calibrated and windows is None:
            raise CompressError(f"{run.method.name} needs calibration windows")
        run.method.run_model(run)
        return run.record
    model, arch, method = run.model, run.arch, run.method
    blocks = arch.get_blocks(model)
    plan = None
    if method.calibrated and run.stats.loaded is None and windows is not None:
        try:
            plan = dist.Plan.current(len(windows))
        except ValueError as e:
            raise CompressError(str(e)) from None
    start, saved_inputs = (work.resume_point(step_index, plan.windows if plan else None) if work is not None
                           else (0, None))
    method.begin(run)
    if run.lm_head and method.unties_head:
        run.untie_lm_head()
    if start > 0:
        log.info("%s: resuming at block %d of %d", method.name, start, len(blocks))

    def process(i, block, inputs):
        blk = BlockContext(i, block, inputs, arch, run.targets, method, run.record, run.stats, run.state, run.pruned)
        method.process_block(blk)
        swap_packed(block, f"{arch.blocks}.{i}.", run.record)

    stream = run.loaded.stream

    def before(i, block):
        if stream is not None:
            stream.release_rest(model)          # block 0's inputs are captured: the embeddings are done
            stream.load_block(i, block)

    def after(i, inputs):
        prefix = f"{arch.blocks}.{i}."
        if stream is not None:     # the block's shard first: the progress must not claim a block not on disk
            stream.write_block(i, blocks[i], run.record)
            if stream.shards:
                for k in [k for k in run.record.packed if k.startswith(prefix)]:
                    del run.record.packed[k]    # in the shard now; the record keeps schemes and losses
        if work is not None:
            work.save_block(step_index, i, None if stream is not None else blocks[i], inputs, run.record, run.stats,
                            prefix)

    def head(inputs):
        if run.lm_head:
            if stream is not None:
                stream.load_rest(model)
            method.process_head(run, inputs)
            swap_packed(model, "", run.record)

    if method.calibrated and run.stats.loaded is None:
        if windows is None:
            raise CompressError(f"{method.name} needs calibration windows")
        run_sequential(model, arch, windows, process, budget=budget, device=run.device, progress=run.progress,
                       desc=method.name, process_head=head, start=start, saved_inputs=saved_inputs,
                       after_block=after, plan=plan, before_block=before)
    else:
        from tqdm import tqdm
        for i in tqdm(range(start, len(blocks)), desc=method.name, unit="block",
                      disable=not (run.progress and dist.is_main()),
                      leave=False, initial=start, total=len(blocks)):
            before(i, blocks[i])
            process(i, blocks[i], None)
            after(i, None)
        head(None)
    method.finish(run)
    return run.record

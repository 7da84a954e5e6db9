"""Run one compression step over a model, block by block, for any registered method.

Calibrated methods go through the sequential runner (:func:`calib.runner.run_sequential`): the
inputs of block i are captured, the method observes and compresses the block, the packed modules
it recorded are swapped into the block, and the block's outputs become block i+1's inputs, so
block i+1 sees what it will see at inference. Methods without calibration (or with loaded
statistics) walk the blocks the same way without inputs. After every block the progress is saved
in the run's work folder (:mod:`compress.resume`), so a killed run continues from there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from calib.runner import DEFAULT_BUDGET, run_sequential

from ..errors import CompressError
from ..formats import w8a8
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


def packed_module(packed, bias):
    """The module that computes from a packed result (None for results that stay float in the
    model, e.g. GGML tensors written to a GGUF)."""
    from ..formats import gptq_int
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
    start, saved_inputs = (work.resume_point(step_index) if work is not None else (0, None))
    method.begin(run)
    if run.lm_head:
        run.untie_lm_head()
    if start > 0:
        log.info("%s: resuming at block %d of %d", method.name, start, len(blocks))

    def process(i, block, inputs):
        blk = BlockContext(i, block, inputs, arch, run.targets, method, run.record, run.stats, run.state, run.pruned)
        method.process_block(blk)
        swap_packed(block, f"{arch.blocks}.{i}.", run.record)

    def after(i, inputs):
        if work is not None:
            work.save_block(step_index, i, blocks[i], inputs, run.record, run.stats, f"{arch.blocks}.{i}.")

    def head(inputs):
        if run.lm_head:
            method.process_head(run, inputs)
            swap_packed(model, "", run.record)

    if method.calibrated and run.stats.loaded is None:
        if windows is None:
            raise CompressError(f"{method.name} needs calibration windows")
        run_sequential(model, arch, windows, process, budget=budget, device=run.device, progress=run.progress,
                       desc=method.name, process_head=head, start=start, saved_inputs=saved_inputs,
                       after_block=after)
    else:
        from tqdm import tqdm
        for i in tqdm(range(start, len(blocks)), desc=method.name, unit="block", disable=not run.progress,
                      leave=False, initial=start, total=len(blocks)):
            process(i, blocks[i], None)
            after(i, None)
        head(None)
    method.finish(run)
    return run.record

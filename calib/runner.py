"""The sequential block runner shared by every calibrated method.

1. Capture the inputs of the first decoder block (and the keyword arguments the model passes
   it: attention mask, position embeddings) for every calibration window.
2. For each block: hand it to the method, which attaches hooks and runs the block over the
   stored inputs (``BlockInputs.run``) as often as it needs, then compresses the block's weights.
3. Re-run the block with its compressed weights; its outputs become the next block's inputs, so
   block i+1 sees what it will see at inference.

Block inputs stay on the CPU (and spill to disk, as safetensors, beyond a memory budget); one
block at a time moves to the compute device, so the model never sits whole on the accelerator.

Under ``torch.distributed`` each process holds and replays its own share of the windows, and
statistics are merged across processes in a fixed order (:mod:`calib.dist`), so every process
ends each block with the same weights, and the result does not depend on the number of processes.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .dist import Plan, is_main, merge_in_order

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 8 << 30   # bytes of block inputs kept in memory before spilling to disk


class _Stop(Exception):
    pass


class InputStore:
    """A list of tensors kept in CPU memory up to ``budget`` bytes, the rest in safetensors files."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self.mem: dict[int, torch.Tensor] = {}
        self.used = 0
        self.dir: Path | None = None
        self.n = 0

    def __len__(self):
        return self.n

    def __setitem__(self, i: int, t: torch.Tensor):
        t = t.detach().to("cpu").contiguous()
        old = self.mem.pop(i, None)
        if old is not None:
            self.used -= old.numel() * old.element_size()
        size = t.numel() * t.element_size()
        if self.used + size <= self.budget:
            self.mem[i] = t
            self.used += size
        else:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix="compress-calib-"))
                log.info("block inputs exceed %.1f GiB: spilling to %s", self.budget / 2**30, self.dir)
            save_file({"x": t}, str(self.dir / f"{i}.safetensors"))
        self.n = max(self.n, i + 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.mem:
            return self.mem[i]
        return load_file(str(self.dir / f"{i}.safetensors"))["x"]

    @property
    def spilled(self) -> bool:
        return self.dir is not None

    def close(self):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class BlockInputs:
    """The stored inputs of the current block (this process's windows, :attr:`plan`) and the
    keyword arguments to call it with."""

    def __init__(self, store: InputStore, kwargs: dict, device: torch.device, plan: Plan | None = None):
        self.store = store
        self.kwargs = kwargs
        self.device = device
        self.plan = plan if plan is not None else Plan(max(1, len(store)))

    def __len__(self):
        return len(self.store)

    def kwargs_on_device(self) -> dict:
        """The keyword arguments the block is called with, on the compute device."""
        return {k: _to(v, self.device) for k, v in self.kwargs.items()}

    def gather(self, idx: list[int]) -> torch.Tensor:
        """The stored inputs ``idx`` concatenated along the batch dim, on the compute device."""
        return torch.cat([self.store[i] for i in idx]).to(self.device)

    def _batches(self, shard: list | None = None):
        """The plan's batches of stored inputs (of one shard, or all), each concatenated along the
        batch dim (bigger matmuls are faster)."""
        for idx in (shard if shard is not None else self.plan.batches()):
            yield idx, self.gather(idx)

    def accumulate(self, block: torch.nn.Module | None, watch: dict, stop_at: torch.nn.Module | None = None,
                   fn: Callable | None = None) -> dict:
        """Statistics over every window: ``watch`` maps a key to ``(module, accumulator factory)``;
        each accumulator sees its module's input while ``block`` runs (as far as ``stop_at``). With
        ``fn`` instead of a block, the accumulators (modules None) see ``fn(x)`` of the stored
        inputs. Accumulated shard by shard and merged in shard order across processes
        (:func:`calib.dist.merge_in_order`): the same bytes for any number of processes."""
        per_shard = []
        for shard in self.plan.shards:
            accs, handles = {}, []
            for key, (module, factory) in watch.items():
                accs[key] = acc = factory()
                if module is not None:
                    handles.append(module.register_forward_hook(acc.hook))
            try:
                if fn is not None:
                    with torch.no_grad():
                        for _, x in self._batches(shard):
                            y = fn(x)
                            for acc in accs.values():
                                acc.add_batch(y)
                else:
                    self.run(block, stop_at, shard=shard)
            finally:
                for h in handles:
                    h.remove()
            per_shard.append(accs)
        return merge_in_order(self.plan, per_shard)

    @torch.no_grad()
    def run(self, block: torch.nn.Module, stop_at: torch.nn.Module | None = None,
            keep: bool = False, shard: list | None = None) -> list[torch.Tensor] | None:
        """Run ``block`` over every stored input so its hooks fire.

        With ``stop_at``, each forward ends as soon as that submodule has been called (its
        forward hooks have run): statistics of early linears need no full block pass.
        With ``keep``, return the block outputs. ``shard``: only that shard's batches.
        """
        kw = self.kwargs_on_device()
        outs = [] if keep else None
        handle = stop_at.register_forward_hook(_raise_stop) if stop_at is not None else None
        try:
            for idx, x in self._batches(shard):
                try:
                    y = block(x, **kw)
                except _Stop:
                    continue
                y = hidden_states(y)
                if keep:
                    outs.extend(y.to("cpu").split(1))
        finally:
            if handle is not None:
                handle.remove()
        return outs

    def group_hessian(self, block: torch.nn.Module, linears: list[str]):
        """Run ``block`` as far as the last of ``linears`` and return the
        :class:`~calib.stats.HessianAccumulator` of the input they share (that of the first)."""
        from calib.stats import HessianAccumulator
        first = block.get_submodule(linears[0])
        return self.accumulate(block, {"h": (first, lambda: HessianAccumulator(first.in_features))},
                               stop_at=block.get_submodule(linears[-1]))["h"]

    def stats_after(self, fn: Callable[[torch.Tensor], torch.Tensor], factory: Callable):
        """The accumulator ``factory()`` over ``fn(x)`` of the stored inputs (e.g. the final norm
        applied to the last block's outputs: the input of the lm_head)."""
        return self.accumulate(None, {"s": (None, factory)}, fn=fn)["s"]

    @torch.no_grad()
    def advance(self, block: torch.nn.Module) -> None:
        """Replace the stored inputs by ``block``'s outputs (the next block's inputs)."""
        kw = self.kwargs_on_device()
        for idx, x in self._batches():
            y = hidden_states(block(x, **kw))
            for i, yi in zip(idx, y.split(1)):
                self.store[i] = yi


def hidden_states(output) -> torch.Tensor:
    """A decoder block's output hidden states (blocks return a tensor or a tuple led by it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _raise_stop(module, args, output):
    raise _Stop


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


@torch.no_grad()
def capture_first_block_inputs(model, arch, windows: torch.Tensor, budget: int = DEFAULT_BUDGET,
                               device: torch.device | str = "cpu", plan: Plan | None = None) -> BlockInputs:
    """Run the model's embedding stage on each window (of this process's share, ``plan``) and store
    what block 0 receives."""
    device = torch.device(device)
    plan = plan if plan is not None else Plan.current(len(windows))
    blocks = arch.get_blocks(model)
    first = blocks[0]
    store = InputStore(budget)
    state = {"kwargs": None, "i": 0}

    class Catcher(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            if hasattr(inner, "attention_type"):   # models that pick a mask per layer read this
                self.attention_type = inner.attention_type

        def forward(self, hidden_states, *args, **kwargs):
            store[state["i"]] = hidden_states
            if state["kwargs"] is None:
                kw = {k: v for k, v in kwargs.items()
                      if k not in ("past_key_value", "past_key_values", "use_cache", "output_attentions")}
                if args:
                    kw["attention_mask"] = args[0]
                state["kwargs"] = {k: (v.detach().to("cpu") if isinstance(v, torch.Tensor) else
                                       tuple(t.detach().to("cpu") for t in v) if isinstance(v, tuple) else v)
                                   for k, v in kw.items()}
            raise _Stop

    blocks[0] = Catcher(first)
    try:
        for i, w in enumerate(plan.windows):
            ids = windows[w]
            state["i"] = i
            try:
                model(input_ids=ids[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        blocks[0] = first
    return BlockInputs(store, state["kwargs"] or {}, device, plan)


def run_sequential(model, arch, windows: torch.Tensor, process_block: Callable[[int, torch.nn.Module, BlockInputs], None],
                   budget: int = DEFAULT_BUDGET, device: torch.device | str = "cpu", progress: bool = True,
                   desc: str = "calibrate",
                   process_head: Callable[[BlockInputs], None] | None = None, start: int = 0,
                   saved_inputs: list[torch.Tensor] | None = None,
                   after_block: Callable[[int, BlockInputs], None] | None = None,
                   plan: Plan | None = None,
                   before_block: Callable[[int, torch.nn.Module], None] | None = None) -> None:
    """Drive ``process_block(i, block, inputs)`` over the decoder blocks in order (see module doc);
    then ``process_head(inputs)``, if given, with the last block's outputs as the stored inputs.

    Resuming: ``start`` skips the blocks before it, whose outputs ``saved_inputs`` holds (one tensor
    per window of ``plan``, this process's share); ``after_block(i, inputs)`` is called once block
    ``i``'s outputs are stored; ``before_block(i, block)`` before block ``i`` is touched (a streamed
    model reads its weights then).
    """
    device = torch.device(device)
    model_device = next(model.parameters()).device
    for name in arch.embeddings + (arch.final_norm,):
        model.get_submodule(name).to(device)
    inputs = capture_first_block_inputs(model, arch, windows, budget, device, plan)
    try:
        if saved_inputs is not None:
            if len(saved_inputs) != len(inputs):
                raise ValueError(f"{len(saved_inputs)} saved block inputs for {len(inputs)} windows")
            for j, t in enumerate(saved_inputs):
                inputs.store[j] = t
        blocks = arch.get_blocks(model)
        for i in tqdm(range(start, len(blocks)), desc=desc, unit="block", disable=not (progress and is_main()),
                      leave=False, initial=start, total=len(blocks)):
            if before_block is not None:
                before_block(i, blocks[i])
            block = blocks[i].to(device)
            process_block(i, block, inputs)
            inputs.advance(block)
            blocks[i] = block.to(model_device)
            if after_block is not None:
                after_block(i, inputs)
        if process_head is not None:
            process_head(inputs)
    finally:
        inputs.store.close()
        for name in arch.embeddings + (arch.final_norm,):
            mod = model.get_submodule(name)
            if not any(p.is_meta for p in mod.parameters()):      # a streamed model's are put away
                mod.to(model_device)

"""The training loop shared by quantization-aware training and distillation.

AdamW, linear warm-up then cosine decay, gradient accumulation and clipping, a fixed seed, a
progress bar with loss, tokens/s and time left, evaluation every N steps and at the end, and
checkpoints every N steps that a re-run of the same command resumes from. The forward and
backward passes run in float32, or under bfloat16 autocast (``precision``: by default on CUDA
devices), with the trained tensors, their gradients and the optimizer state in float32.

What makes a resumed run end with the same weights as an uninterrupted one:

* the data order is a pure function of the seed and the micro-step (each epoch is a permutation of
  the windows drawn from a generator seeded with ``seed + epoch``), so the data position is the
  step count;
* a checkpoint holds the trainable tensors, every optimizer state tensor, the scheduler's step and
  the torch RNG state, in one safetensors file written atomically (no pickle), beside a JSON file
  with the step, the losses so far and a fingerprint of the run; a checkpoint from another run
  (other model, data or options) is refused.

With ``torch.distributed`` initialised (``torchrun``; gloo on CPU, NCCL on GPU) each process takes
its share of every global batch and the gradients are averaged across processes with
``all_reduce`` before the optimizer step, which is what DistributedDataParallel does; the global
batch, and so the loss curve, is the one-process run's. Only rank 0 writes checkpoints.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calib import dist

from ..errors import CompressError
from ..fileio import atomic_file, atomic_text

log = logging.getLogger(__name__)

STATE = "train-state.safetensors"
META = "train-state.json"
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainSpec:
    """How to train: ``steps`` optimizer steps of ``batch`` windows (``accum`` micro-batches of
    ``batch // accum`` windows each)."""

    steps: int
    lr: float = 1e-4
    batch: int = 4
    accum: int = 1
    warmup: float = 0.05          # fraction of the steps spent warming up
    weight_decay: float = 0.0
    clip: float = 1.0             # max gradient norm (0: no clipping)
    seed: int = 0
    checkpoint_every: int = 0     # 0: only when the run ends
    eval_every: int = 0           # 0: only at the end
    precision: str = "auto"       # fp32, bf16 (autocast; float32 weights, gradients and optimizer), auto:
                                  # bf16 when the trained tensors are on a CUDA device, else fp32

    def __post_init__(self):
        if self.steps < 1:
            raise CompressError(f"--steps must be at least 1, got {self.steps}")
        if self.batch < 1 or self.accum < 1 or self.batch % self.accum:
            raise CompressError(f"--batch ({self.batch}) must be a positive multiple of --grad-accum ({self.accum})")
        if not self.lr > 0:
            raise CompressError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise CompressError(f"--warmup must be in [0, 1), got {self.warmup}")
        if self.clip < 0 or self.checkpoint_every < 0 or self.eval_every < 0:
            raise CompressError("--clip, --checkpoint-every and --eval-every must be >= 0")
        if self.precision not in PRECISIONS:
            raise CompressError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def lr_factor(self, step: int) -> float:
        """Warm-up then cosine decay to zero, as a factor of ``lr`` (``step`` counts from 0)."""
        warm = int(self.warmup * self.steps)
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, self.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * t))


def batch_indices(n: int, spec: TrainSpec, step: int) -> list[int]:
    """The window indices of global batch ``step`` (epochs are seeded permutations of ``range(n)``)."""
    orders: dict[int, torch.Tensor] = {}
    out = []
    for j in range(step * spec.batch, (step + 1) * spec.batch):
        epoch, pos = divmod(j, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed * 1000003 + epoch))
        out.append(int(orders[epoch][pos]))
    return out


class Trainer:
    """Trains ``params`` (``{name: parameter}``; parameter groups as ``[(names, lr factor)]``) by
    minimising ``loss_fn(windows) -> scalar`` over ``data`` (an ``(N, L)`` tensor of windows)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], spec: TrainSpec, data: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor], torch.Tensor], ckpt_dir: Path | None = None,
                 fingerprint: dict | None = None, groups: list[tuple[list[str], float]] | None = None,
                 eval_fn: Callable[[], dict] | None = None, progress: bool = True, desc: str = "train"):
        if data.shape[0] < 1:
            raise CompressError("no training windows")
        self.params, self.spec, self.data, self.loss_fn = params, spec, data, loss_fn
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.fingerprint = {**(fingerprint or {}), "spec": asdict(spec),
                            "params": {k: list(p.shape) for k, p in params.items()}}
        self.eval_fn, self.progress, self.desc = eval_fn, progress, desc
        groups = groups or [(list(params), 1.0)]
        self.names = [n for names, _ in groups for n in names]
        self.opt = torch.optim.AdamW([{"params": [params[n] for n in names], "lr": spec.lr * f, "base": spec.lr * f}
                                      for names, f in groups], lr=spec.lr, weight_decay=spec.weight_decay)
        self.step = 0
        self.history: list[dict] = []
        self.device = next(iter(params.values())).device.type if params else "cpu"
        self.bf16 = spec.precision == "bf16" or (spec.precision == "auto" and self.device == "cuda")
        self.rank, self.world = dist.world()
        if spec.batch % (spec.accum * self.world):
            raise CompressError(f"--batch ({spec.batch}) must be a multiple of --grad-accum x processes "
                                f"({spec.accum} x {self.world})")

    # ------------------------------------------------------------------ checkpoints
    def _load(self) -> None:
        if self.ckpt_dir is None or not (self.ckpt_dir / META).exists():
            return
        try:
            meta = json.loads((self.ckpt_dir / META).read_text())
        except (OSError, json.JSONDecodeError):
            raise CompressError(f"{self.ckpt_dir / META} is unreadable; rerun with --restart") from None
        if meta.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            raise CompressError(f"{self.ckpt_dir} holds a checkpoint of a different training run; "
                                "rerun with --restart to start over")
        with safe_open(str(self.ckpt_dir / STATE), framework="pt", device="cpu") as fh:
            for n, p in self.params.items():
                p.data.copy_(fh.get_tensor(f"param/{n}"))
            for n in self.names:
                p = self.params[n]
                if f"exp_avg/{n}" in fh.keys():
                    self.opt.state[p] = {"step": fh.get_tensor(f"step/{n}"), "exp_avg": fh.get_tensor(f"exp_avg/{n}"),
                                         "exp_avg_sq": fh.get_tensor(f"exp_avg_sq/{n}")}
            torch.set_rng_state(fh.get_tensor("rng/torch"))
        self.step, self.history = meta["step"], meta["history"]
        if self.rank == 0:
            print(f"{self.desc}: resuming at step {self.step} of {self.spec.steps} from {self.ckpt_dir}", flush=True)

    def save(self) -> None:
        if self.ckpt_dir is None or self.rank != 0:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        t = {f"param/{n}": p.detach().contiguous() for n, p in self.params.items()}
        for n in self.names:
            st = self.opt.state.get(self.params[n])
            if st:
                t[f"step/{n}"] = torch.as_tensor(st["step"]).reshape(())
                t[f"exp_avg/{n}"] = st["exp_avg"].contiguous()
                t[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].contiguous()
        t["rng/torch"] = torch.get_rng_state()
        atomic_file(self.ckpt_dir / STATE, lambda tmp: save_file(t, str(tmp)))
        atomic_text(self.ckpt_dir / META, json.dumps({"step": self.step, "history": self.history,
                                                      "fingerprint": self.fingerprint}))

    # ------------------------------------------------------------------ training
    def _set_lr(self) -> float:
        f = self.spec.lr_factor(self.step)
        for g in self.opt.param_groups:
            g["lr"] = g["base"] * f
        return f * self.spec.lr

    def _reduce_grads(self) -> None:
        if self.world == 1:
            return
        for n in self.names:
            p = self.params[n]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(self.world)

    def _one_step(self, micro: int, per_rank: int) -> dict:
        """One optimizer step (``micro`` windows per micro-batch, ``per_rank`` of them here)."""
        spec = self.spec
        lr = self._set_lr()
        idx = batch_indices(self.data.shape[0], spec, self.step)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(spec.accum):
            part = idx[a * micro:(a + 1) * micro][self.rank * per_rank:(self.rank + 1) * per_rank]
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss_fn(self.data[part]).float()
            if not torch.isfinite(loss):
                raise CompressError(f"{self.desc}: the loss became {float(loss)} at step {self.step}; lower --lr")
            (loss / spec.accum).backward()
            total += float(loss.detach()) / spec.accum
        self._reduce_grads()
        if self.world > 1:
            t = torch.tensor([total])
            torch.distributed.all_reduce(t)
            total = float(t) / self.world
        if spec.clip > 0:
            torch.nn.utils.clip_grad_norm_([self.params[n] for n in self.names], spec.clip)
        self.opt.step()
        self.step += 1
        rec = {"step": self.step, "loss": total, "lr": lr}
        if spec.eval_every and self.step % spec.eval_every == 0 and self.step < spec.steps and self.eval_fn:
            rec["eval"] = self.eval_fn()
        self.history.append(rec)
        return rec

    def run(self) -> list[dict]:
        """Train to ``spec.steps`` (from a checkpoint if there is one); returns the loss history."""
        from tqdm import tqdm
        self._load()
        spec = self.spec
        micro = spec.batch // spec.accum
        tokens = spec.batch * self.data.shape[1]
        bar = tqdm(total=spec.steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not self.progress or self.rank != 0, leave=False)
        t0, done0 = time.perf_counter(), self.step
        try:
            while self.step < spec.steps:
                rec = self._one_step(micro, micro // self.world)
                rate = (self.step - done0) * tokens / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if spec.checkpoint_every and self.step % spec.checkpoint_every == 0 and self.step < spec.steps:
                    self.save()
        finally:
            bar.close()          # also when killed: a bar left open shifts every later one
        self.save()
        return self.history

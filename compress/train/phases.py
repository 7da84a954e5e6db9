"""The two phases of quantization-aware training (EfficientQAT), shared by the QAT methods of the
integer grid (:mod:`compress.methods.qat`) and of the GGML grids (:mod:`compress.methods.qat_kquant`).

* :func:`reconstruct`: block-wise reconstruction. The block's fake-quantized linears (any layer
  with a ``weight`` parameter and ``quant_parameters()``) train with AdamW so that the block's
  outputs match the unquantized block's on the calibration windows; a block whose output error did
  not go down gets its start back.
* :func:`end_to_end`: the quantization parameters alone train on the calibration windows, on
  next-token cross-entropy or on a teacher's distribution, with the shared training loop
  (checkpoints in the run's work folder, so a killed run resumes).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..config import MethodConfig, opt
from ..errors import CompressError
from .loop import Trainer, TrainSpec
from .losses import lm_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QATPhaseOptions(MethodConfig):
    """The options of the two training phases."""

    blockwise: bool = opt(True, "Block-wise reconstruction of weights, scales and zero-points.",
                          flag="--blockwise/--no-blockwise")
    block_epochs: int = opt(2, "Passes over the calibration windows per block.", min=1)
    block_lr: float = opt(1e-5, "Learning rate of the weights in the block-wise phase.", min=0, open_min=True)
    scale_lr: float = opt(1e-5, "Learning rate of scales and zero-points in the block-wise phase.", min=0,
                          open_min=True)
    e2e_steps: int = opt(40, "Steps of end-to-end training of the scales alone (0: none).", min=0)
    e2e_lr: float = opt(1e-4, "Learning rate of the scales in the end-to-end phase.", min=0, open_min=True)
    batch: int = opt(4, "Windows per training step (both phases).", min=1)
    teacher: str = opt(None, "End-to-end target: this model's next-token distribution (default: the text).")
    checkpoint_every: int = opt(0, "Checkpoint the end-to-end phase every N steps (0: only at the end).", min=0)
    precision: str = opt("auto", "Training passes in float32 or under bfloat16 autocast (weights, scales and "
                                 "optimizer stay float32); auto: bf16 on CUDA, fp32 on CPU.",
                         choices=("auto", "fp32", "bf16"))

    def check(self) -> None:
        if not self.blockwise and self.e2e_steps == 0:
            raise CompressError("--no-blockwise needs --e2e-steps > 0 (otherwise nothing is trained)")


def check_teacher(cfg: QATPhaseOptions, loaded) -> None:
    """A teacher must share the model's vocabulary (read from its config, before any weights)."""
    if cfg.teacher is None:
        return
    from ..models import read_spec_config
    vocab = read_spec_config(cfg.teacher).get("vocab_size")
    if vocab is not None and vocab != loaded.model.config.vocab_size:
        raise CompressError(f"teacher {cfg.teacher} has a vocabulary of {vocab} tokens, "
                            f"the model {loaded.model.config.vocab_size}")


def _mse(block, inputs, targets, idx, kw) -> torch.Tensor:
    from calib.runner import hidden_states
    y = hidden_states(block(inputs.gather(idx), **kw))
    t = torch.cat([targets[i] for i in idx]).to(y.device)
    return torch.nn.functional.mse_loss(y.float(), t.float())


def reconstruct(blk, fakes: dict, targets, cfg: QATPhaseOptions) -> dict:
    """Train the fake-quantized linears ``fakes`` (block-relative name -> layer, already in the
    block) against ``targets`` (the unquantized block's outputs per window). Returns the record
    ``{"mse_init", "mse_trained", "kept", "steps"}``; ``kept`` is ``"start"`` when training did not
    lower the output error (the layers then hold their start again)."""
    inputs, block = blk.inputs, blk.block
    kw = inputs.kwargs_on_device()
    n = len(inputs)
    for p in block.parameters():
        p.requires_grad_(False)
    params, weights, quant = {}, [], []
    for name, fq in fakes.items():
        params[f"{name}.weight"] = fq.weight.requires_grad_(True)
        weights.append(f"{name}.weight")
        for k, p in fq.quant_parameters().items():
            params[f"{name}.{k}"] = p.requires_grad_(True)
            quant.append(f"{name}.{k}")
    batch = min(cfg.batch, n)

    def loss_over_all():
        with torch.no_grad():
            return sum(float(_mse(block, inputs, targets, list(range(s, min(n, s + batch))), kw)) *
                       (min(n, s + batch) - s) for s in range(0, n, batch)) / n

    before = loss_over_all()
    start = {k: p.detach().clone() for k, p in params.items()}
    spec = TrainSpec(steps=cfg.block_epochs * math.ceil(n / batch), lr=cfg.block_lr, batch=batch, warmup=0.0,
                     clip=0.0, seed=blk.i, precision=cfg.precision)
    index = torch.arange(n)[:, None]
    with torch.enable_grad():
        Trainer(params, spec, index, lambda idx: _mse(block, inputs, targets, idx[:, 0].tolist(), kw),
                groups=[(weights, 1.0), (quant, cfg.scale_lr / cfg.block_lr)], progress=False,
                desc=f"block {blk.i}").run()
    for p in params.values():
        p.requires_grad_(False)
    after = loss_over_all()
    log.info("block %d: output MSE %.6g (start) -> %.6g (trained)", blk.i, before, after)
    kept = "trained" if after < before else "start"
    if kept == "start":             # training never leaves a block worse than where it started
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
    return {"mse_init": before, "mse_trained": after, "kept": kept, "steps": spec.steps}


def end_to_end(run, cfg: QATPhaseOptions, params: dict, model) -> dict:
    """Train ``params`` (name -> parameter of ``model``; every other parameter frozen) for
    ``cfg.e2e_steps`` steps on the run's calibration windows. Returns the record of the phase."""
    if run.windows is None:
        raise CompressError("the end-to-end phase needs calibration windows")
    teacher = None
    if cfg.teacher is not None:
        from ..models import load
        teacher = load(cfg.teacher).model.eval()
    spec = TrainSpec(steps=cfg.e2e_steps, lr=cfg.e2e_lr, batch=cfg.batch, seed=0,
                     checkpoint_every=cfg.checkpoint_every, precision=cfg.precision)
    ckpt = run.work.path / f"e2e-{run.step_index}" if run.work is not None else None
    with torch.enable_grad():
        hist = Trainer(params, spec, run.windows, lm_loss(model, teacher), ckpt, {"phase": "qat-e2e"},
                       progress=run.progress, desc="qat end-to-end").run()
    return {"steps": spec.steps, "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"],
            "target": "teacher" if teacher is not None else "text"}

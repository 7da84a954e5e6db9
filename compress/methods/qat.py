"""Quantization-aware training onto the integer grid, in the two phases of EfficientQAT
(Chen et al., 2024), converted exactly into the packed gptq-int checkpoint of post-training
quantization.

1. **Block-wise reconstruction** (``--blockwise``, on the sequential runner): every targeted linear
   of a block becomes a :class:`~compress.train.fakequant.FakeQuantLinear` that starts from GPTQ's
   solution (``--init gptq``, the default: training can only start where the best post-training
   method ends) or from round-to-nearest (min-max or MSE grid); its weights, scales and zero-points are trained with
   AdamW to make the block's outputs match the unquantized block's on the calibration windows
   (``--block-epochs`` passes), then packed; a block whose output error did not go down keeps its
   start. The next block sees the quantized block's outputs.
2. **End-to-end training of the quantization parameters only** (``--e2e-steps``, PEQA-style): the
   integer codes are frozen and every scale of the packed model trains on the calibration windows,
   on next-token cross-entropy, or on the teacher's distribution with ``--teacher``. The shared
   training loop checkpoints (``--checkpoint-every``) into the run's work folder, so a killed run
   resumes there as a killed block-wise phase resumes at its block.

The packed result computes exactly what the trained fake-quantized model computed (same codes,
float16 scales and integer zero-points, same float32 arithmetic).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from ..config import IntOptions, opt
from ..errors import CompressError
from ..formats import gptq_int
from ..qlinear import QuantLinear, set_submodule
from ..registry import Method, register
from ..train.fakequant import FakeQuantLinear, ScaleTunedLinear
from ..train.loop import Trainer, TrainSpec
from ..train.losses import lm_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QATConfig(IntOptions):
    init: str = opt("gptq", "Where training starts: GPTQ's solution (MSE grid, act-order, static groups), or "
                            "round-to-nearest on the min-max or the MSE-searched grid.",
                    choices=("gptq", "mse", "minmax"))
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
    from_checkpoint: str = opt(None, "Start from this packed gptq-int checkpoint of the same model on the same "
                                     "grid (a GPTQ or AWQ result; its norms too) instead of --init.")

    def check(self) -> None:
        super().check()
        if not self.blockwise and self.e2e_steps == 0:
            raise CompressError("--no-blockwise needs --e2e-steps > 0 (otherwise nothing is trained)")


def _mse(block, inputs, targets, idx, kw) -> torch.Tensor:
    from calib.runner import hidden_states
    y = hidden_states(block(inputs.gather(idx), **kw))
    t = torch.cat([targets[i] for i in idx]).to(y.device)
    return torch.nn.functional.mse_loss(y.float(), t.float())


@register
class QAT(Method):
    name = "qat"
    summary = ("quantization-aware training: block-wise reconstruction of weights and quantization "
               "parameters, then end-to-end training of the scales (EfficientQAT)")
    kind = "qat"
    config = QATConfig

    def check_model(self, loaded, targets) -> None:
        if self.cfg.from_checkpoint is not None:
            from ..train.start import PackedStart
            names = [n for n in loaded.arch.linear_names(loaded.model) if targets.selects(n)]
            start = PackedStart(self.cfg.from_checkpoint)
            start.check(loaded.model.config.to_dict(), {n: self.scheme_for(n, targets.override_for(n)) for n in names})
        if self.cfg.teacher is None:
            return
        from ..models import read_spec_config
        vocab = read_spec_config(self.cfg.teacher).get("vocab_size")
        if vocab is not None and vocab != loaded.model.config.vocab_size:
            raise CompressError(f"teacher {self.cfg.teacher} has a vocabulary of {vocab} tokens, "
                                f"the model {loaded.model.config.vocab_size}")

    def metadata(self, record=None) -> dict:
        out = self.cfg.to_dict()
        if record is not None:
            out.update({k: record.extra[k] for k in ("qat_blocks", "qat_e2e") if k in record.extra})
        return out

    # ------------------------------------------------------------------ phase 1: block by block
    def process_block(self, blk) -> None:
        names = [n for g in blk.groups() for n in blk.targeted(g)]
        if not names:
            return
        targets = blk.inputs.run(blk.block, keep=True) if self.cfg.blockwise else None
        fakes = {}
        if self.cfg.from_checkpoint is not None:
            starts = self._checkpoint_starts(blk, names)
        else:
            starts = self._gptq_starts(blk) if self.cfg.init == "gptq" else {}
        for n in names:
            fakes[n] = FakeQuantLinear(blk.linear(n), blk.scheme(n), self.cfg.init, starts.get(n))
            set_submodule(blk.block, n, fakes[n])
        if self.cfg.blockwise:
            before, after, steps = self._reconstruct(blk, fakes, targets)
            blk.record.extra.setdefault("qat_blocks", {})[str(blk.i)] = {
                "mse_init": before, "mse_trained": after, "kept": "trained" if after < before else "start",
                "steps": steps}
        for n, fq in fakes.items():
            blk.record.add(blk.full(n), fq.packed(), fq.scheme.to_dict())

    def _checkpoint_starts(self, blk, names) -> dict:
        """The checkpoint's float tensors loaded into the block, and its packed linears as starts."""
        from ..train.start import PackedStart
        start = blk.run_state.get("start")
        if start is None:
            start = blk.run_state["start"] = PackedStart(self.cfg.from_checkpoint)
        start.load_floats(blk.block, blk.full(""))
        return {n: start.start(blk.full(n), blk.linear(n).in_features, blk.linear(n).out_features) for n in names}

    def _gptq_starts(self, blk) -> dict:
        """GPTQ's solution for every targeted linear of the block: ``{name: (weight, scales, zeros)}``."""
        from ..solvers.int_grid import gptq_solve
        from .gptq import GPTQOptions, block_hessians
        cfg = GPTQOptions(bits=self.cfg.bits, group_size=self.cfg.group_size, sym=self.cfg.sym, grid="mse")
        out = {}
        for group, H in block_hessians(blk, cfg):
            for name in blk.targeted(group):
                scheme = dataclasses.replace(blk.scheme(name), act_order=True)    # g_idx stays natural
                res = gptq_solve(blk.linear(name).weight.detach().to(torch.float32), H, scheme, damp=cfg.damp,
                                 block_size=cfg.block_size, static_groups=True, grid="mse")
                blk.record.note(blk.full(name), res.loss, res.fallback)
                out[name] = (res.dequantize(), res.scales, res.zeros)
        return out

    def _reconstruct(self, blk, fakes, targets):
        cfg, inputs, block = self.cfg, blk.inputs, blk.block
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
        if not after < before:          # training never leaves a block worse than where it started
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(start[k])
        return before, after, spec.steps

    # ------------------------------------------------------------------ phase 2: end to end
    def finish(self, run) -> None:
        cfg = self.cfg
        if cfg.e2e_steps == 0:
            return
        if run.windows is None:
            raise CompressError("the end-to-end phase needs calibration windows")
        model = run.model
        tuned = {}
        for name, p in run.record.packed.items():
            if isinstance(p, gptq_int.PackedInt):
                tuned[name] = ScaleTunedLinear(p, model.get_submodule(name).bias)
                set_submodule(model, name, tuned[name])
        for p in model.parameters():
            p.requires_grad_(False)
        params = {name: st.scale.requires_grad_(True) for name, st in tuned.items()}
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
        for name, st in tuned.items():
            packed = st.packed()
            run.record.packed[name] = packed
            set_submodule(model, name, QuantLinear.from_packed(packed, st.bias))
        run.record.extra["qat_e2e"] = {"steps": spec.steps, "loss_first": hist[0]["loss"],
                                       "loss_last": hist[-1]["loss"],
                                       "target": "teacher" if teacher is not None else "text"}
        if run.work is not None:
            run.work.save_blocks(run.step_index, model, run.arch)

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
from dataclasses import dataclass

import torch

from ..config import IntOptions, opt
from ..formats import gptq_int
from ..qlinear import QuantLinear, set_submodule
from ..registry import Method, register
from ..train.fakequant import FakeQuantLinear, ScaleTunedLinear
from ..train.phases import QATPhaseOptions, check_teacher, end_to_end, reconstruct


@dataclass(frozen=True)
class QATConfig(QATPhaseOptions, IntOptions):
    init: str = opt("gptq", "Where training starts: GPTQ's solution (MSE grid, act-order, static groups), or "
                            "round-to-nearest on the min-max or the MSE-searched grid.",
                    choices=("gptq", "mse", "minmax"))
    from_checkpoint: str = opt(None, "Start from this packed gptq-int checkpoint of the same model on the same "
                                     "grid (a GPTQ or AWQ result; its norms too) instead of --init.")

    def check(self) -> None:
        IntOptions.check(self)
        QATPhaseOptions.check(self)


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
        check_teacher(self.cfg, loaded)

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
            blk.record.extra.setdefault("qat_blocks", {})[str(blk.i)] = reconstruct(blk, fakes, targets, self.cfg)
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

    # ------------------------------------------------------------------ phase 2: end to end
    def finish(self, run) -> None:
        cfg = self.cfg
        if cfg.e2e_steps == 0:
            return
        model = run.model
        tuned = {}
        for name, p in run.record.packed.items():
            if isinstance(p, gptq_int.PackedInt):
                tuned[name] = ScaleTunedLinear(p, model.get_submodule(name).bias)
                set_submodule(model, name, tuned[name])
        for p in model.parameters():
            p.requires_grad_(False)
        params = {name: st.scale.requires_grad_(True) for name, st in tuned.items()}
        run.record.extra["qat_e2e"] = end_to_end(run, cfg, params, model)
        for name, st in tuned.items():
            packed = st.packed()
            run.record.packed[name] = packed
            set_submodule(model, name, QuantLinear.from_packed(packed, st.bias))
        if run.work is not None:
            run.work.save_blocks(run.step_index, model, run.arch)

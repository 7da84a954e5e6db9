"""Quantization-aware training onto the GGML grids of a llama.cpp type mix, written as a GGUF file.

The k-quant counterpart of :mod:`compress.methods.qat`, in the same two phases:

1. **Block-wise reconstruction**: each targeted linear of a block starts from GPTQ's solution on
   its planned GGML type (``kquant-gptq``'s, true-sequential), becomes a
   :class:`~compress.train.fakequant_ggml.GGMLFakeQuantLinear` (weights, sub-block scales and
   mins trained through straight-through rounding, the integer sub-block scales on the block's
   float16 ``d``), and trains against the unquantized block's outputs; a block whose output error
   did not go down keeps GPTQ's blocks, byte for byte.
2. **End to end** (``--e2e-steps``): with the codes frozen, every sub-block scale and min of the
   model trains on the calibration windows (next-token cross-entropy, or ``--teacher``'s
   distribution); the token embedding and an untied output are quantized first, so the phase
   trains the model the file will hold.

Every trained tensor converts exactly into GGUF blocks of its planned type: the file decodes to
the weights the trained model computed with. Tensors planned as F16/F32 are written as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.ggml_mix import FLOAT_TYPES
from ..formats.ggml_model import GGMLTensor, note
from ..qlinear import set_submodule
from ..registry import register
from ..solvers.ggml_grid import gptq_ggml_solve
from ..train.fakequant_ggml import GGMLFakeQuantLinear
from ..train.phases import QATPhaseOptions, check_teacher, end_to_end, reconstruct
from .kquant import KQuantGPTQOptions, _GGMLMethod, layer_choice, record_float


@dataclass(frozen=True)
class QATKQuantConfig(QATPhaseOptions, KQuantGPTQOptions):
    def check(self) -> None:
        KQuantGPTQOptions.check(self)
        QATPhaseOptions.check(self)


def _plain(fq: GGMLFakeQuantLinear) -> torch.nn.Linear:
    """A float linear computing exactly what ``fq`` computes now."""
    lin = torch.nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None, device=fq.weight.device)
    with torch.no_grad():
        lin.weight.copy_(fq.quantized_weight())
        if fq.bias is not None:
            lin.bias.copy_(fq.bias)
    return lin.requires_grad_(False)


@register
class QATKQuant(_GGMLMethod):
    name = "qat-kquant"
    kind = "qat"
    summary = ("quantization-aware training onto the GGML grids of a llama.cpp type mix (--type; from GPTQ's "
               "solution on those grids, block-wise then end to end); the output is a .gguf file")
    config = QATKQuantConfig
    calibrated = True
    label = "qat"

    def check_model(self, loaded, targets) -> None:
        check_teacher(self.cfg, loaded)

    def metadata(self, record=None) -> dict:
        out = {k: v for k, v in self.cfg.to_dict().items() if k not in ("type", "pure")}
        if record is not None:
            out.update({k: record.extra[k] for k in ("qat_blocks", "qat_e2e") if k in record.extra})
        return out

    # ------------------------------------------------------------------ phase 1: block by block
    def process_block(self, blk) -> None:
        if not any(blk.targeted(g) for g in blk.groups()):
            return
        targets = blk.inputs.run(blk.block, keep=True) if self.cfg.blockwise else None
        fakes, choices = {}, {}
        for group in blk.groups():              # GPTQ's start, true-sequential as kquant-gptq
            names = blk.targeted(group)
            if not names:
                continue
            H = blk.hessian(group).hessian()
            for name in names:
                ch = choices[name] = layer_choice(blk, name)
                if ch.type in FLOAT_TYPES:
                    record_float(blk, name, ch)
                    continue
                lin = blk.linear(name)
                res = gptq_ggml_solve(lin.weight.data.to(torch.float32), H, ch.type, damp=self.cfg.damp)
                blk.record.note(blk.full(name), res.loss, res.fallback)
                fakes[name] = GGMLFakeQuantLinear(lin, ch.type, res.data)
                set_submodule(blk.block, name, fakes[name])
        kept = "trained"
        if self.cfg.blockwise and fakes:
            rec = reconstruct(blk, fakes, targets, self.cfg)
            blk.record.extra.setdefault("qat_blocks", {})[str(blk.i)] = rec
            kept = rec["kept"]
        for name, fq in fakes.items():
            ch = choices[name]
            data = fq.start_blocks() if kept == "start" else fq.blocks()
            blk.record.add(blk.full(name), GGMLTensor(ch.name, ch.type, ch.shape, data, note(ch, "gptq+qat")))
            set_submodule(blk.block, name, _plain(fq))

    # ------------------------------------------------------------------ phase 2: end to end
    def finish(self, run) -> None:
        if self.cfg.e2e_steps > 0:
            self._end_to_end(run)
        super().finish(run)

    def _end_to_end(self, run) -> None:
        from ..formats import kquants
        model = run.model
        modules = {"token_embd.weight": model.get_input_embeddings(), "output.weight": model.get_output_embeddings()}
        for name, t in self.rest_tensors(run).items():     # the embedding / output as the file holds them
            mod = modules.get(name)
            if mod is not None and t.type not in FLOAT_TYPES:
                with torch.no_grad():
                    mod.weight.copy_(kquants.dequantize(t.data, t.type, tuple(mod.weight.shape)).to(mod.weight))
        fakes = {}
        for full, t in run.record.packed.items():
            if isinstance(t, GGMLTensor) and t.type not in FLOAT_TYPES:
                fakes[full] = GGMLFakeQuantLinear(model.get_submodule(full), t.type, t.data)
                fakes[full].freeze_codes()
                set_submodule(model, full, fakes[full])
        for p in model.parameters():
            p.requires_grad_(False)
        params = {f"{full}.{k}": p.requires_grad_(True) for full, fq in fakes.items()
                  for k, p in fq.quant_parameters().items()}
        run.record.extra["qat_e2e"] = end_to_end(run, self.cfg, params, model)
        for full, fq in fakes.items():
            t = run.record.packed[full]
            run.record.packed[full] = GGMLTensor(t.name, t.type, t.shape, fq.blocks(), t.note)
            set_submodule(model, full, _plain(fq))
        if run.work is not None:
            run.work.save_blocks(run.step_index, model, run.arch)

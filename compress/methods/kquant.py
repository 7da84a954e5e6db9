"""llama.cpp k-quants as methods writing a GGUF file.

* ``kquant``: llama.cpp's own quantizers for a type mix (``--type Q4_K_M``), byte-identical to
  ``llama-quantize``; with ``--imatrix FILE`` their importance-weighted searches.
* ``kquant-gptq``: GPTQ's error compensation on the same GGML grids for the decoder-block
  linears (:func:`compress.solvers.ggml_grid.gptq_ggml_solve` on the shared column sweep); the
  token embedding and an untied output keep llama.cpp's plain quantizers.

The per-tensor types come from the mix (:mod:`compress.formats.ggml_mix`); block linears that the
step's targets leave out are written as F16.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodConfig, opt
from ..errors import CompressError
from ..formats.ggml_mix import FLOAT_TYPES, MIXES, TensorChoice, get_mix
from ..formats.ggml_model import GGMLModel, GGMLTensor, note, quantize_model_rtn, quantize_tensor
from ..registry import Method, register
from ..solvers.ggml_grid import gptq_ggml_solve

TYPE_HELP = ("llama.cpp type mix: " + ", ".join(MIXES) + " (aliases Q3_K, Q4_K, Q5_K); the output is a .gguf file.")


@dataclass(frozen=True)
class KQuantOptions(MethodConfig):
    type: str = opt(None, TYPE_HELP)
    pure: bool = opt(False, "One type for every tensor (llama-quantize --pure).")

    def check(self) -> None:
        if self.type is None:
            raise CompressError("--type is required (a llama.cpp type mix such as Q4_K_M)")
        get_mix(self.type)

    @property
    def mix(self) -> str:
        return get_mix(self.type).name


@dataclass(frozen=True)
class KQuantImatrixOptions(KQuantOptions):
    imatrix: str = opt(None, "Importance matrix file (llama.cpp GGUF or legacy .dat, e.g. from `compress imatrix`).")


@dataclass(frozen=True)
class KQuantGPTQOptions(KQuantOptions):
    damp: float = opt(0.01, "GPTQ: dampening, relative to the mean Hessian diagonal.", min=0, max=1,
                      open_min=True, open_max=True)


class _GGMLMethod(Method):
    needs_description = True          # llama.cpp's tensor names come from the family
    calibrated = False
    output = "gguf"
    format = "gguf"
    label = "kquant"

    def scheme_for(self, full_name, override):
        if override:
            raise CompressError(f"{self.name} takes its per-tensor types from the --type mix; "
                                f"scheme overrides do not apply ({full_name})")
        return None

    def check_module(self, full_name, linear, override) -> None:
        self.scheme_for(full_name, override)

    def importance(self, floats, arch: str) -> dict:
        return {}

    def begin(self, run) -> None:
        from ..export.gguf import HParams, StreamedTensors, gguf_name, model_tensors, plan_types
        hp = HParams.from_config(run.model.config)
        stream = run.loaded.stream
        floats = model_tensors(run.model, run.arch) if stream is None else StreamedTensors(run.model, run.arch, stream)
        imp = self.importance(floats, hp.arch)
        plan = plan_types(floats, self.cfg.mix, hp, self.cfg.pure, bool(imp))
        chosen: dict[str, set] = {}
        for full in run.arch.linear_names(run.model):
            g = gguf_name(full + ".weight", run.arch.blocks, hp.arch)
            chosen.setdefault(g, set()).add(run.targets.selects(full))
        for g, sel in chosen.items():               # linears the targets leave out stay F16
            if len(sel) > 1:
                raise CompressError(f"the targets take some experts of {g} and leave others: llama.cpp stores "
                                    "them as one tensor of one type; target all of them or none")
            if sel == {False} and g in plan:
                c = plan[g]
                plan[g] = TensorChoice(c.name, c.shape, c.category, "F16", "F16", True)
        run.state.update(floats=floats, plan=plan, importance=imp,
                         name=lambda full: gguf_name(full + ".weight", run.arch.blocks, hp.arch))

    def rest_tensors(self, run) -> dict[str, GGMLTensor]:
        """The planned tensors no block step recorded (the token embedding, an untied output),
        quantized by llama.cpp's quantizers: ``{gguf name: GGMLTensor}`` (computed once)."""
        if "rest" not in run.state:
            plan = run.state["plan"]
            done = {t.name for t in run.record.packed.values()}
            rest = {n: c for n, c in plan.items() if n not in done}
            run.state["rest"] = {t.name: t for t in quantize_model_rtn(run.state["floats"], rest,
                                                                        run.state["importance"], progress=False)}
        return run.state["rest"]

    def finish(self, run) -> None:
        plan = run.state["plan"]
        done = _assembled(run.record.packed, plan)
        others = self.rest_tensors(run)
        tensors = [done[n] if n in done else others[n] for n in plan]
        run.state["ggml"] = GGMLModel(tensors, self.cfg.mix, self.cfg.pure, self.label, plan)
        run.state.pop("floats")


@register
class KQuant(_GGMLMethod):
    name = "kquant"
    summary = "llama.cpp's k-quant/legacy quantizers for a type mix (--type), optionally importance-weighted"
    config = KQuantImatrixOptions

    def importance(self, floats, arch: str) -> dict:
        if self.cfg.imatrix is None:
            return {}
        from .. import imatrix as imx
        from ..export.gguf import gguf_importance
        imp = gguf_importance(imx.read(Path(self.cfg.imatrix)).importance(), floats, arch)
        if not imp:
            raise CompressError("the importance matrix has no entry for any tensor of this model")
        return imp

    def apply(self, blk, group, stats) -> None:
        from ..export.gguf_arch import expert_index
        st = blk.run_state
        for name in blk.targeted(group):
            full = blk.full(name)
            if expert_index(full) is not None:
                continue                # stacked with the other experts: quantized whole at the end
            out = quantize_model_rtn(st["floats"], {st["name"](full): st["plan"][st["name"](full)]},
                                     st["importance"], progress=False)
            blk.record.add(full, out[0])

    def metadata(self, record=None) -> dict:
        return {"imatrix": Path(self.cfg.imatrix).name if self.cfg.imatrix else None}


@register
class KQuantGPTQ(_GGMLMethod):
    name = "kquant-gptq"
    distributed = True
    summary = "GPTQ onto the GGML grids of a llama.cpp type mix (--type)"
    config = KQuantGPTQOptions
    calibrated = True
    label = "gptq"

    def observe(self, blk, group):
        return blk.hessian(group).hessian()

    def apply(self, blk, group, H) -> None:
        blk.solve_each(blk.targeted(group), lambda name: self._solve(blk, name, H))

    def _solve(self, blk, name: str, H) -> None:
        lin, full = blk.linear(name), blk.full(name)
        ch = layer_choice(blk, name)
        w = lin.weight.data
        if ch.type in FLOAT_TYPES:
            record_float(blk, name, ch)
            return
        res = gptq_ggml_solve(w.to(torch.float32), H, ch.type, damp=self.cfg.damp)
        blk.record.add(full, GGMLTensor(ch.name, ch.type, ch.shape, res.data,
                                        note(ch, f"gptq {res.fallback}" if res.fallback else "gptq")),
                       loss=res.loss, fallback=res.fallback)
        blk.record.extra.setdefault("output_errors", {})[full] = res.info["output_error"]
        lin.weight.data = res.weight.to(w.device, w.dtype)

    def metadata(self, record=None) -> dict:
        errs = (record.extra if record else {}).get("output_errors", {})
        return {"damp": float(self.cfg.damp), "total_output_error": float(sum(errs.values()))}


def layer_choice(blk, name: str) -> TensorChoice:
    """The planned GGML type of block linear ``name``; for one expert of a stacked tensor, a choice
    shaped as its own rows (the experts are assembled at the end)."""
    st = blk.run_state
    ch = st["plan"][st["name"](blk.full(name))]
    if len(ch.shape) > 2:
        ch = TensorChoice(ch.name, tuple(blk.linear(name).weight.shape), ch.category, ch.type, ch.wanted, ch.fallback)
    return ch


def record_float(blk, name: str, ch: TensorChoice) -> None:
    """Record linear ``name`` stored as a float type (F16, BF16, F32), its weight rounded alike."""
    lin = blk.linear(name)
    w = lin.weight.data
    data = quantize_tensor(w, ch.type)
    blk.record.add(blk.full(name), GGMLTensor(ch.name, ch.type, ch.shape, data, note(ch)))
    lin.weight.data = data.to(torch.float32).to(w.device, w.dtype)


def _assembled(packed: dict, plan: dict) -> dict[str, GGMLTensor]:
    """The recorded GGUF tensors by GGUF name, each expert's rows (recorded under its own module)
    stacked in expert order into llama.cpp's ``(experts, rows, cols)`` tensor."""
    from ..export.gguf_arch import expert_index
    done: dict[str, GGMLTensor] = {}
    parts: dict[str, dict[int, GGMLTensor]] = {}
    for full, t in packed.items():
        e = expert_index(full)
        if e is None:
            done[t.name] = t
        else:
            parts.setdefault(t.name, {})[e] = t
    for name, ts in parts.items():
        c = plan[name]
        if sorted(ts) != list(range(c.shape[0])):
            raise CompressError(f"{name}: solved experts {sorted(ts)} of {c.shape[0]}; a stacked tensor needs them all")
        common = max({ts[e].note for e in ts}, key=lambda n: sum(ts[e].note == n for e in ts))
        note_ = "; ".join([common, *(f"expert {e}: {ts[e].note}" for e in sorted(ts) if ts[e].note != common)])
        done[name] = GGMLTensor(name, c.type, c.shape, torch.stack([ts[e].data for e in sorted(ts)]), note_)
    return done

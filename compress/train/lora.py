"""Low-rank adapters on a frozen packed checkpoint (QLoRA-style, Dettmers et al., 2023).

Every targeted :class:`~compress.qlinear.QuantLinear` of a gptq-int checkpoint becomes a
:class:`LoRALinear`: ``y = Q(x) + (alpha / r) * B(A(dropout(x)))`` where ``Q`` is the packed layer,
frozen and computed by the same kernels as at inference, and only ``A (r, K)`` and ``B (N, r)``
train (``A`` Kaiming-uniform, ``B`` zero, so training starts from the checkpoint's own outputs). The
backward pass through ``Q`` multiplies by its dequantized weight, the only float copy of it that
exists (kept beside the codes on CPU, as evaluation does).

The result is written either as a **PEFT adapter** (``adapter_config.json`` and
``adapter_model.safetensors``, the layout ``peft.PeftModel.from_pretrained`` reads; the base it
applies to is the checkpoint's dequantized model) or, with ``merge``, as a **packed checkpoint** in
which each adapted linear's weight ``W + (alpha / r) B A`` is re-quantized onto the checkpoint's own
grid (same scales, zero-points and groups; new codes): updates smaller than half a step round away,
which the run's report counts (``codes_changed``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from calib import dist

from ..config import Targets
from ..errors import CompressError
from ..formats import gptq_int
from ..qlinear import QuantLinear, set_submodule
from ..quantizer import dequantize_values, quantize_values

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAOptions:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()     # module names or re: patterns (default: every packed linear)
    merge: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise CompressError(f"--lora-rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise CompressError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise CompressError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        Targets(self.targets)                     # names or re: patterns, checked before any loading

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _FrozenPacked(torch.autograd.Function):
    """``Q(x)`` with the packed layer frozen: the forward pass is the layer's own (any kernel), the
    backward pass gives the input its gradient ``dy @ W`` and the layer none."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, dy):
        w = ctx.layer.dequantized_cached()
        return (dy.to(torch.float32) @ w).to(dy.dtype), None


class LoRALinear(torch.nn.Module):
    """A frozen packed layer plus a trainable low-rank update (see the module doc)."""

    def __init__(self, base: QuantLinear, opts: LoRAOptions, generator: torch.Generator):
        super().__init__()
        self.base = base
        for t in base.buffers():
            t.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, opts.rank, bias=False)
        self.lora_B = torch.nn.Linear(opts.rank, base.out_features, bias=False)
        with torch.no_grad():                     # PEFT's initialisation: A Kaiming-uniform, B zero
            bound = 1.0 / math.sqrt(base.in_features)    # kaiming_uniform_(a=sqrt(5)) on (r, K)
            self.lora_A.weight.copy_(torch.rand(self.lora_A.weight.shape, generator=generator) * 2 * bound - bound)
            self.lora_B.weight.zero_()
        self.scaling = opts.scaling
        self.dropout = torch.nn.Dropout(opts.dropout) if opts.dropout else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenPacked.apply(x, self.base) if torch.is_grad_enabled() else self.base(x)
        return y + self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))).to(y.dtype) * self.scaling

    def delta(self) -> torch.Tensor:
        """``(alpha / r) B A``, the update to the dequantized weight ``(N, K)``."""
        return (self.lora_B.weight @ self.lora_A.weight).detach() * self.scaling

    @torch.no_grad()
    def merged_packed(self) -> tuple[gptq_int.PackedInt, int]:
        """The base weight plus :meth:`delta` re-quantized on the base's grid; and how many codes changed."""
        p = self.base.packed()
        q, zeros = gptq_int.unpack(p)                          # (N, K), (G, N)
        g = p.g_idx.to(torch.int64)
        s, z = p.scales.to(torch.float32).t()[:, g], zeros.to(torch.float32).t()[:, g]     # per column
        w = dequantize_values(q, p.scales, zeros, p.g_idx) + self.delta()
        new = quantize_values(w, s, z, 2 ** p.bits - 1).to(torch.int32)
        changed = int((new != q.to(torch.int32)).sum())
        return gptq_int.pack(new, p.scales, zeros.to(torch.int32), p.g_idx, p.bits), changed


def attach(model: torch.nn.Module, opts: LoRAOptions, seed: int = 0) -> dict[str, LoRALinear]:
    """Wrap every targeted packed linear of ``model`` in a :class:`LoRALinear`; returns them by name."""
    packed = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not packed:
        raise CompressError("LoRA trains on a packed gptq-int checkpoint and this model has no packed linears; "
                            "quantize it first (compress quantize MODEL --method gptq ...)")
    names = [n for n in packed if Targets(opts.targets).selects(n)]
    if not names:
        raise CompressError(f"--targets {' '.join(opts.targets)} match none of the packed linears "
                            f"(e.g. {packed[0]})")
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for n in names:
        out[n] = LoRALinear(model.get_submodule(n), opts, gen)
        set_submodule(model, n, out[n])
    return out


def trainable(layers: dict[str, LoRALinear]) -> dict[str, torch.nn.Parameter]:
    """The adapters' parameters under PEFT's names (``<module>.lora_A.weight``)."""
    out = {}
    for n, m in layers.items():
        out[f"{n}.lora_A.weight"] = m.lora_A.weight.requires_grad_(True)
        out[f"{n}.lora_B.weight"] = m.lora_B.weight.requires_grad_(True)
    return out


def adapter_config(layers: dict[str, LoRALinear], opts: LoRAOptions, base: str) -> dict:
    """PEFT's ``adapter_config.json`` for these adapters (``target_modules``: the exact module names)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": opts.rank,
            "lora_alpha": opts.alpha, "lora_dropout": opts.dropout, "target_modules": sorted(layers),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False}


def save_adapter(layers: dict[str, LoRALinear], opts: LoRAOptions, base: str, out: Path, meta: dict) -> dict:
    """Write a PEFT adapter folder atomically (the suite's record in the safetensors header)."""
    from ..checkpoint import AtomicFolder
    from ..fileio import save_safetensors
    tensors = {}
    for n, m in layers.items():
        tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    with AtomicFolder(out) as tmp:
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt", "compress": json.dumps(meta)})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(layers, opts, base), indent=2))
    return {"out": str(out), "format": "peft-lora", "modules": len(layers),
            "parameters": sum(t.numel() for t in tensors.values())}


def load_adapter(model: torch.nn.Module, folder: Path) -> dict[str, LoRALinear]:
    """Attach the PEFT adapter in ``folder`` (written by :func:`save_adapter`) to a loaded packed model."""
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:
        raise CompressError(f"{folder} is not a readable LoRA adapter: {str(e).splitlines()[0]}") from None
    if cfg.get("peft_type") != "LORA":
        raise CompressError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not LORA")
    names = cfg.get("target_modules") or []
    layers = attach(model, LoRAOptions(int(cfg["r"]), float(cfg["lora_alpha"]),
                                       targets=tuple(names) if isinstance(names, list) else (names,)))
    with torch.no_grad():
        for n, m in layers.items():
            for part in ("lora_A", "lora_B"):
                key = f"{PEFT_PREFIX}{n}.{part}.weight"
                t = state.get(key)
                if t is None or t.shape != getattr(m, part).weight.shape:
                    raise CompressError(f"{folder}: {key} is missing or has the wrong shape")
                getattr(m, part).weight.copy_(t)
    return layers


def save_merged(loaded, layers: dict[str, LoRALinear], out: Path, meta: dict) -> dict:
    """Merge every adapter into its packed layer (re-quantized on the layer's grid) and write the
    packed checkpoint, its ``quantization_config`` kept and the merge recorded."""
    from ..checkpoint import save_packed
    from ..models import read_config
    changed = total = 0
    for n, m in layers.items():
        p, c = m.merged_packed()
        changed += c
        total += p.in_features * p.out_features
        set_submodule(loaded.model, n, QuantLinear.from_packed(p, m.base.bias))
    qc = read_config(loaded.path)["quantization_config"]
    qc = dict(qc, compress=dict(qc.get("compress") or {}, lora_merged={**meta, "codes_changed": changed,
                                                                       "codes": total}))
    save_packed(loaded, out, qc)
    return {"out": str(out), "format": "gptq-int (merged)", "codes_changed": changed, "codes": total}


def run(checkpoint: str, out: Path, spec, opts: LoRAOptions, calib, teacher_spec: str | None = None,
        temperature: float = 1.0, divergence: str = "forward", eval_windows: int = 16, data_dir=None,
        restart: bool = False, progress: bool = True) -> dict:
    """Train adapters on ``checkpoint`` (a packed gptq-int folder) over the windows of ``calib`` (a
    :class:`calib.data.CalibSpec`), on the text or on ``teacher_spec``'s distributions; write the
    adapter (or, with ``opts.merge``, the merged packed checkpoint) to ``out``."""
    from calib.data import calibration_windows, resolve_text

    from .. import models
    from ..resume import model_fingerprint, tensor_fingerprint
    from . import job
    from .losses import lm_loss

    out = job.check_output(out)
    cfg = job.check_config(checkpoint, "model", quantized_ok=True)
    if cfg and (cfg.get("quantization_config") or {}).get("quant_method") != "gptq":
        raise CompressError(f"{checkpoint} is not a packed gptq-int checkpoint; LoRA trains adapters on one "
                            "(quantize it first: compress quantize MODEL --method gptq ...)")
    if teacher_spec is not None:
        job.check_vocab(job.check_config(teacher_spec, "teacher"), cfg)
    resolve_text(calib.source, data_dir)
    rank = dist.init()
    loaded = models.load(checkpoint)
    if loaded.kind != "packed":
        raise CompressError(f"{checkpoint} is not a packed checkpoint folder")
    teacher = models.load(teacher_spec).model.eval() if teacher_spec is not None else None
    layers = attach(loaded.model, opts, spec.seed)
    params = trainable(layers)
    model = loaded.model.train()
    wins = calibration_windows(loaded.tokenizer, calib, data_dir)
    fp = {"model": model_fingerprint(loaded.path), "windows": tensor_fingerprint(wins), "options": asdict(opts),
          "teacher": model_fingerprint(models.resolve(teacher_spec)[1]) if teacher_spec else None,
          "loss": [temperature, divergence]}
    res = job.train(params, spec, wins, lm_loss(model, teacher, temperature, divergence), out, fp,
                    job.evaluator(model, loaded.tokenizer, eval_windows, data_dir), restart, progress, "lora")
    model.eval()
    result = {"model": checkpoint, "teacher": teacher_spec, "mode": "merged" if opts.merge else "adapter", **res,
              "spec": asdict(spec), "options": asdict(opts)}
    if rank == 0:
        meta = {"method": "lora", "model": checkpoint, "teacher": teacher_spec, "options": asdict(opts),
                "train": asdict(spec), "steps": res["steps"], "tokens": res["tokens"],
                "loss_first": res["loss_first"], "loss_last": res["loss_last"]}
        result["output"] = (save_merged(loaded, layers, out, meta) if opts.merge else
                            save_adapter(layers, opts, checkpoint, out, meta))
    job.finish(out)
    return result

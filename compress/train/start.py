"""A packed gptq-int checkpoint of the same model as the starting point of quantization-aware
training (``compress qat --from-checkpoint``): a GPTQ or an AWQ result, or an earlier QAT run.

Each targeted linear starts from the checkpoint's codes, scales, zero-points and group order, and
each block takes the checkpoint's own float tensors (norms, biases) before training: AWQ folds
its per-channel scales into the norms and linears before the ones it scales, so its quantized
weights only compute the block's function beside its own norms. The block's reconstruction
targets stay the unquantized model's outputs (the residual stream, which AWQ's rescaling inside a
block leaves unchanged).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CompressError
from ..formats import gptq_int

_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "model_type")


class PackedStart:
    def __init__(self, path: str):
        from ..checkpoint import read_quant_meta
        from ..models import read_config
        self.path = Path(path)
        if not self.path.is_dir():
            raise CompressError(f"--from-checkpoint {path}: no such checkpoint folder")
        self.config = read_config(self.path)
        if (self.config.get("quantization_config") or {}).get("quant_method") != "gptq":
            raise CompressError(f"--from-checkpoint {path} is not a packed gptq-int checkpoint")
        _, meta = read_quant_meta(self.config, self.path)
        self.modules = meta["modules"]
        self.compact = set(meta.get("compact_modules") or [])
        self._state: dict | None = None

    def check(self, model_config: dict, schemes: dict) -> None:
        """Refuse a checkpoint of another model, or one that does not hold every targeted linear
        (``schemes``: full name -> the scheme QAT trains it on) on the same grid."""
        for k in _SHAPE_KEYS:
            if k in model_config and self.config.get(k) != model_config.get(k):
                raise CompressError(f"--from-checkpoint {self.path} is another model: {k} "
                                    f"{self.config.get(k)} against {model_config.get(k)}")
        for name, sc in schemes.items():
            have = self.modules.get(name)
            if have is None:
                raise CompressError(f"--from-checkpoint {self.path} does not quantize {name}")
            if name in self.compact:
                raise CompressError(f"--from-checkpoint {self.path}: {name} is stored compactly (pruned); "
                                    "start from a dense checkpoint")
            if (getattr(have, "bits", None), getattr(have, "group_size", None), getattr(have, "sym", None)) != \
                    (sc.bits, sc.group_size, sc.sym):
                raise CompressError(f"--from-checkpoint {self.path}: {name} is {have.describe()}, "
                                    f"the training grid {sc.describe()}")

    def state(self) -> dict:
        if self._state is None:
            from ..checkpoint import read_state
            self._state = read_state(self.path)
        return self._state

    @torch.no_grad()
    def load_floats(self, block: torch.nn.Module, prefix: str) -> None:
        """Copy the checkpoint's float tensors of ``block`` (full names under ``prefix``) into it."""
        state = self.state()
        for rel, t in [*block.named_parameters(), *block.named_buffers()]:
            src = state.get(prefix + rel)
            if src is not None and src.is_floating_point():
                if src.shape != t.shape:
                    raise CompressError(f"--from-checkpoint {self.path}: {prefix + rel} has shape "
                                        f"{tuple(src.shape)}, the model {tuple(t.shape)}")
                t.copy_(src.to(t.dtype))

    def start(self, name: str, in_features: int, out_features: int):
        """``(dequantized weight, scales (G, N), zeros (G, N), g_idx (K,))`` of linear ``name``."""
        state, bits = self.state(), self.modules[name].bits
        try:
            p = gptq_int.from_tensors({k: state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")},
                                      bits, in_features, out_features)
        except KeyError as e:
            raise CompressError(f"--from-checkpoint {self.path}: tensor {e.args[0]} is missing") from None
        _, zeros = gptq_int.unpack(p)
        return p.dequantize(torch.float32), p.scales.to(torch.float32), zeros, p.g_idx.to(torch.int64)

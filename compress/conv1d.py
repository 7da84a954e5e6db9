"""GPT-2's ``Conv1D`` layers as torch Linear layers.

transformers' ``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``(in, out)``: the function of a
``torch.nn.Linear`` whose weight is ``W.T``. The suite turns every ``Conv1D`` into such a Linear
when it builds or loads a model (:func:`linearize`), so every method, hook and solver sees
``nn.Linear``; a linearized layer carries ``conv1d = True``. Float weights are written back in
``Conv1D``'s orientation (:func:`swap_orientation` on the tensors being saved, and on the tensors
being loaded), so a saved float or sparse checkpoint is what transformers' GPT-2 reads. Quantized
layers are stored in the Linear orientation (``qweight`` packs the input dimension), as GPTQ
checkpoints of GPT-2 are.
"""
from __future__ import annotations

import torch


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linearize(model: torch.nn.Module) -> list[str]:
    """Replace every ``Conv1D`` of ``model`` by the equivalent ``nn.Linear`` (in place); returns
    their names."""
    from .qlinear import set_submodule
    names = [n for n, m in model.named_modules() if _is_conv1d(m)]
    for name in names:
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        lin = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
        if conv.bias is not None:
            lin.bias = torch.nn.Parameter(conv.bias.detach(), requires_grad=False)
        lin.conv1d = True
        set_submodule(model, name, lin)
    return names


def conv1d_modules(model: torch.nn.Module) -> list[str]:
    """The float Linear layers of ``model`` that were ``Conv1D`` (quantized ones are not: their
    layout is the Linear one)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and getattr(m, "conv1d", False)]


def swap_orientation(tensors: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """Transpose each module's ``.weight`` in ``tensors`` (in place; Linear <-> Conv1D orientation)."""
    for name in modules:
        key = name + ".weight"
        if key in tensors:
            tensors[key] = tensors[key].t().contiguous()
    return tensors

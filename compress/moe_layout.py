"""Mixtures of experts in transformers 4.57's module layout under either major: transformers 5
fuses each block's experts into two 3-D parameters; :func:`per_expert_layout` gives them back one
module per expert, so module names and checkpoint keys are the same under both."""
from __future__ import annotations

import torch

from .compat import TRANSFORMERS_MAJOR

# the 4.57 names of an expert's gate, up and down projections, and (Mixtral) of the decoder
# layer's attribute that holds the MoE block (5.x calls it ``mlp``)
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                 "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
_MOE_ATTR = {"mixtral": "block_sparse_moe"}


class _ExpertMLP(torch.nn.Module):
    """One expert as transformers 4.57 holds it: three bias-free linears, ``down(act(gate(x)) * up(x))``."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act, device, dtype):
        nn = torch.nn
        super().__init__()
        self._names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, n, nn.Linear(i, o, bias=False, device=device, dtype=dtype))
        self.act_fn = act

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(self.act_fn(gate(x)) * up(x))


class PerExpertMLPs(torch.nn.ModuleList):
    """A fused experts module of transformers 5 (``gate_up_proj (E, 2F, H)``, ``down_proj (E, H, F)``)
    as one module per expert (4.57's layout, names and checkpoint keys), computing the same thing
    with the fused module's call ``(hidden_states, top_k_index, top_k_weights)``: each expert runs
    on the tokens routed to it, its output scaled by the routing weight and summed."""

    def __init__(self, fused, names: tuple[str, str, str]):
        n_exp, two_f, hidden = fused.gate_up_proj.shape
        inter = two_f // 2
        w = fused.gate_up_proj
        super().__init__([_ExpertMLP(names, hidden, inter, fused.act_fn, w.device, w.dtype) for _ in range(n_exp)])
        self.num_experts = n_exp
        if w.device.type != "meta":
            with torch.no_grad():
                for e, ex in enumerate(self):
                    g, u, d = (getattr(ex, n) for n in names)
                    g.weight.copy_(w[e, :inter])
                    u.weight.copy_(w[e, inter:])
                    d.weight.copy_(fused.down_proj[e])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            experts = torch.greater(hit.sum(dim=(-1, -2)), 0).nonzero()
        for e in experts[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, tok = torch.where(hit[e])
            y = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


_LAYER_CLASSES: dict = {}


def _renamed_layer_class(cls, attr: str):
    """``cls`` whose ``mlp`` is read from ``attr`` (the layer's forward calls ``self.mlp``)."""
    if (cls, attr) not in _LAYER_CLASSES:
        _LAYER_CLASSES[(cls, attr)] = type(cls.__name__, (cls,), {"mlp": property(lambda self: getattr(self, attr))})
    return _LAYER_CLASSES[(cls, attr)]


def per_expert_layout(model):
    """Under transformers 5, give ``model``'s mixture-of-experts blocks transformers 4.57's module
    layout (one module per expert, Mixtral's block as ``block_sparse_moe``), with the same weights
    and outputs, so that module names and checkpoint keys are the same under both majors. A no-op
    for other models and under 4.57. Returns ``model``."""
    names = _EXPERT_NAMES.get(getattr(model.config, "model_type", None))
    if TRANSFORMERS_MAJOR < 5 or names is None:
        return model
    attr = _MOE_ATTR.get(model.config.model_type)
    for layer in list(model.modules()):
        moe = layer._modules.get("mlp")
        experts = getattr(moe, "experts", None) if moe is not None else None
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue
        moe.experts = PerExpertMLPs(experts, names)
        if attr is not None:            # the same place in the layer's children, under 4.57's name
            layer._modules = type(layer._modules)((attr if k == "mlp" else k, v) for k, v in layer._modules.items())
            layer.__class__ = _renamed_layer_class(type(layer), attr)
    return model

"""Cut a model into a smaller dense one: keep some decoder blocks, some key-value head groups and
MLP channels in every kept block (the same number in each), and some hidden channels.

A :class:`Plan` says what is kept (original indices, ascending). :func:`apply_plan` slices every
weight of the model's state dict accordingly, writes the new widths into a copy of the config and
builds a fresh model of the same class from it, so the result is exactly what
``AutoModelForCausalLM.from_pretrained`` builds from the saved folder. Which tensors hold which
width comes from the family's :class:`~compress.arch.Widths` description; a family without one is
refused.

With grouped-query attention a key-value head goes with the query heads that read it: the unit
of attention pruning is the group (one K head, one V head, ``heads / kv_heads`` Q heads and the
matching columns of the output projection).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .errors import CompressError


@dataclass(frozen=True)
class Plan:
    layers: tuple[int, ...]                       # decoder blocks kept
    kv_groups: dict[int, tuple[int, ...]]         # per kept block: key-value head groups kept
    mlp: dict[int, tuple[int, ...]]               # per kept block: MLP intermediate channels kept
    hidden: tuple[int, ...]                       # hidden (embedding) channels kept

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "kv_groups": {str(k): list(v) for k, v in self.kv_groups.items()},
                "mlp_channels": {str(k): len(v) for k, v in self.mlp.items()}, "hidden": len(self.hidden)}


@dataclass(frozen=True)
class Dims:
    """A model's prunable widths, read from its config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    hidden: int

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads


def widths_of(model, arch) -> "Dims":
    w = arch.widths
    if w is None:
        raise CompressError(f"structured pruning is not described for the {arch.family} family "
                            "(supported: llama, mistral, qwen2)")
    cfg = model.config
    heads = int(getattr(cfg, w.heads_key))
    kv = int(getattr(cfg, w.kv_heads_key, None) or heads)
    hidden = int(getattr(cfg, w.hidden_key))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    if heads % kv:
        raise CompressError(f"{heads} attention heads do not divide into {kv} key-value groups")
    return Dims(int(getattr(cfg, w.layers_key)), heads, kv, head_dim, int(getattr(cfg, w.mlp_key)), hidden)


def full_plan(d: Dims) -> Plan:
    """The plan that keeps everything (pruning nothing)."""
    layers = tuple(range(d.layers))
    return Plan(layers, {i: tuple(range(d.kv_heads)) for i in layers}, {i: tuple(range(d.mlp)) for i in layers},
                tuple(range(d.hidden)))


def _check(plan: Plan, d: Dims) -> None:
    if not plan.layers:
        raise CompressError("the plan keeps no decoder block")
    counts = {len(plan.kv_groups[i]) for i in plan.layers}
    mlps = {len(plan.mlp[i]) for i in plan.layers}
    if len(counts) != 1 or len(mlps) != 1:
        raise CompressError("every kept block must keep the same number of head groups and MLP channels")
    if 0 in counts or 0 in mlps or not plan.hidden:
        raise CompressError("the plan removes a whole width (all heads, MLP channels or hidden channels)")
    for what, idx, n in [("block", plan.layers, d.layers), ("hidden channel", plan.hidden, d.hidden)] + \
            [("head group", plan.kv_groups[i], d.kv_heads) for i in plan.layers] + \
            [("MLP channel", plan.mlp[i], d.mlp) for i in plan.layers]:
        if list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
            raise CompressError(f"kept {what} indices must be ascending, distinct and below {n}")


def _rows(d: Dims, groups, per_head: int) -> torch.Tensor:
    """Row indices of ``per_head`` heads per kept group (query: rep heads per group, key/value: 1)."""
    heads = [g * per_head + h for g in groups for h in range(per_head)]
    return torch.tensor([h * d.head_dim + j for h in heads for j in range(d.head_dim)], dtype=torch.long)


def _take(t: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None:
        t = t.index_select(1, cols)
    return t.contiguous()


def sliced_state(model, arch, plan: Plan, d: Dims) -> dict[str, torch.Tensor]:
    """The model's state dict (widths ``d``) cut to ``plan`` (blocks renumbered)."""
    w = arch.widths
    _check(plan, d)
    hid = None if len(plan.hidden) == d.hidden else torch.tensor(plan.hidden, dtype=torch.long)
    new_index = {old: new for new, old in enumerate(plan.layers)}
    prefix = arch.blocks + "."
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith(prefix):
            i_str, _, rest = name[len(prefix):].partition(".")
            i = int(i_str)
            if i not in new_index:
                continue
            mod, _, kind = rest.rpartition(".")
            q_rows = _rows(d, plan.kv_groups[i], d.rep)
            kv_rows = _rows(d, plan.kv_groups[i], 1)
            mlp = torch.tensor(plan.mlp[i], dtype=torch.long)
            is_w = kind == "weight"
            if mod == w.q:
                t = _take(t, q_rows, hid if is_w else None)
            elif mod in (w.k, w.v):
                t = _take(t, kv_rows, hid if is_w else None)
            elif mod == w.attn_out:
                t = _take(t, hid, q_rows) if is_w else _take(t, hid)
            elif mod in w.mlp_in:
                t = _take(t, mlp, hid if is_w else None)
            elif mod == w.mlp_out:
                t = _take(t, hid, mlp) if is_w else _take(t, hid)
            elif mod in w.norms:
                t = _take(t, hid)
            elif mod in w.head_norms:
                pass
            elif hid is not None:
                raise CompressError(f"{name} is not in the description of the {arch.family} widths: "
                                    "its hidden channels cannot be pruned")
            out[f"{prefix}{new_index[i]}.{rest}"] = t
        elif hid is None:
            out[name] = t
        else:
            mod = name.rpartition(".")[0]
            if mod in arch.embeddings or mod == arch.lm_head:
                out[name] = _take(t, None, hid) if t.dim() == 2 else t     # (rows, hidden); a head's bias stays
            elif mod == arch.final_norm:
                out[name] = _take(t, hid)
            else:
                raise CompressError(f"{name} is not in the description of the {arch.family} widths: "
                                    "its hidden channels cannot be pruned")
    return out


def pruned_config(config, arch, plan: Plan, d: Dims):
    w = arch.widths
    cfg = copy.deepcopy(config)
    groups = len(plan.kv_groups[plan.layers[0]])
    setattr(cfg, w.layers_key, len(plan.layers))
    setattr(cfg, w.heads_key, groups * d.rep)
    setattr(cfg, w.kv_heads_key, groups)
    setattr(cfg, w.mlp_key, len(plan.mlp[plan.layers[0]]))
    setattr(cfg, w.hidden_key, len(plan.hidden))
    cfg.head_dim = d.head_dim                       # no longer hidden / heads
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in plan.layers]
    return cfg


def apply_plan(model, arch, plan: Plan):
    """A new model of ``model``'s class cut to ``plan`` (``model`` itself is left as it is)."""
    from transformers import AutoModelForCausalLM

    from .compat import no_init_weights
    d = widths_of(model, arch)
    state = sliced_state(model, arch, plan, d)
    cfg = pruned_config(model.config, arch, plan, d)
    param = next(model.parameters())
    with no_init_weights():
        new = AutoModelForCausalLM.from_config(cfg, dtype=param.dtype, trust_remote_code=False)
    from .models import prepare
    prepare(new)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (tied and m == arch.lm_head + ".weight")]
    if missing or unexpected:
        raise CompressError(f"the cut model does not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    if tied:
        new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.to(param.device).eval()

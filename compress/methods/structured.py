"""Structured pruning into a smaller dense model: whole key-value head groups, MLP intermediate
channels, decoder blocks and hidden (embedding) channels, chosen by an importance measured on the
calibration windows, the same widths in every block so the result is a plain model of the same
family with a rewritten ``config.json``.

Two importance measures (``--importance``):

* ``activation`` (default; Minitron, Muralidharan et al., 2024): forward passes only. A head
  group's importance is the mean L2 norm of its heads' attention outputs (the input of the output
  projection) per token; an MLP channel's, the mean absolute value of its activation (the input of
  the down projection); a hidden channel's, the mean absolute output of every norm layer (each
  block's and the final one); a block's, one minus the mean cosine similarity of its input and
  output hidden states (how little it changes the residual stream). It costs one forward pass
  and no gradient memory, which is why it is the default.
* ``gradient`` (first-order Taylor, as LLM-Pruner): one forward and backward pass per window of
  the next-token loss; a structure's importance is ``|sum(w * dL/dw)|`` over every weight that
  belongs to it (the first-order change of the loss when it is zeroed), and a block's is
  ``|sum(dL/dh * (h_out - h_in))|`` (the first-order change when the block's contribution to
  the residual stream is removed). It needs the gradients of the whole model in memory.

All importances are measured once, on the unpruned model; then every width is cut at once
(:mod:`compress.structure`). Ties keep the lower index, so the choice is deterministic.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import MethodConfig, opt
from ..errors import CompressError
from ..registry import Method, register
from ..structure import Dims, Plan, apply_plan, widths_of

log = logging.getLogger(__name__)

IMPORTANCE = ("activation", "gradient")


@dataclass(frozen=True)
class StructuredOptions(MethodConfig):
    heads: float = opt(0.0, "Fraction of the attention heads removed from every block, in whole key-value groups "
                            "(rounded to the nearest group).", min=0, max=1, open_max=True)
    mlp: float = opt(0.0, "Fraction of the MLP intermediate channels removed from every block.",
                     min=0, max=1, open_max=True)
    layers: int = opt(0, "Number of whole decoder blocks removed.", min=0)
    hidden: float = opt(0.0, "Fraction of the hidden (embedding) channels removed.", min=0, max=1, open_max=True)
    importance: str = opt("activation", "How importance is measured on the calibration windows: activation "
                                        "magnitudes (Minitron) or first-order Taylor scores (gradients).",
                          choices=IMPORTANCE)
    multiple_of: int = opt(32, "Kept MLP and hidden widths are rounded to a multiple of this.", min=1)

    def check(self) -> None:
        if not (self.heads or self.mlp or self.layers or self.hidden):
            raise CompressError("structured pruning needs something to remove: --heads, --mlp, --layers or --hidden")

    def counts(self, d: Dims) -> dict:
        """Widths kept: head groups per block, MLP channels per block, blocks, hidden channels."""
        groups = round(self.heads * d.kv_heads)
        if self.heads and groups == 0:
            raise CompressError(f"--heads {self.heads} removes no head group: each block has {d.kv_heads} key-value "
                                f"groups of {d.rep} heads (the smallest step is {1 / d.kv_heads:.3f})")
        if groups >= d.kv_heads:
            raise CompressError(f"--heads {self.heads} removes all {d.kv_heads} key-value head groups of each block")
        if self.layers >= d.layers:
            raise CompressError(f"--layers {self.layers}: the model has {d.layers} decoder blocks")
        return {"kv_groups": d.kv_heads - groups, "mlp": self._keep(self.mlp, d.mlp, "--mlp"),
                "layers": d.layers - self.layers, "hidden": self._keep(self.hidden, d.hidden, "--hidden")}

    def _keep(self, frac: float, n: int, flag: str) -> int:
        if not frac:
            return n
        m = self.multiple_of
        keep = int(round((1 - frac) * n / m)) * m
        if keep <= 0 or keep >= n:
            raise CompressError(f"{flag} {frac} of {n} channels, rounded to a multiple of {m} (--multiple-of), "
                                f"keeps {max(keep, 0)}: nothing {'left' if keep <= 0 else 'removed'}")
        return keep


def top(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """Indices of the ``k`` highest scores, ascending; ties keep the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return tuple(sorted(order[:k]))


def make_plan(scores: dict, counts: dict, d: Dims) -> Plan:
    layers = top(scores["layers"], counts["layers"])
    return Plan(layers, {i: top(scores["heads"][i], counts["kv_groups"]) for i in layers},
                {i: top(scores["mlp"][i], counts["mlp"]) for i in layers}, top(scores["hidden"], counts["hidden"]))


def _hidden_states(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def activation_scores(model, arch, d: Dims, windows: torch.Tensor, progress: bool = True) -> dict:
    w = arch.widths
    blocks = arch.get_blocks(model)
    dev = next(model.parameters()).device
    s = {"heads": torch.zeros(d.layers, d.kv_heads, dtype=torch.float64),
         "mlp": torch.zeros(d.layers, d.mlp, dtype=torch.float64),
         "hidden": torch.zeros(d.hidden, dtype=torch.float64), "layers": torch.zeros(d.layers, dtype=torch.float64)}
    handles = []

    def add_hidden(_m, _a, out):
        s["hidden"] += _first(out).detach().abs().double().reshape(-1, d.hidden).sum(0)

    for i, blk in enumerate(blocks):
        def heads(_m, args, i=i):
            x = args[0].detach().double().reshape(-1, d.heads, d.head_dim).norm(dim=-1).sum(0)
            s["heads"][i] += x.view(d.kv_heads, d.rep).sum(-1)

        def mlp(_m, args, i=i):
            s["mlp"][i] += args[0].detach().abs().double().reshape(-1, d.mlp).sum(0)

        def layer(_m, args, kwargs, out, i=i):
            h_in = _hidden_states(args, kwargs).double().reshape(-1, d.hidden)
            h_out = _first(out).double().reshape(-1, d.hidden)
            s["layers"][i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()

        handles += [blk.get_submodule(w.attn_out).register_forward_pre_hook(heads),
                    blk.get_submodule(w.mlp_out).register_forward_pre_hook(mlp),
                    blk.register_forward_hook(layer, with_kwargs=True)]
        handles += [blk.get_submodule(n).register_forward_hook(add_hidden) for n in w.norms]
    handles.append(model.get_submodule(arch.final_norm).register_forward_hook(add_hidden))
    try:
        for ids in _iter(windows, progress, "importance"):
            model(ids[None].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    tokens = windows.numel()
    return {k: v / tokens for k, v in s.items()}


def gradient_scores(model, arch, d: Dims, windows: torch.Tensor, progress: bool = True) -> dict:
    blocks = arch.get_blocks(model)
    dev = next(model.parameters()).device
    layer_acc = torch.zeros(d.layers, dtype=torch.float64)
    handles = []

    def layer(_m, args, kwargs, out, i):
        h_out = _first(out)
        if not h_out.requires_grad:
            return
        delta = (h_out - _hidden_states(args, kwargs)).detach()

        def grad_hook(g):
            layer_acc[i] += float((g.double() * delta.double()).sum())
        h_out.register_hook(grad_hook)

    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_hook(lambda m, a, k, o, i=i: layer(m, a, k, o, i), with_kwargs=True))
    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for ids in _iter(windows, progress, "importance"):
                ids = ids[None].to(dev)
                model(ids, labels=ids, use_cache=False).loss.backward()
        scores = _taylor(model, arch, d, len(windows))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, r in zip(params, was):
            p.requires_grad_(r)
    scores["layers"] = layer_acc.abs() / len(windows)
    return scores


def _taylor(model, arch, d: Dims, windows: int) -> dict:
    """``|sum(w * grad)|`` per head group, MLP channel and hidden channel (gradients summed over
    ``windows`` windows, divided by their number)."""
    w = arch.widths
    blocks = arch.get_blocks(model)
    heads = torch.zeros(d.layers, d.kv_heads, dtype=torch.float64)
    mlp = torch.zeros(d.layers, d.mlp, dtype=torch.float64)
    hidden = torch.zeros(d.hidden, dtype=torch.float64)

    def wg(p):
        return (p.detach().double() * p.grad.double()) if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)

    seen = set()
    for i, blk in enumerate(blocks):
        q, k, v, o = (wg(blk.get_submodule(n).weight) for n in (w.q, w.k, w.v, w.attn_out))
        g = (q.sum(1).view(d.kv_heads, -1).sum(1) + k.sum(1).view(d.kv_heads, -1).sum(1)
             + v.sum(1).view(d.kv_heads, -1).sum(1) + o.sum(0).view(d.kv_heads, -1).sum(1))
        heads[i] = g.abs()
        ins = [wg(blk.get_submodule(n).weight) for n in w.mlp_in]
        down = wg(blk.get_submodule(w.mlp_out).weight)
        mlp[i] = (sum(t.sum(1) for t in ins) + down.sum(0)).abs()
        for n in (w.q, w.k, w.v, *w.mlp_in):
            hidden += wg(blk.get_submodule(n).weight).sum(0)
        hidden += o.sum(1) + down.sum(1)
        for n in w.norms:
            hidden += wg(blk.get_submodule(n).weight)
        seen |= {id(blk.get_submodule(n).weight) for n in (w.q, w.k, w.v, w.attn_out, w.mlp_out, *w.mlp_in, *w.norms)}
    for name in (*arch.embeddings, arch.final_norm, arch.lm_head):
        p = model.get_submodule(name).weight
        if id(p) in seen:                      # a tied lm_head is the embedding table
            continue
        seen.add(id(p))
        t = wg(p)
        hidden += t.sum(0) if t.dim() == 2 else t
    return {"heads": heads / windows, "mlp": mlp / windows, "hidden": hidden.abs() / windows}


def _iter(windows, progress: bool, desc: str):
    from tqdm import tqdm
    return tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False)


@register
class Structured(Method):
    name = "structured"
    needs_description = True
    kind = "prune"
    summary = ("whole head groups, MLP channels, blocks and hidden channels removed: a smaller dense model "
               "(calibrated importance)")
    config = StructuredOptions
    format = None
    whole_model = True

    @classmethod
    def writes(cls, cfg) -> str | None:
        return None

    def check_module(self, full_name, linear, override) -> None:
        pass

    def check_model(self, loaded, targets) -> None:
        if targets.targets or targets.ignore or targets.overrides:
            raise CompressError("structured pruning cuts the same widths in every block: it takes no targets, "
                                "ignore or overrides")
        self.cfg.counts(widths_of(loaded.model, loaded.arch))

    def run_model(self, run) -> None:
        model, arch = run.model, run.arch
        d = widths_of(model, arch)
        counts = self.cfg.counts(d)
        measure = activation_scores if self.cfg.importance == "activation" else gradient_scores
        scores = measure(model, arch, d, run.windows, run.progress)
        plan = make_plan(scores, counts, d)
        before = sum(p.numel() for p in model.parameters())
        run.loaded.model = apply_plan(model, arch, plan)
        after = sum(p.numel() for p in run.loaded.model.parameters())
        run.record.extra["structured"] = {
            "importance": self.cfg.importance, "plan": plan.to_dict(),
            "removed_layers": [i for i in range(d.layers) if i not in plan.layers],
            "widths_before": d.__dict__, "widths_after": widths_of(run.loaded.model, arch).__dict__,
            "parameters_before": before, "parameters_after": after}
        log.info("structured: %d -> %d parameters", before, after)

"""Training losses over next-token distributions: cross-entropy on the text, and the divergences of
knowledge distillation between a teacher's and a student's temperature-scaled distributions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CompressError

DIVERGENCES = ("forward", "reverse", "mix")


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
            divergence: str = "forward") -> torch.Tensor:
    """Mean per-token divergence between ``softmax(teacher / T)`` and ``softmax(student / T)``,
    times ``T**2`` (so gradients keep their size across temperatures, as Hinton et al. do).

    ``forward``: KL(teacher || student), the student covers every mode of the teacher;
    ``reverse``: KL(student || teacher), mode-seeking (as MiniLLM argues for generation);
    ``mix``: their mean.
    """
    if divergence not in DIVERGENCES:
        raise CompressError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if student.shape != teacher.shape:
        raise CompressError(f"the student's logits {tuple(student.shape)} and the teacher's "
                            f"{tuple(teacher.shape)} differ (another vocabulary?)")
    ls = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    lt = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    parts = []
    if divergence in ("forward", "mix"):
        parts.append(F.kl_div(ls, lt, log_target=True, reduction="batchmean"))
    if divergence in ("reverse", "mix"):
        parts.append(F.kl_div(lt, ls, log_target=True, reduction="batchmean"))
    return sum(parts) / len(parts) * temperature ** 2


def kd_loss_topk(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Forward KL from the teacher's ``k`` largest logits per position (``values``, ``indices``:
    ``(..., k)``) to the student, times ``T**2``: the teacher's distribution is taken as
    ``softmax(values / T)`` on its top-``k`` tokens (renormalised; with ``k`` the whole vocabulary this
    is :func:`kd_loss` exactly), the student's is its full ``log_softmax(student / T)``."""
    if student.shape[:-1] != values.shape[:-1]:
        raise CompressError(f"the cached teacher logits {tuple(values.shape)} do not fit the student's "
                            f"{tuple(student.shape)}")
    ls = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, indices.long())
    lt = F.log_softmax(values.float() / temperature, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    return kl.mean() * temperature ** 2


class HiddenMatch(torch.nn.Module):
    """Hidden-state matching at mapped layers: for each pair ``(j, i)``, the student's hidden state
    after its block ``j`` against the teacher's after its block ``i`` (``hidden_states[j + 1]`` and
    ``[i + 1]`` of transformers' outputs), through a learned linear projection when the widths differ
    (identity otherwise). Each layer's mean squared error is divided by the mean square of the
    teacher's hidden state there (residual streams differ in scale by orders of magnitude across
    layers), and the layers are averaged."""

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int, seed: int = 0):
        super().__init__()
        self.pairs = list(pairs)
        self.proj = None
        if student_width != teacher_width:
            gen = torch.Generator().manual_seed(seed)          # the same start in every run of the same seed
            self.proj = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width, bias=False)
                                            for _ in self.pairs)
            for lin in self.proj:
                torch.nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5, generator=gen)

    def forward(self, student_hidden, teacher_hidden) -> torch.Tensor:
        parts = []
        for n, (j, i) in enumerate(self.pairs):
            s, t = student_hidden[j + 1].float(), teacher_hidden[i + 1].float()
            if self.proj is not None:
                s = self.proj[n](s)
            parts.append(F.mse_loss(s, t) / t.square().mean().clamp_min(1e-12))
        return sum(parts) / len(parts)


def layer_pairs(spec: str, student_layers: int, teacher_layers: int, kept: list[int] | None = None
                ) -> list[tuple[int, int]]:
    """The (student block, teacher block) pairs of ``--hidden-layers``: ``auto`` pairs each student
    block with the teacher block it was cut from when the student is a structured-pruned model
    (``kept``: the teacher blocks it kept, in order), else spreads the student's blocks evenly over
    the teacher's (the last with the last); or explicit ``"S:T,S:T"``."""
    if spec == "auto":
        if kept is not None and len(kept) == student_layers:
            return list(enumerate(kept))
        return [(j, round((j + 1) * teacher_layers / student_layers) - 1) for j in range(student_layers)]
    pairs = []
    for part in spec.split(","):
        try:
            j, i = (int(x) for x in part.split(":"))
        except ValueError:
            raise CompressError(f"--hidden-layers: {part!r} is not STUDENT:TEACHER (block numbers)") from None
        if not (0 <= j < student_layers and 0 <= i < teacher_layers):
            raise CompressError(f"--hidden-layers: {part} is out of range (the student has {student_layers} "
                                f"blocks, the teacher {teacher_layers})")
        pairs.append((j, i))
    if not pairs:
        raise CompressError("--hidden-layers names no pair")
    return pairs


def lm_loss(model, teacher=None, temperature: float = 1.0, divergence: str = "forward", ce_weight: float = 0.0,
            hidden: HiddenMatch | None = None, hidden_weight: float = 0.0):
    """The loss of a batch of windows ``ids`` for ``model``: next-token cross-entropy without a
    teacher; with one, :func:`kd_loss` to its distributions plus ``ce_weight`` times the cross-entropy.
    ``teacher`` may also be a :class:`compress.train.topk.TopKCache` (the teacher's top-k logits of
    every training window, computed once): then :func:`kd_loss_topk` (forward KL only). With
    ``hidden`` (a teacher model), ``hidden_weight`` times :class:`HiddenMatch` is added."""
    from .topk import TopKCache

    def loss(ids: torch.Tensor) -> torch.Tensor:
        so = model(input_ids=ids, use_cache=False, output_hidden_states=hidden is not None)
        logits = so.logits
        if teacher is None:
            return next_token_ce(logits, ids)
        if isinstance(teacher, TopKCache):
            values, indices = teacher.lookup(ids)
            out = kd_loss_topk(logits, values, indices, temperature)
            return out + ce_weight * next_token_ce(logits, ids) if ce_weight else out
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden is not None)
        out = kd_loss(logits, target.logits, temperature, divergence)
        if hidden is not None:
            out = out + hidden_weight * hidden(so.hidden_states, target.hidden_states)
        return out + ce_weight * next_token_ce(logits, ids) if ce_weight else out
    return loss

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


def lm_loss(model, teacher=None, temperature: float = 1.0, divergence: str = "forward", ce_weight: float = 0.0):
    """The loss of a batch of windows ``ids`` for ``model``: next-token cross-entropy without a
    teacher; with one, :func:`kd_loss` to its distributions plus ``ce_weight`` times the cross-entropy."""
    def loss(ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False).logits
        if teacher is None:
            return next_token_ce(logits, ids)
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        out = kd_loss(logits, target, temperature, divergence)
        return out + ce_weight * next_token_ce(logits, ids) if ce_weight else out
    return loss

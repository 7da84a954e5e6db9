"""Which weights a pruning method keeps: keep-masks from scores, for a sparsity or an N:M pattern.

A pattern ``N:M`` keeps at most N weights of every M consecutive input weights of a row (2:4 is
what sparse tensor cores run). Masks select exactly: unstructured masks prune ``round(s * count)``
weights of their scope (the whole layer, or each row), N:M masks prune exactly ``M - N`` of every
group; ties are broken by position, so equal scores give the same mask on every run.
"""
from __future__ import annotations

import torch

from ..errors import CompressError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; None or ``""`` -> None. Refuses anything that is not ``N:M`` with
    ``0 < N < M``."""
    if pattern in (None, "", "unstructured"):
        return None
    parts = str(pattern).split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise CompressError(f"--pattern must look like 2:4 (N kept of every M), got {pattern!r}") from None
    if not 0 < n < m:
        raise CompressError(f"--pattern {pattern}: N:M needs 0 < N < M (N weights kept of every M)")
    return n, m


def pattern_sparsity(nm: tuple[int, int]) -> float:
    return (nm[1] - nm[0]) / nm[1]


def check_pattern_fits(nm: tuple[int, int] | None, in_features: int, name: str) -> None:
    if nm is not None and in_features % nm[1]:
        raise CompressError(f"{name}: pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, "
                            f"it has {in_features}")


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest entries of each row of ``score`` (ties: the first positions)."""
    order = torch.argsort(score, dim=-1, stable=True)
    return order[..., :count]


def keep_mask(score: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
              per_row: bool = False) -> torch.Tensor:
    """Boolean keep-mask of ``score (N, K)``: the lowest scores are pruned.

    ``nm``: prune ``M - N`` of every ``M`` consecutive columns of each row. Otherwise ``sparsity``
    of the whole tensor (``per_row`` False) or of each row.
    """
    rows, cols = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise CompressError(f"pattern {n}:{m} needs a width divisible by {m}, got {cols}")
        g = score.reshape(rows, cols // m, m)
        idx = _lowest(g, m - n)
        keep.view(rows, cols // m, m).scatter_(-1, idx, False)
        return keep
    if sparsity is None or not 0 <= sparsity < 1:
        raise CompressError(f"sparsity must be in [0, 1), got {sparsity}")
    if per_row:
        k = int(round(sparsity * cols))
        if k:
            keep.scatter_(1, _lowest(score, k), False)
        return keep
    k = int(round(sparsity * score.numel()))
    if k:
        keep.view(-1)[_lowest(score.reshape(-1), k)] = False
    return keep


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((w == 0).sum()) / max(1, w.numel())


def follows_pattern(w: torch.Tensor, nm: tuple[int, int]) -> bool:
    """Whether every group of M consecutive weights of each row of ``w`` has at most N nonzeros."""
    n, m = nm
    rows, cols = w.shape
    if cols % m:
        return False
    return bool(((w != 0).reshape(rows, cols // m, m).sum(-1) <= n).all())

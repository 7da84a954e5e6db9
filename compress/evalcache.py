"""Per-window results of perplexity runs, kept so the same model on the same windows is not
evaluated twice: ``compress eval ppl Q --base M`` computes M's per-window negative
log-likelihoods anyway, and a later ``compress eval ppl M`` on the same windows reads them.

Files live in ``eval/`` of the suite's cache folder, one JSON per (model fingerprint, windows,
scored positions, package and torch version); only results without a base (perplexity alone)
are ever served from it, since KL divergence needs the base's full distributions.
"""
from __future__ import annotations

import json

import torch


def _path(fingerprint: str, wins: torch.Tensor, skip):
    from . import __version__
    from .models import cache_file
    from .resume import tensor_fingerprint
    return cache_file("eval", {"model": fingerprint, "windows": tensor_fingerprint(wins), "skip": skip,
                               "package": __version__, "torch": torch.__version__}, ".json")


def load(fingerprint: str, wins: torch.Tensor, skip) -> dict | None:
    path = _path(fingerprint, wins, skip)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if len(data.get("window_nll") or []) != wins.shape[0]:
        return None
    data["path"] = str(path)
    return data


def save(fingerprint: str, wins: torch.Tensor, skip, window_nll: list[float], tokens: int, seconds: float) -> None:
    from .fileio import atomic_text
    path = _path(fingerprint, wins, skip)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(path, json.dumps({"window_nll": window_nll, "tokens": tokens, "seconds": seconds}))
    except OSError:
        pass                      # a cache that cannot be written only costs time later

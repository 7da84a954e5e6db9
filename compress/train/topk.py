"""The teacher's top-k logits of every training window, computed once and cached on disk, so
distillation does not run the teacher at every step of every epoch (``compress distill --teacher-topk K``).

The file (``teacher-topk/`` in the suite's cache folder, safetensors) holds ``values (N, L, k)``
float32 and ``indices (N, L, k)`` int32 for the ``N`` windows, keyed by the teacher's fingerprint,
the windows and ``k``; a second run with the same teacher and text reads it and never loads the
teacher. A batch is matched to its rows by the windows' tokens, so any data order works.
"""
from __future__ import annotations

import hashlib

import torch

from ..errors import CompressError


class TopKCache:
    def __init__(self, wins: torch.Tensor, values: torch.Tensor, indices: torch.Tensor):
        if values.shape[:2] != wins.shape or indices.shape != values.shape:
            raise CompressError("the cached teacher logits do not match the training windows; delete the cache file")
        self.values, self.indices = values, indices
        self.rows = {self._key(w): i for i, w in enumerate(wins)}

    @staticmethod
    def _key(w: torch.Tensor) -> bytes:
        return hashlib.blake2b(w.to(torch.int64).numpy().tobytes(), digest_size=16).digest()

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            rows = [self.rows[self._key(w)] for w in ids.cpu()]
        except KeyError:
            raise CompressError("a training window has no cached teacher logits") from None
        return self.values[rows].to(ids.device), self.indices[rows].to(ids.device)


def cache_path(teacher_fingerprint: str, wins: torch.Tensor, k: int):
    from ..models import cache_file
    from ..resume import tensor_fingerprint
    return cache_file("teacher-topk", {"teacher": teacher_fingerprint, "windows": tensor_fingerprint(wins), "k": k},
                      ".safetensors")


def load_cached(path, wins: torch.Tensor) -> TopKCache | None:
    from safetensors.torch import load_file
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
    except Exception:
        raise CompressError(f"{path} is unreadable; delete it to recompute the teacher's logits") from None
    return TopKCache(wins, t["values"], t["indices"])


@torch.no_grad()
def compute(teacher, wins: torch.Tensor, k: int, path, progress: bool, batch: int = 4) -> TopKCache:
    """Run ``teacher`` over ``wins`` once, keep its top-``k`` logits per position, write them to ``path``."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..fileio import atomic_file
    vocab = teacher.config.vocab_size
    if not 1 <= k <= vocab:
        raise CompressError(f"--teacher-topk must be in [1, {vocab}], got {k}")
    vals, idx = [], []
    for s in tqdm(range(0, wins.shape[0], batch), desc="teacher top-k", disable=not progress, leave=False):
        logits = teacher(input_ids=wins[s:s + batch], use_cache=False).logits.float()
        v, i = logits.topk(k, dim=-1)
        vals.append(v.contiguous())
        idx.append(i.to(torch.int32).contiguous())
    values, indices = torch.cat(vals), torch.cat(idx)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(path, lambda tmp: save_file({"values": values, "indices": indices}, str(tmp)))
    return TopKCache(wins, values, indices)

"""Perplexity over fixed windows, and KL divergence / top-1 agreement against a base model."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import DataError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text once, without BOS or other special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seqlen)`` from the start of the stream."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise DataError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


def strided_windows(tokens: torch.Tensor, seqlen: int, stride: int, max_windows: int | None) -> tuple[torch.Tensor, list[int]]:
    """Sliding windows ``(n, seqlen)`` starting every ``stride`` tokens (full windows only; the
    tokens after the last one are not scored), and per window the number of leading targets to
    skip because an earlier window scored them: each token is predicted once, by the window that
    gives it the most context. ``stride == seqlen`` gives :func:`windows`."""
    if not 0 < stride <= seqlen:
        raise DataError(f"--stride must be in [1, --seqlen = {seqlen}], got {stride}")
    if tokens.numel() < seqlen:
        raise DataError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    n = (tokens.numel() - seqlen) // stride + 1
    if max_windows is not None:
        n = min(n, max_windows)
    wins = torch.stack([tokens[i * stride: i * stride + seqlen] for i in range(n)])
    return wins, [0] + [max(0, seqlen - stride - 1)] * (n - 1)


def predicted_bytes(tokenizer, wins: torch.Tensor, skip: list[int] | None = None) -> int:
    """UTF-8 bytes of the text the scored targets spell (for bits per byte): decoded as they are,
    without the clean-up of spaces before punctuation that some tokenizer configs ask for (and
    that transformers 4.57 applies and 5.x does not)."""
    total = 0
    for i, ids in enumerate(wins):
        s = skip[i] if skip else 0
        total += len(tokenizer.decode(ids[1 + s:].tolist(), clean_up_tokenization_spaces=False).encode("utf-8"))
    return total


@dataclass
class PplResult:
    ppl: float
    nll: float
    tokens: int            # predicted tokens
    windows: int
    seqlen: int
    seconds: float
    kld: float | None = None
    kld_max: float | None = None
    top1: float | None = None
    base_ppl: float | None = None
    window_nll: list | None = None        # summed negative log-likelihood per window (not in to_dict)
    base_window_nll: list | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.endswith("window_nll")}


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids[None], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[0].float()


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, base=None, progress: bool = True, desc: str = "ppl",
             skip: list[int] | None = None) -> PplResult:
    """Perplexity of ``model`` on ``wins``; with ``base``, the mean KL(base || model) of the
    next-token distributions and the share of positions where both pick the same top-1 token.
    ``skip[i]``: leading targets of window i not scored (sliding windows)."""
    t0 = time.perf_counter()
    nll = 0.0
    base_nll = 0.0
    count = 0
    kl_sum = 0.0
    kl_max = 0.0
    agree = 0
    per, base_per = [], []
    for i, ids in enumerate(tqdm(wins, desc=desc, unit="win", disable=not progress, leave=False)):
        s = skip[i] if skip else 0
        logits = _logits(model, ids)[s:-1]
        target = ids[1 + s:]
        logp = F.log_softmax(logits, dim=-1)
        per.append(float(-logp.gather(1, target[:, None]).sum()))
        nll += per[-1]
        count += target.numel()
        if base is not None:
            blogp = F.log_softmax(_logits(base, ids)[s:-1], dim=-1)
            base_per.append(float(-blogp.gather(1, target[:, None]).sum()))
            base_nll += base_per[-1]
            kl = (blogp.exp() * (blogp - logp)).sum(-1)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            agree += int((blogp.argmax(-1) == logp.argmax(-1)).sum())
    res = PplResult(ppl=math.exp(nll / count), nll=nll / count, tokens=count, windows=wins.shape[0],
                    seqlen=wins.shape[1], seconds=time.perf_counter() - t0, window_nll=per,
                    base_window_nll=base_per or None)
    if base is not None:
        res.kld = kl_sum / count
        res.kld_max = kl_max
        res.top1 = agree / count
        res.base_ppl = math.exp(base_nll / count)
    return res


def from_windows(window_nll: list[float], tokens: int, wins: torch.Tensor, seconds: float) -> PplResult:
    """The result of a model whose per-window negative log-likelihoods are known (no KL divergence)."""
    nll = sum(window_nll)
    return PplResult(ppl=math.exp(nll / tokens), nll=nll / tokens, tokens=tokens, windows=wins.shape[0],
                     seqlen=wins.shape[1], seconds=seconds, window_nll=list(window_nll))


@torch.no_grad()
def evaluate_many(models: dict, wins: torch.Tensor, base, progress: bool = True) -> dict[str, PplResult]:
    """Evaluate several models against one base in a single pass over the windows: the base's
    distribution is computed once per window and shared (same numbers as :func:`evaluate`)."""
    acc = {name: {"nll": 0.0, "kl": 0.0, "kl_max": 0.0, "agree": 0, "sec": 0.0} for name in models}
    base_nll = 0.0
    count = 0
    base_sec = 0.0
    for ids in tqdm(wins, desc="ppl", unit="win", disable=not progress, leave=False):
        target = ids[1:]
        tb = time.perf_counter()
        blogp = F.log_softmax(_logits(base, ids)[:-1], dim=-1)
        base_sec += time.perf_counter() - tb
        bp = blogp.exp()
        barg = blogp.argmax(-1)
        base_nll += float(-blogp.gather(1, target[:, None]).sum())
        count += target.numel()
        for name, model in models.items():
            tm = time.perf_counter()
            logp = F.log_softmax(_logits(model, ids)[:-1], dim=-1)
            a = acc[name]
            a["sec"] += time.perf_counter() - tm
            a["nll"] += float(-logp.gather(1, target[:, None]).sum())
            kl = (bp * (blogp - logp)).sum(-1)
            a["kl"] += float(kl.sum())
            a["kl_max"] = max(a["kl_max"], float(kl.max()))
            a["agree"] += int((barg == logp.argmax(-1)).sum())
    out = {}
    for name, a in acc.items():
        out[name] = PplResult(ppl=math.exp(a["nll"] / count), nll=a["nll"] / count, tokens=count,
                              windows=wins.shape[0], seqlen=wins.shape[1], seconds=a["sec"],
                              kld=a["kl"] / count, kld_max=a["kl_max"], top1=a["agree"] / count,
                              base_ppl=math.exp(base_nll / count))
    out["__base__"] = PplResult(ppl=math.exp(base_nll / count), nll=base_nll / count, tokens=count,
                                windows=wins.shape[0], seqlen=wins.shape[1], seconds=base_sec)
    return out

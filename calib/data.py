"""Calibration sets: tokenised windows from a text file or a named dataset.

Named sets resolve inside the data folder (``--data-dir`` or ``$COMPRESS_DATA_DIR``):
``wikitext2`` is WikiText-2 validation (``wikitext-2/valid.txt``). The whole text is
tokenised once (no special tokens) and ``nsamples`` windows of ``seqlen`` tokens start at
``torch.randint(0, N - seqlen - 1, (1,))`` draws from a generator seeded with ``seed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

NAMED = {"wikitext2": "wikitext-2/valid.txt"}


class CalibError(Exception):
    """A calibration set that cannot be built (missing/empty text, bad sizes)."""


@dataclass(frozen=True)
class CalibSpec:
    source: str = "wikitext2"     # a name from NAMED or a path to a UTF-8 text file
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.nsamples < 1:
            raise CalibError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise CalibError(f"--seqlen must be at least 2, got {self.seqlen}")

    def to_dict(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


def resolve_text(source: str, data_dir: str | os.PathLike | None = None) -> Path:
    if source in NAMED:
        d = data_dir or os.environ.get("COMPRESS_DATA_DIR")
        if not d:
            raise CalibError(f"calibration set '{source}' needs the data folder: pass --data-dir or set COMPRESS_DATA_DIR")
        p = Path(d).expanduser() / NAMED[source]
        if not p.is_file():
            raise CalibError(f"calibration text {p} does not exist")
        return p
    p = Path(source).expanduser()
    if not p.is_file():
        raise CalibError(f"calibration text '{source}' is neither a file nor one of: {', '.join(NAMED)}")
    return p


def calibration_windows(tokenizer, spec: CalibSpec, data_dir=None) -> torch.Tensor:
    """``(nsamples, seqlen)`` token windows drawn as the module docstring says."""
    path = resolve_text(spec.source, data_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibError(f"calibration text {path} is not UTF-8") from None
    if not text.strip():
        raise CalibError(f"calibration text {path} is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.long)
    n = tokens.numel()
    if n < spec.seqlen + 2:
        raise CalibError(f"calibration text {path} has {n} tokens, too few for windows of {spec.seqlen}")
    g = torch.Generator().manual_seed(spec.seed)
    starts = [int(torch.randint(0, n - spec.seqlen - 1, (1,), generator=g)) for _ in range(spec.nsamples)]
    return torch.stack([tokens[s:s + spec.seqlen] for s in starts])

"""Where evaluation text lives, and the fixed perplexity protocols."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class DataError(Exception):
    """Missing or unusable evaluation text."""


@dataclass(frozen=True)
class Protocol:
    name: str
    file: str          # relative to the data folder
    seqlen: int
    max_windows: int | None
    description: str


PROTOCOLS = {
    "wt2-quick": Protocol("wt2-quick", "wikitext-2-raw/test.joined.txt", 512, 64,
                          "WikiText-2 raw test, no BOS, first 64 non-overlapping windows of 512 tokens"),
    "wt2-full": Protocol("wt2-full", "wikitext-2-raw/test.joined.txt", 2048, None,
                         "WikiText-2 raw test, no BOS, all non-overlapping windows of 2048 tokens"),
}


def data_dir(option: str | os.PathLike | None = None) -> Path:
    """The data folder: the option if given, else $COMPRESS_DATA_DIR."""
    d = option or os.environ.get("COMPRESS_DATA_DIR")
    if not d:
        raise DataError("no data folder: pass --data-dir or set COMPRESS_DATA_DIR (e.g. to ../shared/data)")
    p = Path(d).expanduser()
    if not p.is_dir():
        raise DataError(f"data folder {p} does not exist")
    return p


def read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"text file {path} is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e.strerror}") from None
    if "\x00" in text:
        raise DataError(f"text file {path} holds NUL bytes: it is binary, not text")
    if not text.strip():
        raise DataError(f"text file {path} is empty")
    return text

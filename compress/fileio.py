"""Atomic file output: write to a temporary sibling, rename onto the destination when complete,
so a failed or interrupted command never leaves a half-written file behind."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import CompressError


def publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temporary file (or folder) the mode a normally created one would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` with a temporary path beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise CompressError(f"{path} exists and is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_text(path: Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(text))

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


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with the header's metadata in sorted order: the library writes
    it from a hash map, in an order that changes from process to process, and the same checkpoint
    must be the same bytes whichever process wrote it."""
    import json
    import struct

    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {})
        ordered = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(ordered, separators=(",", ":")).encode()
        if len(text) > n:
            raise CompressError(f"cannot order the safetensors header of {path}")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))

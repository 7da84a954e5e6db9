"""Models by their Hugging Face hub name (``org/name`` or ``org/name@revision``).

A name is looked up in the local hub cache in huggingface_hub's layout (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``: ``models--org--name/refs/<revision>`` holds the
commit, ``models--org--name/snapshots/<commit>/`` the files), with no network. With downloads
allowed (``compress --download ...`` or ``COMPRESS_DOWNLOAD=1``) a name that is not cached is
fetched into that cache with ``huggingface_hub.snapshot_download`` (config, tokenizer and
safetensors files only: the suite never reads pickled weights).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CompressError

_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(@[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.tiktoken"]


def looks_like_hub_name(spec: str) -> bool:
    return bool(_NAME.match(spec)) and not spec.endswith(".gguf")


def cache_root() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def downloads_allowed() -> bool:
    return os.environ.get("COMPRESS_DOWNLOAD", "") not in ("", "0")


def split(spec: str) -> tuple[str, str]:
    repo, _, rev = spec.partition("@")
    return repo, rev or "main"


def cached_snapshot(spec: str) -> Path | None:
    """The snapshot folder of ``spec`` in the local hub cache, or None."""
    repo, rev = split(spec)
    folder = cache_root() / f"models--{repo.replace('/', '--')}"
    commit = rev if _COMMIT.match(rev) else None
    if commit is None:
        ref = folder / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = folder / "snapshots" / commit
    return snap if (snap / "config.json").is_file() else None


def download(spec: str) -> Path:
    repo, rev = split(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CompressError("--download needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        path = snapshot_download(repo, revision=rev, cache_dir=str(cache_root()), allow_patterns=_PATTERNS)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressError(f"cannot download {spec} from the Hugging Face hub: {msg}") from None
    if not (Path(path) / "config.json").is_file():
        raise CompressError(f"{spec} on the Hugging Face hub has no config.json")
    return Path(path)


def resolve(spec: str) -> Path:
    """The local folder of hub name ``spec``: cached, or downloaded when allowed; else a one-line error."""
    snap = cached_snapshot(spec)
    if snap is not None:
        return snap
    if downloads_allowed():
        return download(spec)
    raise CompressError(f"no such file or folder: {spec}, and no model {spec} in the Hugging Face cache "
                        f"{cache_root()} (`compress --download ...` fetches it from the hub)")

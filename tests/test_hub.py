"""Models by their Hugging Face hub name: resolved from a cache folder in huggingface_hub's layout
without network, fetched with --download (huggingface_hub's snapshot_download, replaced here by a
function that writes the same layout), refused in one line when neither works."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.test_cli import assert_clean_error, run

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_layout(root, repo, src, commit=COMMIT, ref="main"):
    """Lay ``src``'s files out as huggingface_hub caches ``repo`` (blobs linked from the snapshot)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for f in src.iterdir():
        blob = folder / "blobs" / f"{f.name}.blob"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_llama, tiny_data):
    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("COMPRESS_DOWNLOAD", "0")
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))
    hub_layout(root, "Org/Tiny-LM", tiny_llama)
    return root


def test_a_cached_hub_name_quantizes_without_network(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run(["quantize", "Org/Tiny-LM", "--method", "rtn", "--bits", 4, "--group-size", 32, "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["compress"]["source_model"] == "Org/Tiny-LM"
    res = run(["quantize", f"Org/Tiny-LM@{COMMIT}", "--method", "rtn", "--bits", 4, "--group-size", 32,
               "-o", tmp_path / "q2"])
    assert res.exit_code == 0, res.output


def test_hf_home_is_honoured(tmp_path, monkeypatch, tiny_llama):
    from compress import hub as h
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap = hub_layout(tmp_path / "home" / "hub", "Org/Other", tiny_llama, ref="v1")
    assert h.cached_snapshot("Org/Other@v1") == snap
    assert h.cached_snapshot("Org/Other") is None                      # no refs/main


def test_a_name_neither_cached_nor_downloadable_is_one_line(hub, tmp_path):
    res = run(["quantize", "Org/Missing", "--method", "rtn", "-o", tmp_path / "q"])
    assert_clean_error(res, "Org/Missing", "--download")
    assert not (tmp_path / "q").exists()


def test_download_fetches_through_snapshot_download(hub, tmp_path, monkeypatch, tiny_llama):
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, revision, cache_dir, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        from pathlib import Path
        return str(hub_layout(Path(cache_dir), repo_id, tiny_llama))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    res = run(["--download", "quantize", "Org/New", "--method", "rtn", "--bits", 4, "--group-size", 32,
               "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    assert calls and calls[0][:2] == ("Org/New", "main") and "*.safetensors" in calls[0][2]
    assert not any("bin" in p or "pt" == p.rsplit(".", 1)[-1] for p in calls[0][2])     # never pickled weights


def test_download_without_network_is_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("the hub is unreachable (offline mode)")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    res = run(["--download", "quantize", "Org/Missing", "--method", "rtn", "-o", tmp_path / "q"])
    assert_clean_error(res, "cannot download Org/Missing")
    assert not (tmp_path / "q").exists()


def test_a_missing_local_path_still_reads_as_one(tmp_path, hub):
    res = run(["inspect", tmp_path / "nowhere" / "ckpt"])
    assert_clean_error(res, "no such file or folder")

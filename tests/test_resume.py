"""Runs that survive a kill: a GPTQ run killed with SIGKILL resumes and writes the same bytes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_tiny, kill_mid_run
from tests.test_cli import assert_clean_error, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A tiny model with enough blocks that a kill lands in the middle of the run."""
    return build_tiny(tmp_path_factory.mktemp("deep") / "llama", "llama", hidden=128, ffn=256, layers=8)


def _cmd(model, data, out, *extra):
    return [sys.executable, "-m", "compress.cli", "quantize", str(model), "--method", "gptq", "--bits", "3",
            "--group-size", "32", "--act-order", "--nsamples", "16", "--seqlen", "64", "--data-dir", str(data),
            "--lm-head", *extra, "-o", str(out)]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_killed_run_resumes_to_identical_bytes(deep_llama, tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(deep_llama, tiny_data, ref), check=True, env=env, capture_output=True, timeout=600)
    out = tmp_path / "out"
    work = tmp_path / ".out.work"
    proc = subprocess.Popen(_cmd(deep_llama, tiny_data, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    blocks = kill_mid_run(proc, work, 2)
    assert 2 <= blocks < 8, f"the run was not caught mid-way ({blocks} blocks done)"
    assert not out.exists() and work.is_dir()
    # the same command continues from the last finished block
    res = subprocess.run(_cmd(deep_llama, tiny_data, out), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    assert not work.exists()
    a, b = _files(ref), _files(out)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_changed_recipe_or_data_is_refused_and_restart_starts_over(deep_llama, tiny_data, tmp_path):
    out = tmp_path / "o"
    work = tmp_path / ".o.work"
    work.mkdir()
    progress = {"fingerprint": {"model": "x", "recipe": "y", "calibration": "z", "statistics": None, "version": "0"},
                "steps": {"0": {"blocks": 2, "done": False}}}
    (work / "progress.json").write_text(json.dumps(progress))
    args = ["quantize", deep_llama, "--method", "gptq", "--group-size", "32", "--nsamples", "2", "--seqlen", "16",
            "--data-dir", tiny_data, "-o", out]
    res = run(args)
    assert_clean_error(res, "different", "model", "recipe", "--restart")
    assert work.is_dir() and not out.exists()
    res = run(args + ["--restart"])
    assert res.exit_code == 0, res.output
    assert out.is_dir() and not work.exists()


def test_unreadable_work_folder_is_refused(deep_llama, tiny_data, tmp_path):
    out = tmp_path / "o"
    (tmp_path / ".o.work").mkdir()
    (tmp_path / ".o.work" / "progress.json").write_text("{not json")
    assert_clean_error(run(["quantize", deep_llama, "--method", "gptq", "--group-size", "32", "--nsamples", "2",
                            "--seqlen", "16", "--data-dir", tiny_data, "-o", out]), "--restart")


def test_failed_run_leaves_nothing_behind(deep_llama, tiny_data, tmp_path):
    stats = tmp_path / "nothing.safetensors"
    from calib.stats import save_stats
    save_stats(stats, {})
    res = run(["quantize", deep_llama, "--method", "gptq", "--group-size", "32", "--load-stats", stats,
               "-o", tmp_path / "o"])
    assert_clean_error(res, "no statistics for model.layers.0.self_attn.q_proj")
    assert list(tmp_path.iterdir()) == [stats]


def test_killed_gguf_run_resumes_to_identical_bytes(deep_llama, tiny_data, tmp_path):
    """GPTQ onto k-quant grids: the blocks finished before the kill keep their GPTQ tensors."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cmd(out):
        return [sys.executable, "-m", "compress.cli", "quantize", str(deep_llama), "--method", "kquant-gptq",
                "--type", "q4_k_m", "--nsamples", "16", "--seqlen", "64", "--data-dir", str(tiny_data), "-o", str(out)]
    ref, out = tmp_path / "ref.gguf", tmp_path / "out.gguf"
    subprocess.run(cmd(ref), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = kill_mid_run(proc, tmp_path / ".out.gguf.work", 2)
    assert 2 <= blocks < 8, f"the run was not caught mid-way ({blocks} blocks done)"
    res = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    assert out.read_bytes() == ref.read_bytes()

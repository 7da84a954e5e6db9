"""Calibration split between processes (``--nproc``, gloo on the CPU): the same bytes as one
process, a killed run that resumes with another number of processes, and clear refusals."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calib.dist import Plan, merge_in_order
from calib.stats import AbsMaxAccumulator, HessianAccumulator, load_stats
from tests.conftest import build_tiny, kill_mid_run
from tests.test_cli import assert_clean_error, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("dist") / "llama", "llama", hidden=128, ffn=256, layers=6)


def _env(data: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COMPRESS_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "compress", *map(str, args)]


def _files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- the plan and the merge
@pytest.mark.parametrize("n", [1, 5, 24, 31, 200])
def test_plan_splits_whole_batches_independently_of_the_process_count(n):
    one = Plan(n)
    for size in range(1, min(len(one.shard_owner), 4) + 1):
        plans = [Plan(n, r, size) for r in range(size)]
        assert [w for p in plans for w in p.windows] == list(range(n))        # each window once, in order
        for p in plans:
            got = [[p.windows[i] for i in b] for b in p.batches()]
            assert all(b == list(range(b[0], b[0] + len(b))) and b[0] % 4 == 0 for b in got)
        # the shards (and so the order of every sum) are those of one process
        shards = [[[p.windows[i] for i in b] for b in s] for p in plans for s in p.shards]
        assert shards == [[list(b) for b in s] for s in one.shards]


def test_too_many_processes_for_the_windows_is_refused():
    with pytest.raises(ValueError, match="at most 2 processes"):
        Plan(8, 0, 3)


def test_merge_in_order_folds_the_shards_in_order():
    torch.manual_seed(0)
    xs = [torch.randn(7, 5) for _ in range(3)]
    per = []
    for x in xs:
        h, a = HessianAccumulator(5), AbsMaxAccumulator(5)
        h.add_batch(x), a.add_batch(x)
        per.append({"h": h, "a": a})
    ref = HessianAccumulator(5)
    for x in xs:
        ref.merge(_one(x))
    out = merge_in_order(Plan(12), per)
    assert torch.equal(out["h"].H, ref.H) and out["h"].nsamples == 21
    assert torch.equal(out["a"].absmax(), torch.cat(xs).abs().amax(0))


def _one(x):
    h = HessianAccumulator(x.shape[1])
    h.add_batch(x)
    return h


# --------------------------------------------------------------------------- end to end, two processes
CASES = {
    "gptq": ["quantize", "--method", "gptq", "--bits", "3", "--group-size", "32", "--act-order", "--lm-head",
             "--true-sequential"],
    "sparsegpt-joint": ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--bits", "4", "--group-size", "32"],
    "kquant-gptq": ["quantize", "--method", "kquant-gptq", "--type", "q4_k_m"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_write_the_bytes_of_one(case, deep_llama, tiny_data, tmp_path):
    cmd, *opts = CASES[case]
    ext = ".gguf" if "kquant" in case else ""
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}{ext}"
        extra = ["--save-stats", tmp_path / f"stats{n}.safetensors"] if case == "gptq" else []
        res = subprocess.run(_cli(cmd, deep_llama, *opts, "--nsamples", 16, "--seqlen", 48, "--nproc", n, *extra,
                                  "-o", out), env=_env(tiny_data), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("wrote ") == 1          # one process reports
        outs[n] = _files(out)
    assert outs[1].keys() == outs[2].keys()
    assert [k for k in outs[1] if outs[1][k] != outs[2][k]] == []
    if case == "gptq":      # the merged statistics too (safetensors orders its metadata keys at random)
        a, b = (load_stats(tmp_path / f"stats{n}.safetensors") for n in (1, 2))
        assert list(a) == list(b) and all(torch.equal(a[k].H, b[k].H) and a[k].nsamples == b[k].nsamples for k in a)


def test_two_streaming_processes_write_the_tensors_of_one_in_memory(deep_llama, tiny_data, tmp_path):
    from compress.models import tensor_digests
    opts = [*CASES["gptq"][1:], "--nsamples", 16, "--seqlen", 48]
    for name, extra in (("mem", ["--nproc", 1]), ("str", ["--nproc", 2, "--stream"])):
        res = subprocess.run(_cli("quantize", deep_llama, *opts, *extra, "-o", tmp_path / name), env=_env(tiny_data),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
    assert tensor_digests(tmp_path / "mem") == tensor_digests(tmp_path / "str")
    assert (tmp_path / "str" / "model.safetensors.index.json").is_file() and not list(tmp_path.glob(".str*"))


def test_killed_two_process_run_resumes_with_one_to_the_same_bytes(deep_llama, tiny_data, tmp_path):
    opts = [*CASES["gptq"][1:], "--nsamples", 16, "--seqlen", 48]
    ref = tmp_path / "ref"
    subprocess.run(_cli("quantize", deep_llama, *opts, "-o", ref), env=_env(tiny_data), check=True,
                   capture_output=True, timeout=600)
    out, work = tmp_path / "out", tmp_path / ".out.work"
    proc = subprocess.Popen(_cli("quantize", deep_llama, *opts, "--nproc", 2, "-o", out), env=_env(tiny_data),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    blocks = kill_mid_run(proc, work, 2, group=True)
    assert 2 <= blocks < 6, f"the run was not caught mid-way ({blocks} blocks done)"
    assert not out.exists() and len(list(work.glob("inputs-0-*-1.safetensors"))) >= 1   # each process its share
    res = subprocess.run(_cli("quantize", deep_llama, *opts, "-o", out), env=_env(tiny_data), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout and not work.exists()
    a, b = _files(ref), _files(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


# --------------------------------------------------------------------------- refusals
def test_methods_that_cannot_split_are_refused_before_any_work(deep_llama, tiny_data, tmp_path):
    env = {"COMPRESS_DATA_DIR": str(tiny_data)}
    res = run(["quantize", deep_llama, "--method", "awq", "--group-size", 32, "--nproc", 2, "-o", tmp_path / "a"], env)
    assert_clean_error(res, "awq", "one process")
    res = run(["quantize", deep_llama, "--method", "rtn", "--nproc", 2, "-o", tmp_path / "a"], env)
    assert_clean_error(res, "none to split")
    res = run(["quantize", deep_llama, "--method", "gptq", "--nsamples", 4, "--nproc", 2, "-o", tmp_path / "a"], env)
    assert_clean_error(res, "at most 1 processes")
    assert not (tmp_path / "a").exists()


def test_an_error_inside_the_processes_is_one_line(deep_llama, tiny_data, tmp_path):
    out = tmp_path / "a"
    res = subprocess.run(_cli("quantize", deep_llama, "--method", "gptq", "--group-size", 512, "--nsamples", 16,
                              "--seqlen", 48, "--nproc", 2, "-o", out), env=_env(tiny_data), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "group size" in errors[0] and "Traceback" not in res.stderr, res.stderr
    assert not out.exists() and not (tmp_path / ".a.work").exists()

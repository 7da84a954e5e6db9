"""Streaming (``--stream``): the blocks are read when the run reaches them and written to their own
shards; every tensor equals the in-memory run's, a killed streamed run resumes, and a truncated
shard met half-way is a one-line error that leaves nothing at the output path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress import models
from compress.memory import checkpoint_numel
from compress.models import tensor_digests
from tests.conftest import build_tiny, kill_mid_run
from tests.test_cli import assert_clean_error, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A tiny model whose weights are split over two safetensors files (blocks 0-2, the rest)."""
    folder = build_tiny(tmp_path_factory.mktemp("stream") / "llama", "llama", hidden=128, ffn=256, layers=6)
    state = load_file(str(folder / "model.safetensors"))
    first = {k: v for k, v in state.items() if any(k.startswith(f"model.layers.{i}.") for i in range(3))}
    rest = {k: v for k, v in state.items() if k not in first}
    (folder / "model.safetensors").unlink()
    save_file(first, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(rest, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in first},
                  **{k: "model-00002-of-00002.safetensors" for k in rest}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


CASES = {
    "gptq+lm_head": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--lm-head"],
    "rtn": ["quantize", "--method", "rtn", "--bits", "3", "--group-size", "64"],
    "sparsegpt-joint": ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--bits", "4", "--group-size", "32"],
    "smoothquant": ["quantize", "--method", "smoothquant"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_run_writes_the_tensors_of_the_in_memory_run(case, sharded_llama, tiny_data, tmp_path):
    cmd, *opts = CASES[case]
    calib = [] if case == "rtn" else ["--nsamples", 8, "--seqlen", 32]
    for name, extra in (("mem", []), ("str", ["--stream"])):
        res = run([cmd, sharded_llama, *opts, *calib, *extra, "--data-dir", tiny_data, "--report",
                   tmp_path / f"{name}.json", "-o", tmp_path / name])
        assert res.exit_code == 0, res.output
    a, b = tensor_digests(tmp_path / "mem"), tensor_digests(tmp_path / "str")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    assert (tmp_path / "mem" / "config.json").read_text() == (tmp_path / "str" / "config.json").read_text()
    index = json.loads((tmp_path / "str" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert len({f for f in index["weight_map"].values()}) == 7                  # a shard per block and the rest
    assert json.loads((tmp_path / "str.json").read_text())["streamed"] is True
    assert not list(tmp_path.glob(".str*"))                                    # no staging or work folder left
    # the sharded checkpoint loads and computes what the single-file one does
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        la, lb = (models.load(str(tmp_path / n)).model(input_ids=ids).logits for n in ("mem", "str"))
    assert torch.equal(la, lb)


@pytest.mark.parametrize("imatrix", [False, True])
def test_streamed_kquant_writes_the_gguf_of_the_in_memory_run(imatrix, sharded_llama, tiny_data, tmp_path):
    extra = []
    if imatrix:
        im = tmp_path / "im.gguf"
        res = run(["imatrix", sharded_llama, "--nsamples", 4, "--seqlen", 32, "--data-dir", tiny_data, "-o", im])
        assert res.exit_code == 0, res.output
        extra = ["--imatrix", im]
    for name, flag in (("mem", []), ("str", ["--stream"])):
        res = run(["quantize", sharded_llama, "--method", "kquant", "--type", "q4_k_m", *extra, *flag,
                   "-o", tmp_path / f"{name}.gguf"])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "mem.gguf").read_bytes() == (tmp_path / "str.gguf").read_bytes()


def test_stream_holds_one_block_of_weights(sharded_llama):
    every = checkpoint_numel(sharded_llama)
    resident = checkpoint_numel(sharded_llama, "model.layers")
    state = {}
    for f in sharded_llama.glob("*.safetensors"):
        state.update(load_file(str(f)))
    block = sum(v.numel() for k, v in state.items() if k.startswith("model.layers.0."))
    assert resident == every - 5 * block


def _cmd(model, data, out, *extra):
    return [sys.executable, "-m", "compress", "quantize", str(model), "--method", "gptq", "--bits", "3",
            "--group-size", "32", "--nsamples", "16", "--seqlen", "64", "--data-dir", str(data), "--lm-head",
            "--stream", *extra, "-o", str(out)]


def test_killed_streamed_run_resumes_to_the_same_tensors(sharded_llama, tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(sharded_llama, tiny_data, ref), check=True, env=env, capture_output=True, timeout=600)
    out, work = tmp_path / "out", tmp_path / ".out.work"
    proc = subprocess.Popen(_cmd(sharded_llama, tiny_data, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    blocks = kill_mid_run(proc, work, 2)
    assert 2 <= blocks < 6, f"the run was not caught mid-way ({blocks} blocks done)"
    assert not out.exists() and len(list((work / "shards").glob("model-*.safetensors"))) >= 2
    res = subprocess.run(_cmd(sharded_llama, tiny_data, out), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout and not work.exists()
    a, b = tensor_digests(ref), tensor_digests(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def test_truncated_shard_met_half_way_is_one_line_and_nothing_is_written(sharded_llama, tiny_data, tmp_path,
                                                                          monkeypatch):
    import shutil

    from compress.stream import Streamer
    model = tmp_path / "model"
    shutil.copytree(sharded_llama, model)
    second = model / "model-00002-of-00002.safetensors"
    original = Streamer.load_block

    def load_block(self, i, block):
        if i == 3:          # the second file is cut short after the run has started
            data = second.read_bytes()
            second.write_bytes(data[: len(data) // 2])
        return original(self, i, block)

    monkeypatch.setattr(Streamer, "load_block", load_block)
    out = tmp_path / "out"
    res = run(["quantize", model, "--method", "rtn", "--stream", "-o", out, "--group-size", 32])
    assert_clean_error(res, "truncated safetensors file", second.name)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_what_stream_does_not_cover_is_refused(sharded_llama, tiny_data, tmp_path):
    env = {"COMPRESS_DATA_DIR": str(tiny_data)}
    cases = [
        (["prune", sharded_llama, "--method", "structured", "--heads", "0.25", "--stream"], "structured pruning"),
        (["quantize", sharded_llama, "--method", "kquant-gptq", "--type", "q4_0", "--stream"], "runs in memory"),
        (["prune", sharded_llama, "--method", "wanda", "--stream"], "pruning alone"),
    ]
    for args, needle in cases:
        out = tmp_path / ("o.gguf" if "kquant" in args else "o")
        res = run([*args, "-o", out], env)
        assert_clean_error(res, needle)
        assert not out.exists()

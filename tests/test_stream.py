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
    "wanda-owl+lm_head": ["prune", "--method", "wanda", "--sparsity", "0.5", "--profile", "owl", "--lm-head"],
    "awq": ["quantize", "--method", "awq", "--bits", "4", "--group-size", "32"],
    "sparsegpt-2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--ignore", "re:.*q_proj"],
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


@pytest.mark.parametrize("method", ["kquant", "kquant+imatrix", "kquant-gptq"])
def test_streamed_kquant_writes_the_gguf_of_the_in_memory_run(method, sharded_llama, tiny_data, tmp_path):
    extra = []
    if method == "kquant+imatrix":
        im = tmp_path / "im.gguf"
        res = run(["imatrix", sharded_llama, "--nsamples", 4, "--seqlen", 32, "--data-dir", tiny_data, "-o", im])
        assert res.exit_code == 0, res.output
        extra = ["--imatrix", im]
    if method == "kquant-gptq":
        extra = ["--nsamples", 8, "--seqlen", 32, "--data-dir", tiny_data]
    for name, flag in (("mem", []), ("str", ["--stream"])):
        res = run(["quantize", sharded_llama, "--method", method.split("+")[0], "--type", "q4_k_m", *extra, *flag,
                   "-o", tmp_path / f"{name}.gguf"])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "mem.gguf").read_bytes() == (tmp_path / "str.gguf").read_bytes()


@pytest.fixture(scope="module")
def k_gguf(sharded_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-q4km.gguf"
    res = run(["export", "gguf", sharded_llama, "--type", "Q4_K_M", "-o", out])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("method", ["gptq", "kquant"])
def test_streamed_gguf_input_gives_the_in_memory_output(method, k_gguf, tiny_data, tmp_path):
    """A GGUF's blocks are read and decoded tensor by tensor (this suite's decoders, q/k rows
    un-permuted) into what transformers' GGUF loader gives the in-memory run."""
    opts = (["--bits", "4", "--group-size", "32", "--nsamples", 8, "--seqlen", 32, "--data-dir", tiny_data]
            if method == "gptq" else ["--type", "Q4_0"])
    outs = {}
    for name, flag in (("mem", []), ("str", ["--stream"])):
        outs[name] = tmp_path / (name + (".gguf" if method == "kquant" else ""))
        res = run(["quantize", k_gguf, "--method", method, *opts, *flag, "--report", tmp_path / f"{name}.json",
                   "-o", outs[name]])
        assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "str.json").read_text())["streamed"] is True
    if method == "kquant":
        assert outs["mem"].read_bytes() == outs["str"].read_bytes()
        return
    a, b = tensor_digests(outs["mem"]), tensor_digests(outs["str"])
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def test_stream_holds_one_block_of_weights(sharded_llama):
    every = checkpoint_numel(sharded_llama)
    resident = checkpoint_numel(sharded_llama, "model.layers")
    state = {}
    for f in sharded_llama.glob("*.safetensors"):
        state.update(load_file(str(f)))
    block = sum(v.numel() for k, v in state.items() if k.startswith("model.layers.0."))
    assert resident == every - 5 * block


KILLED = {
    "gptq": ["quantize", "--method", "gptq", "--bits", "3", "--group-size", "32", "--lm-head"],
    "sparsegpt": ["prune", "--method", "sparsegpt", "--sparsity", "0.6"],     # shard counts kept across the kill
}


def _cmd(case, model, data, out):
    cmd, *opts = KILLED[case]
    return [sys.executable, "-m", "compress", cmd, str(model), *opts, "--nsamples", "16", "--seqlen", "64",
            "--data-dir", str(data), "--stream", "-o", str(out)]


@pytest.mark.parametrize("case", list(KILLED))
def test_killed_streamed_run_resumes_to_the_same_tensors(case, sharded_llama, tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(case, sharded_llama, tiny_data, ref), check=True, env=env, capture_output=True, timeout=600)
    out, work = tmp_path / "out", tmp_path / ".out.work"
    proc = subprocess.Popen(_cmd(case, sharded_llama, tiny_data, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    blocks = kill_mid_run(proc, work, 2)
    assert 2 <= blocks < 6, f"the run was not caught mid-way ({blocks} blocks done)"
    assert not out.exists() and len(list((work / "shards").glob("model-*.safetensors"))) >= 2
    res = subprocess.run(_cmd(case, sharded_llama, tiny_data, out), env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout and not work.exists()
    a, b = tensor_digests(ref), tensor_digests(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    assert (ref / "config.json").read_text() == (out / "config.json").read_text()


def test_what_stream_does_not_cover_is_refused(sharded_llama, tiny_data, tmp_path):
    env = {"COMPRESS_DATA_DIR": str(tiny_data)}
    cases = [
        (["prune", sharded_llama, "--method", "structured", "--heads", "0.25", "--stream"], "structured pruning"),
    ]
    two = tmp_path / "two.yaml"
    two.write_text(json.dumps({"stream": True, "steps": [{"method": "sparsegpt", "sparsity": 0.5},
                                                         {"method": "gptq", "bits": 4, "group_size": 32}]}))
    cases.append((["run", two, "--model", sharded_llama], "one compression step"))
    for args, needle in cases:
        out = tmp_path / "o"
        res = run([*args, "-o", out], env)
        assert_clean_error(res, needle)
        assert not out.exists()


def test_preflight_reads_a_gguf_header_and_counts_one_streamed_block(k_gguf, tmp_path):
    """The memory estimate of a GGUF input comes from its tensor table: a limit between the
    streamed and the in-memory estimate refuses the in-memory run (naming --stream) and lets the
    streamed one through."""
    from compress.formats.gguf_file import check_gguf
    from compress.memory import FIXED, gguf_numel
    lay = check_gguf(k_gguf)
    whole, one = gguf_numel(lay, False), gguf_numel(lay, True)
    assert one < whole / 2
    limit = FIXED + 2 * (whole + one)            # bytes: float32 of the midpoint
    res = run(["quantize", k_gguf, "--method", "rtn", "--group-size", 32, "--max-memory", limit, "-o", tmp_path / "a"])
    assert_clean_error(res, "--stream")
    assert not (tmp_path / "a").exists()
    res = run(["quantize", k_gguf, "--method", "rtn", "--group-size", 32, "--max-memory", limit, "--stream",
               "-o", tmp_path / "b"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_file_cut_short_half_way_is_one_line_and_nothing_is_written(source, sharded_llama, k_gguf, tmp_path,
                                                                     monkeypatch):
    """A file the run reads from (the second safetensors shard, or the GGUF) is cut short after
    the run has started: a one-line error naming it, nothing at the output path."""
    import shutil

    from compress.stream import Streamer
    if source == "safetensors":
        model = tmp_path / "model"
        shutil.copytree(sharded_llama, model)
        cut, needle = model / "model-00002-of-00002.safetensors", "truncated safetensors file"
    else:
        model = cut = tmp_path / "m.gguf"
        shutil.copyfile(k_gguf, model)
        needle = "truncated GGUF file"
    original = Streamer.load_block

    def load_block(self, i, block):
        if i == 3:
            data = cut.read_bytes()
            cut.write_bytes(data[: len(data) // 2])
        return original(self, i, block)

    monkeypatch.setattr(Streamer, "load_block", load_block)
    out = tmp_path / "out"
    res = run(["quantize", model, "--method", "rtn", "--stream", "-o", out, "--group-size", 32])
    assert_clean_error(res, needle, cut.name)
    assert not out.exists() and not list(tmp_path.glob(".out*"))

"""Run llm-compressor's GPTQ or pruning side by side with ours: same model, same windows, same evaluator protocol.

Imported by OUR bench scripts under OUR venv (stdlib + torch + safetensors only). llm-compressor
itself lives in its own venv (it needs transformers 5.x), made by

    bench/peers/setup.sh llmcompressor [DIR]        # DIR: ~/.cache/compress/peers/llmcompressor

and runs there as a subprocess (bench/peers/llmcompressor_oneshot.py). Our side tokenizes: the peer
only ever sees token ids (docs/REFERENCE.md section 7: transformers 5 tokenizes our SmolLM2 folder
differently).

    from bench.peers.llmcompressor import write_windows, run_llmcompressor
    write_windows(tmp / "windows.safetensors", calib_windows, eval_windows)
    res = run_llmcompressor(None, model_folder, tmp / "windows.safetensors", tmp / "lc.json",
                                 bits=4, group_size=64, sym=False, act_order="static", damp=0.01)
    res["ppl"], res["seconds_quantize"]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "llmcompressor_oneshot.py"
SETUP = HERE / "setup.sh"
DEFAULT_VENV = Path("~/.cache/compress/peers/llmcompressor").expanduser()
ACT_ORDERS = ("none", "static", "group", "weight")
MODIFIERS = ("gptq", "sparsegpt", "wanda", "magnitude")


class PeerError(RuntimeError):
    """The peer tool is missing or its run failed."""


def write_windows(path, calib, eval) -> Path:  # noqa: A002 - the brief's name for the eval windows
    """Write the token windows the peer uses: int64 ``calib`` (n, seqlen) and ``eval`` (m, seqlen')."""
    path = Path(path)
    tensors = {}
    for name, t in (("calib", calib), ("eval", eval)):
        t = torch.as_tensor(t)
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 2:
            raise ValueError(f"{name} windows must be (n, seqlen) with n >= 1, seqlen >= 2; got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} windows must hold integer token ids, got {t.dtype}")
        tensors[name] = t.to(torch.int64).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def peer_python(venv=None) -> Path:
    """The peer venv's interpreter; a clear error naming the setup command when it is not there."""
    venv = Path(venv).expanduser() if venv else DEFAULT_VENV
    py = venv / "bin" / "python"
    if not py.is_file() or not (venv / ".installed-llmcompressor").is_file():
        setup = f"{SETUP.relative_to(HERE.parents[1])} llmcompressor{'' if venv == DEFAULT_VENV else f' {venv}'}"
        raise PeerError(f"llm-compressor's virtual environment {venv} is missing or incomplete: "
                        f"create it with `{setup}` (about two minutes, needs the package registry)")
    return py


def run_llmcompressor(venv, model_folder, windows_path, out_json, *, modifier: str = "gptq", bits: int = 4,
                      group_size: int = 64, sym: bool = False, act_order: str = "static", damp: float = 0.01,
                      block_size: int = 128, sparsity: float | None = None, pattern: str | None = None,
                      eval_base: bool = True, threads: int | None = None, timeout: float | None = None,
                      log=None) -> dict:
    """Compress ``model_folder`` (our fp32 HF folder) with one llm-compressor modifier (``gptq``:
    GPTQModifier with ``bits``/``group_size``/``sym``/``act_order``; ``sparsegpt``, ``wanda``,
    ``magnitude``: its pruning modifiers at ``sparsity`` or N:M ``pattern``; ``damp`` and
    ``block_size`` for GPTQ and SparseGPT) on the ``calib`` windows of ``windows_path`` and
    evaluate perplexity on its ``eval`` windows, in the peer venv ``venv`` (None: the default one).
    Runs with our torch thread count (``threads``, default ``torch.get_num_threads()``) set
    explicitly. ``eval_base``: also evaluate the unquantized model in the peer venv first
    (result["base"]; it must match our fp32 perplexity on the same windows). Returns the JSON the
    script writes (also left at ``out_json``); ``log``: a file object for the peer's output (default: ours)."""
    if act_order not in ACT_ORDERS:
        raise ValueError(f"act_order must be one of {ACT_ORDERS}, got {act_order!r}")
    if modifier not in MODIFIERS:
        raise ValueError(f"modifier must be one of {MODIFIERS}, got {modifier!r}")
    py = peer_python(venv)
    model_folder = Path(model_folder).expanduser().resolve()
    windows_path = Path(windows_path).expanduser().resolve()
    out_json = Path(out_json).expanduser().resolve()
    if not (model_folder / "config.json").is_file():
        raise PeerError(f"{model_folder} is not a Hugging Face model folder (no config.json)")
    if not windows_path.is_file():
        raise PeerError(f"windows file {windows_path} does not exist: write it with write_windows()")
    threads = int(threads or torch.get_num_threads())
    out_json.parent.mkdir(parents=True, exist_ok=True)
    if out_json.exists():
        out_json.unlink()

    cmd = [str(py), "-P", str(SCRIPT), "--model", str(model_folder), "--windows", str(windows_path),
           "--bits", str(bits), "--group-size", str(group_size), "--sym" if sym else "--asym",
           "--act-order", act_order, "--damp", repr(float(damp)), "--block-size", str(block_size),
           "--threads", str(threads), "--out", str(out_json), "--modifier", modifier] \
        + (["--eval-base"] if eval_base else []) + (["--sparsity", repr(float(sparsity))] if sparsity else []) \
        + (["--pattern", pattern] if pattern else [])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="compress-peer-") as cwd:   # nothing left behind in our tree
        tail_path = Path(cwd) / "peer.log"
        with open(tail_path, "w+") as tail:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            try:
                sink = log or sys.stderr
                for line in proc.stdout:   # echo the peer's progress and keep a copy for errors
                    sink.write(line)
                    tail.write(line)
                rc = proc.wait()
            finally:
                if timer:
                    timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            tail.seek(0)
            last = tail.read()[-4000:]
        if timer and rc < 0 and not out_json.is_file():
            raise PeerError(f"llm-compressor run killed after the {timeout} s timeout\n--- last output ---\n{last}")
    if rc != 0 or not out_json.is_file():
        raise PeerError(f"llm-compressor run failed (exit {rc}): {' '.join(cmd)}\n--- last output ---\n{last}")
    return json.loads(out_json.read_text())

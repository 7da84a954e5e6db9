"""ONNX Runtime GenAI's own int4 export (its model builder) of the unquantized model, for
``bench/onnx_cpu.py`` to time and evaluate beside ours.

The builder (``python -m onnxruntime_genai.models.builder``) quantizes the Hugging Face folder's
float weights itself (ONNX Runtime's MatMulNBits quantizer, round-to-nearest by default) and writes
a folder that ONNX Runtime GenAI runs (``genai_config.json``, ``model.onnx``). It needs the
transformers release its onnxruntime-genai version was written against (0.17 imports transformers
5 classes), so it runs in the Python given by ``--builder-python``; a builder that cannot run
(import error, no network for a remote name, ...) is reported with its error, never faked.
Nothing is fetched: ``HF_HUB_OFFLINE=1``, and the input is the suite's cached model folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

# label -> the builder's --extra_options. Its CPU defaults: symmetric 4-bit blocks of 32, accuracy
# level 4 (int8 activations), every MatMul quantized (the lm_head too) and the embedding reading the
# lm_head's 4-bit table.
VARIANTS = [
    ("builder int4 b32 sym acc4 +lm_head int4", []),   # its defaults
    # as close as the builder comes to our default export: asymmetric blocks of 128, fp32 activations
    # (its level 1), the lm_head left in float
    ("builder int4 g128 asym acc1", ["block_size=128", "is_symmetric=false", "accuracy_level=1",
                                     "nodes_to_exclude=/lm_head/MatMul"]),
]


def build(python: str, src: Path, out: Path, extra: list[str], cache: Path) -> dict:
    """Run the builder on the float folder ``src`` into ``out``; a record with the command, its wall
    time, and ``built: False`` with the builder's last error line when it failed."""
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(cache)]
    if extra:
        cmd += ["--extra_options", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rec = {"command": " ".join(cmd), "seconds": time.perf_counter() - t0, "built": res.returncode == 0}
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        rec["error"] = lines[-1] if lines else f"exit status {res.returncode}"
    else:
        m = _onnx_summary(out / "model.onnx")
        rec.update(m)
    return rec


def _onnx_summary(path: Path) -> dict:
    """What the builder wrote: node counts of the quantized ops and their attributes."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    q = [n for n in m.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    attrs = sorted({tuple((a.name, a.i) for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level"))
                    for n in q})
    return {"quantized_nodes": {op: sum(n.op_type == op for n in q) for op in ("MatMulNBits", "GatherBlockQuantized")},
            "node_attributes": [dict(a) for a in attrs]}


class BuilderModel:
    """The builder's ONNX model as ``model(input_ids=...)`` for the perplexity evaluation: the whole
    window at once, an all-ones attention mask and empty past key/values."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])
        dec = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_shape = (dec["num_key_value_heads"], 0, dec["head_size"])
        self.past = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        ids = input_ids.numpy().astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for name in self.past:
            feed[name] = np.zeros((ids.shape[0], *self.kv_shape), np.float32)
        return torch.from_numpy(self.session.run(["logits"], feed)[0])

"""What the GGUF test modules share: the round-trip checks of every GGUF written while they run
(wired to the writers in tests/export/conftest.py) and helpers reading tensors, logits and plans."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch


def _reader(path):
    from gguf import GGUFReader
    return GGUFReader(str(path))


# --------------------------------------------------------------------------------------------
# round trip: every GGUF written here is read back
# --------------------------------------------------------------------------------------------

_READ_BACK: list[str] = []           # files read back so far
_ROUND_TRIP_PROBLEMS: list[str] = []


def _field_matches(f, kv) -> bool:
    from gguf import GGUFValueType as T
    if f.types[0] != kv.vtype or (kv.sub_type is not None and f.types[-1] != kv.sub_type):
        return False
    got = f.contents()
    if kv.vtype == T.FLOAT32:
        return np.float32(got) == np.float32(kv.value)
    if kv.vtype == T.ARRAY:
        return list(got) == list(kv.value)
    return got == kv.value


def check_model_round_trip(path, kvs, tensors, hp) -> list[str]:
    """What gguf's reader finds in a model GGUF against what ``write_gguf`` was handed: the same
    tensors in the same order, with the same GGML types, (rows, cols) shapes and bytes (q/k rows
    permuted as llama.cpp's converter does), and every key with its type and value."""
    from compress.export.gguf import permute_qk
    r = _reader(path)
    got = [(t.name, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    want = [(t.name, t.type, tuple(int(x) for x in t.shape)) for t in tensors]
    if got != want:
        bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        return [f"{path}: {len(got)} tensors read, {len(want)} written; first difference at #{bad}: "
                f"read {got[bad] if bad < len(got) else None}, written {want[bad] if bad < len(want) else None}"]
    problems = []
    for t, rt in zip(tensors, r.tensors):
        data = t.data
        if re.search(r"\.attn_q\.(weight|bias)$", t.name):
            data = permute_qk(data, hp.n_head, hp.n_head)
        elif re.search(r"\.attn_k\.(weight|bias)$", t.name):
            data = permute_qk(data, hp.n_head, hp.n_head_kv)
        dtype = {"F32": torch.float32, "F16": torch.float16}.get(t.type, torch.uint8)
        if np.array(rt.data).tobytes() != data.detach().cpu().contiguous().to(dtype).numpy().tobytes():
            problems.append(f"{path}: the bytes of {t.name} ({t.type}) differ from those written")
    if r.fields["general.architecture"].contents() != "llama":
        problems.append(f"{path}: general.architecture is {r.fields['general.architecture'].contents()!r}")
    for kv in kvs:
        if kv.key != "general.architecture" and (kv.key not in r.fields or not _field_matches(r.fields[kv.key], kv)):
            problems.append(f"{path}: key {kv.key} was not read back as written")
    return problems


def check_imatrix_round_trip(path, im) -> list[str]:
    """An imatrix GGUF read back: per entry (in name order) ``<name>.in_sum2`` (1 x n) and
    ``<name>.counts`` (1 x 1), F32, holding the sums and counts written; the dataset and chunk keys."""
    r = _reader(path)
    want, vals = [], []
    for name in sorted(im.sums):
        s = im.sums[name].to(torch.float32).reshape(1, -1)
        want += [(f"{name}.in_sum2", "F32", tuple(s.shape)), (f"{name}.counts", "F32", (1, 1))]
        vals += [s.numpy(), np.array([[im.counts[name]]], dtype=np.float32)]
    got = [(t.name, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    if got != want:
        return [f"{path}: imatrix tensors read {got[:2]}..., written {want[:2]}..."]
    problems = [f"{path}: the values of {t.name} differ from those written"
                for t, v in zip(r.tensors, vals) if np.array(t.data).tobytes() != v.tobytes()]
    f = r.fields
    if (f["general.type"].contents() != "imatrix"
            or f["imatrix.datasets"].contents() != (list(im.datasets) or ["unknown"])
            or f["imatrix.chunk_count"].contents() != im.chunk_count
            or f["imatrix.chunk_size"].contents() != im.chunk_size):
        problems.append(f"{path}: imatrix keys not read back as written")
    return problems


def _record(path, check) -> None:
    try:
        problems = check()
    except Exception as e:  # noqa: BLE001 - a file the reader cannot read is a round-trip failure
        problems = [f"{path}: read back failed: {type(e).__name__}: {e}"]
    _READ_BACK.append(str(path))
    _ROUND_TRIP_PROBLEMS.extend(problems)


def _logits(spec, ids):
    from compress import models
    m = models.load(str(spec))
    with torch.no_grad():
        return m.model(ids).logits


def _source_weight(folder, name):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))[name]


def _tensor(r, name):
    return next(t for t in r.tensors if t.name == name)


def _assert_llama_cpp_bytes(r, name, w, type_name):
    """The tensor ``name`` of reader ``r`` holds llama.cpp's quantization of ``w`` (rows in file order)."""
    from compress.formats import kquants
    t = _tensor(r, name)
    assert t.tensor_type.name == type_name, (name, t.tensor_type.name)
    assert np.array_equal(np.array(t.data).reshape(-1), kquants.quantize(w, type_name).numpy().reshape(-1)), name


def _plan_types(r, mix, **kw):
    from compress.formats.ggml_mix import select_types
    shapes = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    return {n: c.type for n, c in select_types(shapes, mix, n_layer=2, n_head=4, n_head_kv=2, **kw).items()}

"""Sparse float checkpoints in the compressed-tensors layout (the format vLLM and llm-compressor
read), written and read without that library.

Each pruned linear ``<m>`` is stored as

* ``sparse-bitmask`` (any sparsity): ``<m>.shape`` int64 ``(2,)``, ``<m>.compressed`` the nonzero
  values in row-major order ``(nnz,)``, ``<m>.bitmask`` uint8 ``(N, ceil(K/8))`` (bit ``k % 8`` of
  byte ``k // 8`` set where ``W[n, k]`` is kept: numpy's ``packbits(bitorder="little")``) and
  ``<m>.row_offsets`` int64 ``(N,)`` (where each row starts in ``compressed``);
* ``sparse-24-bitmask`` (every pruned linear 2:4): ``<m>.shape`` int64 ``(2, 1)``,
  ``<m>.compressed`` the two kept values of every group of four ``(N, K/2)``, ``<m>.bitmask`` as above
  with exactly two bits set per group of four.

``config.json`` carries ``quantization_config = {"quant_method": "compressed-tensors",
"sparsity_config": {...}}`` and this suite's metadata under the top-level key ``compress``.
See docs/FORMATS.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CompressError
from .bits import pack_bits, unpack_bits

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
FORMATS = (BITMASK, BITMASK_24)
QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.14.0.1"          # the compressed-tensors release whose layout this follows
FORMAT_VERSION = 1


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """The two positions kept in every group of four: the nonzeros, completed by the first zeros."""
    n, k = w.shape
    g = (w != 0).reshape(n, k // 4, 4)
    if bool((g.sum(-1) > 2).any()):
        raise CompressError("a weight is not 2:4 sparse (a group of four holds more than two nonzeros)")
    # rank positions: nonzeros first, then by position; keep the first two
    order = torch.argsort((~g).to(torch.int8) * 4 + torch.arange(4), dim=-1, stable=True)[..., :2]
    keep = torch.zeros_like(g)
    keep.scatter_(-1, order, True)
    return keep.reshape(n, k)


def encode(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of one pruned weight ``(N, K)`` (suffixes without the module name)."""
    n, k = w.shape
    if fmt == BITMASK_24:
        if k % 4:
            raise CompressError(f"sparse-24-bitmask needs a width divisible by 4, got {k}")
        keep = mask_24(w)
        return {"shape": torch.tensor([n, k], dtype=torch.int64).reshape(-1, 1),
                "compressed": w[keep].reshape(n, k // 2).contiguous(), "bitmask": pack_bits(keep)}
    keep = w != 0
    counts = keep.sum(dim=1)
    return {"shape": torch.tensor([n, k], dtype=torch.int64), "compressed": w[keep].contiguous(),
            "bitmask": pack_bits(keep), "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def decode(t: dict[str, torch.Tensor], fmt: str, name: str = "weight") -> torch.Tensor:
    """The dense weight from :func:`encode`'s tensors, checking that they agree."""
    try:
        shape = tuple(int(x) for x in t["shape"].flatten().tolist())
        values, bits = t["compressed"], t["bitmask"]
    except KeyError as e:
        raise CompressError(f"{name}: sparse tensor {e.args[0]} is missing") from None
    if len(shape) != 2 or min(shape) <= 0:
        raise CompressError(f"{name}.shape is {shape}, not a 2-D weight shape")
    n, k = shape
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (n, -(-k // 8)):
        raise CompressError(f"{name}.bitmask has shape {tuple(bits.shape)} ({bits.dtype}), expected "
                            f"({n}, {-(-k // 8)}) uint8")
    keep = unpack_bits(bits, (n, k))
    if fmt == BITMASK_24:
        if k % 4 or not bool((keep.reshape(n, k // 4, 4).sum(-1) == 2).all()):
            raise CompressError(f"{name}.bitmask does not mark two of every four weights")
        if tuple(values.shape) != (n, k // 2):
            raise CompressError(f"{name}.compressed has shape {tuple(values.shape)}, expected ({n}, {k // 2})")
    else:
        nnz = int(keep.sum())
        if values.dim() != 1 or values.numel() != nnz:
            raise CompressError(f"{name}.compressed holds {values.numel()} values, the bitmask marks {nnz}")
        counts = keep.sum(dim=1)
        offsets = t.get("row_offsets")
        if offsets is None or not torch.equal(offsets.to(torch.int64), torch.cumsum(counts, 0) - counts):
            raise CompressError(f"{name}.row_offsets disagree with the bitmask")
    out = torch.zeros((n, k), dtype=values.dtype)
    out[keep] = values.reshape(-1)
    return out


def choose_format(patterns: dict[str, str]) -> tuple[str, str]:
    """(format, sparsity_structure) for the pruned modules: 2:4 everywhere -> sparse-24-bitmask."""
    structures = set(patterns.values())
    if len(structures) == 1:
        s = structures.pop()
        return (BITMASK_24 if s == "2:4" else BITMASK), s
    return BITMASK, "unstructured"


def encode_modules(tensors: dict, modules: list[str], fmt: str) -> dict[str, int]:
    """Replace each module's ``.weight`` in ``tensors`` by its :func:`encode` tensors; returns the
    bytes before and after."""
    dense = stored = 0
    for m in modules:
        w = tensors.pop(m + ".weight")
        dense += w.numel() * w.element_size()
        for k, v in encode(w, fmt).items():
            tensors[f"{m}.{k}"] = v
            stored += v.numel() * v.element_size()
    return {"dense_bytes": dense, "stored_bytes": stored}


def step_format(names: list[str], scheme_of) -> str:
    """The format of a pruning step's output decided before it runs, from each module's scheme
    (``scheme_of(name)``: its N:M pattern or None), as :func:`choose_format` decides after."""
    return choose_format({n: (f"{nm[0]}:{nm[1]}" if (nm := scheme_of(n)) else "unstructured") for n in names})[0]


def save_sparse(loaded, out: Path, sparsity: dict[str, float], patterns: dict[str, str], dtype: str,
                meta: dict) -> dict:
    """Write ``loaded``'s float model with the linears named in ``sparsity`` stored compactly."""
    from ..checkpoint import model_tensors, write_folder
    if not sparsity:
        raise CompressError("nothing was pruned: the targets selected no module")
    from ..conv1d import conv1d_modules
    conv = set(conv1d_modules(loaded.model))        # stored transposed: N:M runs along the other axis there
    fmt, structure = choose_format({m: "unstructured" if m in conv else patterns.get(m, "unstructured")
                                    for m in sparsity})
    tensors = model_tensors(loaded, dtype)
    resident = [p for p in loaded.model.parameters() if not p.is_meta]     # a streamed model's blocks: in shards
    counts = {"zeros": sum(int((p == 0).sum()) for p in resident), "params": sum(p.numel() for p in resident)}
    if loaded.stream is not None:
        if loaded.stream.sparse != fmt:
            raise CompressError(f"the streamed blocks were written as {loaded.stream.sparse}, the run needs {fmt}")
        for k, v in loaded.stream.shard_counts().items():
            counts[k] = counts.get(k, 0) + v
    # what is not in a streamed block's shard (a pruned lm_head or tied embedding table) is encoded here
    for k, v in encode_modules(tensors, [m for m in sparsity if m + ".weight" in tensors], fmt).items():
        counts[k] = counts.get(k, 0) + v
    dense_bytes, stored_bytes, zeros, params = (counts.get(k, 0) for k in ("dense_bytes", "stored_bytes", "zeros", "params"))
    cfg = loaded.model.config.to_dict()
    cfg["torch_dtype"] = dtype
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD, "version": CT_VERSION,
        "sparsity_config": {"format": fmt, "global_sparsity": round(zeros / params, 6),
                            "sparsity_structure": structure, "targets": sorted(sparsity), "ignore": [],
                            "registry_requires_subclass": False}}
    cfg["compress"] = {"format": fmt, "format_version": FORMAT_VERSION, "sparsity": sparsity,
                       "patterns": patterns, **meta}
    from .. import __version__
    cfg["compress"]["package_version"] = __version__
    write_folder(loaded, out, tensors, cfg, {"compress_format": fmt, "compress_format_version": str(FORMAT_VERSION)})
    return {"out": str(out), "layers": len(sparsity), "format": fmt, "dense_bytes": dense_bytes,
            "stored_bytes": stored_bytes}


def is_sparse_config(config: dict) -> bool:
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD and bool(qc.get("sparsity_config"))


def read_sparse_meta(config: dict, path: Path) -> tuple[str, dict]:
    """(format, metadata) of a sparse checkpoint; refuses one this version cannot read."""
    qc = config["quantization_config"]
    keys = set(qc) - {"quant_method", "version", "sparsity_config"}
    if keys:
        raise CompressError(f"{path}: compressed-tensors checkpoints with quantization ({', '.join(sorted(keys))}) "
                            "are not read by this version; sparse float ones are")
    fmt = qc["sparsity_config"].get("format")
    if fmt not in FORMATS:
        raise CompressError(f"{path}: sparsity format {fmt!r} is not supported (this version reads "
                            f"{', '.join(FORMATS)})")
    meta = config.get("compress") or {}
    if meta and meta.get("format") != fmt:
        raise CompressError(f"{path}: config.json's compress.format ({meta.get('format')!r}) disagrees with "
                            f"its sparsity_config ({fmt!r})")
    return fmt, meta


def decode_state(state: dict[str, torch.Tensor], fmt: str, path: Path) -> tuple[dict, list[str]]:
    """Replace every sparse weight in ``state`` by its dense tensor; returns the state and the
    names of the modules decoded."""
    suffixes = ("shape", "compressed", "bitmask", "row_offsets")
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.rsplit(".", 1)[-1] == "bitmask"})
    for m in modules:
        t = {s: state.pop(f"{m}.{s}") for s in suffixes if f"{m}.{s}" in state}
        state[m + ".weight"] = decode(t, fmt, f"{path}: {m}")
    return state, modules




def inspect_sparse(path: Path, config: dict) -> dict:
    """Per pruned linear: its measured sparsity (exact zeros after decoding) and the bytes stored
    against the dense tensor's; the file's size."""
    from safetensors import safe_open

    from ..models import safetensors_files
    fmt, meta = read_sparse_meta(config, path)
    layers, stored, dense, files = [], 0, 0, safetensors_files(path)
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
            for m in sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".bitmask")}):
                t = {s: fh.get_tensor(f"{m}.{s}") for s in ("shape", "compressed", "bitmask", "row_offsets")
                     if f"{m}.{s}" in keys}
                w = decode(t, fmt, f"{path}: {m}")
                nb = sum(v.numel() * v.element_size() for v in t.values())
                db = w.numel() * w.element_size()
                stored, dense = stored + nb, dense + db
                layers.append({"name": m, "shape": list(w.shape), "sparsity": float((w == 0).sum()) / w.numel(),
                               "pattern": (meta.get("patterns") or {}).get(m), "bytes": nb, "dense_bytes": db})
    weights = sum(f.stat().st_size for f in files)
    return {"path": str(path), "format": fmt, "format_version": meta.get("format_version"),
            "method": meta.get("method"), "label": f"{meta.get('method', 'sparse')} {meta.get('label', fmt)}",
            "size_bytes": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()),
            "weights_bytes": weights, "pruned_bytes": stored, "pruned_dense_bytes": dense,
            "bytes_saved": dense - stored, "block_sparsity": next((st["options"].get("block_sparsity") for st in
                                                                  meta.get("steps", []) if "options" in st), None),
            "layers": layers, "package_version": meta.get("package_version")}

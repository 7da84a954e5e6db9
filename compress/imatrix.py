"""Importance matrices in llama.cpp's file formats: collect, write, read.

An importance matrix holds, for every linear layer, the per-input-channel sum of squared
activations and the number of rows (tokens) summed; importance = sum / count, the mean square
(:class:`calib.stats.ImportanceAccumulator`). llama.cpp's quantizers weight their scale searches
with it.

Files (keyed by llama.cpp tensor names, ``blk.N.attn_q.weight`` ...):

* GGUF (current llama.cpp, ``llama-imatrix`` default): ``general.type = "imatrix"``,
  ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count``, ``imatrix.chunk_size`` (u32),
  and per tensor ``<name>.in_sum2`` F32 ``ne = (K, 1)`` (raw sums of x^2) and ``<name>.counts``
  F32 ``ne = (1, 1)`` (rows summed). ``llama-quantize`` requires the three metadata keys.
* legacy ``.dat`` (older llama.cpp, ``--output-format dat``), little-endian:
  ``i32 n_entries``; per entry ``i32 len, name[len], i32 ncall, i32 nval, f32 values[nval]`` with
  ``values = sum / count * ncall``; then ``i32 chunk_count, i32 len, dataset[len]``.
  Reading divides by ``ncall``.

Collecting runs the unquantized model through the sequential block runner (calib/runner.py) and
records the input of every decoder-block linear (q, k and v share one input but get one entry
each, as in llama.cpp); llama.cpp collects ``output.weight`` only with ``--process-output``
and never for tied embeddings; ``process_output=True`` does the same here.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CompressError, first_line
from .fileio import atomic_file
from .formats.gguf_file import read_gguf_layout

log = logging.getLogger(__name__)

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass
class IMatrix:
    """Raw sums and counts per llama.cpp tensor name (``sums (K,)`` float32, ``count`` rows)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def importance(self) -> dict[str, torch.Tensor]:
        """``{tensor name: sums / count}`` (a zero count gives ones, as llama-quantize does)."""
        out = {}
        for name, s in self.sums.items():
            c = float(self.counts[name])
            out[name] = s / c if c > 0 else torch.ones_like(s)
        return out

    def by_module(self, blocks_prefix: str = "model.layers") -> dict[str, torch.Tensor]:
        """``{our module name: importance (K,)}``, e.g. ``model.layers.0.self_attn.q_proj``.
        Entries with names this suite does not know are left out (logged)."""
        from .export.gguf_arch import hf_name
        out = {}
        for name, imp in self.importance().items():
            try:
                full = hf_name(name, blocks_prefix)
            except CompressError:
                log.info("imatrix entry %s has no module in this suite's naming; ignored", name)
                continue
            out[full.removesuffix(".weight")] = imp
        return out


# --------------------------------------------------------------------------------------------
# collecting
# --------------------------------------------------------------------------------------------

def collect(loaded, windows: torch.Tensor, process_output: bool = False, device: str = "cpu",
            progress: bool = True, dataset: str = "") -> IMatrix:
    """Sums of squared inputs of every decoder-block linear (and of the output layer with
    ``process_output`` when the embeddings are not tied) over ``windows (n, seqlen)``.

    The model is not modified. Keys are llama.cpp tensor names.
    """
    from calib.runner import run_sequential
    from calib.stats import ImportanceAccumulator

    from .export.gguf_arch import check_exportable, gguf_arch, gguf_name

    model, arch = loaded.model, loaded.arch
    check_exportable(model.config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if process_output and tied:
        log.warning("output.weight is the tied token embedding: llama.cpp never collects it; skipped")
    accs: dict[str, ImportanceAccumulator] = {}
    nblocks = len(arch.get_blocks(model))
    handles: list = []

    def drop_hooks():
        for h in handles:
            h.remove()
        handles.clear()

    def process(i, block, inputs):
        # The runner re-runs every block once over all stored inputs right after this call, to
        # produce the next block's inputs; the weights are not changed, so the hooks attached
        # here collect during that pass (one forward per block instead of two). They are
        # removed when the next block starts.
        drop_hooks()
        for g in arch.groups:
            first = block.get_submodule(g.linears[0])
            acc = ImportanceAccumulator(first.in_features)
            handles.append(first.register_forward_hook(acc.hook))
            for name in g.linears:
                accs[gguf_name(f"{arch.blocks}.{i}.{name}.weight", arch.blocks, gguf_arch(model.config))] = acc
        if i == nblocks - 1 and process_output and not tied:
            head = model.get_submodule(arch.lm_head)
            norm = model.get_submodule(arch.final_norm)
            out_acc = accs["output.weight"] = ImportanceAccumulator(head.in_features)

            def final(module, args, output):
                y = output[0] if isinstance(output, (tuple, list)) else output
                with torch.no_grad():
                    out_acc.add_batch(norm(y))

            handles.append(block.register_forward_hook(final))

    try:
        run_sequential(model, arch, windows, process, device=device, progress=progress, desc="imatrix")
    finally:
        drop_hooks()
    im = IMatrix(datasets=[dataset] if dataset else [], chunk_count=int(windows.shape[0]),
                 chunk_size=int(windows.shape[1]))
    for name, acc in accs.items():
        im.sums[name] = acc.sum_sq.detach().to(torch.float32).cpu().clone()
        im.counts[name] = float(acc.count)
    return im


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def write_gguf(path: Path, im: IMatrix) -> Path:
    """llama.cpp's GGUF imatrix layout (see the module docstring); entries in name order."""
    import gguf
    if not im.sums:
        raise CompressError("the importance matrix is empty")

    def write(tmp):
        w = gguf.GGUFWriter(str(tmp), "")
        # llama-imatrix writes no general.architecture; gguf-py adds one in its constructor
        for kv in w.kv_data:
            kv.pop(gguf.Keys.General.ARCHITECTURE, None)
        w.add_string("general.type", "imatrix")
        w.add_key_value(KEY_DATASETS, list(im.datasets) or ["unknown"], gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.STRING)
        w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
        for name in sorted(im.sums):
            s = im.sums[name].detach().to(torch.float32).cpu().numpy().reshape(1, -1)
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(s))
            w.add_tensor(f"{name}.counts", np.array([[im.counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_file(path, write)


def write_legacy(path: Path, im: IMatrix) -> Path:
    """llama.cpp's legacy binary ``.dat`` layout: values ``sum / count * ncall`` with
    ``ncall = ceil(count / chunk_size)``."""
    if not im.sums:
        raise CompressError("the importance matrix is empty")
    cs = max(1, int(im.chunk_size))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<i", len(im.sums)))
            for name in sorted(im.sums):
                b = name.encode()
                count = float(im.counts[name])
                ncall = int(-(-int(count) // cs)) if count > 0 else 0
                s = im.sums[name].detach().to(torch.float32).cpu()
                vals = (s / count * ncall) if count > 0 else torch.ones_like(s)
                f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, s.numel()))
                f.write(vals.numpy().astype("<f4").tobytes())
            f.write(struct.pack("<i", int(im.chunk_count)))
            ds = (im.datasets[-1] if im.datasets else "").encode()
            f.write(struct.pack("<i", len(ds)) + ds)

    return atomic_file(path, write)


def write(path: Path, im: IMatrix, fmt: str | None = None) -> Path:
    """Write GGUF (default) or legacy (``fmt="dat"`` or a ``.dat`` suffix)."""
    fmt = fmt or ("dat" if Path(path).suffix == ".dat" else "gguf")
    if fmt not in ("gguf", "dat"):
        raise CompressError(f"imatrix format must be gguf or dat, got {fmt}")
    return write_legacy(path, im) if fmt == "dat" else write_gguf(path, im)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def read(path: Path) -> IMatrix:
    """Read an imatrix file, GGUF or legacy (told apart by the GGUF magic). Raises CompressError
    with what is wrong for missing, truncated or inconsistent files."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"imatrix file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    for name, s in im.sums.items():
        if not bool(torch.isfinite(s).all()):
            raise CompressError(f"imatrix {path}: entry {name} holds non-finite values")
    return im


def _read_gguf(path: Path) -> IMatrix:
    from gguf import GGMLQuantizationType, GGUFReader
    # gguf's reader trusts every length in the file (a corrupt one sends it past the end): check them first
    read_gguf_layout(path, kind="imatrix file")
    try:
        r = GGUFReader(str(path))
    except Exception as e:
        raise CompressError(f"corrupt imatrix file {path}: {first_line(e)}") from None
    sums, counts = {}, {}
    for t in r.tensors:
        for suffix, store in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise CompressError(f"imatrix {path}: {t.name} must be F32, is {t.tensor_type.name}")
                store[t.name[:-len(suffix)]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise CompressError(f"{path} is not an imatrix file (no <tensor>.in_sum2 entries)")
    im = IMatrix()
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise CompressError(f"imatrix {path}: {name} has {'no counts' if name in sums else 'counts but no sums'}")
        c = counts[name]
        if c.size != 1:
            raise CompressError(f"imatrix {path}: {name} has {c.size} counts (expert matrices are not supported)")
        if not np.isfinite(c[0]) or c[0] < 0:
            raise CompressError(f"imatrix {path}: {name} has an invalid count {c[0]}")
        im.sums[name] = torch.from_numpy(sums[name].copy())
        im.counts[name] = float(round(float(c[0])))

    def val(key, default):
        f = r.fields.get(key)
        try:
            return f.contents() if f is not None else default
        except Exception:
            return default

    ds = val(KEY_DATASETS, [])
    im.datasets = [ds] if isinstance(ds, str) else list(ds or [])
    im.chunk_count = int(val(KEY_CHUNK_COUNT, 0) or 0)
    im.chunk_size = int(val(KEY_CHUNK_SIZE, 0) or 0)
    return im


def _read_legacy(path: Path) -> IMatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise CompressError(f"corrupt imatrix file {path}: truncated while reading {what} "
                                f"(not a GGUF or legacy llama.cpp imatrix?)")
        b = data[pos:pos + n]
        pos += n
        return b

    (n_entries,) = struct.unpack("<i", take(4, "the entry count"))
    if n_entries < 1 or n_entries > 1_000_000:
        raise CompressError(f"corrupt imatrix file {path}: {n_entries} entries")
    im = IMatrix(legacy=True)
    for i in range(n_entries):
        (ln,) = struct.unpack("<i", take(4, f"entry {i + 1}'s name length"))
        if ln < 1 or ln > 4096:
            raise CompressError(f"corrupt imatrix file {path}: entry {i + 1} has a name of {ln} bytes")
        try:
            name = take(ln, f"entry {i + 1}'s name").decode()
        except UnicodeDecodeError:
            raise CompressError(f"corrupt imatrix file {path}: entry {i + 1}'s name is not UTF-8") from None
        ncall, nval = struct.unpack("<ii", take(8, f"{name}'s sizes"))
        if nval < 1:
            raise CompressError(f"corrupt imatrix file {path}: {name} has {nval} values")
        vals = np.frombuffer(take(4 * nval, f"{name}'s values"), dtype="<f4").astype(np.float32)
        # sums / ncall is the importance; keep (sums, count) so that importance() divides back
        im.sums[name] = torch.from_numpy(vals.copy())
        im.counts[name] = float(ncall) if ncall > 0 else 1.0
    if pos + 4 <= len(data):
        (im.chunk_count,) = struct.unpack("<i", take(4, "the chunk count"))
        if pos + 4 <= len(data):
            (ln,) = struct.unpack("<i", take(4, "the dataset name length"))
            if ln > 0:
                im.datasets = [take(ln, "the dataset name").decode(errors="replace")]
    return im

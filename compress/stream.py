"""Streaming: compress a model block by block without ever holding it whole (``--stream``).

The model is built with its decoder blocks' parameters on the ``meta`` device (no memory); the
embeddings, the final norm, the lm_head and every buffer (rotary tables) are read from the
safetensors files. When the runner reaches block ``i`` its tensors are read from the files
(one tensor at a time, with plain reads: no file mapping) as float32; when the block is done its tensors, as the
checkpoint stores them, go to a shard file of their own and the block goes back to ``meta``. The
output folder is assembled from the shards when every block is done (the last shard holds the
rest of the model; ``model.safetensors.index.json`` maps names to shards, as Hugging Face
sharded checkpoints do) and renamed into place, so it appears whole or not at all.

While the blocks run the embeddings and the lm_head are on ``meta`` too (read back for the head's
own step and for writing): peak memory is about one block in float32, its statistics and solver
work, and the calibration activations. Every tensor is the same as the in-memory path writes (``tests/test_stream.py``); the file
layout differs (one shard per block). A resumable run keeps its shards in the work folder, so a
killed run continues from the last finished block.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import CompressError

INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class SafetensorsFiles:
    """The tensors of a Hugging Face folder's safetensors files: ``name in src``, ``iter(src)`` and
    ``src.read(names)``, each tensor read with plain reads into its own buffer (no mapping of the
    file: memory is the tensors alone)."""

    def __init__(self, folder: Path):
        from .models import check_safetensors, safetensors_files
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        self.headers: dict[Path, tuple[dict, int]] = {}      # file -> (header, offset of its data)
        for f in safetensors_files(self.folder):
            head = check_safetensors(f)
            with open(f, "rb") as fh:
                self.headers[f] = (head, 8 + int.from_bytes(fh.read(8), "little"))
            for k in head:
                if k != "__metadata__":
                    self.where[k] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __iter__(self):
        return iter(self.where)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as float32 (integers as stored). A file cut short is a one-line error
        naming it."""
        out = {}
        for n in names:
            if n not in self.where:
                raise CompressError(f"{self.folder}: tensor {n} is missing from the safetensors files")
            f = self.where[n]
            head, offset = self.headers[f]
            e = head[n]
            if e.get("dtype") not in _DTYPES:
                raise CompressError(f"{f}: tensor {n} has unsupported dtype {e.get('dtype')}")
            start, end = (int(x) for x in e["data_offsets"])
            shape = [int(d) for d in e["shape"]]
            t = torch.empty(shape, dtype=_DTYPES[e["dtype"]])
            if t.numel() * t.element_size() != end - start:
                raise CompressError(f"corrupt safetensors file {f}: tensor {n} holds {end - start} bytes for shape {shape}")
            try:
                with open(f, "rb") as fh:
                    fh.seek(offset + start)
                    got = fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) if end > start else 0
            except OSError as err:
                raise CompressError(f"cannot read {f}: {err.strerror or err}") from None
            if got != end - start:
                raise CompressError(f"truncated safetensors file {f}: tensor {n} ends past the end of the file")
            out[n] = t.to(torch.float32) if t.is_floating_point() else t
        return out


class Streamer:
    """A model whose blocks live on ``meta`` until :meth:`load_block` reads them from ``source``
    (:class:`SafetensorsFiles`, or :class:`compress.formats.gguf_tensors.GGUFTensors`)."""

    def __init__(self, source, arch, nblocks: int):
        self.source = source
        self.arch = arch
        self.nblocks = nblocks
        self.staging: Path | None = None
        self.own_staging = False
        self.shards = True                     # write each block's shard (False: a GGUF output, written at the end)
        self.dtype = "float16"                 # storage dtype of the float tensors
        self.compact = True                    # pruned and quantized modules stored compactly
        self.sparse: str | None = None         # pruned float modules in this compressed-tensors format

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return self.source.read(names)

    def check_finite(self) -> None:
        """Every weight of the blocks finite, read one tensor at a time and checked in slices (no
        temporaries the size of the tensor), before any work starts."""
        prefix = f"{self.arch.blocks}."
        for name in self.source:
            if name.startswith(prefix):
                t = self.read([name])[name]
                if t.is_floating_point() and not all(bool(torch.isfinite(c).all()) for c in t.view(-1).split(1 << 20)):
                    raise CompressError(f"{name} has NaN or Inf weights")

    def load_block(self, i: int, block: torch.nn.Module) -> None:
        """Give block ``i`` its tensors from the files (float32, on the CPU)."""
        prefix = f"{self.arch.blocks}.{i}."
        names = [n for n, p in list(block.named_parameters()) + list(block.named_buffers()) if p.is_meta]
        tensors = self.read([prefix + n for n in names])
        for n in names:
            _assign(block, n, tensors[prefix + n])

    # ---------------------------------------------------------------- embeddings and head
    def _rest(self, model) -> list[str]:
        """The parameters of the embeddings and the lm_head (the large tensors outside the blocks)."""
        out = []
        for m in (*self.arch.embeddings, self.arch.lm_head):
            out += [f"{m}.{n}" for n, _ in model.get_submodule(m).named_parameters()]
        return out

    def release_rest(self, model) -> None:
        """Put the embeddings and the lm_head on ``meta`` while the blocks run (their inputs are
        captured; the head is needed again only at the end): no-op when they are already there."""
        for n in self._rest(model):
            if not model.get_parameter(n).is_meta:
                _assign(model, n, torch.empty(model.get_parameter(n).shape, device="meta"))

    def load_rest(self, model) -> None:
        """Read the embeddings and the lm_head back (an lm_head untied from a tied embedding gets
        the embedding's table, as untying gave it)."""
        names = [n for n in self._rest(model) if model.get_parameter(n).is_meta]
        if not names:
            return
        head = f"{self.arch.lm_head}.weight"
        emb = next((n for n in self.source if n.startswith(self.arch.embeddings[0] + ".")), None)
        tensors = self.read([emb if n == head and n not in self.source else n for n in names])
        for n in names:
            src = emb if n == head and n not in self.source else n
            _assign(model, n, tensors[src].clone() if src != n else tensors[src])
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()

    # ---------------------------------------------------------------- writing
    def open_staging(self, work_dir: Path | None, out: Path) -> None:
        """Shards go into the work folder (kept for a resumed run) or a temporary sibling of ``out``."""
        if not self.shards:
            return
        if work_dir is not None:
            self.staging = Path(work_dir) / "shards"
            self.staging.mkdir(parents=True, exist_ok=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.shards-"))
            self.own_staging = True

    def write_block(self, i: int, block: torch.nn.Module, record) -> None:
        """Block ``i``'s tensors as the checkpoint stores them (in :attr:`dtype`; pruned and
        quantized modules compactly with :attr:`compact`), to its shard, atomically (with
        :attr:`shards`; a GGUF keeps the block's GGML tensors in the run's record); then the block
        goes back to ``meta``."""
        from calib.dist import is_main

        from .checkpoint import as_written, compact_tensors
        from .fileio import save_safetensors
        prefix = f"{self.arch.blocks}.{i}."
        if is_main() and self.shards:
            tensors = {prefix + k: as_written(k, v, self.dtype) for k, v in block.state_dict().items()}
            pruned = [m for m in (record.extra.get("sparsity") or {}) if m.startswith(prefix)]
            counts = {}
            if self.sparse is not None:
                from .formats.sparse import encode_modules
                counts = encode_modules(tensors, pruned, self.sparse)
                counts.update(zeros=sum(int((p == 0).sum()) for p in block.parameters()),
                              params=sum(p.numel() for p in block.parameters()))
            elif self.compact:
                pruned = [m for m in pruned if m in record.schemes]
                compact_tensors(tensors, {m: block.get_submodule(m[len(prefix):]) for m in pruned})
            name = shard_name(i, self.nblocks + 1)
            tmp = self.staging / (name + ".tmp")
            save_safetensors(tensors, tmp, metadata={"format": "pt", **{k: str(v) for k, v in counts.items()}})
            os.replace(tmp, self.staging / name)
        self.drop_block(block)

    def drop_block(self, block: torch.nn.Module) -> None:
        """Put ``block`` back on ``meta`` and hand its memory back to the system."""
        block.to("meta")
        _trim()

    def shard_counts(self) -> dict[str, int]:
        """The counts :meth:`write_block` wrote into the block shards' headers (zeros, parameters,
        dense and stored bytes of a sparse run), summed over the blocks."""
        from .models import check_safetensors
        total: dict[str, int] = {}
        for i in range(self.nblocks):
            meta = check_safetensors(self.staging / shard_name(i, self.nblocks + 1)).get("__metadata__") or {}
            for k, v in meta.items():
                if k != "format":
                    total[k] = total.get(k, 0) + int(v)
        return total

    def finish(self, tmp: Path, rest: dict, metadata: dict) -> None:
        """Put the block shards into the output folder being written (``tmp``: hard links, so no
        second copy on disk and the staged ones stay for a rerun if writing fails), write the rest
        of the model as the last shard and the index."""
        from .fileio import save_safetensors
        from .models import check_safetensors
        last = shard_name(self.nblocks, self.nblocks + 1)
        weight_map = {}
        for i in range(self.nblocks):
            name = shard_name(i, self.nblocks + 1)
            if not (self.staging / name).exists():
                raise CompressError(f"block {i}'s shard is missing from {self.staging}")
            weight_map.update({k: name for k in check_safetensors(self.staging / name) if k != "__metadata__"})
            try:
                os.link(self.staging / name, tmp / name)
            except OSError:                 # another file system, or no hard links there
                shutil.copyfile(self.staging / name, tmp / name)
        save_safetensors(rest, tmp / last, metadata={"format": "pt", **metadata})
        weight_map.update({k: last for k in rest})
        size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=2))

    def close(self) -> None:
        """Drop a temporary staging folder (the work folder's is removed with the work folder)."""
        if self.own_staging and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def _tune_malloc() -> None:
    """glibc's malloc: tensors of 4 MiB and more get their own mappings, returned to the system when
    freed (by default the threshold grows to 32 MiB and freed blocks stay in the heap, so memory
    crept up block after block), and at most two arenas."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)       # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)             # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    """Hand the freed block's memory back to the system (glibc keeps freed heap otherwise, and the
    next block would start above the last one's peak)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _assign(root: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t


def load(spec: str):
    """``spec`` (a Hugging Face folder, a registered name or a ``.gguf`` file) with its decoder
    blocks on ``meta``: a :class:`~compress.models.Loaded` whose ``stream`` is the
    :class:`Streamer` that fills them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from . import models
    from .arch import GENERIC, describe
    _tune_malloc()
    kind, path = models.resolve(spec)
    if kind == "name":
        path = models.fetch(spec)
        kind = "folder"
    if kind == "gguf":
        from .formats.gguf_file import check_gguf
        from .formats.gguf_load import gguf_config, gguf_tokenizer
        from .formats.gguf_tensors import GGUFTensors
        layout = check_gguf(path)
        hf_config, tokenizer = gguf_config(path, layout), gguf_tokenizer(path, layout)
        config = hf_config.to_dict()
    else:
        config = models.read_config(path)
        if config.get("quantization_config"):
            raise CompressError(f"{spec} is already a quantized checkpoint")
        hf_config, tokenizer = models.hf_config(path), None
    arch = models.arch_for(config.get("model_type"), config.get("architectures"))
    if kind != "gguf" and arch.family != GENERIC:
        models.check_config(config, path, arch)
    if arch.family == GENERIC:
        raise CompressError(f"--stream needs an architecture description and '{config.get('model_type')}' has none")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, trust_remote_code=False)
    model.eval()
    models.prepare(model)
    if getattr(model, "_checkpoint_conversion_mapping", None):
        raise CompressError(f"--stream reads tensors under the model's own names; {config.get('model_type')} "
                            "checkpoints store them under others: run it in memory")
    from .conv1d import conv1d_modules
    if conv1d_modules(model):
        raise CompressError(f"--stream does not read {config.get('model_type')}'s Conv1D layers; run it in memory")
    arch = describe(arch, model, config)
    blocks = arch.get_blocks(model)
    source = GGUFTensors(path, arch.blocks, layout) if kind == "gguf" else SafetensorsFiles(path)
    st = Streamer(source, arch, len(blocks))
    block_prefix = f"{arch.blocks}."
    rest = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.is_meta and not n.startswith(block_prefix)]
    head = arch.lm_head + ".weight"
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    tensors = st.read([n for n in rest if not (tied and n == head and n not in source)])
    for n, t in tensors.items():
        _assign(model, n, t)
    if tied:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(block_prefix)]
    if left:
        raise CompressError(f"{path}: weights do not match the config (missing: {left[:3]})")
    if tokenizer is None:
        tokenizer = models.load_tokenizer(path)
    loaded = models.Loaded(model, tokenizer, arch, spec, path, "gguf" if kind == "gguf" else "hf")
    loaded.stream = st
    return loaded

"""Runs that survive a kill: the work folder beside the output.

After every finished block the runner records, in ``.<output name>.work/`` next to the output:

* ``block-<step>-<i>.safetensors``: the block's state (its packed modules included; the module
  kinds in the metadata), plus GGML tensors for GGUF outputs;
* ``inputs-<step>-<i>-<rank>.safetensors``: the block's outputs, i.e. the next block's inputs, one
  file per process (each its share of the windows, keyed by window index, so a run resumes with
  any number of processes);
* ``stats-<step>-<i>.safetensors``: the statistics observed in the block (with ``--save-stats``);
* ``record-<step>.json``: losses, fallbacks, schemes and method results so far;
* ``progress.json`` (written last, atomically): the fingerprint of model, recipe and calibration
  windows, and how many blocks of each step are done.

Re-running the same command continues after the last finished block; the result is byte-identical
to an uninterrupted run because every block is computed from exactly the saved state. A different
model, recipe or calibration set is refused (``--restart`` starts over). The folder is removed
when the output is complete.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calib import dist

from .errors import CompressError
from .fileio import atomic_file, atomic_text
from .formats import gptq_int, w8a8
from .formats.ggml_model import GGMLTensor
from .qlinear import QuantLinear, W8A8Linear, set_submodule
from .registry import RunRecord

PROGRESS = "progress.json"
GGML_PREFIX = "__ggml__/"


def work_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.work"


def model_fingerprint(path: Path) -> str:
    """Cheap identity of a model on disk: config, and each weight file's size, header and first and
    last MiB (hashing every byte of a 100 GB model would take minutes)."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                   if p.suffix in (".json", ".safetensors", ".gguf"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()


def tensor_fingerprint(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _module_kind(m) -> dict | None:
    if isinstance(m, QuantLinear):
        return {"kind": gptq_int.FORMAT_ID, "bits": m.bits, "groups": int(m.scales.shape[0]), "bias": m.bias is not None}
    if isinstance(m, W8A8Linear):
        return {"kind": w8a8.FORMAT_ID, "static": m.input_scale is not None, "bias": m.bias is not None}
    return None


def _skeleton(spec: dict, lin: torch.nn.Linear):
    if spec["kind"] == gptq_int.FORMAT_ID:
        return QuantLinear(lin.in_features, lin.out_features, spec["bits"], spec["groups"], spec["bias"])
    return W8A8Linear(lin.in_features, lin.out_features, spec["bias"], static=spec["static"])


def save_module_state(path: Path, root: torch.nn.Module, extra: dict | None = None) -> None:
    """``root``'s state with the kinds of its packed modules in the metadata (atomic)."""
    kinds = {n: k for n, m in root.named_modules() if (k := _module_kind(m)) is not None}
    tensors = {k: v.detach().cpu().contiguous() for k, v in root.state_dict().items()}
    tensors.update(extra or {})
    atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={"modules": json.dumps(kinds)}))


def load_module_state(path: Path, root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rebuild ``root``'s packed modules as saved and load its state (strict). Returns the extra tensors."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        kinds = json.loads((f.metadata() or {}).get("modules", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, spec in kinds.items():
        lin = root.get_submodule(name) if name else root
        if isinstance(lin, torch.nn.Linear):
            set_submodule(root, name, _skeleton(spec, lin))
    extra = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(GGML_PREFIX)]}
    dev = next(root.parameters(), next(root.buffers(), torch.empty(0))).device
    root.load_state_dict({k: v.to(dev) for k, v in tensors.items()}, strict=True)
    return extra


def _has_progress(prog: dict) -> bool:
    return any(st.get("blocks", 0) or st.get("done") for st in prog.get("steps", {}).values())


class WorkFolder:
    def __init__(self, out: Path, fingerprint: dict, restart: bool = False):
        """Under torch.distributed rank 0 checks, clears or creates the folder; the others then read
        its progress (only rank 0 writes anything but its own share of the block inputs)."""
        self.path = work_path(out)
        self.fingerprint = fingerprint
        if not dist.is_main():
            dist.barrier()
            self.progress = json.loads((self.path / PROGRESS).read_text())
            self.resumed = _has_progress(self.progress)
            return
        try:
            self._open(restart)
        finally:
            dist.barrier()

    def _open(self, restart: bool) -> None:
        fingerprint = self.fingerprint
        if restart and self.path.exists():
            shutil.rmtree(self.path)
        self.resumed = False
        if self.path.exists():
            try:
                prog = json.loads((self.path / PROGRESS).read_text())
            except (OSError, json.JSONDecodeError):
                raise CompressError(f"{self.path} holds no readable progress (an interrupted run's work folder); "
                                    "rerun with --restart to start over") from None
            if not _has_progress(prog):
                shutil.rmtree(self.path)         # nothing finished: nothing to resume
                prog = None
        if self.path.exists():
            old = prog.get("fingerprint", {})
            differs = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
            if differs:
                raise CompressError(f"{self.path} belongs to an interrupted run with a different "
                                    f"{', '.join(differs)}; rerun with --restart to start over")
            self.progress = prog
            self.resumed = _has_progress(prog)
        else:
            self.path.mkdir(parents=True)
            self.progress = {"fingerprint": fingerprint, "steps": {}}
            self._write_progress()

    # ------------------------------------------------------------------ progress
    def has_progress(self) -> bool:
        return _has_progress(self.progress)

    def _step(self, s: int) -> dict:
        return self.progress["steps"].setdefault(str(s), {"blocks": 0, "done": False})

    def _write_progress(self) -> None:
        if not dist.is_main():
            return
        atomic_text(self.path / PROGRESS, json.dumps(self.progress, indent=1, sort_keys=True))

    def step_done(self, s: int) -> bool:
        return bool(self._step(s)["done"])

    def resume_point(self, s: int, windows: list[int] | None = None) -> tuple[int, list[torch.Tensor] | None]:
        """The first block of step ``s`` to run, and the saved inputs of ``windows`` (global window
        indices: this process's share) to run it on (None without saved inputs)."""
        b = self._step(s)["blocks"]
        if not b or windows is None:
            return b, None
        files = sorted(self.path.glob(f"inputs-{s}-{b - 1}-*.safetensors"))
        found = {}
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                keys = set(fh.keys())
                found.update({w: fh.get_tensor(f"x{w}") for w in windows if f"x{w}" in keys})
        missing = [w for w in windows if w not in found]
        if missing:
            raise CompressError(f"{self.path} lacks the saved inputs of {len(missing)} calibration windows; "
                                "rerun with --restart to start over")
        return b, [found[w] for w in windows]

    # ------------------------------------------------------------------ saving
    def save_block(self, s: int, i: int, block, inputs, record: RunRecord, stats, prefix: str) -> None:
        """Save block ``i`` of step ``s`` (``prefix``: the block's full name and a dot; ``block``
        None for a streamed block, whose state is in its output shard)."""
        from calib.stats import save_stats
        rank, _ = dist.world()
        if inputs is not None:        # every process its own windows, keyed by global index
            xs = {f"x{w}": inputs.store[j] for j, w in enumerate(inputs.plan.windows)}
            atomic_file(self.path / f"inputs-{s}-{i}-{rank}.safetensors", lambda tmp: save_file(xs, str(tmp)))
        dist.barrier()                # every share is on disk before the progress says so
        saved = self._step(s).setdefault("stats_keys", [])
        new = {k: v for k, v in (stats.kept or {}).items() if k not in saved}
        if rank == 0 and block is not None:          # None: a streamed block, in its output shard already
            ggml = {f"{GGML_PREFIX}{k}": t.data for k, t in record.packed.items()
                    if isinstance(t, GGMLTensor) and k.startswith(prefix)}
            save_module_state(self.path / f"block-{s}-{i}.safetensors", block, ggml)
            if new:
                atomic_file(self.path / f"stats-{s}-{i}.safetensors", lambda tmp: save_stats(tmp, new))
        saved.extend(new)
        self._save_record(s, record)
        self._step(s)["blocks"] = i + 1
        self._write_progress()
        if rank == 0:
            for old in self.path.glob(f"inputs-{s}-{i - 1}-*.safetensors"):
                old.unlink()

    def save_blocks(self, s: int, model, arch) -> None:
        """Save every block of step ``s`` again (a method changed them after the last block, e.g. an
        end-to-end training phase)."""
        for i, block in enumerate(arch.get_blocks(model)):
            save_module_state(self.path / f"block-{s}-{i}.safetensors", block)

    def _save_record(self, s: int, record: RunRecord) -> None:
        if not dist.is_main():
            return
        ggml = {k: t.meta() for k, t in record.packed.items() if isinstance(t, GGMLTensor)}
        data = {**record.summary(), "packed": list(record.packed), "ggml": ggml}
        atomic_text(self.path / f"record-{s}.json", json.dumps(data))       # insertion order kept

    def finish_step(self, s: int, model, head: str | None, record: RunRecord) -> None:
        if head is not None and dist.is_main():
            save_module_state(self.path / f"head-{s}.safetensors", torch.nn.ModuleDict({"head": model.get_submodule(head)}))
        self._save_record(s, record)
        self._step(s)["done"] = True
        self._write_progress()

    # ------------------------------------------------------------------ restoring
    def restore(self, model, arch, steps: int, head: str) -> None:
        """Put the saved state of every block (the latest step that finished it) back into ``model``."""
        blocks = arch.get_blocks(model)
        for i in range(len(blocks)):
            for s in reversed(range(steps)):
                st = self._step(s)
                f = self.path / f"block-{s}-{i}.safetensors"
                if (st["done"] or i < st["blocks"]) and f.exists():
                    load_module_state(f, blocks[i])
                    break
        for s in reversed(range(steps)):
            f = self.path / f"head-{s}.safetensors"
            if self.step_done(s) and f.exists():
                holder = torch.nn.ModuleDict({"head": model.get_submodule(head)})
                load_module_state(f, holder)
                set_submodule(model, head, holder["head"])
                if holder["head"].weight is not model.get_input_embeddings().weight:   # pruning keeps it tied
                    model.config.tie_word_embeddings = False
                break

    def load_record(self, s: int, model, record: RunRecord, stats) -> None:
        """Fill ``record`` (and ``stats.kept``) with what step ``s`` had done before the kill."""
        from calib.stats import load_stats
        f = self.path / f"record-{s}.json"
        if not f.exists():
            return
        data = json.loads(f.read_text())
        record.schemes.update(data["schemes"])
        record.losses.update(data["losses"])
        record.fallbacks.update(data["fallbacks"])
        record.extra.update(data["extra"])
        ggml_files = {}
        for name in data["packed"]:
            if name in data["ggml"]:
                meta = data["ggml"][name]
                if not ggml_files:
                    for bf in sorted(self.path.glob(f"block-{s}-*.safetensors")):
                        with safe_open(str(bf), framework="pt", device="cpu") as fh:
                            for k in fh.keys():
                                if k.startswith(GGML_PREFIX):
                                    ggml_files[k[len(GGML_PREFIX):]] = fh.get_tensor(k)
                # the tensor's GGUF name (records before it was kept: the module's name, as they had it)
                record.packed[name] = GGMLTensor.from_meta({"name": name, **meta}, ggml_files[name])
            else:
                mod = model.get_submodule(name)
                if hasattr(mod, "packed") and not any(t.is_meta for t in mod.buffers()):   # else in a stream shard
                    record.packed[name] = mod.packed()
        if stats.kept is not None:
            for sf in sorted(self.path.glob(f"stats-{s}-*.safetensors")):
                stats.kept.update(load_stats(sf))

    def remove(self) -> None:
        if dist.is_main():
            shutil.rmtree(self.path, ignore_errors=True)

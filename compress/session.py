"""Run a recipe: check everything that can be checked before heavy work, run each compression
step through the sequential runner (resuming an interrupted run), write the output atomically,
then evaluate and export it, and report."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from calib import dist

from . import __version__, models
from .arch import GENERIC, check_calibration_length, path_label, supported_model_types
from .errors import CompressError
from .recipe import EvalStep, ExportStep, Recipe, Step
from .registry import RunRecord, StatsBook
from .resume import WorkFolder, model_fingerprint, tensor_fingerprint
from .runners.sequential import StepRun, run_step

log = logging.getLogger(__name__)


def _check_output(recipe: Recipe, out: Path) -> None:
    if recipe.output == "gguf":
        if out.suffix != ".gguf":
            raise CompressError(f"{recipe.steps[0].method} writes a GGUF file: the output must end with .gguf, got {out}")
        if out.is_dir():
            raise CompressError(f"{out} is a folder; {recipe.steps[0].method} writes a .gguf file")
    elif out.suffix == ".gguf":
        raise CompressError(f"{recipe.steps[0].method} writes a checkpoint folder, not a .gguf file ({out})")
    elif out.exists() and not out.is_dir():
        raise CompressError(f"{out} exists and is not a folder")


def check_processes(recipe: Recipe, procs: int) -> None:
    """Several processes split the calibration windows: every step must merge its statistics across
    them (methods whose search or training runs the block over the windows itself do not)."""
    if procs < 1:
        raise CompressError(f"--nproc must be at least 1, got {procs}")
    if procs == 1:
        return
    if not needs_windows(recipe):
        raise CompressError("--nproc splits the calibration windows between processes; this run has none to split "
                            "(a method without calibration, or --load-stats)")
    bad = [s.method for s in recipe.steps if s.cls.calibrated and not s.cls.distributed]
    if bad:
        raise CompressError(f"{', '.join(bad)} cannot split its calibration between processes (it searches or trains "
                            f"over the windows itself); run it with one process")
    try:
        dist.Plan(recipe.calib_spec().nsamples, procs - 1, procs)
    except ValueError as e:
        raise CompressError(str(e)) from None


def preflight(recipe: Recipe, spec: str, out: Path, data_dir=None, procs: int = 1) -> None:
    """Checks that need no weights: the model's architecture, the output path, the data and files,
    the memory of ``procs`` processes."""
    _check_output(recipe, out)
    check_processes(recipe, procs)
    kind, path = models.resolve(spec)
    if kind == "name" and models.is_cached(spec):
        kind = "folder"
    if kind == "folder":
        config = models.read_config(path)
        arch = models.arch_for(config.get("model_type"), config.get("architectures"))
        _check_generic(recipe, arch, config.get("model_type"))
        if recipe.stream and arch.family == GENERIC:
            raise CompressError(f"--stream needs an architecture description and '{config.get('model_type')}' has none")
        from .formats.sparse import is_sparse_config
        if config.get("quantization_config") and not is_sparse_config(config):
            raise CompressError(f"{spec} is already a quantized checkpoint")
        from .memory import checkpoint_numel
        _check_memory(recipe, config, checkpoint_numel(path, arch.blocks if recipe.stream else None), procs)
        if needs_windows(recipe):
            check_calibration_length(config, recipe.calib_spec().seqlen)
    elif kind == "gguf":
        from .formats.gguf_file import check_gguf
        from .memory import gguf_numel, gguf_sizes
        lay = check_gguf(path)
        _check_memory(recipe, gguf_sizes(lay), gguf_numel(lay, recipe.stream), procs)
    if needs_windows(recipe):
        from calib.data import resolve_text
        resolve_text(recipe.calib_spec().source, data_dir or recipe.calibration.get("data_dir"))
    if recipe.load_stats and not Path(recipe.load_stats).is_file():
        raise CompressError(f"statistics file {recipe.load_stats} does not exist")
    for s in recipe.steps:
        im = getattr(s.config, "imatrix", None)
        if im is not None and not Path(im).is_file():
            raise CompressError(f"importance matrix {im} does not exist")


def _check_memory(recipe: Recipe, config: dict, numel: int, procs: int) -> None:
    from calib.runner import DEFAULT_BUDGET

    from .memory import check, parse_size
    check(config, numel, recipe.steps, recipe.calib_spec() if needs_windows(recipe) else None,
          parse_size(recipe.max_memory) if recipe.max_memory else None, DEFAULT_BUDGET, procs, recipe.stream)


def _check_generic(recipe: Recipe, arch, model_type) -> None:
    """On the generic path (a model type without a description) only methods that need none run."""
    if arch.family != GENERIC:
        return
    bad = [s.method for s in recipe.steps if s.cls.needs_description or s.lm_head]
    if bad:
        raise CompressError(f"{', '.join(bad)}{' with --lm-head' if any(s.lm_head for s in recipe.steps) else ''} "
                            f"needs an architecture description and '{model_type}' has none (its generic path "
                            f"runs rtn, gptq, qat and unstructured pruning); described: {', '.join(supported_model_types())}")


def needs_windows(recipe: Recipe) -> bool:
    return any(s.cls.calibrated for s in recipe.steps) and not recipe.load_stats


def check_modules(loaded, step: Step, where: str) -> list[str]:
    """The modules ``step`` will compress, after checking each exists, is finite and fits its scheme."""
    arch, model = loaded.arch, loaded.model
    inst = step.cls(step.config)
    names = [n for n in arch.linear_names(model) if step.targets.selects(n)]
    if step.targets.targets and not names:
        raise CompressError(f"{where}: targets {list(step.targets.targets)} match no linear in the decoder blocks")
    if step.lm_head:
        names.append(arch.lm_head)
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, torch.nn.Linear):
            raise CompressError(f"{name} is a {type(lin).__name__}, not a linear layer")
        if not lin.weight.is_meta and not torch.isfinite(lin.weight).all():    # streamed: Streamer.check_finite
            raise CompressError(f"{name} has NaN or Inf weights")
        inst.check_module(name, lin, step.targets.override_for(name))
    inst.check_model(loaded, step.targets)
    return names


def compress_model(loaded, recipe: Recipe, out: Path | None = None, data_dir=None, restart: bool = False,
                   progress: bool = True, windows: torch.Tensor | None = None) -> dict:
    """Run the recipe's compression steps on ``loaded`` in place. With ``out``, progress is saved in
    the work folder beside it after every block (and an interrupted run resumes). Returns
    ``{"records": [RunRecord], "methods": [Method], "seconds": ..., "resumed": bool}``."""
    if loaded.kind == "packed":
        raise CompressError(f"{loaded.source} is already a quantized checkpoint")
    if recipe.output == "gguf":          # every tensor goes into the file: all must be finite
        from .export.gguf import HParams
        HParams.from_config(loaded.model.config)
        for name, p in loaded.model.named_parameters():
            if not p.is_meta and not torch.isfinite(p).all():      # streamed blocks: Streamer.check_finite
                raise CompressError(f"{name} has NaN or Inf weights")
    names = [check_modules(loaded, step, f"step {n} ({step.method})") for n, step in enumerate(recipe.steps, 1)]
    if loaded.stream is not None:
        loaded.stream.check_finite()
        loaded.stream.dtype, loaded.stream.compact = recipe.dtype, recipe.sparse_storage == "compact"
        loaded.stream.shards = recipe.output != "gguf"
        if not recipe.quantizes:            # pruned float modules: each block's shard in the sparse format
            from .formats.sparse import step_format
            step = recipe.steps[-1]
            inst = step.cls(step.config)
            loaded.stream.sparse = step_format(names[-1], lambda n: inst.scheme_for(n, step.targets.override_for(n)).nm)
    if windows is None and needs_windows(recipe):
        from calib.data import calibration_windows
        windows = calibration_windows(loaded.tokenizer, recipe.calib_spec(),
                                      data_dir or recipe.calibration.get("data_dir"))
    stats_loaded = None
    if recipe.load_stats:
        from calib.stats import load_stats
        try:
            stats_loaded = load_stats(recipe.load_stats)
        except (ValueError, OSError) as e:
            raise CompressError(f"cannot load statistics from {recipe.load_stats}: {e}") from None
    work = None
    # without calibration a run takes seconds per block, and a whole-model step is one pass: no resume
    if out is not None and needs_windows(recipe) and not any(s.cls.whole_model for s in recipe.steps):
        fp = {"model": model_fingerprint(loaded.path), "recipe": recipe.fingerprint(),
              "calibration": tensor_fingerprint(windows), "version": __version__}
        work = WorkFolder(out, fp, restart)
        if work.resumed:
            print(f"resuming the interrupted run from {work.path} (--restart starts over)", flush=True)
            work.restore(loaded.model, loaded.arch, len(recipe.steps), loaded.arch.lm_head)
    if loaded.stream is not None:
        if out is None:
            raise CompressError("a streamed model is compressed into an output folder")
        loaded.stream.open_staging(work.path if work is not None else None, Path(out))
    try:
        return _run_steps(loaded, recipe, work, windows, stats_loaded, progress)
    except BaseException:
        if loaded.stream is not None:
            loaded.stream.close()
        if work is not None and not work.has_progress():
            work.remove()           # nothing to resume: leave nothing behind
        raise


def _run_steps(loaded, recipe: Recipe, work, windows, stats_loaded, progress: bool) -> dict:
    t0 = time.perf_counter()
    records, methods = [], []
    for s, step in enumerate(recipe.steps):
        method = step.cls(step.config)
        calibrated = step.cls.calibrated
        stats = StatsBook(stats_loaded if calibrated else None, keep=bool(recipe.save_stats) and calibrated,
                          source=str(recipe.load_stats))
        record = RunRecord()
        run = StepRun(loaded, step.targets, method, record, stats, step.lm_head, recipe.device, progress,
                      pruned=frozenset(pruned_modules(loaded, records)))
        if work is not None:
            work.load_record(s, loaded.model, record, stats)
        if work is not None and work.step_done(s):
            if step.cls.output == "gguf":
                method.begin(run)
                method.finish(run)
        else:
            run_step(run, windows, work, s)
            if work is not None:
                work.finish_step(s, loaded.model, loaded.arch.lm_head if step.lm_head else None, record)
        if recipe.save_stats and stats.kept is not None and dist.is_main():
            from calib.stats import save_stats

            from .fileio import atomic_file
            atomic_file(Path(recipe.save_stats), lambda tmp: save_stats(tmp, stats.kept))
        records.append((record, run.state))
        methods.append(method)
    return {"records": records, "methods": methods, "seconds": time.perf_counter() - t0,
            "resumed": bool(work is not None and work.resumed), "work": work, "windows": windows}


def merged(records, field: str) -> dict:
    """One dict of every step's ``RunRecord.<field>`` (schemes, losses, fallbacks)."""
    out = {}
    for rec, _ in records:
        out.update(getattr(rec, field))
    return out


def merged_extra(loaded, records, key: str) -> dict:
    """``extra[key]`` (per-module sparsity, patterns) of a sparse input checkpoint and every step."""
    out = dict((loaded.quant or {}).get(key) or {}) if loaded.kind == "hf" else {}
    for rec, _ in records:
        out.update(rec.extra.get(key) or {})
    return out


def pruned_modules(loaded, records) -> set[str]:
    """Linears pruned by the input checkpoint or an earlier step: later steps keep their zeros."""
    return set(merged_extra(loaded, records, "sparsity"))


def save_output(loaded, recipe: Recipe, result: dict, out: Path, source: str) -> dict:
    """Write the compressed model: a packed checkpoint folder, or the GGUF file."""
    extra = {"source_model": source, "architecture": path_label(loaded.arch)}
    (rec, state), method = result["records"][0], result["methods"][0]
    if recipe.output == "gguf":
        from .export.gguf import save_ggml_model
        extra.update(method.metadata(rec))
        if method.calibrated and not recipe.load_stats:
            import json
            extra["calibration"] = json.dumps(recipe.calib_spec().to_dict())
        info = save_ggml_model(loaded, state["ggml"], out, extra)
        info.update(mix=state["ggml"].mix, pure=state["ggml"].pure, plan=[c.to_dict() for c in state["ggml"].plan.values()])
        return info
    from .checkpoint import quantization_config, save_packed
    steps = []
    for step, (r, _), m in zip(recipe.steps, result["records"], result["methods"]):
        steps.append({"method": step.method, "options": m.metadata(r), **step.targets.to_dict(),
                      "lm_head": step.lm_head})
    if needs_windows(recipe):
        extra["calibration"] = recipe.calib_spec().to_dict()
    if recipe.load_stats:
        extra["stats_loaded_from"] = str(recipe.load_stats)
    sparsity = merged_extra(loaded, result["records"], "sparsity")
    patterns = merged_extra(loaded, result["records"], "pattern")
    if any(s.cls.whole_model for s in recipe.steps):
        from .checkpoint import save_dense
        extra.update(method=recipe.steps[0].method, steps=steps, **result["records"][0][0].extra)
        info = save_dense(loaded, out, recipe.dtype, extra)
        info["structured"] = result["records"][0][0].extra.get("structured")
        return info
    if not recipe.quantizes:
        from .formats.sparse import save_sparse
        method = ",".join(s.method for s in recipe.steps)
        extra.update(method=method, steps=steps, fallbacks=merged(result["records"], "fallbacks"),
                     label=_sparse_label(sparsity, patterns))
        return save_sparse(loaded, out, sparsity, patterns, recipe.dtype, extra)
    if sparsity:
        extra.update(sparsity=sparsity, patterns=patterns)
    schemes = merged(result["records"], "schemes")
    extra.update(fallbacks=merged(result["records"], "fallbacks"), steps=steps)
    qc = quantization_config(schemes, ",".join(s.method for s in recipe.steps),
                             loaded.arch.linear_names(loaded.model), extra)
    compact = ()
    if recipe.sparse_storage == "compact" and qc.get("quant_method") == "gptq":
        compact = tuple(m for m in sparsity if m in schemes)
    save_packed(loaded, out, qc, recipe.dtype, compact)
    return {"out": str(out), "layers": len(schemes)}


def _sparse_label(sparsity: dict, patterns: dict) -> str:
    kinds = set(patterns.values())
    if len(kinds) == 1 and len(patterns) == len(sparsity):
        return kinds.pop()
    mean = sum(sparsity.values()) / max(1, len(sparsity))
    return f"{100 * mean:.1f}% sparse"


def run(recipe: Recipe, spec: str | None, out: Path, data_dir=None, restart: bool = False,
        progress: bool = True) -> dict:
    """Everything a recipe says, end to end; returns the report (also what ``compress run`` prints)."""
    spec = spec or recipe.model
    if not spec:
        raise CompressError("no model: give MODEL on the command line or 'model:' in the recipe")
    out = Path(out)
    rank = dist.init()
    procs = dist.world()[1]
    preflight(recipe, spec, out, data_dir, procs)
    t0 = time.perf_counter()
    if recipe.stream:
        from .stream import load as load_streamed
        loaded = load_streamed(spec)
    else:
        loaded = models.load(spec)
    result = compress_model(loaded, recipe, out, data_dir, restart, progress and rank == 0)
    try:
        if loaded.stream is not None and loaded.stream.shards:     # a GGUF's tensors are in the record already
            loaded.stream.load_rest(loaded.model)
        info = save_output(loaded, recipe, result, out, spec) if rank == 0 else {}
    finally:
        if loaded.stream is not None:
            loaded.stream.close()
    dist.barrier()                   # every process holds the same model; rank 0 has written it
    if result["work"] is not None:
        result["work"].remove()
    if rank != 0:
        return {"rank": rank}
    losses = merged(result["records"], "losses")
    steps = [{**s.to_dict(), "extra": r.extra} for s, (r, _) in zip(recipe.steps, result["records"])]
    report = {"model": spec, "out": str(out), "steps": steps,
              "compress_seconds": round(result["seconds"], 3), "resumed": result["resumed"],
              "modules": info["layers"] if recipe.output != "gguf" else info.get("tensors"),
              "total_loss": sum(losses.values()) if losses else None,
              "fallbacks": merged(result["records"], "fallbacks"),
              "architecture": path_label(loaded.arch), "output": info, "processes": procs,
              "streamed": loaded.stream is not None, "post": []}
    del loaded
    for p in recipe.post:
        report["post"].append(_post(p, out, spec, data_dir, progress))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _post(p, out: Path, spec: str, data_dir, progress: bool) -> dict:
    if isinstance(p, EvalStep):
        from .api import eval_ppl, write_json
        res = eval_ppl(str(out), p.protocol, p.max_windows, spec if p.base else None, data_dir, progress)
        if p.json:
            write_json(res, Path(p.json))
        return {"eval": {k: res.get(k) for k in ("protocol", "ppl", "kld", "top1", "base_ppl", "tokens", "seconds")}}
    assert isinstance(p, ExportStep)
    opts = dict(p.options)
    if p.format == "onnx":
        from .export.onnx import export_onnx
        level = opts.get("accuracy_level")
        export_onnx(str(out), Path(p.out), fmt=opts.get("fmt"), kv_cache=opts.get("kv_cache", True),
                    target=opts.get("target", "balanced"), accuracy_level=None if level is None else int(level),
                    lm_head_bits=opts.get("lm_head_bits"))
        return {"export": {"format": "onnx", "out": p.out}}
    from .api import export_gguf
    info = export_gguf(str(out), Path(p.out), opts.get("type"), imatrix=opts.get("imatrix"),
                       pure=bool(opts.get("pure", False)), progress=progress)
    return {"export": {"format": "gguf", "out": p.out, "type_counts": info["type_counts"]}}

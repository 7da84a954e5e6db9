"""`compress export`, `compress eval`, `compress generate`, `compress report`, `compress inspect`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import CompressError
from ..export.onnx_options import FORMATS, TARGETS
from . import SuiteGroup, _device, cli

GGUF_TYPE_HELP = ("llama.cpp type mix: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, "
                  "Q4_0, Q4_1, Q5_0, Q5_1, F16, F32")

@cli.group(name="export", cls=SuiteGroup)
def export_():
    """Export checkpoints to other runtimes' formats (one subcommand per format)."""


@export_.command("onnx")
@click.argument("checkpoint")
@click.option("--target", type=click.Choice(TARGETS), default="balanced", show_default=True,
              help="balanced: 4-bit weights in memory, fp32 activations (exact); decode: accuracy level 4, the "
                   "fastest decode; prefill: 4-bit file, weights expanded to fp32 when ONNX Runtime loads it "
                   "(fp32 speed on any CPU, fp32 memory).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="matmulnbits: com.microsoft::MatMulNBits (ONNX Runtime); qdq: opset-21 DequantizeLinear + MatMul. "
                   "[default: matmulnbits; qdq for --target prefill]")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
              help="Past/present key-value inputs and outputs for token-by-token generation.")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=None,
              help="MatMulNBits accuracy level: 0 keeps fp32 activations, 4 quantizes them to int8 (faster). "
                   "[default: the target's: 4 for decode, else 0]")
@click.option("--lm-head-bits", type=click.Choice(["4", "8"]), default=None,
              help="Also quantize lm_head (and a tied embedding) at export; changes the model, off by default.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
def export_onnx(checkpoint, target, fmt, kv_cache, accuracy_level, lm_head_bits, out):
    """Export CHECKPOINT (packed or unquantized) to ONNX for ONNX Runtime and other runtimes."""
    from ..export.onnx import export_onnx as run
    info = run(checkpoint, out, fmt=fmt, kv_cache=kv_cache, target=target,
               accuracy_level=int(accuracy_level) if accuracy_level is not None else None,
               lm_head_bits=int(lm_head_bits) if lm_head_bits else None)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    click.echo(f"wrote {out} ({info['format']}, target {target}, {size / 2**20:.1f} MiB)")


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
    from ..api import export_gguf as run
    info = run(checkpoint, out, gguf_type, imatrix=imatrix, pure=pure)
    counts = ", ".join(f"{t} x{n}" for t, n in sorted(info["type_counts"].items()))
    click.echo(f"wrote {info['out']} ({counts}; {info['bits_per_weight_matrices']:.3f} bpw in the matrices, "
               f"{info['size_bytes'] / 2**20:.2f} MiB, tokenizer from {info['tokenizer_from']})")
    if info.get("mapping"):
        click.echo(f"mapping: {json.dumps(info['mapping'])}", err=True)


@export_.command("compressed-tensors")
@click.argument("checkpoint")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the tensors left unquantized.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
def export_compressed_tensors(checkpoint, dtype, out):
    """Write the packed CHECKPOINT in the compressed-tensors layout that vLLM loads (pack-quantized for
    4/8-bit weight-only linears, int-quantized for W8A8)."""
    from ..export.compressed_tensors import export
    info = export(checkpoint, out, dtype)
    click.echo(f"wrote {info['out']} (compressed-tensors {info['format']}, {info['modules']} linears in "
               f"{info['groups']} config groups, {info['size_bytes'] / 2**20:.2f} MiB)")


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
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="Evaluate on this UTF-8 text file instead of a protocol (your own domain data).")
@click.option("--seqlen", type=int, default=None, help="--text: tokens per window  [default: 512]")
@click.option("--stride", type=int, default=None,
              help="--text: a window starts every N tokens (sliding windows; each token is scored once, with "
                   "the most context)  [default: --seqlen, non-overlapping]")
@click.option("--adapter", type=click.Path(path_type=Path), default=None,
              help="Apply this LoRA adapter folder (from `compress lora`) to the packed MODEL.")
def eval_ppl(model, protocol, max_windows, base, data_dir, json_out, runtime, text_file, seqlen, stride, adapter):
    """Perplexity and bits per byte of MODEL on a fixed protocol or a text file (and KL divergence to --base)."""
    from ..api import eval_ppl, write_json
    if runtime == "onnxruntime":
        if text_file is not None or adapter is not None:
            raise CompressError("--text and --adapter work with the torch runtime; ONNX Runtime evaluates the fixed "
                                "protocols on an exported folder")
        from ..runtime_onnx import eval_ppl_onnx
        res = eval_ppl_onnx(model, protocol, max_windows, base, data_dir)
    else:
        res = eval_ppl(model, protocol, max_windows, base, data_dir, text_file=str(text_file) if text_file else None,
                       seqlen=seqlen, stride=stride, adapter=str(adapter) if adapter else None)
    where = protocol if text_file is None else f"{text_file} (stride {res['stride']})"
    bpb = f", {res['bits_per_byte']:.4f} bits/byte" if res.get("bits_per_byte") is not None else ""
    line = f"{model}: ppl {res['ppl']:.4f}{bpb} on {where} ({res['tokens']} tokens, {res['seconds']:.1f} s)"
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
        from ..runtime_onnx import generate_text
        if not prompt:
            raise CompressError("--prompt must not be empty")
        res = generate_text(model, prompt, max_new_tokens, temperature, seed)
    else:
        from ..api import generate as run
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
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None,
              help="Also draw perplexity and KL divergence against bits per weight and file size (PNG, Pareto "
                   "front marked; needs matplotlib); the report embeds it.")
@click.option("--format", "fmt", type=click.Choice(["md", "html"]), default="md", show_default=True,
              help="Markdown, or one self-contained HTML page with the table and the plot.")
def report(results, out, max_ppl_increase, plot_out, fmt):
    """Compare evaluation results (JSON files from `compress eval ppl --json`)."""
    import os

    from evals import plot as plots
    from evals import report as rep

    from ..api import write_json
    from ..fileio import atomic_text
    if max_ppl_increase is not None and max_ppl_increase < 0:
        raise click.BadParameter("must be >= 0", param_hint="--max-ppl-increase")
    if plot_out is not None and plot_out.suffix.lower() != ".png":
        raise CompressError(f"--plot writes a PNG file: the name must end with .png, got {plot_out}")
    runs = [rep.read_run(p) for p in results]
    data = rep.build(runs)
    md = rep.markdown(data)
    if plot_out is not None:
        points = [{**r, "label": f"{r['scheme']}"} for r in data["rows"]]
        try:
            plots.plot(points, plot_out, f"{data['rows'][0]['protocol']}: quality against size")
        except plots.PlotError as e:
            raise CompressError(str(e)) from None
        md += f"\n![perplexity and KL divergence against size]({os.path.relpath(plot_out, out.parent)})\n"
    page = plots.html_page(md, plot_out, "compress report") if fmt == "html" else md
    atomic_text(out, page)
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

def _echo_structured(info: dict) -> None:
    b, a = info["widths_before"], info["widths_after"]
    click.echo(f"checkpoint      {info['path']}")
    click.echo(f"format          {info['format']} ({info['importance']} importance)")
    click.echo(f"parameters      {info['parameters_before']:,} -> {info['parameters_after']:,} "
               f"({info['parameters_after'] / info['parameters_before']:.3f}x); weights {info['weights_bytes'] / 2**20:.2f} MiB")
    for k in ("layers", "heads", "kv_heads", "head_dim", "mlp", "hidden"):
        click.echo(f"{k:15s} {b[k]} -> {a[k]}")
    click.echo(f"removed blocks  {', '.join(map(str, info['removed_layers'])) or 'none'}")


def _echo_sparse(info: dict) -> None:
    click.echo(f"checkpoint      {info['path']}")
    click.echo(f"format          {info['format']} (compressed-tensors layout) v{info['format_version']}")
    click.echo(f"method          {info['label']}")
    click.echo(f"size on disk    {info['size_bytes'] / 2**20:.2f} MiB (weights {info['weights_bytes'] / 2**20:.2f} MiB)")
    click.echo(f"pruned linears  {info['pruned_bytes'] / 2**20:.2f} MiB stored for {info['pruned_dense_bytes'] / 2**20:.2f} "
               f"MiB dense ({info['bytes_saved'] / 2**20:.2f} MiB saved)")
    if info.get("block_sparsity"):
        click.echo("block sparsity  " + " ".join(f"{s:.3f}" for s in info["block_sparsity"]))
    click.echo(f"{'layer':48s} {'shape':>12s} {'sparsity':>9s} {'pattern':>7s} {'stored':>8s}")
    for l in info["layers"]:
        shape = "x".join(map(str, l["shape"]))
        click.echo(f"{l['name']:48s} {shape:>12s} {100 * l['sparsity']:8.2f}% {l['pattern'] or '-':>7s} "
                   f"{l['bytes'] / l['dense_bytes']:7.3f}x")


@cli.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(checkpoint, as_json):
    """Show a packed checkpoint's scheme, format, size and per-layer summary."""
    from ..api import inspect as run
    info = run(checkpoint)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if "tensors" in info and "architecture" in info:
        return _echo_gguf(info)
    if "pruned_bytes" in info:
        return _echo_sparse(info)
    if info.get("method") == "structured":
        return _echo_structured(info)
    click.echo(f"checkpoint      {info['path']}")
    click.echo(f"format          {info['format']} v{info['format_version']}")
    click.echo(f"method/scheme   {info['label']}")
    click.echo(f"size on disk    {info['size_bytes'] / 2**20:.2f} MiB (weights {info['weights_bytes'] / 2**20:.2f} MiB)")
    click.echo(f"parameters      {info['parameters']:,}")
    click.echo(f"bits per weight {info['bits_per_weight_quantized']:.3f} (quantized linears), "
               f"{info['bits_per_weight_overall']:.3f} (whole file)")
    sparse = any(l.get("sparsity") for l in info["layers"])
    click.echo(f"{'layer':48s} {'shape':>12s} {'bits':>4s} {'groups':>6s} {'bpw':>6s}" + ("  sparsity" if sparse else ""))
    for l in info["layers"]:
        shape = "x".join(map(str, l["shape"]))
        click.echo(f"{l['name']:48s} {shape:>12s} {l['bits']:>4d} {l['groups']:>6d} {l['bits_per_weight']:>6.3f}"
                   + (f"  {100 * (l.get('sparsity') or 0):7.2f}%" if sparse else ""))

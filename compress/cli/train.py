"""`compress distill` and `compress lora`: training with the shared loop."""
from __future__ import annotations

from pathlib import Path

import click

from . import _with, cli

_data_options = [
    click.option("--data", "source", default="wikitext2", show_default=True,
                 help="Training text: a named set (wikitext2: WikiText-2 validation) or a UTF-8 text file."),
    click.option("--nsamples", type=int, default=256, show_default=True, help="Training windows drawn from the text."),
    click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per window."),
    click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                 help="Folder holding the named sets (default: $COMPRESS_DATA_DIR)."),
]


def _train_options(lr: float):
    """The loop's options (every training command has them; ``lr`` is the command's default)."""
    return _with([
        click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps."),
        click.option("--batch", type=int, default=8, show_default=True, help="Windows per step (the global batch)."),
        click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per step."),
        click.option("--lr", type=float, default=lr, show_default=True, help="Peak AdamW learning rate."),
        click.option("--warmup", type=float, default=0.05, show_default=True, help="Share of the steps warming up."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip (0: none)."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                     help="Forward/backward in float32 or under bfloat16 autocast (weights, gradients and "
                          "optimizer stay float32); auto: bf16 on CUDA, fp32 on CPU."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the window draw and data order."),
        click.option("--checkpoint-every", type=int, default=0, show_default=True,
                     help="Save a resumable checkpoint every N steps (0: only at the end)."),
        click.option("--eval-every", type=int, default=0, show_default=True,
                     help="Evaluate every N steps (0: at the end)."),
        click.option("--eval-windows", type=int, default=16, show_default=True,
                     help="wt2-quick windows evaluated before and after (0: no evaluation)."),
        click.option("--restart", is_flag=True, help="Discard an interrupted run's checkpoint and start over."),
        click.option("--report", "report_out", type=click.Path(path_type=Path), default=None,
                     help="Write the run's report (JSON) here."),
    ])


_kd_options = [
    click.option("--temperature", type=float, default=1.0, show_default=True),
    click.option("--divergence", type=click.Choice(["forward", "reverse", "mix"]), default="forward",
                 show_default=True, help="KL(teacher||student), KL(student||teacher) or their mean."),
]


def _spec(o: dict):
    """The TrainSpec of the loop options in ``o`` (checked before any loading)."""
    from ..errors import CompressError
    from ..train.loop import TrainSpec
    if o["eval_windows"] < 0:
        raise CompressError(f"--eval-windows must be >= 0, got {o['eval_windows']}")
    return TrainSpec(steps=o["steps"], lr=o["lr"], batch=o["batch"], accum=o["grad_accum"], warmup=o["warmup"],
                     weight_decay=o["weight_decay"], clip=o["clip"], seed=o["seed"],
                     checkpoint_every=o["checkpoint_every"], eval_every=o["eval_every"], precision=o["precision"])


def _finish(rep: dict, report_out, what: str) -> None:
    from ..api import write_json
    if "output" not in rep:
        return
    ev = ""
    if rep.get("eval_before"):
        ev = f"; {rep['eval_after']['protocol']} ppl {rep['eval_before']['ppl']:.2f} -> {rep['eval_after']['ppl']:.2f}"
    click.echo(f"wrote {rep['output']['out']} ({what}, {rep['steps']} steps, {rep['tokens']:,} tokens, "
               f"{rep['train_seconds']:.1f} s; loss {rep['loss_first']:.4f} -> {rep['loss_last']:.4f}{ev})")
    if report_out is not None:
        write_json(rep, report_out)


@cli.command()
@click.option("--teacher", required=True, help="The model to learn from (registered name, HF folder or .gguf).")
@click.option("--student", required=True, help="The float model that trains (e.g. a structured-pruned model).")
@_with(_data_options)
@_train_options(5e-5)
@_with(_kd_options)
@click.option("--ce-weight", type=float, default=0.0, show_default=True,
              help="Add this times the cross-entropy on the text.")
@click.option("--generate", type=int, default=0, show_default=True,
              help="Black-box: train with cross-entropy on N sequences the teacher generates from prompts drawn "
                   "from the text (cached for the next run) instead of on its distributions.")
@click.option("--prompt-tokens", type=int, default=32, show_default=True, help="--generate: tokens of each prompt.")
@click.option("--gen-temperature", type=float, default=1.0, show_default=True,
              help="--generate: the teacher's sampling temperature.")
@click.option("--hidden-weight", type=float, default=0.0, show_default=True,
              help="Add this times the hidden-state matching loss at mapped blocks (relative MSE, through a learned "
                   "projection where the widths differ).")
@click.option("--hidden-layers", default="auto", show_default=True, metavar="auto|S:T,...",
              help="--hidden-weight: the (student block, teacher block) pairs; auto: the blocks a structured-pruned "
                   "student kept, else spread evenly.")
@click.option("--teacher-topk", type=int, default=0, show_default=True,
              help="Run the teacher once over the training windows and cache its K largest logits per position "
                   "(reused by later runs; 0: run the teacher at every step).")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in the backward pass (less memory).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float32", show_default=True,
              help="Storage dtype of the output.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
def distill(teacher, student, source, nsamples, seqlen, data_dir, temperature, divergence, ce_weight, generate,
            prompt_tokens, gen_temperature, hidden_weight, hidden_layers, teacher_topk, grad_checkpointing, dtype, out,
            **loop):
    """Distill TEACHER into STUDENT: white-box (the KL divergence of the next-token distributions) on
    the training text, or black-box (--generate: cross-entropy on text the teacher generates); a
    killed run resumes from its last checkpoint. Under torchrun the processes split each batch."""
    from calib.data import CalibSpec

    from ..distill import DistillOptions, distill as run
    CalibSpec(source, nsamples, seqlen, loop["seed"])            # option checks before any loading
    spec = _spec(loop)
    opts = DistillOptions(source, nsamples, seqlen, temperature, divergence, ce_weight, grad_checkpointing,
                          loop["eval_windows"], dtype, generate, prompt_tokens, gen_temperature, teacher_topk,
                          hidden_weight, hidden_layers)
    rep = run(teacher, student, out, spec, opts, data_dir, loop["restart"])
    _finish(rep, loop["report_out"], rep["mode"])


@cli.command()
@click.argument("checkpoint")
@click.option("--rank", "--lora-rank", "rank", type=int, default=16, show_default=True, help="Adapter rank r.")
@click.option("--alpha", "--lora-alpha", "alpha", type=float, default=32.0, show_default=True,
              help="The update is scaled by alpha / r.")
@click.option("--dropout", "--lora-dropout", "dropout", type=float, default=0.0, show_default=True,
              help="Dropout on the adapters' input while training.")
@click.option("--targets", multiple=True, metavar="NAME|re:PATTERN",
              help="Packed linears that get adapters (repeatable; a short name such as q_proj matches every "
                   "block; default: all).")
@click.option("--teacher", default=None, help="Train on this model's next-token distributions instead of the text.")
@_with(_data_options)
@_train_options(2e-4)
@_with(_kd_options)
@click.option("--merge", is_flag=True,
              help="Write a packed checkpoint with the adapters merged and re-quantized on its grid instead of "
                   "the adapter.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output folder: a PEFT adapter (or, with --merge, a packed checkpoint).")
def lora(checkpoint, rank, alpha, dropout, targets, teacher, source, nsamples, seqlen, data_dir, temperature,
         divergence, merge, out, **loop):
    """Train low-rank adapters on CHECKPOINT (a packed gptq-int checkpoint, its weights frozen; QLoRA-style)
    on the training text or a teacher's distributions; write them as a PEFT adapter that
    `peft.PeftModel.from_pretrained` loads, or merged into the packed checkpoint. A killed run resumes."""
    from calib.data import CalibSpec

    from ..train.lora import LoRAOptions, run
    calib = CalibSpec(source, nsamples, seqlen, loop["seed"])
    spec = _spec(loop)
    opts = LoRAOptions(rank, alpha, dropout, tuple(targets), merge)
    rep = run(checkpoint, out, spec, opts, calib, teacher, temperature, divergence, loop["eval_windows"], data_dir,
              loop["restart"])
    _finish(rep, loop["report_out"], rep["mode"])

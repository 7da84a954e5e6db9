"""What every training command shares around the loop: the models' configs checked before any
weights are read, the process group under ``torchrun``, the training windows, the evaluation
before and after, and the work folder a killed run resumes from."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from calib import dist

from .. import models
from ..errors import CompressError
from .loop import Trainer, TrainSpec


def check_config(spec: str, role: str, quantized_ok: bool = False) -> dict:
    """The model's config.json, checked for this role (a causal LM of a described family; a float
    model unless ``quantized_ok``), read without its weights."""
    cfg = models.read_spec_config(spec)
    if not cfg:
        return cfg
    arch = (cfg.get("architectures") or [""])[0]
    if arch and not arch.endswith("ForCausalLM"):
        raise CompressError(f"the {role} {spec} is a {arch}, not a causal language model")
    models.arch_for(cfg.get("model_type"), cfg.get("architectures"))
    if cfg.get("quantization_config") and not quantized_ok:
        raise CompressError(f"the {role} {spec} is a quantized checkpoint; train its scales with "
                            "`compress qat --teacher` or adapters with `compress lora` instead")
    return cfg


def check_vocab(teacher_cfg: dict, student_cfg: dict) -> None:
    if teacher_cfg and student_cfg and teacher_cfg.get("vocab_size") != student_cfg.get("vocab_size"):
        raise CompressError(f"the teacher has a vocabulary of {teacher_cfg.get('vocab_size')} tokens, the student "
                            f"{student_cfg.get('vocab_size')}: distillation needs one vocabulary")


def check_output(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressError(f"{out} exists and is not a folder")
    if out.suffix == ".gguf":
        raise CompressError(f"training writes a folder, not a .gguf file ({out})")
    return out


def evaluator(model, tokenizer, n: int, data_dir):
    """Perplexity on the first ``n`` windows of wt2-quick (None when ``n`` is 0)."""
    if n == 0:
        return lambda: None
    from evals.data import PROTOCOLS, data_dir as resolve_data, read_text
    from evals.perplexity import evaluate, tokenize, windows
    proto = PROTOCOLS["wt2-quick"]
    wins = windows(tokenize(tokenizer, read_text(resolve_data(data_dir) / proto.file)), proto.seqlen,
                   min(n, proto.max_windows))

    def run():
        was = model.training
        model.eval()
        r = evaluate(model, wins, progress=False)
        model.train(was)
        return {"protocol": f"wt2-quick[:{wins.shape[0]}]", "ppl": r.ppl}
    return run


def train(params: dict, spec: TrainSpec, wins: torch.Tensor, loss_fn, out: Path, fingerprint: dict, evaluate,
          restart: bool, progress: bool, desc: str) -> dict:
    """Run the loop with its checkpoints in ``out``'s work folder; the losses, time and evaluations."""
    from ..resume import work_path
    rank = dist.world()[0]
    before = evaluate() if rank == 0 else None
    work = work_path(out)
    if restart and work.exists() and rank == 0:
        shutil.rmtree(work)
    t0 = time.perf_counter()
    hist = Trainer(params, spec, wins, loss_fn, work, fingerprint, eval_fn=evaluate, progress=progress,
                   desc=desc).run()
    result = {"steps": spec.steps, "tokens": spec.steps * spec.batch * wins.shape[1],
              "train_seconds": time.perf_counter() - t0, "loss_first": hist[0]["loss"],
              "loss_last": hist[-1]["loss"], "history": hist, "eval_before": before}
    if rank == 0:
        result["eval_after"] = evaluate()
    return result


def finish(out: Path) -> None:
    """After the output is written: drop the work folder (rank 0) and wait for every process."""
    from ..resume import work_path
    if dist.world()[0] == 0:
        shutil.rmtree(work_path(out), ignore_errors=True)
    dist.barrier()

"""Knowledge distillation: a student learns from a teacher, white-box (the teacher's next-token
distributions) or black-box (text the teacher generated).

The student (any float model the suite loads: a structured-pruned model, a smaller model of the same
tokenizer) trains every parameter on the divergence between the teacher's and its own
temperature-scaled distributions (:func:`compress.train.losses.kd_loss`: forward KL by default,
reverse or their mix), plus ``ce_weight`` times the cross-entropy on the text, over windows of the
training text (WikiText-2 validation by default, or a UTF-8 file), with the shared training loop:
a killed run resumes from its last checkpoint in ``.<output name>.work/`` beside the output.
Black-box (``generate`` > 0): the teacher continues prompts of ``prompt_tokens`` tokens drawn from the
training text by sampling (``gen_temperature``) to ``seqlen`` tokens; the student trains with
cross-entropy on those sequences. The generated text is cached (``generated/`` in the suite's cache
folder, keyed by the teacher, the prompts and the sampling options), so a second run reuses it.
Under ``torchrun`` the processes split every global batch (gloo on CPU, NCCL on GPU) and rank 0
writes the output.

Everything that needs no weights is checked first: both models' configs (a causal LM the suite
describes, one vocabulary), the text, the options and the output path.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import models
from .errors import CompressError
from .train.loop import Trainer, TrainSpec
from .train.losses import DIVERGENCES, lm_loss


@dataclass(frozen=True)
class DistillOptions:
    source: str = "wikitext2"       # training text: a named set or a UTF-8 file
    nsamples: int = 256             # training windows drawn from it
    seqlen: int = 512
    temperature: float = 1.0
    divergence: str = "forward"
    ce_weight: float = 0.0
    grad_checkpointing: bool = False
    eval_windows: int = 16          # wt2-quick windows evaluated before and after (0: none)
    dtype: str = "float32"
    generate: int = 0               # black-box: sequences the teacher generates (0: white-box)
    prompt_tokens: int = 32
    gen_temperature: float = 1.0

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise CompressError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if not self.temperature > 0:
            raise CompressError(f"--temperature must be > 0, got {self.temperature}")
        if self.ce_weight < 0 or self.eval_windows < 0 or self.generate < 0:
            raise CompressError("--ce-weight, --eval-windows and --generate must be >= 0")
        if self.generate and not 1 <= self.prompt_tokens < self.seqlen:
            raise CompressError(f"--prompt-tokens must be in [1, --seqlen), got {self.prompt_tokens}")
        if not self.gen_temperature > 0:
            raise CompressError(f"--gen-temperature must be > 0, got {self.gen_temperature}")


def _config(spec: str, role: str) -> dict:
    """The model's config.json, checked for this role, read without its weights."""
    cfg = models.read_spec_config(spec)
    if not cfg:
        return cfg
    arch = (cfg.get("architectures") or [""])[0]
    if arch and not arch.endswith("ForCausalLM"):
        raise CompressError(f"the {role} {spec} is a {arch}, not a causal language model")
    models.arch_for(cfg.get("model_type"), cfg.get("architectures"))
    if cfg.get("quantization_config") and role == "student":
        raise CompressError(f"the student {spec} is a quantized checkpoint; train its scales with "
                            "`compress qat --teacher` instead")
    return cfg


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def distill(teacher_spec: str, student_spec: str, out: Path, spec: TrainSpec, opts: DistillOptions,
            data_dir=None, restart: bool = False, progress: bool = True) -> dict:
    from calib.data import CalibSpec, calibration_windows, resolve_text

    from .checkpoint import save_dense
    from .resume import model_fingerprint, tensor_fingerprint, work_path

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressError(f"{out} exists and is not a folder")
    if out.suffix == ".gguf":
        raise CompressError(f"distillation writes a checkpoint folder, not a .gguf file ({out})")
    tcfg, scfg = _config(teacher_spec, "teacher"), _config(student_spec, "student")
    if tcfg and scfg and tcfg.get("vocab_size") != scfg.get("vocab_size"):
        raise CompressError(f"the teacher has a vocabulary of {tcfg.get('vocab_size')} tokens, the student "
                            f"{scfg.get('vocab_size')}: distillation needs one vocabulary")
    resolve_text(opts.source, data_dir)
    calib = CalibSpec(opts.source, opts.generate or opts.nsamples, opts.seqlen, spec.seed)

    _init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    teacher, student = models.load(teacher_spec).model.eval(), models.load(student_spec)
    if student.kind != "hf":
        raise CompressError(f"the student {student_spec} must be a float checkpoint folder")
    if teacher.config.vocab_size != student.model.config.vocab_size:
        raise CompressError("the teacher and the student have different vocabularies")
    wins = calibration_windows(student.tokenizer, calib, data_dir)
    if opts.generate:
        wins = generated(teacher, teacher_spec, wins, opts, spec.seed, progress and rank == 0)
        teacher = None                   # black-box: the teacher's text is all the student sees
    model = student.model
    if opts.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()

    evaluate = _evaluator(model, student.tokenizer, opts.eval_windows, data_dir)
    before = evaluate() if rank == 0 else None
    work = work_path(out)
    if restart and work.exists() and rank == 0:
        shutil.rmtree(work)
    fp = {"teacher": model_fingerprint(models.resolve(teacher_spec)[1]), "student": model_fingerprint(student.path),
          "windows": tensor_fingerprint(wins), "options": asdict(opts)}
    t0 = time.perf_counter()
    loss_fn = lm_loss(model, teacher, opts.temperature, opts.divergence, opts.ce_weight)
    trainer = Trainer(dict(model.named_parameters()), spec, wins, loss_fn, work, fp, eval_fn=evaluate,
                      progress=progress, desc="distill")
    hist = trainer.run()
    seconds = time.perf_counter() - t0
    model.eval()
    result = {"teacher": teacher_spec, "student": student_spec, "mode": "black-box" if opts.generate else "white-box",
              "steps": spec.steps,
              "tokens": spec.steps * spec.batch * opts.seqlen, "train_seconds": seconds,
              "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"], "history": hist,
              "eval_before": before, "spec": asdict(spec), "options": asdict(opts)}
    if rank == 0:
        result["eval_after"] = evaluate()
        meta = {"method": "distill", "mode": result["mode"], "teacher": teacher_spec, "student": student_spec,
                **{k: v for k, v in result.items() if k in ("steps", "tokens", "loss_first", "loss_last")},
                "options": asdict(opts), "train": asdict(spec)}
        result["output"] = save_dense(student, out, opts.dtype, meta)
        shutil.rmtree(work, ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def _evaluator(model, tokenizer, n: int, data_dir):
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


@torch.no_grad()
def generated(teacher, teacher_spec: str, wins: torch.Tensor, opts: DistillOptions, seed: int,
              progress: bool) -> torch.Tensor:
    """``(generate, seqlen)`` token sequences: each window's first ``prompt_tokens`` tokens continued
    by the teacher (sampling at ``gen_temperature``); read from the cache when this teacher already
    continued these prompts with these options."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from .fileio import atomic_file
    from .resume import model_fingerprint, tensor_fingerprint
    prompts = wins[:, :opts.prompt_tokens].contiguous()
    key = hashlib.sha256(json.dumps({
        "teacher": model_fingerprint(models.resolve(teacher_spec)[1]), "prompts": tensor_fingerprint(prompts),
        "seqlen": opts.seqlen, "temperature": opts.gen_temperature, "seed": seed}).encode()).hexdigest()[:32]
    path = models.cache_dir() / "generated" / f"{key}.safetensors"
    if path.is_file():
        print(f"reusing the teacher's generated text {path}", flush=True)
        return load_file(str(path))["ids"]
    torch.manual_seed(seed)
    eos = teacher.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    new = opts.seqlen - opts.prompt_tokens
    out = []
    for start in tqdm(range(0, prompts.shape[0], 8), desc="teacher generates", disable=not progress, leave=False):
        batch = prompts[start:start + 8]
        ids = teacher.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                               temperature=opts.gen_temperature, top_k=0, top_p=1.0, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=eos)
        out.append(ids[:, :opts.seqlen])
    ids = torch.cat(out).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(path, lambda tmp: save_file({"ids": ids}, str(tmp)))
    return ids

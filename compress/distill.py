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

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from calib import dist

from . import models
from .errors import CompressError
from .train import job
from .train.loop import TrainSpec
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
    teacher_topk: int = 0           # white-box: the teacher's top-k logits computed once and cached (0: every step)
    hidden_weight: float = 0.0      # white-box: add this times the hidden-state matching loss
    hidden_layers: str = "auto"     # its (student block, teacher block) pairs, see losses.layer_pairs

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
        if self.teacher_topk < 0:
            raise CompressError(f"--teacher-topk must be >= 0, got {self.teacher_topk}")
        if self.teacher_topk and self.generate:
            raise CompressError("--teacher-topk caches the teacher's logits for white-box distillation; "
                                "--generate trains on its text instead")
        if self.hidden_weight < 0:
            raise CompressError(f"--hidden-weight must be >= 0, got {self.hidden_weight}")
        if self.hidden_weight and (self.generate or self.teacher_topk):
            raise CompressError("--hidden-weight matches the teacher's hidden states, which neither --generate "
                                "nor --teacher-topk keeps")
        if self.teacher_topk and self.divergence != "forward":
            raise CompressError("--teacher-topk supports --divergence forward only (the student's mass outside "
                                "the teacher's top-k is unknown to a reverse KL)")


def distill(teacher_spec: str, student_spec: str, out: Path, spec: TrainSpec, opts: DistillOptions,
            data_dir=None, restart: bool = False, progress: bool = True) -> dict:
    from calib.data import CalibSpec, calibration_windows, resolve_text

    from .checkpoint import save_dense
    from .resume import model_fingerprint, tensor_fingerprint

    out = job.check_output(out)
    tcfg, scfg = job.check_config(teacher_spec, "teacher"), job.check_config(student_spec, "student")
    job.check_vocab(tcfg, scfg)
    if opts.hidden_weight and tcfg and scfg:               # an explicit layer map checked before any loading
        from .train.losses import layer_pairs
        layer_pairs(opts.hidden_layers, scfg["num_hidden_layers"], tcfg["num_hidden_layers"])
    resolve_text(opts.source, data_dir)
    calib = CalibSpec(opts.source, opts.generate or opts.nsamples, opts.seqlen, spec.seed)

    rank = dist.init()
    student = models.load(student_spec)
    if student.kind != "hf":
        raise CompressError(f"the student {student_spec} must be a float checkpoint folder")
    wins = calibration_windows(student.tokenizer, calib, data_dir)
    tfp = model_fingerprint(models.resolve(teacher_spec)[1])
    if opts.teacher_topk:
        teacher = _topk_teacher(teacher_spec, tfp, wins, opts.teacher_topk, rank, progress)
    else:
        teacher = models.load(teacher_spec).model.eval()
        if teacher.config.vocab_size != student.model.config.vocab_size:
            raise CompressError("the teacher and the student have different vocabularies")
    if opts.generate:
        wins = generated(teacher, tfp, wins, opts, spec.seed, progress and rank == 0)
        teacher = None                   # black-box: the teacher's text is all the student sees
    model = student.model
    if opts.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()

    fp = {"teacher": tfp, "student": model_fingerprint(student.path),
          "windows": tensor_fingerprint(wins), "options": asdict(opts)}
    params = dict(model.named_parameters())
    match = None
    if opts.hidden_weight:
        match = _hidden_match(teacher.config, model.config, opts.hidden_layers, spec.seed)
        params.update({f"hidden_match.{k}": p for k, p in match.named_parameters()})
    loss_fn = lm_loss(model, teacher, opts.temperature, opts.divergence, opts.ce_weight, match, opts.hidden_weight)
    res = job.train(params, spec, wins, loss_fn, out, fp,
                    job.evaluator(model, student.tokenizer, opts.eval_windows, data_dir), restart, progress, "distill")
    model.eval()
    result = {"teacher": teacher_spec, "student": student_spec, "mode": "black-box" if opts.generate else "white-box",
              **res, "spec": asdict(spec), "options": asdict(opts)}
    if rank == 0:
        meta = {"method": "distill", "mode": result["mode"], "teacher": teacher_spec, "student": student_spec,
                **{k: v for k, v in result.items() if k in ("steps", "tokens", "loss_first", "loss_last")},
                "options": asdict(opts), "train": asdict(spec)}
        result["output"] = save_dense(student, out, opts.dtype, meta)
    job.finish(out)
    return result


def _hidden_match(tcfg, scfg, spec: str, seed: int):
    """The hidden-state matching of ``--hidden-layers`` between the teacher's and the student's blocks."""
    from .train.losses import HiddenMatch, layer_pairs
    plan = ((getattr(scfg, "compress", None) or {}).get("structured") or {}).get("plan") or {}
    pairs = layer_pairs(spec, scfg.num_hidden_layers, tcfg.num_hidden_layers, plan.get("layers"))
    return HiddenMatch(pairs, scfg.hidden_size, tcfg.hidden_size, seed)


def _topk_teacher(teacher_spec: str, fingerprint: str, wins: torch.Tensor, k: int, rank: int, progress: bool):
    """The teacher's top-k logits of ``wins``: read from the cache, or computed once by rank 0."""
    from .train import topk
    path = topk.cache_path(fingerprint, wins, k)
    cached = topk.load_cached(path, wins)
    if cached is not None:
        if rank == 0:
            print(f"reusing the teacher's top-{k} logits {path}", flush=True)
        return cached
    if rank == 0:
        teacher = models.load(teacher_spec).model.eval()
        cached = topk.compute(teacher, wins, k, path, progress)
        del teacher
    dist.barrier()
    return cached if cached is not None else topk.load_cached(path, wins)


@torch.no_grad()
def generated(teacher, teacher_fingerprint: str, wins: torch.Tensor, opts: DistillOptions, seed: int,
              progress: bool) -> torch.Tensor:
    """``(generate, seqlen)`` token sequences: each window's first ``prompt_tokens`` tokens continued
    by the teacher (sampling at ``gen_temperature``); read from the cache when this teacher already
    continued these prompts with these options."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from .fileio import atomic_file
    from .resume import tensor_fingerprint
    prompts = wins[:, :opts.prompt_tokens].contiguous()
    path = models.cache_file("generated", {
        "teacher": teacher_fingerprint, "prompts": tensor_fingerprint(prompts), "seqlen": opts.seqlen,
        "temperature": opts.gen_temperature, "seed": seed}, ".safetensors")
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

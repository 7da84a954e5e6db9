"""llm-compressor's GPTQ or pruning on our model, our calibration windows and our evaluation windows.

Runs under the peer venv made by ``bench/peers/setup.sh llmcompressor`` (llmcompressor 0.14.0.1,
transformers 5.x, CPU torch), never under ours; bench/peers/llmcompressor.py launches it:

    ~/.cache/compress/peers/llmcompressor/bin/python bench/peers/llmcompressor_oneshot.py \\
        --model ~/.cache/compress/models/smollm2-135m --windows windows.safetensors \\
        --bits 4 --group-size 64 --asym --act-order static --damp 0.01 --out result.json
    ... llmcompressor_oneshot.py --modifier sparsegpt --sparsity 0.5 [--pattern 2:4] ...

``--windows`` is a safetensors file written by OUR side (``llmcompressor.write_windows``): int64
``calib`` (n, seqlen) and ``eval`` (m, seqlen_eval) token ids. Nothing is tokenized here:
transformers 5 builds a different tokenizer from our converted folder (docs/REFERENCE.md section 7).

1. ``oneshot(model, dataset=<exactly the n calib windows>, recipe=[modifier], pipeline=...)`` on
   the CPU in fp32 (no shuffling, batch 1, no truncation); the call is timed. ``--modifier gptq``:
   GPTQModifier; ``sparsegpt``/``wanda``: SparseGPTModifier/WandaPruningModifier (mask_structure
   "0:0" for unstructured, "N:M" for ``--pattern``), on the sequential pipeline; ``magnitude``:
   the mask creator of its MagnitudePruningModifier applied once (see ``magnitude_masks``).
2. Perplexity of the compressed model (compressed-tensors fake-quant forward for GPTQ) on the eval
   windows with our protocol (docs/REFERENCE.md section 3): no BOS, each window on its own,
   ppl = exp(sum NLL / predicted tokens), seqlen - 1 predicted tokens per window.

Act-order mapping (ours -> llm-compressor 0.14 / compressed-tensors 0.19 ``actorder``):
none -> None; static -> "static" (an alias of "weight"): columns processed by decreasing Hessian
diagonal, group grids fixed beforehand from the unquantized weights in their original column order;
weight -> "weight" (same thing); group -> "group", which compressed-tensors 0.19 has removed and
refuses ("actorder='group' has been removed").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# This folder also holds our llmcompressor.py (the launcher), which would shadow the package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

ACT_ORDER = {"none": None, "static": "static", "weight": "weight", "group": "group"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="our fp32 HF folder (safetensors)")
    p.add_argument("--windows", required=True, help="safetensors with int64 'calib' (n, L) and 'eval' (m, L')")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="-1: per output channel")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true")
    g.add_argument("--asym", dest="sym", action="store_false")
    p.set_defaults(sym=False)
    p.add_argument("--act-order", choices=sorted(ACT_ORDER), default="static")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQModifier.dampening_frac (its default: 0.01)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQModifier.block_size (its default: 128)")
    p.add_argument("--eval-base", action="store_true",
                   help="also evaluate the unquantized model first (\"base\" in the JSON: checks that this venv's "
                        "transformers gives our fp32 numbers)")
    p.add_argument("--modifier", choices=("gptq", "sparsegpt", "wanda", "magnitude"), default="gptq")
    p.add_argument("--sparsity", type=float, default=None, help="pruning: fraction of weights set to zero")
    p.add_argument("--pattern", default=None, help="pruning: N:M mask structure (e.g. 2:4)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--out", required=True, help="result JSON")
    return p.parse_args(argv)


def weight_args(a) -> dict:
    w = {"num_bits": a.bits, "type": "int", "symmetric": a.sym}
    if a.group_size == -1:
        w["strategy"] = "channel"
    else:
        w["strategy"] = "group"
        w["group_size"] = a.group_size
    if ACT_ORDER[a.act_order] is not None:
        w["actorder"] = ACT_ORDER[a.act_order]
    return w


def grid_check(model, bits: int) -> dict:
    """How many target linears carry a quantization scheme, and the most distinct values found
    in any one row-group of the first one (<= 2**bits if the weights really sit on the grid)."""
    import torch
    quantized = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None]
    out = {"quantized_linears": len(quantized)}
    if quantized:
        name, m = quantized[0]
        w = m.weight.detach()
        qa = m.quantization_scheme.weights
        gs = w.shape[1] if qa.group_size in (None, -1) else qa.group_size
        groups = w[:8, : (w.shape[1] // gs) * gs].reshape(8, -1, gs)
        out["first"] = name
        out["max_levels_per_group"] = int(max(len(torch.unique(groups[r, j]))
                                              for r in range(groups.shape[0]) for j in range(groups.shape[1])))
        out["levels_allowed"] = 2 ** bits
    return out


def pruning_modifier(a):
    """The pruning modifier of ``a.modifier`` at ``a.sparsity`` (or the N:M ``a.pattern``)."""
    if a.pattern:
        n, m = (int(x) for x in a.pattern.split(":"))
        sparsity, structure = (m - n) / m, a.pattern
    else:
        if a.sparsity is None:
            raise SystemExit("pruning needs --sparsity or --pattern")
        sparsity, structure = a.sparsity, "0:0"
    if a.modifier == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        return SparseGPTModifier(sparsity=sparsity, mask_structure=structure, block_size=a.block_size,
                                 dampening_frac=a.damp, targets=["Linear"], ignore=["lm_head"])
    if a.modifier == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier
        return WandaPruningModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"],
                                    ignore=["lm_head"])
    raise SystemExit(f"no oneshot modifier for {a.modifier}")


def magnitude_masks(model, a) -> None:
    """Magnitude pruning with llm-compressor's own mask creator. Its MagnitudePruningModifier is a
    training-time modifier: under ``oneshot`` it computes masks but applies them only at optimizer
    steps, so the weights stay dense; here the mask it would apply (its "unstructured" creator,
    the lowest |w| of each layer) is multiplied in directly. It has no N:M mask structure."""
    import torch
    from llmcompressor.modifiers.pruning.utils.pytorch import PruningMaskCreatorArgs, PruningMaskFactory
    if a.pattern or a.sparsity is None:
        raise SystemExit("llm-compressor's magnitude pruning has no N:M mask structure: give --sparsity")
    create = PruningMaskFactory.create_mask_creator("unstructured")
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                w = m.weight
                w.mul_(create(PruningMaskCreatorArgs(parameter=w, sparsity=a.sparsity, scores=w.abs())).to(w.dtype))


def sparsity_check(model) -> dict:
    """Measured zeros of the decoder blocks' linears (the pruned ones)."""
    import torch
    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return {"linears_sparsity": zeros / max(total, 1)}


def perplexity(model, wins):
    """Our protocol: each window alone, no BOS (ids used as given), NLL of tokens 1..L-1."""
    import torch
    nll_sum, tokens = 0.0, 0
    with torch.no_grad():
        for ids in wins:
            logits = model(input_ids=ids[None], use_cache=False).logits[0].float()[:-1]
            target = ids[1:]
            logp = torch.log_softmax(logits, dim=-1)
            nll_sum += float(-logp.gather(1, target[:, None]).sum())
            tokens += target.numel()
    return nll_sum, tokens


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # built first, so that options the library refuses (actorder="group") fail before any work
    modifier_actorder = ACT_ORDER[a.act_order]   # None must be explicit: the modifier's default is "static"
    if a.modifier == "gptq":
        recipe = [GPTQModifier(
            targets="Linear", ignore=["lm_head"],
            config_groups={"group_0": {"targets": ["Linear"], "weights": weight_args(a)}},
            actorder=modifier_actorder, dampening_frac=a.damp, block_size=a.block_size)]
    elif a.modifier != "magnitude":
        recipe = [pruning_modifier(a)]

    wins = load_file(a.windows)
    calib, evalw = wins["calib"], wins["eval"]
    for name, t in (("calib", calib), ("eval", evalw)):
        if t.dtype != torch.int64 or t.dim() != 2:
            raise SystemExit(f"{a.windows}: '{name}' must be int64 (n, seqlen), got {t.dtype} {tuple(t.shape)}")

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    for name, t in (("calib", calib), ("eval", evalw)):
        if int(t.max()) >= vocab or int(t.min()) < 0:
            raise SystemExit(f"{a.windows}: '{name}' holds ids outside [0, {vocab})")

    base = None
    if a.eval_base:
        tb = time.perf_counter()
        b_nll, b_tok = perplexity(model, evalw)
        base = {"ppl": math.exp(b_nll / b_tok), "nll_sum": b_nll, "tokens": b_tok,
                "seconds": time.perf_counter() - tb}

    n, seqlen = calib.shape
    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(),
                                     "attention_mask": torch.ones_like(calib).tolist()})

    t0 = time.perf_counter()
    if a.modifier == "magnitude":
        magnitude_masks(model, a)
    else:
        oneshot(model=model, dataset=ds, recipe=recipe, pipeline="sequential",
                num_calibration_samples=n, shuffle_calibration_samples=False, batch_size=1,
                max_seq_length=seqlen)
    seconds = time.perf_counter() - t0

    check = grid_check(model, a.bits) if a.modifier == "gptq" else sparsity_check(model)

    # evaluation: our protocol, each window alone, no BOS (the ids are used as given)
    t1 = time.perf_counter()
    nll_sum, tokens = perplexity(model, evalw)
    eval_seconds = time.perf_counter() - t1

    result = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds_quantize": seconds,
        "seconds_eval": eval_seconds,
        "ppl": math.exp(nll_sum / tokens),
        "nll_sum": nll_sum,
        "tokens": tokens,
        "eval_windows": int(evalw.shape[0]),
        "eval_seqlen": int(evalw.shape[1]),
        "calib_windows": int(n),
        "calib_seqlen": int(seqlen),
        "options": {
            "bits": a.bits, "group_size": a.group_size, "sym": a.sym, "act_order": a.act_order,
            "actorder_llmcompressor": modifier_actorder, "damp": a.damp, "block_size": a.block_size,
            "observer": "memoryless_minmax (weights' default)", "targets": "Linear", "ignore": ["lm_head"],
            "pipeline": "sequential", "propagate_error": True, "batch_size": 1,
            "weights": weight_args(a),
        },
        "base": base,
        "grid_check" if a.modifier == "gptq" else "sparsity_check": check,
        "modifier": a.modifier, "sparsity": a.sparsity, "pattern": a.pattern,
        "threads": torch.get_num_threads(),
        "model": str(Path(a.model).expanduser()),
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ppl", "seconds_quantize", "tokens", "threads")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python face of the suite: quantize, evaluate, inspect. The CLI calls these."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__, models
from .checkpoint import quantization_config, read_quant_meta, save_packed
from .errors import CompressError
from .methods import rtn
from .qlinear import QuantLinear, set_submodule
from .scheme import IntScheme

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
CALIBRATED = ("gptq",)


def check_weights(loaded: models.Loaded, scheme: IntScheme) -> list[str]:
    """Names of the block linears, after checking each is finite and fits the scheme."""
    names = loaded.arch.linear_names(loaded.model)
    for name in names:
        lin = loaded.model.get_submodule(name)
        if not isinstance(lin, torch.nn.Linear):
            raise CompressError(f"{name} is a {type(lin).__name__}, not a linear layer")
        if not torch.isfinite(lin.weight).all():
            raise CompressError(f"{name} has NaN or Inf weights")
        scheme.check_layer(lin.in_features, name)
    return names


def quantize(loaded: models.Loaded, scheme: IntScheme, method: str = "rtn", progress: bool = True,
             calib=None, data_dir=None, gptq=None, save_stats=None, load_stats=None,
             device: str = "cpu") -> dict:
    """Quantize the decoder-block linears of ``loaded.model`` in place; returns run metadata.

    Calibrated methods take ``calib`` (a :class:`calib.data.CalibSpec`), method options
    (``gptq``: :class:`compress.pipeline.GPTQOptions`) and may save/load their statistics.
    """
    if loaded.kind == "packed":
        raise CompressError(f"{loaded.source} is already a quantized checkpoint")
    if method not in METHODS:
        raise CompressError(f"unknown method '{method}'; available: {', '.join(METHODS)}")
    if method not in CALIBRATED:
        if scheme.act_order:
            raise CompressError("--act-order applies to GPTQ only")
        if save_stats or load_stats:
            raise CompressError(f"--save-stats/--load-stats apply to calibrated methods, not {method}")
    names = check_weights(loaded, scheme)
    if method in CALIBRATED:
        return _quantize_calibrated(loaded, scheme, method, progress, calib, data_dir, gptq,
                                    save_stats, load_stats, device)
    t0 = time.perf_counter()
    for name in tqdm(names, desc=f"{method} {scheme.describe()}", unit="layer", disable=not progress, leave=False):
        lin = loaded.model.get_submodule(name)
        packed = rtn.solve(lin.weight.detach(), scheme)
        set_submodule(loaded.model, name, QuantLinear.from_packed(packed, lin.bias))
    seconds = time.perf_counter() - t0
    return {"modules": names, "seconds": round(seconds, 3), "meta": {}}


def _quantize_calibrated(loaded, scheme, method, progress, calib, data_dir, gptq, save_stats, load_stats, device):
    from calib.data import CalibSpec, calibration_windows

    from .pipeline import GPTQOptions, gptq_model
    calib = calib or CalibSpec()
    gptq = gptq or GPTQOptions()
    t0 = time.perf_counter()
    windows = None if load_stats else calibration_windows(loaded.tokenizer, calib, data_dir)
    rec = gptq_model(loaded, scheme, windows, gptq, save_stats_path=save_stats, load_stats_path=load_stats,
                     device=device, progress=progress)
    seconds = time.perf_counter() - t0
    meta = {"calibration": None if load_stats else calib.to_dict(),
            "stats_loaded_from": str(load_stats) if load_stats else None,
            "damp": gptq.damp, "block_size": gptq.block_size, "static_groups": gptq.static_groups,
            "fallbacks": rec.fallbacks, "total_loss": sum(rec.losses.values())}
    return {"modules": list(rec.packed), "seconds": round(seconds, 3), "meta": meta}


def quantize_to_folder(model_spec: str, scheme: IntScheme, out: Path, method: str = "rtn",
                       dtype: str = "float16", progress: bool = True, **kwargs) -> dict:
    """Load ``model_spec``, quantize it with ``method`` and write a packed checkpoint to ``out``."""
    loaded = models.load(model_spec)
    info = quantize(loaded, scheme, method, progress, **kwargs)
    extra = {"source_model": model_spec, "quantize_seconds": info["seconds"], **info["meta"]}
    qc = quantization_config(scheme, method, info["modules"], extra)
    save_packed(loaded, Path(out), qc, dtype)
    return {"out": str(out), "layers": len(info["modules"]), "seconds": info["seconds"],
            "fallbacks": info["meta"].get("fallbacks", {})}


# --------------------------------------------------------------------------- inspection

def weight_stats(model: torch.nn.Module) -> dict:
    """Parameter counts and storage of quantized linears vs everything else."""
    q_params = q_bytes = 0
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            p = m.packed()
            n = m.in_features * m.out_features
            q_params += n
            q_bytes += p.nbytes()
            layers.append({"name": name, "shape": [m.out_features, m.in_features], "bits": m.bits,
                           "groups": int(m.scales.shape[0]), "bytes": p.nbytes(),
                           "bits_per_weight": 8 * p.nbytes() / n})
    return {"quantized_params": q_params, "quantized_bytes": q_bytes,
            "bits_per_weight": (8 * q_bytes / q_params) if q_params else None, "layers": layers}


def inspect(spec: str) -> dict:
    kind, path = models.resolve(spec)
    if kind != "folder":
        raise CompressError(f"inspect takes a checkpoint folder, got {spec}")
    config = models.read_config(path)
    if not config.get("quantization_config"):
        raise CompressError(f"{path} is not a quantized checkpoint (no quantization_config)")
    scheme, meta = read_quant_meta(config, path)
    loaded = models.load(str(path))
    stats = weight_stats(loaded.model)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    total_params = sum(p.numel() for p in loaded.model.parameters()) + stats["quantized_params"]
    weights_size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {
        "path": str(path), "format": meta["format"], "format_version": meta["format_version"],
        "method": meta.get("method"), "scheme": scheme.to_dict(), "label": meta.get("label"),
        "size_bytes": size, "weights_bytes": weights_size, "parameters": total_params,
        "bits_per_weight_quantized": stats["bits_per_weight"],
        "bits_per_weight_overall": 8 * weights_size / total_params,
        "layers": stats["layers"], "package_version": meta.get("package_version"),
        "fallbacks": meta.get("fallbacks"),
    }


# --------------------------------------------------------------------------- evaluation

def eval_ppl(model_spec: str, protocol: str = "wt2-quick", max_windows: int | None = None,
             base_spec: str | None = None, data_dir: str | None = None, progress: bool = True) -> dict:
    from evals.data import PROTOCOLS, data_dir as resolve_data, read_text
    from evals.perplexity import evaluate, tokenize, windows

    if protocol not in PROTOCOLS:
        raise CompressError(f"unknown protocol '{protocol}'; available: {', '.join(PROTOCOLS)}")
    if max_windows is not None and max_windows < 1:
        raise CompressError(f"--max-windows must be at least 1, got {max_windows}")
    proto = PROTOCOLS[protocol]
    loaded = models.load(model_spec)
    base = models.load(base_spec) if base_spec else None
    text = read_text(resolve_data(data_dir) / proto.file)
    tokens = tokenize(loaded.tokenizer, text)
    if base is not None:
        btokens = tokenize(base.tokenizer, text)
        if not torch.equal(tokens, btokens):
            raise CompressError(f"{model_spec} and {base_spec} tokenize the text differently; KL divergence needs one vocabulary")
    limit = proto.max_windows if max_windows is None else (
        max_windows if proto.max_windows is None else min(max_windows, proto.max_windows))
    wins = windows(tokens, proto.seqlen, limit)
    res = evaluate(loaded.model, wins, base.model if base else None, progress, desc=f"{protocol}")
    stats = weight_stats(loaded.model)
    out = {
        "model": model_spec, "path": str(loaded.path), "kind": loaded.kind,
        "scheme": loaded.scheme_label, "quantized": loaded.kind != "hf",
        "method": loaded.quant.get("method"), "protocol": protocol,
        "protocol_description": proto.description, "max_windows": max_windows,
        "text_tokens": int(tokens.numel()), **res.to_dict(),
        "bits_per_weight": stats["bits_per_weight"], "base": base_spec,
        "package_version": __version__, "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if loaded.kind == "packed":
        out["size_bytes"] = sum(f.stat().st_size for f in Path(loaded.path).glob("*.safetensors"))
    return out


def write_json(data: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- generation

def generate(model_spec: str, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
             device: str = "cpu") -> dict:
    """Decode ``max_new_tokens`` after ``prompt`` with the KV cache (greedy when temperature is 0)."""
    from kernels import dispatch
    if not prompt:
        raise CompressError("--prompt must not be empty")
    loaded = models.load(model_spec)
    model = loaded.model.to(device)
    ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    torch.manual_seed(seed)
    dispatch.reset_path_counts()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None, pad_token_id=loaded.tokenizer.eos_token_id)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return {"text": prompt + loaded.tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "token_ids": new.tolist(), "seconds": seconds, "tokens_per_second": new.numel() / seconds,
            "kernel_paths": dispatch.path_counts()}

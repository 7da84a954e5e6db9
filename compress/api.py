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
from .fileio import atomic_text
from .methods import rtn
from .qlinear import QuantLinear, W8A8Linear, set_submodule
from .scheme import IntScheme, W8A8Scheme

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant")
CALIBRATED = ("gptq", "awq", "awq+gptq", "smoothquant")
USES_GPTQ = ("gptq", "awq+gptq")      # methods that take GPTQOptions and act-order
LM_HEAD_METHODS = ("rtn", "gptq")     # methods that can also quantize the lm_head


def check_weights(loaded: models.Loaded, scheme: IntScheme, names: list[str] | None = None) -> list[str]:
    """Names of the block linears (or of ``names``), after checking each is finite and fits the scheme."""
    names = loaded.arch.linear_names(loaded.model) if names is None else list(names)
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
             device: str = "cpu", awq=None, smoothquant=None, lm_head: bool = False) -> dict:
    """Quantize the decoder-block linears of ``loaded.model`` in place; returns run metadata.

    ``lm_head`` (rtn and gptq) quantizes the lm_head too, with the same scheme; a tied input
    embedding is untied first and stays unquantized (:func:`compress.pipeline.untie_lm_head`).

    Calibrated methods take ``calib`` (a :class:`calib.data.CalibSpec`), method options
    (``gptq``: :class:`compress.pipeline.GPTQOptions` for gptq and awq+gptq; ``awq``:
    :class:`compress.methods.awq.AWQOptions`; ``smoothquant``:
    :class:`compress.methods.smoothquant.SmoothQuantOptions`) and may save/load their statistics.
    ``smoothquant`` takes a :class:`compress.scheme.W8A8Scheme`; the other methods an IntScheme.
    """
    if loaded.kind == "packed":
        raise CompressError(f"{loaded.source} is already a quantized checkpoint")
    if method not in METHODS:
        raise CompressError(f"unknown method '{method}'; available: {', '.join(METHODS)}")
    if (method == "smoothquant") != isinstance(scheme, W8A8Scheme):
        raise CompressError("smoothquant takes a W8A8 scheme (8-bit per-channel symmetric weights, int8 activations)"
                            if method == "smoothquant" else f"a W8A8 scheme needs --method smoothquant, not {method}")
    if scheme.act_order and method not in USES_GPTQ:
        raise CompressError(f"--act-order applies to GPTQ ({', '.join(USES_GPTQ)}), not to {method}")
    if gptq is not None and method not in USES_GPTQ:
        raise CompressError(f"GPTQ options apply to {', '.join(USES_GPTQ)}, not to {method}")
    if awq is not None and method not in ("awq", "awq+gptq"):
        raise CompressError(f"AWQ options apply to awq and awq+gptq, not to {method}")
    if smoothquant is not None and method != "smoothquant":
        raise CompressError(f"SmoothQuant options (--alpha, --act-scheme) apply to smoothquant, not to {method}")
    if method not in CALIBRATED:
        if save_stats or load_stats:
            raise CompressError(f"--save-stats/--load-stats apply to calibrated methods, not {method}")
    if lm_head and method not in LM_HEAD_METHODS:
        raise CompressError(f"--lm-head works with {', '.join(LM_HEAD_METHODS)}, not {method}")
    names = check_weights(loaded, scheme)
    if lm_head:
        names += check_weights(loaded, scheme, [loaded.arch.lm_head])
    if method in CALIBRATED:
        return _quantize_calibrated(loaded, scheme, method, progress, calib, data_dir, gptq,
                                    save_stats, load_stats, device, awq, smoothquant, lm_head)
    t0 = time.perf_counter()
    if lm_head:
        from .pipeline import untie_lm_head
        untie_lm_head(loaded)
    for name in tqdm(names, desc=f"{method} {scheme.describe()}", unit="layer", disable=not progress, leave=False):
        lin = loaded.model.get_submodule(name)
        packed = rtn.solve(lin.weight.detach(), scheme)
        set_submodule(loaded.model, name, QuantLinear.from_packed(packed, lin.bias))
    seconds = time.perf_counter() - t0
    return {"modules": names, "seconds": round(seconds, 3), "meta": {"lm_head": True} if lm_head else {}}


def _quantize_calibrated(loaded, scheme, method, progress, calib, data_dir, gptq, save_stats, load_stats, device,
                         awq=None, smoothquant=None, lm_head=False):
    """Every calibrated method: calibration windows, the sequential runner (compress.pipeline)."""
    from calib.data import CalibSpec, calibration_windows

    from .methods.awq import AWQOptions
    from .methods.smoothquant import SmoothQuantOptions
    from .pipeline import GPTQOptions, awq_model, gptq_model, smoothquant_model
    calib = calib or CalibSpec()
    if method in USES_GPTQ:
        gptq = gptq or GPTQOptions()
    t0 = time.perf_counter()
    windows = None if load_stats else calibration_windows(loaded.tokenizer, calib, data_dir)
    common = dict(save_stats_path=save_stats, load_stats_path=load_stats, device=device, progress=progress)
    if method == "gptq":
        rec = gptq_model(loaded, scheme, windows, gptq, lm_head=lm_head, **common)
    elif method in ("awq", "awq+gptq"):
        awq = awq or AWQOptions()
        rec = awq_model(loaded, scheme, windows, awq, gptq if method == "awq+gptq" else None, **common)
    else:
        smoothquant = smoothquant or SmoothQuantOptions()
        rec = smoothquant_model(loaded, scheme, windows, smoothquant, **common)
    seconds = time.perf_counter() - t0
    meta = {"calibration": None if load_stats else calib.to_dict(),
            "stats_loaded_from": str(load_stats) if load_stats else None,
            "fallbacks": rec.fallbacks, "total_loss": sum(rec.losses.values()) if rec.losses else None}
    if lm_head:
        meta["lm_head"] = True
    if method in USES_GPTQ:
        meta.update(damp=gptq.damp, block_size=gptq.block_size, static_groups=gptq.static_groups, grid=gptq.grid)
    if awq is not None:
        alphas = [a for a in rec.extra.get("awq_alphas", {}).values() if a is not None]
        meta["awq"] = {**rec.extra.get("awq_options", awq.to_dict()), "scaled_groups": len(alphas),
                       "mean_alpha": round(sum(alphas) / len(alphas), 4) if alphas else None}
    if smoothquant is not None:
        meta["smoothquant"] = {**smoothquant.to_dict(), "act_scheme": scheme.act_scheme,
                               "smoothed_groups": len(rec.extra.get("smoothed_groups", []))}
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
        if isinstance(m, (QuantLinear, W8A8Linear)):
            p = m.packed()
            n = m.in_features * m.out_features
            q_params += n
            q_bytes += p.nbytes()
            bits, groups = (8, 1) if isinstance(m, W8A8Linear) else (m.bits, int(m.scales.shape[0]))
            layers.append({"name": name, "shape": [m.out_features, m.in_features], "bits": bits,
                           "groups": groups, "bytes": p.nbytes(),
                           "bits_per_weight": 8 * p.nbytes() / n})
    return {"quantized_params": q_params, "quantized_bytes": q_bytes,
            "bits_per_weight": (8 * q_bytes / q_params) if q_params else None, "layers": layers}


def inspect(spec: str) -> dict:
    kind, path = models.resolve(spec)
    if kind == "gguf":
        from .export.gguf import inspect_gguf
        return inspect_gguf(path)
    if kind != "folder":
        raise CompressError(f"inspect takes a checkpoint folder or a .gguf file, got {spec}")
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
    elif loaded.kind == "gguf":
        from .export.gguf import inspect_gguf
        g = inspect_gguf(loaded.path)
        out.update(size_bytes=g["size_bytes"], bits_per_weight=g["bits_per_weight_matrices"],
                   gguf_file_type=g["file_type_name"], gguf_type_counts=g["type_counts"])
    return out


def write_json(data: dict, path: Path) -> None:
    atomic_text(path, json.dumps(data, indent=2, default=str) + "\n")


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


# --------------------------------------------------------------------------- GGUF (llama.cpp)

GGUF_METHODS = ("kquant", "gptq")


def _gguf_input(model_spec: str) -> models.Loaded:
    from .export.gguf import HParams
    loaded = models.load(model_spec)
    if loaded.kind == "packed":
        raise CompressError(f"{model_spec} is already a quantized checkpoint; "
                            "use `compress export gguf` to convert it")
    HParams.from_config(loaded.model.config)
    for name, p in loaded.model.named_parameters():
        if not torch.isfinite(p).all():
            raise CompressError(f"{name} has NaN or Inf weights")
    return loaded


def quantize_to_gguf(model_spec: str, out: Path, gguf_type: str, method: str = "kquant", imatrix=None,
                     pure: bool = False, calib=None, data_dir=None, damp: float = 0.01, device: str = "cpu",
                     progress: bool = True) -> dict:
    """Quantize ``model_spec`` with a llama.cpp type mix into a GGUF file ``out``.

    ``method`` "kquant": llama.cpp's quantizers (importance-weighted with an ``imatrix`` file);
    "gptq": GPTQ onto the same GGML grids (calibration ``calib``), see compress.methods.kquant.
    Returns a summary with the per-tensor plan.
    """
    from . import imatrix as imx
    from .export import gguf as gg
    from .methods.kquant import get_mix
    mix = get_mix(gguf_type).name
    if method not in GGUF_METHODS:
        raise CompressError(f"GGUF output (--type) works with --method {' or '.join(GGUF_METHODS)}, not {method}")
    if method == "gptq" and imatrix is not None:
        raise CompressError("--imatrix applies to --method kquant; GPTQ weighs errors with its own Hessian")
    if Path(out).suffix != ".gguf":
        raise CompressError(f"GGUF output must end with .gguf, got {out}")
    importance = imx.read(Path(imatrix)).by_module() if imatrix is not None else None
    loaded = _gguf_input(model_spec)
    t0 = time.perf_counter()
    extra = {"source_model": model_spec, "imatrix": Path(imatrix).name if imatrix is not None else None}
    if method == "kquant":
        gm = gg.build_rtn(loaded, mix, importance, pure, progress)
    else:
        from calib.data import CalibSpec, calibration_windows
        calib = calib or CalibSpec(seqlen=512)
        windows = calibration_windows(loaded.tokenizer, calib, data_dir)
        gm = gg.build_gptq(loaded, mix, windows, pure, damp, device, progress)
        extra.update(calibration=json.dumps(calib.to_dict()), damp=float(damp))
    seconds = time.perf_counter() - t0
    info = gg.save_ggml_model(loaded, gm, Path(out), extra)
    info.update(method=method, mix=mix, pure=pure, seconds=round(seconds, 3),
                plan=[c.to_dict() for c in gm.plan.values()], fallbacks_gptq=gm.meta.get("fallbacks", {}))
    return info


def compute_imatrix(model_spec: str, out: Path, calib=None, data_dir=None, process_output: bool = False,
                    fmt: str | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """llama.cpp-compatible importance matrix of ``model_spec`` (unquantized) on calibration text."""
    from calib.data import CalibSpec, calibration_windows

    from . import imatrix as imx
    out = Path(out)
    fmt = fmt or ("dat" if out.suffix == ".dat" else "gguf")
    if fmt not in ("gguf", "dat"):
        raise CompressError(f"--output-format must be gguf or dat, got {fmt}")
    calib = calib or CalibSpec(seqlen=512)
    loaded = models.load(model_spec)
    if loaded.kind == "packed":
        raise CompressError(f"{model_spec} is a quantized checkpoint; the importance matrix needs the unquantized model")
    t0 = time.perf_counter()
    windows = calibration_windows(loaded.tokenizer, calib, data_dir)
    im = imx.collect(loaded, windows, process_output=process_output, device=device, progress=progress,
                     dataset=calib.source)
    imx.write(out, im, fmt)
    return {"out": str(out), "format": fmt, "entries": len(im.sums), "chunks": im.chunk_count,
            "chunk_size": im.chunk_size, "seconds": round(time.perf_counter() - t0, 3)}


def export_gguf(spec: str, out: Path, gguf_type: str | None = None, imatrix=None, pure: bool = False,
                progress: bool = True) -> dict:
    """Convert a checkpoint (packed gptq-int, Hugging Face folder, registered name) to GGUF.

    gptq-int checkpoints map their integers directly onto a legacy GGML type (``gguf_type`` None:
    the natural one, see compress.export.gguf.auto_target; or Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 when the
    integers fit); any other ``gguf_type``, a mapping that does not fit, and unquantized models
    are (re-)quantized with llama.cpp's quantizers for that type mix (default F16 for
    unquantized models).
    """
    from . import imatrix as imx
    from .export import gguf as gg
    from .methods.kquant import get_mix
    mix = get_mix(gguf_type).name if gguf_type is not None else None
    if Path(out).suffix != ".gguf":
        raise CompressError(f"GGUF output must end with .gguf, got {out}")
    importance = imx.read(Path(imatrix)).by_module() if imatrix is not None else None
    loaded = models.load(spec)
    gg.HParams.from_config(loaded.model.config)
    t0 = time.perf_counter()
    how = None
    if loaded.kind == "packed" and (mix is None or (mix in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
                                                     and not pure and importance is None)):
        try:
            gm, how = gg.build_from_packed(loaded, mix)
        except CompressError as e:
            if mix is None:
                raise
            log.warning("%s; re-quantizing with %s", e, mix)
            how = {"requantized": str(e)}
            gm = gg.build_rtn(loaded, mix, importance, pure, progress)
    else:
        gm = gg.build_rtn(loaded, mix or "F16", importance, pure, progress)
        if loaded.kind == "packed":
            how = {"requantized": f"--type {mix}"}
    extra = {"source_model": spec, "imatrix": Path(imatrix).name if imatrix is not None else None}
    info = gg.save_ggml_model(loaded, gm, Path(out), extra)
    info.update(seconds=round(time.perf_counter() - t0, 3), mapping=how, source_kind=loaded.kind)
    return info

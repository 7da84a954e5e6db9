"""The Python face of the suite: quantize, evaluate, inspect. The CLI calls these."""
from __future__ import annotations

import json
import math
import logging
import sys
import time
from pathlib import Path

import torch

from . import __version__, models
from .checkpoint import read_quant_meta
from .errors import CompressError
from .fileio import atomic_text
from .qlinear import QuantLinear, W8A8Linear
from .solvers.masks import sparsity_of

log = logging.getLogger(__name__)



def make_step(method: str = "rtn", targets=(), ignore=(), overrides=(), lm_head: bool = False, **options):
    """One compression step: ``method`` from the registry with its ``options`` (validated by the
    method's config; an option of another method is refused), ``targets``/``ignore`` (names or
    ``re:`` patterns) and ``overrides`` (``[{"targets": [...], "bits": 8, ...}]``)."""
    from .recipe import Step
    d = {"method": method, **options}
    if targets:
        d["targets"] = list(targets)
    if ignore:
        d["ignore"] = list(ignore)
    if overrides:
        d["overrides"] = list(overrides)
    if lm_head:
        d["lm_head"] = True
    from .registry import REGISTRY
    return Step.from_dict(d, REGISTRY[method].kind if method in REGISTRY else "quantize")


def make_recipe(steps, calib=None, save_stats=None, load_stats=None, device: str = "cpu", dtype: str = "float16",
                model: str | None = None, post=()):
    from .recipe import Recipe
    if not isinstance(steps, (list, tuple)):
        steps = [steps]
    return Recipe(tuple(steps), tuple(post), model, calib.to_dict() if calib is not None else {}, dtype, device,
                  str(save_stats) if save_stats else None, str(load_stats) if load_stats else None)


def quantize(loaded: models.Loaded, method: str = "rtn", progress: bool = True, calib=None, data_dir=None,
             save_stats=None, load_stats=None, device: str = "cpu", **step) -> dict:
    """Compress ``loaded.model`` in place with one registered method; returns what the run did.

    ``step``: the method's options (``bits=4, group_size=128, act_order=True, ...``; see
    ``compress.registry.methods()[method].config``) and ``targets``, ``ignore``, ``overrides``,
    ``lm_head``. Calibrated methods take ``calib`` (a :class:`calib.data.CalibSpec`) and may save or
    load their statistics. GGUF-writing methods (kquant, kquant-gptq) leave the GGML tensors in the
    result's ``ggml`` (write them with :func:`compress.export.gguf.save_ggml_model`).
    """
    from .session import compress_model
    recipe = make_recipe(make_step(method, **step), calib, save_stats, load_stats, device)
    res = compress_model(loaded, recipe, None, data_dir, progress=progress)
    (rec, state), = res["records"]
    return {"modules": list(rec.packed), "seconds": round(res["seconds"], 3), "record": rec,
            "method": res["methods"][0], "ggml": state.get("ggml")}


def quantize_to_folder(model_spec: str, out: Path, method: str = "rtn", progress: bool = True, dtype: str = "float16",
                       calib=None, data_dir=None, save_stats=None, load_stats=None, device: str = "cpu",
                       restart: bool = False, **step) -> dict:
    """Load ``model_spec``, compress it with ``method`` and write the output (a packed checkpoint
    folder, or a .gguf file for GGUF methods) to ``out``; resumes an interrupted run."""
    from .session import run
    recipe = make_recipe(make_step(method, **step), calib, save_stats, load_stats, device, dtype)
    return run(recipe, model_spec, Path(out), data_dir, restart, progress)


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
                           "bits_per_weight": 8 * p.nbytes() / n,
                           "sparsity": sparsity_of(p.dequantize()) if isinstance(m, QuantLinear) else None})
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
    structured = (config.get("compress") or {}).get("structured")
    if not config.get("quantization_config") and structured:
        return {"path": str(path), "format": "dense (structured pruning)", "method": "structured",
                "weights_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")), **structured}
    if not config.get("quantization_config"):
        raise CompressError(f"{path} is not a quantized or pruned checkpoint (no quantization_config)")
    from .formats.sparse import inspect_sparse, is_sparse_config
    if is_sparse_config(config):
        return inspect_sparse(path, config)
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
             base_spec: str | None = None, data_dir: str | None = None, progress: bool = True,
             text_file: str | None = None, seqlen: int | None = None, stride: int | None = None,
             adapter: str | None = None) -> dict:
    """Perplexity (and bits per byte; KL divergence and top-1 agreement against ``base_spec``) on
    a fixed protocol, or on any UTF-8 ``text_file`` with windows of ``seqlen`` tokens every
    ``stride`` tokens (non-overlapping when ``stride`` is not given)."""
    import hashlib

    from evals.data import PROTOCOLS, data_dir as resolve_data, read_text
    from evals.perplexity import evaluate, predicted_bytes, strided_windows, tokenize, windows

    if max_windows is not None and max_windows < 1:
        raise CompressError(f"--max-windows must be at least 1, got {max_windows}")
    if text_file is None:
        if protocol not in PROTOCOLS:
            raise CompressError(f"unknown protocol '{protocol}'; available: {', '.join(PROTOCOLS)}")
        if seqlen is not None or stride is not None:
            raise CompressError("--seqlen and --stride apply to --text; a protocol fixes its windows")
        proto = PROTOCOLS[protocol]
        text_path = resolve_data(data_dir) / proto.file
    else:
        seqlen = 512 if seqlen is None else seqlen
        stride = seqlen if stride is None else stride
        if seqlen < 2:
            raise CompressError(f"--seqlen must be at least 2, got {seqlen}")
        if not 0 < stride <= seqlen:
            raise CompressError(f"--stride must be in [1, --seqlen = {seqlen}], got {stride}")
        text_path = Path(text_file)
    text = read_text(text_path)             # before any model is loaded
    loaded = models.load(model_spec)
    if adapter is not None:
        from .train.lora import load_adapter
        load_adapter(loaded.model, Path(adapter))
    base = models.load(base_spec) if base_spec else None
    tokens = tokenize(loaded.tokenizer, text)
    if base is not None:
        btokens = tokenize(base.tokenizer, text)
        if not torch.equal(tokens, btokens):
            raise CompressError(f"{model_spec} and {base_spec} tokenize the text differently; KL divergence needs one vocabulary")
    skip = None
    if text_file is None:
        limit = proto.max_windows if max_windows is None else (
            max_windows if proto.max_windows is None else min(max_windows, proto.max_windows))
        wins = windows(tokens, proto.seqlen, limit)
        description = proto.description
    else:
        wins, skip = strided_windows(tokens, seqlen, stride, max_windows)
        protocol = "text"
        description = (f"{text_path.name}, no BOS, {wins.shape[0]} windows of {seqlen} tokens every {stride} "
                       "tokens, each token scored once")
    from . import evalcache
    from .resume import model_fingerprint
    from evals.perplexity import from_windows
    fp = model_fingerprint(loaded.path) + (f"+{model_fingerprint(Path(adapter))}" if adapter else "")
    cached = evalcache.load(fp, wins, skip) if base is None else None
    if cached is not None:
        res = from_windows(cached["window_nll"], cached["tokens"], wins, cached["seconds"])
        if progress:
            print(f"reusing this model's per-window results on these windows ({cached['path']})", file=sys.stderr)
    else:
        res = evaluate(loaded.model, wins, base.model if base else None, progress, desc=f"{protocol}", skip=skip)
        evalcache.save(fp, wins, skip, res.window_nll, res.tokens, res.seconds)
        if base is not None:
            evalcache.save(model_fingerprint(base.path), wins, skip, res.base_window_nll, res.tokens, res.seconds)
    nbytes = predicted_bytes(loaded.tokenizer, wins, skip)
    stats = weight_stats(loaded.model)
    out = {
        "model": model_spec, "adapter": adapter, "path": str(loaded.path), "kind": loaded.kind,
        "scheme": loaded.scheme_label, "quantized": loaded.kind != "hf",
        "method": loaded.quant.get("method"), "protocol": protocol,
        "protocol_description": description, "max_windows": max_windows,
        "text_file": str(text_path), "text_sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
        "stride": stride if text_file is not None else None,
        "text_tokens": int(tokens.numel()), **res.to_dict(),
        "predicted_bytes": nbytes, "bits_per_byte": res.nll * res.tokens / math.log(2) / nbytes,
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
    from .formats.ggml_mix import get_mix
    mix = get_mix(gguf_type).name if gguf_type is not None else None
    if Path(out).suffix != ".gguf":
        raise CompressError(f"GGUF output must end with .gguf, got {out}")
    importance = imx.read(Path(imatrix)).importance() if imatrix is not None else None
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

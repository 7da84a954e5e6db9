"""Packed checkpoints (formats "gptq-int" and "w8a8-int8", version 2: a scheme per module;
version 1 still reads): atomic write and safetensors-only read.

The folder is a Hugging Face-style checkpoint: ``config.json`` with a ``quantization_config``
(GPTQ's for gptq-int, ``quant_method: "compress-w8a8"`` for w8a8-int8; both with a ``compress``
section holding this suite's metadata), ``model.safetensors`` and the tokenizer files.
See docs/FORMATS.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import __version__
from .errors import CompressError
from .fileio import publish_mode, save_safetensors
from .formats import gptq_int, w8a8
from .qlinear import QuantLinear, W8A8Linear, set_submodule
from .scheme import IntScheme, W8A8Scheme

WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
W8A8_QUANT_METHOD = "compress-w8a8"
# float tensors of quantized linears kept in their own dtype whatever --dtype says
_KEEP_DTYPE = (".scales", ".weight_scale", ".input_scale")


class AtomicFolder:
    """Write into a temporary sibling folder; rename onto ``dest`` only when complete."""

    def __init__(self, dest: Path, overwrite: bool = True):
        self.dest = Path(dest)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.dest.exists() and not self.overwrite:
            raise CompressError(f"{self.dest} already exists")
        if self.dest.exists() and not self.dest.is_dir():
            raise CompressError(f"{self.dest} exists and is not a folder")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.dest.parent, prefix=f".{self.dest.name}.tmp-"))
        return self.tmp

    def _publish_modes(self):
        publish_mode(self.tmp, directory=True)
        for f in self.tmp.rglob("*"):
            publish_mode(f, directory=f.is_dir())

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        self._publish_modes()
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        return False


def _default_scheme(schemes: dict[str, dict]) -> dict:
    """The most common per-module scheme (ties: the first module's)."""
    counts: dict[str, int] = {}
    for sc in schemes.values():
        k = json.dumps(sc, sort_keys=True)
        counts[k] = counts.get(k, 0) + 1
    return json.loads(max(counts, key=lambda k: (counts[k], -list(counts).index(k))))


def quantization_config(schemes: dict[str, dict], method: str, block_linears: list[str], extra: dict) -> dict:
    """The ``quantization_config`` runtimes read, with our metadata under ``compress``.

    ``schemes``: the scheme of every quantized module (full name -> scheme dict). gptq-int: GPTQ's
    config with the most common scheme at the top level and GPTQModel's ``dynamic`` rules for the
    modules that differ (``+:`` with their fields) or stay float among the block linears (``-:``);
    a W8A8 scheme: the "compress-w8a8" config of the w8a8-int8 format."""
    if not schemes:
        raise CompressError("nothing was quantized: the targets selected no module")
    default = _default_scheme(schemes)
    if "act_scheme" in default:
        return _w8a8_config(W8A8Scheme.from_dict(default), method, schemes, extra)
    scheme = IntScheme.from_dict(default)
    dynamic = {}
    for name, sc in schemes.items():
        if sc != default:
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": sc["bits"], "group_size": sc["group_size"],
                                                 "desc_act": sc["act_order"], "sym": sc["sym"]}
    for name in block_linears:
        if name not in schemes:
            dynamic[f"-:^{re.escape(name)}$"] = {}
    qc = {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": scheme.act_order,
        "sym": scheme.sym,
        "static_groups": any(st.get("options", {}).get("static_groups", False) for st in extra.get("steps", [])),
        "true_sequential": any(st.get("options", {}).get("true_sequential", False) for st in extra.get("steps", [])),
        "damp_percent": next((st["options"]["damp"] for st in extra.get("steps", []) if "damp" in st.get("options", {})),
                             0.01),
        "checkpoint_format": "gptq",
    }
    if dynamic:
        qc["dynamic"] = dynamic
    qc["compress"] = _suite_meta(gptq_int.FORMAT_ID, gptq_int.FORMAT_VERSION, scheme, method, schemes, extra)
    return qc


def _suite_meta(fmt: str, version, scheme, method: str, schemes: dict, extra: dict) -> dict:
    """The ``compress`` section both formats carry in their ``quantization_config``."""
    return {"format": fmt, "format_version": version, "method": method, "scheme": scheme.to_dict(),
            "label": f"{method} {scheme.describe()}" + (" (mixed)" if len({json.dumps(v, sort_keys=True)
                                                                          for v in schemes.values()}) > 1 else ""),
            "quantized_modules": list(schemes), "modules": schemes, "package_version": __version__, **extra}


def _w8a8_config(scheme: W8A8Scheme, method: str, schemes: dict, extra: dict) -> dict:
    dynamic = scheme.act_scheme == "dynamic"
    return {
        "quant_method": W8A8_QUANT_METHOD,
        "bits": 8,
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": dynamic,
                              "strategy": "token" if dynamic else "tensor"},
        "compress": _suite_meta(w8a8.FORMAT_ID, w8a8.FORMAT_VERSION, scheme, method, schemes, extra),
    }


def as_written(name: str, t: torch.Tensor, dtype: str) -> torch.Tensor:
    """One tensor as the checkpoint stores it: floats in ``dtype`` (quantization scales kept as
    they are), contiguous, on the CPU."""
    if t.is_floating_point() and not name.endswith(_KEEP_DTYPE):
        t = t.to(DTYPES[dtype])
    return t.detach().contiguous().cpu()


def model_tensors(loaded, dtype: str = "float16") -> dict[str, torch.Tensor]:
    """The model's state dict as written (:func:`as_written`), a tied lm_head left out; with
    ``loaded.stream`` only what is not in the streamed blocks' shards."""
    if dtype not in DTYPES:
        raise CompressError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    model = loaded.model
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = loaded.arch.lm_head + ".weight"
    blocks = f"{loaded.arch.blocks}." if loaded.stream is not None else None
    for name, t in model.state_dict().items():
        if (tied and name == head) or (blocks and name.startswith(blocks)):
            continue
        tensors[name] = as_written(name, t, dtype)
    from .conv1d import conv1d_modules, swap_orientation
    return swap_orientation(tensors, conv1d_modules(model))         # GPT-2's float layers as Conv1D stores them


def compact_tensors(tensors: dict, modules: dict) -> dict:
    """Replace the GPTQ tensors of each pruned module (``{full name: QuantLinear}``) in ``tensors``
    by its compact codes (format version 3); returns the added tensors."""
    added = {}
    for name, mod in modules.items():
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            tensors.pop(f"{name}.{k}")
        for k, v in gptq_int.compact(mod.packed()).items():
            added[f"{name}.{k}"] = v.contiguous()
    tensors.update(added)
    return added


def write_folder(loaded, out: Path, tensors: dict, cfg: dict, metadata: dict) -> Path:
    """Write ``config.json`` (``cfg``), ``model.safetensors`` (``tensors``, header ``metadata``),
    the generation config and the tokenizer to ``out``, atomically. A streamed model's blocks are
    already in shards: they are moved in and ``tensors`` becomes the last shard."""
    model = loaded.model
    with AtomicFolder(out) as tmp:
        if loaded.stream is not None:
            loaded.stream.finish(tmp, tensors, metadata)
        else:
            save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", **metadata})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            from .models import save_tokenizer
            save_tokenizer(loaded.tokenizer, tmp)
    return out


def save_dense(loaded, out: Path, dtype: str, meta: dict) -> dict:
    """Write ``loaded``'s float model as a plain checkpoint folder (what ``from_pretrained`` reads),
    with the suite's record of how it was made under ``compress`` in ``config.json``."""
    from . import __version__
    tensors = model_tensors(loaded, dtype)
    cfg = loaded.model.config.to_dict()
    cfg.pop("compress", None)
    cfg["torch_dtype"] = dtype
    cfg["compress"] = {**meta, "package_version": __version__}
    write_folder(loaded, out, tensors, cfg, {})
    return {"out": str(out), "layers": len(loaded.arch.linear_names(loaded.model)),
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def save_packed(loaded, out: Path, qconfig: dict, dtype: str = "float16", compact: tuple = ()) -> Path:
    """Write the model held by ``loaded`` (its linears already replaced by QuantLinear) to ``out``;
    the modules named in ``compact`` (pruned ones) store their codes compactly (format version 3)."""
    tensors = model_tensors(loaded, dtype)
    if compact:
        compact_tensors(tensors, {n: loaded.model.get_submodule(n) for n in compact if f"{n}.qweight" in tensors})
        qconfig = dict(qconfig, compress=dict(qconfig["compress"], format_version=gptq_int.COMPACT_VERSION,
                                              compact_modules=sorted(compact)))
    cfg = loaded.model.config.to_dict()
    cfg["quantization_config"] = qconfig
    cfg["torch_dtype"] = dtype
    fmt = (qconfig.get("compress") or {})
    return write_folder(loaded, out, tensors, cfg, {
        "compress_format": fmt.get("format", gptq_int.FORMAT_ID),
        "compress_format_version": str(fmt.get("format_version", gptq_int.FORMAT_VERSION))})


# quant_method -> (format id, readable versions, scheme class)
_FORMATS = {"gptq": (gptq_int.FORMAT_ID, gptq_int.READABLE_VERSIONS, IntScheme),
            W8A8_QUANT_METHOD: (w8a8.FORMAT_ID, w8a8.READABLE_VERSIONS, W8A8Scheme)}
# GPTQ's top-level quantization_config keys and the scheme field each must agree with
_GPTQ_TOP = (("bits", "bits"), ("group_size", "group_size"), ("sym", "sym"), ("desc_act", "act_order"))


def read_quant_meta(config: dict, path: Path) -> tuple[IntScheme, dict]:
    """The checkpoint's default scheme and its ``compress`` metadata, with ``meta["modules"]``
    (full name -> scheme object) for every quantized module; refuses any disagreement between the
    config's top-level fields, its ``dynamic`` rules and the per-module records."""
    qc = config.get("quantization_config") or {}
    meta = qc.get("compress")
    if qc.get("quant_method") not in _FORMATS or not isinstance(meta, dict):
        raise CompressError(f"{path}: quantization_config is not a checkpoint this suite wrote "
                            f"(quant_method={qc.get('quant_method')!r})")
    fmt, versions, scheme_cls = _FORMATS[qc["quant_method"]]
    if meta.get("format") != fmt:
        raise CompressError(f"{path}: unsupported packed format {meta.get('format')!r}")
    version = meta.get("format_version")
    if version not in versions:
        raise CompressError(f"{path}: format version {version} is not supported "
                            f"(this version reads {', '.join(map(str, versions))})")
    try:
        scheme = scheme_cls.from_dict(meta["scheme"])
        names = list(meta["quantized_modules"])
        records = meta.get("modules") if version >= 2 else {n: meta["scheme"] for n in names}
        if not isinstance(records, dict) or sorted(records) != sorted(names):
            raise CompressError(f"{path}: the per-module scheme records do not list the quantized modules")
        modules = {n: scheme_cls.from_dict(sc) for n, sc in records.items()}
    except CompressError as e:
        raise CompressError(f"{path}: config.json: {e}") from None
    except (KeyError, TypeError) as e:
        raise CompressError(f"{path}: config.json: incomplete quantization metadata ({e})") from None
    if scheme_cls is IntScheme:
        for top, field in _GPTQ_TOP:
            if qc.get(top) != getattr(scheme, field):
                raise CompressError(f"{path}: config.json says {top} = {qc.get(top)!r} but the checkpoint was "
                                    f"written with {field} = {getattr(scheme, field)!r}")
        dynamic = qc.get("dynamic") or {}
        for name, sc in modules.items():
            rule = dynamic.get(f"+:^{re.escape(name)}$")
            want = None if sc.key() == scheme.key() else {"bits": sc.bits, "group_size": sc.group_size,
                                                           "desc_act": sc.act_order, "sym": sc.sym}
            if rule != want:
                raise CompressError(f"{path}: config.json's dynamic rule for {name} ({rule}) disagrees with "
                                    f"its recorded scheme {sc.describe()}")
        extra_rules = [k for k in dynamic if k.startswith("+:") and not any(
            k == f"+:^{re.escape(n)}$" for n in modules)]
        if extra_rules:
            raise CompressError(f"{path}: config.json's dynamic rule {extra_rules[0]} names no quantized module")
    meta = dict(meta)
    meta["modules"] = modules
    return scheme, meta


def load_packed(path: Path, source: str):
    """Build the model from config.json, swap in QuantLinear modules, load the safetensors."""
    from .arch import describe
    from .models import Loaded, arch_for, load_tokenizer, read_config

    config_dict = read_config(path)
    arch = arch_for(config_dict.get("model_type"), config_dict.get("architectures"))
    scheme, meta = read_quant_meta(config_dict, path)
    state = read_state(path)
    model, config = empty_model(path)
    arch = describe(arch, model, config_dict)
    compact_modules = set(meta.get("compact_modules") or [])
    if compact_modules - set(meta["modules"]):
        raise CompressError(f"{path}: compact_modules names a module that is not quantized")
    for name, mscheme in meta["modules"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"{path}: the config has no module {name}") from None
        if not isinstance(lin, torch.nn.Linear):
            raise CompressError(f"{path}: {name} is a {type(lin).__name__} in the model, not a linear layer")
        prefix = name + "."
        if isinstance(mscheme, W8A8Scheme):
            set_submodule(model, name, _load_w8a8(state, prefix, lin, mscheme, name, path))
            continue
        compact = name in compact_modules
        try:
            t = {k: state.pop(prefix + k) for k in (gptq_int.COMPACT_TENSORS if compact else
                                                    ("qweight", "qzeros", "scales", "g_idx"))}
        except KeyError as e:
            raise CompressError(f"{path}: tensor {e.args[0]} of {name} is missing") from None
        bias = state.pop(prefix + "bias", None)
        if compact:
            try:
                p = gptq_int.from_compact(t, mscheme.bits, lin.in_features, lin.out_features, name)
            except (ValueError, RuntimeError) as e:
                raise CompressError(f"{path}: {str(e).splitlines()[0]}") from None
        else:
            p = gptq_int.from_tensors(t, mscheme.bits, lin.in_features, lin.out_features)
        _check_packed_shapes(p, mscheme, name, path)
        set_submodule(model, name, QuantLinear.from_packed(p, bias))
    fill_model(model, config, state, arch, set(meta["quantized_modules"]), path)
    quant = dict(meta)
    quant["scheme_obj"] = scheme
    return Loaded(model, load_tokenizer(path), arch, source, path, "packed", quant)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    from .models import safetensors_files
    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise CompressError(f"corrupt safetensors file {f}: {str(e).splitlines()[0]}") from None
    return state


def empty_model(path: Path):
    """The float32 model ``config.json`` describes, without its quantization config or weights."""
    from transformers import AutoModelForCausalLM

    from .compat import no_init_weights
    from .models import hf_config, prepare
    config = hf_config(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    return prepare(model), config


def fill_model(model, config, state: dict, arch, replaced: set, path: Path) -> None:
    """Load the remaining float tensors; every weight the model has must be there (those of the
    modules in ``replaced`` and a tied lm_head excepted), and nothing else."""
    from .conv1d import conv1d_modules, swap_orientation
    state = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}
    swap_orientation(state, conv1d_modules(model))                    # stored as Conv1D, held as Linear
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = arch.lm_head + ".weight"
    missing = [m for m in missing if m.rpartition(".")[0] not in replaced
               and not (m == head and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise CompressError(f"{path}: weights do not match the config "
                            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()


def load_sparse(path: Path, source: str):
    """A sparse float checkpoint (compressed-tensors sparse-bitmask / sparse-24-bitmask), decoded
    to the dense model (the same weights as the pruned model that was saved)."""
    from .formats import sparse
    from .arch import describe
    from .models import Loaded, arch_for, load_tokenizer, read_config
    config_dict = read_config(path)
    arch = arch_for(config_dict.get("model_type"), config_dict.get("architectures"))
    fmt, meta = sparse.read_sparse_meta(config_dict, path)
    state, modules = sparse.decode_state(read_state(path), fmt, path)
    model, config = empty_model(path)
    arch = describe(arch, model, config_dict)
    fill_model(model, config, state, arch, set(), path)
    info = {"format": fmt, "method": meta.get("method"), "sparsity": meta.get("sparsity") or {},
            "patterns": meta.get("patterns") or {}, "sparse_modules": modules,
            "label": f"{meta.get('method', 'sparse')} {meta.get('label', fmt)}",
            "source_model": meta.get("source_model")}
    return Loaded(model, load_tokenizer(path), arch, source, path, "hf", info)


def _load_w8a8(state: dict, prefix: str, lin, scheme: W8A8Scheme, name: str, path: Path) -> W8A8Linear:
    keys = ("weight", "weight_scale") + (("input_scale",) if scheme.act_scheme == "static" else ())
    try:
        t = {k: state.pop(prefix + k) for k in keys}
    except KeyError as e:
        raise CompressError(f"{path}: tensor {e.args[0]} of {name} is missing") from None
    if prefix + "input_scale" in state and scheme.act_scheme != "static":
        raise CompressError(f"{path}: {name}.input_scale present but the activation scheme is dynamic")
    bias = state.pop(prefix + "bias", None)
    p = w8a8.from_tensors(t, lin.in_features, lin.out_features)
    bad = w8a8.check_shapes(p, scheme.act_scheme == "static")
    if bad:
        raise CompressError(f"{path}: {name}.{bad}")
    return W8A8Linear.from_packed(p, bias)


def _check_packed_shapes(p: gptq_int.PackedInt, scheme: IntScheme, name: str, path: Path) -> None:
    k, n = p.in_features, p.out_features
    want = {
        "qweight": (gptq_int.packed_words(k, p.bits), n),
        "qzeros": (scheme.groups(k), gptq_int.packed_words(n, p.bits)),
        "scales": (scheme.groups(k), n),
        "g_idx": (k,),
    }
    for key, shape in want.items():
        got = tuple(getattr(p, key).shape)
        if got != shape:
            raise CompressError(f"{path}: {name}.{key} has shape {got}, expected {shape}")
    if p.qweight.dtype != torch.int32 or p.qzeros.dtype != torch.int32 or p.g_idx.dtype != torch.int32:
        raise CompressError(f"{path}: {name} packed tensors must be int32")
    g = p.g_idx.to(torch.int64)
    if int(g.min()) < 0 or int(g.max()) >= scheme.groups(k):
        raise CompressError(f"{path}: {name}.g_idx refers to a group outside 0..{scheme.groups(k) - 1}")
    if not scheme.act_order and not torch.equal(g, torch.arange(k) // scheme.effective_group(k)):
        raise CompressError(f"{path}: {name}.g_idx does not follow group size {scheme.group_size} "
                            "(the checkpoint says act-order is off)")

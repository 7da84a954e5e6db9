"""GGUF export: llama.cpp's model file, written with gguf-py's ``GGUFWriter``.

A written file holds

* the architecture metadata llama.cpp's loader reads for ``llama`` (context/embedding/feed-forward
  lengths, block count, head counts, rope base and dimension count, RMS epsilon, vocab size,
  ``general.file_type``, ``general.quantization_version``);
* the tokenizer: copied key for key from the model's original GGUF when there is one (a
  registered model's ``source.gguf``, a ``.gguf`` input, or the source named by a packed
  checkpoint), otherwise derived from ``tokenizer.json`` (byte-level BPE only: ``gpt2`` model,
  tokens, token types, merges, bos/eos/unk/pad ids, ``add_bos_token``);
* every tensor under llama.cpp's name (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``,
  ``output`` only when the embeddings are not tied), with llama.cpp's query/key row permutation
  (the one ``convert_hf_to_gguf.py`` applies for the llama arch and transformers' GGUF loader
  undoes); 1-D tensors float32, 2-D tensors in their GGML type;
* this suite's own keys under ``compress.*`` (method, mix, per-tensor notes), which llama.cpp ignores.

Files are written to a temporary sibling and renamed into place when complete. docs/GGUF.md
describes the mapping and the exporter's choices.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import CompressError
from ..fileio import atomic_file
from ..formats.ggml_mix import FLOAT_TYPES, MIXES, TensorChoice, get_mix, select_types
from ..formats.ggml_model import GGMLModel, GGMLTensor, bits_per_weight, quantize_model_rtn
from ..formats.gguf_file import read_gguf_layout
from ..formats.ggml_codec import CODECS, pack_codes
from .gguf_arch import (HParams, as_stored, expert_index, file_order, gguf_arch, gguf_name, hf_name, is_gguf_name,
                        neox_qkv, permute_qk)
from .gguf_meta import KV, model_metadata, tokenizer_metadata

log = logging.getLogger(__name__)
# ggml type name -> the llama_ftype a file made mostly of it carries
_FTYPE_OF_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                  "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}
FTYPE_NAMES = {m.ftype: m.name for m in MIXES.values()}



def model_tensors(model, arch) -> dict[str, torch.Tensor]:
    """GGUF-named float tensors of a (float or dequantized) model, in llama.cpp's file order;
    ``output.weight`` only when the embeddings are not tied."""
    hp_tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    from ..qlinear import QuantLinear, W8A8Linear
    quant = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}
    state = dict(model.state_dict())
    for name, m in quant.items():
        for k in [k for k in state if k.startswith(name + ".")]:
            if k != name + ".bias":
                state.pop(k)
        state[name + ".weight"] = m.dequantize(torch.float32)
    a = gguf_arch(model.config)
    experts: dict[str, list] = {}
    for k, v in state.items():
        if hp_tied and k == arch.lm_head + ".weight":
            continue
        if not v.is_floating_point():
            raise CompressError(f"tensor {k} is not a float tensor; cannot export it to GGUF")
        g, t = gguf_name(k, arch.blocks, a), as_stored(k, v.detach().to(torch.float32).cpu(), a)
        e = expert_index(k)
        if e is None:
            out[g] = t
        else:
            experts.setdefault(g, []).append((e, t))
    for g, parts in experts.items():             # llama.cpp's (experts, rows, cols), in expert order
        out[g] = torch.stack([t for _, t in sorted(parts, key=lambda p: p[0])])
    return dict(sorted(out.items(), key=lambda kv: file_order(kv[0])))


class StreamedTensors(Mapping):
    """:func:`model_tensors` of a streamed model (:mod:`compress.stream`): the same GGUF names in
    the same order, each tensor taken from the model when its block is in memory, else read from
    the checkpoint's files when asked for (one at a time)."""

    def __init__(self, model, arch, stream):
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        names = [k for k in model.state_dict(keep_vars=True) if not (tied and k == arch.lm_head + ".weight")]
        self.model, self.stream = model, stream
        a = self.arch = gguf_arch(model.config)
        if any(expert_index(k) is not None for k in names):
            raise CompressError("--stream does not write a mixture of experts' stacked GGUF tensors; run it in memory")
        self.names = dict(sorted(((gguf_name(k, arch.blocks, a), k) for k in names), key=lambda kv: file_order(kv[0])))

    def _tensor(self, hf: str) -> torch.Tensor:
        mod, _, leaf = hf.rpartition(".")
        return getattr(self.model.get_submodule(mod) if mod else self.model, leaf)

    def shapes(self) -> dict[str, tuple]:
        """Every tensor's shape, from the model (its ``meta`` tensors have them): nothing is read."""
        return {g: tuple(self._tensor(hf).shape) for g, hf in self.names.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        hf = self.names[name]
        t = self._tensor(hf)
        if t.is_meta:
            t = self.stream.read([hf])[hf]
        return as_stored(hf, t.detach().to(torch.float32).cpu(), self.arch)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------------------------
# writing and reading
# --------------------------------------------------------------------------------------------

def _np(t: GGMLTensor) -> np.ndarray:
    d = t.data.detach().cpu().contiguous()
    if t.type == "F32":
        return d.to(torch.float32).numpy()
    if t.type == "F16":
        return d.to(torch.float16).numpy()
    return d.to(torch.uint8).numpy()


def write_gguf(path: Path, kvs: list[KV], tensors: list[GGMLTensor], hp: HParams, progress: bool = False) -> Path:
    """Write a GGUF atomically (temporary sibling, then rename). ``tensors`` hold rows in Hugging
    Face order; q/k rows are permuted here as llama.cpp's converter does."""
    import gguf
    path = Path(path)
    if path.suffix != ".gguf":
        raise CompressError(f"GGUF output must end with .gguf, got {path}")

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), hp.arch)
        for kv in kvs:
            if kv.key == "general.architecture":
                continue
            w.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)
        for t in tensors:
            data = t.data
            if hp.permuted and re.search(r"\.attn_q\.(weight|bias)$", t.name):
                data = permute_qk(data, hp.n_head, hp.n_head)
            elif hp.permuted and re.search(r"\.attn_k\.(weight|bias)$", t.name):
                data = permute_qk(data, hp.n_head, hp.n_head_kv)
            elif hp.arch == "gptneox" and re.search(r"\.attn_qkv\.(weight|bias)$", t.name):
                data = neox_qkv(data, hp.n_head)
            arr = _np(GGMLTensor(t.name, t.type, t.shape, data))
            if t.type in FLOAT_TYPES:
                w.add_tensor(t.name, arr)
            else:
                w.add_tensor(t.name, arr, raw_dtype=gguf.GGMLQuantizationType[t.type])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()

    return atomic_file(path, write)


def inspect_gguf(path: Path) -> dict:
    """Per-tensor types, sizes and bits per weight of a GGUF file, plus this suite's notes."""
    from gguf import GGUFReader
    path = Path(path)
    read_gguf_layout(path)               # structure only: inspect shows any GGUF that is intact
    r = GGUFReader(str(path))

    def val(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:
            return default

    notes = {}
    for item in val("compress.tensor_notes", []) or []:
        name, _, note = item.partition("=")
        notes[name] = note
    tensors = []
    q_bytes = q_params = all_bytes = all_params = 0
    counts: dict[str, int] = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]      # (rows, cols)
        n = int(math.prod(shape))
        nbytes = int(t.n_bytes)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": shape, "bytes": nbytes,
                        "bits_per_weight": 8 * nbytes / n if n else None, "note": notes.get(t.name, "")})
        all_bytes += nbytes
        all_params += n
        if len(shape) >= 2:
            q_bytes += nbytes
            q_params += n
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    ft = val("general.file_type")
    return {
        "path": str(path), "size_bytes": path.stat().st_size, "architecture": val("general.architecture"),
        "name": val("general.name"), "file_type": ft, "file_type_name": FTYPE_NAMES.get(ft, str(ft)),
        "method": val("compress.method"), "mix": val("compress.mix"), "pure": val("compress.pure"),
        "imatrix": val("compress.imatrix"), "parameters": all_params,
        "bits_per_weight_matrices": 8 * q_bytes / q_params if q_params else None,
        "bits_per_weight_overall": 8 * all_bytes / all_params if all_params else None,
        "type_counts": counts, "tensors": tensors,
    }


# --------------------------------------------------------------------------------------------
# building GGUFs from models and checkpoints
# --------------------------------------------------------------------------------------------

def plan_types(tensors: Mapping[str, torch.Tensor], mix: str, hp: HParams, pure: bool, has_imatrix: bool):
    shapes = (tensors.shapes() if isinstance(tensors, StreamedTensors)       # no tensor read to plan
              else {n: tuple(t.shape) for n, t in tensors.items()})
    return select_types(shapes.items(), mix, n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head_kv,
                        pure=pure, has_imatrix=has_imatrix, n_expert=hp.n_expert)


def _notes(tensors: list[GGMLTensor]) -> list[str]:
    return [f"{t.name}={t.note}" for t in tensors if t.note]


def build_rtn(loaded, mix: str, importance: dict[str, torch.Tensor] | None = None, pure: bool = False,
              progress: bool = True) -> GGMLModel:
    """llama.cpp's quantization of ``loaded`` (its float or dequantized weights) with a mix."""
    hp = HParams.from_config(loaded.model.config)
    floats = model_tensors(loaded.model, loaded.arch)
    imp = gguf_importance(importance, floats, hp.arch)
    if importance is not None and not imp:
        raise CompressError("the importance matrix has no entry for any tensor of this model")
    plan = plan_types(floats, mix, hp, pure, bool(imp))
    tensors = quantize_model_rtn(floats, plan, imp, progress)
    return GGMLModel(tensors, get_mix(mix).name, pure, "kquant", plan)


def gguf_importance(importance, floats, arch: str = "llama") -> dict[str, torch.Tensor]:
    """Importance keyed by GGUF tensor name, from {our module name or GGUF name: (K,)}."""
    out = {}
    for k, v in (importance or {}).items():
        try:
            name = k if is_gguf_name(k) else gguf_name(k + ".weight", arch=arch)
        except CompressError:           # a tensor this model does not have: left out, as below
            continue
        if name in floats and floats[name].dim() > 2:      # stacked experts: one importance per expert
            continue
        if name in floats:
            out[name] = v
    return out


def save_ggml_model(loaded, gm: GGMLModel, out: Path, extra: dict | None = None, progress: bool = False) -> dict:
    """Write a :class:`GGMLModel` built from ``loaded`` as a GGUF; returns a summary."""
    hp = HParams.from_config(loaded.model.config)
    tok, gen, tok_src = tokenizer_metadata(loaded, hp)
    file_type = get_mix(gm.mix).ftype if gm.mix in MIXES else _dominant_ftype(gm.tensors)
    meta = {"method": gm.method, "mix": gm.mix, "pure": gm.pure, "package_version": __version__,
            "tensor_notes": _notes(gm.tensors), **(extra or {})}
    ordered = sorted(gm.tensors, key=lambda t: file_order(t.name))
    kvs = model_metadata(hp, file_type, Path(str(loaded.source)).name, gen, meta) + tok
    write_gguf(out, kvs, ordered, hp, progress=progress)
    counts: dict[str, int] = {}
    for t in ordered:
        if len(t.shape) >= 2:
            counts[t.type] = counts.get(t.type, 0) + 1
    return {"out": str(out), "tensors": len(ordered), "type_counts": counts,
            "fallbacks": sum(1 for c in gm.plan.values() if c.fallback) if gm.plan else 0,
            "bits_per_weight_matrices": bits_per_weight(ordered), "size_bytes": Path(out).stat().st_size,
            "tokenizer_from": tok_src, "file_type": FTYPE_NAMES.get(file_type, str(file_type))}


def _dominant_ftype(tensors: list[GGMLTensor]) -> int:
    sizes: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            sizes[t.type] = sizes.get(t.type, 0) + math.prod(t.shape)
    top = max(sizes, key=sizes.get) if sizes else "F32"
    return _FTYPE_OF_TYPE.get(top, 0)


# --------------------------------------------------------------------------------------------
# gptq-int checkpoints -> GGML legacy blocks (direct mapping of the integers)
# --------------------------------------------------------------------------------------------

def map_gptq_int(packed, target: str) -> tuple[torch.Tensor, str]:
    """Write a gptq-int linear as GGML ``target`` blocks without re-rounding, when possible.

    Every 32-column block must lie inside one scale group (group size a multiple of 32, or per
    channel; no act-order permutation across a block). Then, with ``s`` the group scale and ``z``
    the zero-point of an output row (``W = s * (q - z)``):

    * Q4_0 / Q5_0 / Q8_0 (``y = d * c``): ``d = s``, ``c = q - z``; exact when ``q - z`` fits the
      type's code range (always for symmetric 2/3/4-bit -> Q4_0, asymmetric 2/3-bit -> Q4_0,
      asymmetric 4-bit -> Q5_0, symmetric 8-bit -> Q8_0).
    * Q4_1 / Q5_1 (``y = d * c + m``): ``d = s``, ``c = q``, ``m = fp16(-s * z)``: exact up to
      the float16 rounding of ``m`` (relative 2^-11 of ``|s * z|``, per block).

    Returns ``(uint8 rows, "exact" | "fp16-m")``; raises CompressError when the mapping does not fit.
    """
    from ..formats import gptq_int
    n, k = packed.out_features, packed.in_features
    if k % 32:
        raise CompressError(f"{k} input columns are not a multiple of 32")
    g = packed.g_idx.to(torch.int64).view(k // 32, 32)
    if not bool((g == g[:, :1]).all()):
        raise CompressError("a 32-column block spans several scale groups (act-order or a group size "
                            "that is not a multiple of 32)")
    q, zeros = gptq_int.unpack(packed)                                   # (N, K), (G, N)
    gb = g[:, 0]                                                         # group of each 32-block
    s = packed.scales.to(torch.float32)[gb].t()                          # (N, K/32), fp16 values
    z = zeros.to(torch.int64)[gb].t()                                   # (N, K/32)
    q = q.to(torch.int64).view(n, k // 32, 32)
    cd = CODECS.get(target)
    if cd is None or target not in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        raise CompressError(f"no direct gptq-int mapping to {target}")
    tmpl = torch.zeros((n * (k // 32), cd.size), dtype=torch.uint8)
    tmpl[:, 0:2] = s.reshape(-1).to(torch.float16).view(torch.uint8).view(-1, 2)
    if target in ("Q4_0", "Q5_0", "Q8_0"):
        c = q - z[:, :, None]
        how = "exact"
    else:
        c = q
        m = (-(s * z.to(torch.float32))).to(torch.float16)
        tmpl[:, 2:4] = m.reshape(-1).view(torch.uint8).view(-1, 2)
        how = "exact" if bool(torch.equal(m.to(torch.float32), -(s * z.to(torch.float32)))) else "fp16-m"
    if int(c.min()) < cd.cmin or int(c.max()) > cd.cmax:
        raise CompressError(f"codes {int(c.min())}..{int(c.max())} do not fit {target}'s range "
                            f"{cd.cmin}..{cd.cmax}")
    data = pack_codes(tmpl, c.reshape(-1, 32), target)
    return data.view(n, -1), how


def auto_target(scheme) -> str | None:
    """The GGML type a gptq-int scheme maps onto by default (None: no direct mapping)."""
    if scheme.bits == 8:
        return "Q8_0" if scheme.sym else None
    if scheme.sym or scheme.bits <= 3:
        return "Q4_0"
    return "Q4_1"


def build_from_packed(loaded, target: str | None) -> tuple[GGMLModel, dict]:
    """A gptq-int checkpoint as GGUF by direct mapping of its integers (see :func:`map_gptq_int`).

    ``target`` None picks :func:`auto_target`. Tensors left unquantized in the checkpoint
    (embedding, norms; stored as float16 there) are written F16 (2-D) and F32 (1-D): lossless.
    """
    from ..qlinear import QuantLinear
    scheme = loaded.quant.get("scheme_obj")
    if loaded.quant.get("format") != "gptq-int" or scheme is None:
        raise CompressError(f"{loaded.source}: only gptq-int checkpoints map directly onto GGUF types; "
                            "pass --type to re-quantize the dequantized weights")
    modules = loaded.quant.get("modules") or {}

    def target_for(mod_name: str) -> str:
        ms = modules.get(mod_name, scheme)
        t = target or auto_target(ms)
        if t is None:
            raise CompressError(f"{loaded.source}: {mod_name} ({ms.describe()}) has no GGUF equivalent "
                                "(GGUF has no asymmetric 8-bit type); pass --type (e.g. Q8_0) to re-quantize")
        return t

    targets = {target_for(n) for n in modules} or {target or auto_target(scheme)}
    HParams.from_config(loaded.model.config)          # refuses a model GGUF cannot describe
    floats = model_tensors(loaded.model, loaded.arch)
    tensors, how = [], {}
    arch = loaded.arch
    for name, w in floats.items():
        hf = hf_name(name, arch.blocks, gguf_arch(loaded.model.config))
        mod_name = hf.rpartition(".")[0]
        mod = loaded.model.get_submodule(mod_name) if name.endswith(".weight") else None
        if isinstance(mod, QuantLinear):
            tgt = target_for(mod_name)
            try:
                data, h = map_gptq_int(mod.packed(), tgt)
            except CompressError as e:
                raise CompressError(f"{loaded.source}: {mod_name} cannot be written as {tgt}: {e}; "
                                    "pass --type to re-quantize instead") from None
            how[h] = how.get(h, 0) + 1
            tensors.append(GGMLTensor(name, tgt, tuple(w.shape), data, f"gptq-int->{tgt} {h}"))
        elif w.dim() >= 2:
            tensors.append(GGMLTensor(name, "F16", tuple(w.shape), w.to(torch.float16)))
        else:
            tensors.append(GGMLTensor(name, "F32", tuple(w.shape), w))
    plan = {t.name: TensorChoice(t.name, t.shape, "", t.type, t.type, t.type != "F32") for t in tensors}
    tgt = "+".join(sorted(targets))
    gm = GGMLModel(tensors, f"gptq-int->{tgt}", False, f"export:{loaded.quant.get('method', 'gptq-int')}", plan)
    return gm, {"mapping": how, "target": tgt, "scheme": scheme.describe()}

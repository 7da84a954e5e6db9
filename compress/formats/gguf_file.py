"""GGUF files checked before anything reads them.

gguf-py's GGUFReader trusts every length and count in a file: a corrupt length sends it past the
end of the file, where its reads come back empty and it fails with "index 0 is out of bounds for
axis 0 with size 0" (or loops for as many items as a corrupt array length says). So a GGUF is
walked here first (:func:`read_gguf_layout`), every length checked against the bytes left, the
tensor table checked the way llama.cpp's gguf.cpp checks it (tensors back to back, aligned, inside
the file); :func:`check_gguf` then checks a model's hyperparameters, tokenizer and tensor shapes
against its metadata, before the reader or transformers sees the file.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CompressError

_GGUF_SCALAR = {0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
                4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<B"),
                10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d")}
_GGUF_BOOL, _GGUF_STRING, _GGUF_ARRAY = 7, 8, 9
_GGUF_INTS = (0, 1, 2, 3, 4, 5, 10, 11)
_GGUF_MAX_DIMS = 4
GGUF_MODEL_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2", "gptneox", "qwen2moe",
                    "qwen3moe")
# block tensors only some architectures have (and then must have): name -> those architectures
_GEMMA = ("gemma2", "gemma3")
_ARCH_ONLY = {"attn_q_norm.weight": ("qwen3", "gemma3", "qwen3moe"), "attn_k_norm.weight": ("qwen3", "gemma3", "qwen3moe"),
              "attn_qkv.weight": ("phi3", "gpt2", "gptneox"), "post_attention_norm.weight": _GEMMA, "post_ffw_norm.weight": _GEMMA}
# block tensors some architectures do not have (phi3 and gpt2 fuse q/k/v; phi3 fuses gate/up, gpt2 has no gate)
_FUSED = ("phi3", "gpt2", "gptneox")
_ARCH_NOT = {"attn_q.weight": _FUSED, "attn_k.weight": _FUSED, "attn_v.weight": _FUSED, "ffn_gate.weight": _FUSED}
# a mixture of experts ({arch}.expert_count, llama's too: Mixtral) has the stacked experts and a router
# instead of the dense MLP
_EXPERTS_ONLY = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_inp.weight")
_DENSE_ONLY = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


class _BadGGUF(Exception):
    """What is wrong inside a GGUF file, in words; becomes a CompressError naming the file."""


@dataclass(frozen=True)
class GGUFArray:
    item_type: int                                       # GGUF value type of the items
    count: int
    values: object = field(default=None, repr=False)     # list of str, or a numpy array of numbers


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]     # ggml order: dims[0] is the length of a row
    type: str                 # GGML type name (Q4_K, F32, ...)
    offset: int               # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, cols): the order transformers and this suite use."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFLayout:
    path: Path
    version: int
    kv: dict[str, object]             # scalars and strings as values, arrays as GGUFArray
    kv_types: dict[str, int]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_offset: int


def _shown(name: str) -> str:
    """A key or tensor name as a message shows it: quoted, control characters escaped, at most 60 characters."""
    r = repr(name)[1:-1]
    return f"'{r[:57]}...'" if len(r) > 60 else f"'{r}'"


class _Cursor:
    """Reads little-endian values from a buffer, each checked against the bytes left. ``what``
    names the value for the error message: a string, or a callable that makes one (for the items
    of long arrays, which are named only if one is bad)."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what) -> int:
        if n > self.size - self.pos:
            raise _BadGGUF(f"{_named(what)} ({n} bytes at byte {self.pos}) runs past the end of the file "
                           f"({self.size} bytes)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what) -> str:
        if self.size - self.pos < 8:
            self.take(8, lambda: f"length of {_named(what)}")
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _BadGGUF(f"{_named(what)} (at byte {start}) is not valid UTF-8") from None


def _named(what) -> str:
    return what() if callable(what) else what


def _gguf_value(c: _Cursor, vtype: int, key: str):
    if vtype in _GGUF_SCALAR:
        name, fmt = _GGUF_SCALAR[vtype]
        v = c.unpack(fmt, f"{name} value of {_shown(key)}")
        if vtype == _GGUF_BOOL:
            if v > 1:
                raise _BadGGUF(f"bool value of {_shown(key)} is {v}, not 0 or 1")
            return bool(v)
        return v
    if vtype == _GGUF_STRING:
        return c.string(f"string value of {_shown(key)}")
    if vtype != _GGUF_ARRAY:
        raise _BadGGUF(f"key {_shown(key)} has an unknown value type {vtype}")
    itype = c.unpack("<I", f"item type of array {_shown(key)}")
    count = c.unpack("<Q", f"length of array {_shown(key)}")
    if itype == _GGUF_ARRAY:
        raise _BadGGUF(f"array {_shown(key)} holds arrays (nested arrays are not supported)")
    if itype in _GGUF_SCALAR:
        name, fmt = _GGUF_SCALAR[itype]
        size = struct.calcsize(fmt)
    elif itype == _GGUF_STRING:
        name, size = "string", 8
    else:
        raise _BadGGUF(f"array {_shown(key)} has an unknown item type {itype}")
    if count * size > c.size - c.pos:
        raise _BadGGUF(f"array {_shown(key)} claims {count} {name} items, more than the {c.size - c.pos} bytes "
                       f"left in the file can hold (byte {c.pos})")
    if itype == _GGUF_STRING:
        return GGUFArray(itype, count, [c.string(lambda: f"item {j} of {_shown(key)}") for j in range(count)])
    import numpy as np
    start = c.take(count * size, f"array {_shown(key)}")
    return GGUFArray(itype, count, np.frombuffer(c.buf, np.dtype(fmt), count, start).copy())


def read_gguf_layout(path: Path, kind: str = "GGUF file") -> GGUFLayout:
    """Walk a GGUF file's header, key/value pairs and tensor table, checking every length against
    the file, as llama.cpp's loader does; the tensor data is not read. Raises a one-line
    CompressError naming the file and what is wrong ("corrupt <kind> <path>: ...")."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4 or f.read(4) != b"GGUF":
                f.seek(0)
                raise CompressError(f"corrupt {kind} {path}: bad magic {f.read(4)!r} "
                                    "(a GGUF file starts with b'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk_gguf(path, buf, size)
    except OSError as e:
        raise CompressError(f"cannot read {path}: {e.strerror or e}") from None
    except _BadGGUF as e:
        raise CompressError(f"corrupt {kind} {path}: {e}") from None


def _walk_gguf(path: Path, buf, size: int) -> GGUFLayout:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    c = _Cursor(buf, size)
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and (version >> 16) in (0x200, 0x300):
            raise _BadGGUF("a big-endian GGUF file; only little-endian files are read")
        raise _BadGGUF(f"version {version}; GGUF versions 2 and 3 are read")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "key/value count")
    # the smallest key/value pair takes 13 bytes (key length, one key byte, type, a uint8), the
    # smallest tensor entry 33 (name length, one name byte, dims count, one dim, type, offset)
    if 13 * n_kv + 33 * n_tensors > size - c.pos:
        raise _BadGGUF(f"the header claims {n_kv} key/value pairs and {n_tensors} tensors, more than a file of "
                       f"{size} bytes can hold")
    kv: dict[str, object] = {}
    kv_types: dict[str, int] = {}
    for i in range(n_kv):
        key = c.string(f"key of key/value pair {i + 1} of {n_kv}")
        if key in kv:
            raise _BadGGUF(f"key {_shown(key)} appears twice")
        vtype = c.unpack("<I", f"value type of {_shown(key)}")
        kv[key] = _gguf_value(c, vtype, key)
        kv_types[key] = vtype
    infos = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i + 1} of {n_tensors}")
        label = f"tensor {i + 1} of {n_tensors} ({_shown(name)})"
        n_dims = c.unpack("<I", f"dimension count of {label}")
        if not 1 <= n_dims <= _GGUF_MAX_DIMS:
            raise _BadGGUF(f"{label} has {n_dims} dimensions (GGUF tensors have 1 to {_GGUF_MAX_DIMS})")
        dims = tuple(c.unpack("<Q", f"dimension {j} of {label}") for j in range(n_dims))
        type_id = c.unpack("<I", f"type of {label}")
        offset = c.unpack("<Q", f"data offset of {label}")
        infos.append((name, dims, type_id, offset))
    alignment = kv.get("general.alignment", 32)
    if "general.alignment" in kv and (kv_types["general.alignment"] != 4 or alignment <= 0
                                      or alignment & (alignment - 1)):
        raise _BadGGUF(f"general.alignment is {alignment!r}, not a power of two stored as uint32")
    data_offset = -(-c.pos // alignment) * alignment
    tensors, seen, expected = [], set(), 0
    for name, dims, type_id, offset in infos:
        if name in seen:
            raise _BadGGUF(f"tensor {_shown(name)} appears twice")
        seen.add(name)
        try:
            gtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[gtype]
        except (ValueError, KeyError):
            raise _BadGGUF(f"tensor {_shown(name)} has an unknown type id {type_id}") from None
        n = math.prod(dims)
        if min(dims) < 1 or n >= 2 ** 62:
            raise _BadGGUF(f"tensor {_shown(name)} has an impossible shape {list(reversed(dims))}")
        if dims[0] % block:
            raise _BadGGUF(f"tensor {_shown(name)} has rows of {dims[0]} values, not a whole number of "
                           f"{gtype.name} blocks of {block}")
        if offset != expected:      # llama.cpp's loader refuses the same: tensors lie back to back
            if not tensors:
                raise _BadGGUF(f"the first tensor, {_shown(name)}, starts at data offset {offset}, not 0")
            prev = tensors[-1]
            raise _BadGGUF(f"tensor {_shown(name)} starts at data offset {offset}, but the tensor before it, "
                           f"{_shown(prev.name)} ({' x '.join(map(str, prev.shape))} {prev.type}), ends at {expected}")
        nbytes = n // block * type_size
        tensors.append(GGUFTensorInfo(name, dims, gtype.name, offset, nbytes))
        expected = -(-(offset + nbytes) // alignment) * alignment
    end = data_offset + (tensors[-1].offset + tensors[-1].nbytes if tensors else 0)
    if end > size:
        raise _BadGGUF(f"truncated: its tensor data ends at byte {end}, the file has {size} bytes")
    return GGUFLayout(path, version, kv, kv_types, tensors, alignment, data_offset)


_GGUF_TOKENIZER_MODELS = ("llama", "gpt2", "bert", "t5", "rwkv", "plamo2", "no_vocab")   # llama.cpp's vocab types
_GGUF_TOKEN_IDS = ("bos", "eos", "unknown", "padding", "separator", "cls", "mask")


def _check_gguf_tokenizer(lay: GGUFLayout, n_vocab: int) -> None:
    """The tokenizer keys transformers builds the tokenizer from: a known model, token types in
    range, special ids inside the vocabulary, merges of two tokens whose join is a token."""
    import numpy as np
    kv, p = lay.kv, lay.path
    model = kv.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise CompressError(f"GGUF file {p} has no tokenizer type (tokenizer.ggml.model)")
    if model not in _GGUF_TOKENIZER_MODELS:
        raise CompressError(f"corrupt GGUF file {p}: tokenizer.ggml.model is {model!r}, not a tokenizer type "
                            f"llama.cpp knows ({', '.join(_GGUF_TOKENIZER_MODELS)})")
    types = kv.get("tokenizer.ggml.token_type")
    if types is not None:
        if not isinstance(types, GGUFArray) or types.item_type not in _GGUF_INTS or types.count != n_vocab:
            raise CompressError(f"corrupt GGUF file {p}: tokenizer.ggml.token_type is not {n_vocab} integers "
                                "(one per token)")
        bad = np.flatnonzero((types.values < 0) | (types.values > 6))
        if bad.size:
            raise CompressError(f"corrupt GGUF file {p}: token {int(bad[0])} has type {int(types.values[bad[0]])} "
                                "(llama.cpp's token types are 0 to 6)")
    for name in _GGUF_TOKEN_IDS:
        k = f"tokenizer.ggml.{name}_token_id"
        if k in kv and (lay.kv_types[k] not in _GGUF_INTS or not 0 <= kv[k] < n_vocab):
            raise CompressError(f"corrupt GGUF file {p}: {k} is {kv[k]!r}, not a token id below {n_vocab}")
    if lay.kv.get("general.architecture") in ("llama", "mistral"):
        # transformers' GGUF llama tokenizer reads both ids (a missing one ends in an AttributeError)
        for name in ("bos", "eos"):
            if f"tokenizer.ggml.{name}_token_id" not in kv:
                raise CompressError(f"GGUF file {p} lacks tokenizer.ggml.{name}_token_id (the llama tokenizer "
                                    "needs the bos and eos token ids)")
    merges = kv.get("tokenizer.ggml.merges")
    if merges is None and "tokenizer.ggml.scores" not in kv:
        raise CompressError(f"GGUF file {p} has neither tokenizer.ggml.merges nor tokenizer.ggml.scores "
                            "(a tokenizer needs one of them)")
    if merges is not None:
        if not isinstance(merges, GGUFArray) or merges.item_type != _GGUF_STRING:
            raise CompressError(f"corrupt GGUF file {p}: tokenizer.ggml.merges is not a list of strings")
        vocab = set(kv["tokenizer.ggml.tokens"].values)
        for j, m in enumerate(merges.values):
            parts = m.split(" ")
            if len(parts) != 2:
                raise CompressError(f"corrupt GGUF file {p}: merge {j} ({m!r}) is not two tokens joined by one space")
            missing = next((t for t in (*parts, "".join(parts)) if t not in vocab), None)
            if missing is not None:
                raise CompressError(f"corrupt GGUF file {p}: merge {j} ({m!r}) needs the token {missing!r}, "
                                    "which the vocabulary lacks")


def check_gguf(path: Path) -> GGUFLayout:
    """Check a GGUF model file before anything reads it: its structure (:func:`read_gguf_layout`),
    a supported architecture, the hyperparameters the model is built from, a tokenizer, and every
    llama tensor's presence and shape against those hyperparameters. Raises a one-line
    CompressError naming the file and what is wrong; returns the layout."""
    lay = read_gguf_layout(path)
    kv, p = lay.kv, lay.path
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise CompressError(f"GGUF file {p} is not a model: it has no general.architecture")
    if arch not in GGUF_MODEL_ARCHS:
        raise CompressError(f"GGUF file {p}: architecture {arch!r} is not supported "
                            f"(supported: {', '.join(GGUF_MODEL_ARCHS)})")

    def hparam(key: str, default: int | None = None) -> int:
        k = f"{arch}.{key}"
        if k not in kv:
            if default is not None:
                return default
            raise CompressError(f"GGUF file {p} lacks the hyperparameter {k}")
        v = kv[k]
        if lay.kv_types[k] not in _GGUF_INTS or v <= 0:
            raise CompressError(f"corrupt GGUF file {p}: {k} is {v!r}, not a positive integer")
        return int(v)

    n_layer, n_embd, n_ff = hparam("block_count"), hparam("embedding_length"), hparam("feed_forward_length")
    n_head = hparam("attention.head_count")
    n_kv = hparam("attention.head_count_kv", n_head)
    if n_head % n_kv:
        raise CompressError(f"corrupt GGUF file {p}: {arch}.attention.head_count {n_head} is not a multiple of "
                            f"{arch}.attention.head_count_kv {n_kv}")
    if f"{arch}.attention.key_length" not in kv and n_embd % n_head:
        raise CompressError(f"corrupt GGUF file {p}: {arch}.embedding_length {n_embd} is not a multiple of "
                            f"{arch}.attention.head_count {n_head}")
    hk = hparam("attention.key_length", n_embd // n_head)
    hv = hparam("attention.value_length", hk)
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, GGUFArray) or tokens.item_type != _GGUF_STRING:
        raise CompressError(f"GGUF file {p} has no tokenizer (tokenizer.ggml.tokens)")
    n_vocab = tokens.count
    if f"{arch}.vocab_size" in kv and hparam("vocab_size") != n_vocab:
        raise CompressError(f"corrupt GGUF file {p}: {arch}.vocab_size is {kv[f'{arch}.vocab_size']}, "
                            f"the tokenizer has {n_vocab} tokens")
    _check_gguf_tokenizer(lay, n_vocab)
    for key in ("rope.freq_base", "attention.layer_norm_rms_epsilon"):
        k = f"{arch}.{key}"
        if k in kv and (lay.kv_types[k] not in (6, 12) or not math.isfinite(kv[k]) or kv[k] <= 0):
            raise CompressError(f"corrupt GGUF file {p}: {k} is {kv[k]!r}, not a positive number")
    if f"{arch}.rope.dimension_count" in kv and hparam("rope.dimension_count") > hk:
        raise CompressError(f"corrupt GGUF file {p}: {arch}.rope.dimension_count {kv[f'{arch}.rope.dimension_count']} "
                            f"exceeds the head size {hk}")
    voc, emb, ffn = (n_vocab, "tokens"), (n_embd, "embedding_length"), (n_ff, "feed_forward_length")
    qd, kd = (n_head * hk, "heads x key length"), (n_kv * hk, "kv heads x key length")
    vd, od = (n_kv * hv, "kv heads x value length"), (n_head * hv, "heads x value length")
    globals_ = {"token_embd.weight": (voc, emb), "output.weight": (voc, emb), "output_norm.weight": (emb,)}
    block = {"attn_norm.weight": (emb,), "attn_q.weight": (qd, emb), "attn_k.weight": (kd, emb),
             "attn_v.weight": (vd, emb), "attn_output.weight": (emb, od), "ffn_norm.weight": (emb,),
             "ffn_gate.weight": (ffn, emb), "ffn_up.weight": (ffn, emb), "ffn_down.weight": (emb, ffn),
             "attn_q.bias": (qd,), "attn_k.bias": (kd,), "attn_v.bias": (vd,), "attn_output.bias": (emb,),
             "attn_q_norm.weight": ((hk, "key length"),), "attn_k_norm.weight": ((hk, "key length"),),
             "post_attention_norm.weight": (emb,), "post_ffw_norm.weight": (emb,),
             "ffn_gate_exps.weight": None, "ffn_up_exps.weight": None, "ffn_down_exps.weight": None,
             "ffn_gate_inp.weight": None}                       # experts: present, shapes not checked here
    if arch in _FUSED:          # fused: q, k, v rows in one tensor (phi3: gate and up rows in one too)
        block["attn_qkv.weight"] = ((qd[0] + kd[0] + vd[0], "heads x key length + 2 kv heads x key length"), emb)
    if arch == "phi3":
        block["ffn_up.weight"] = ((2 * n_ff, "2 x feed_forward_length"), emb)
    have = {t.name for t in lay.tensors}
    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in have:
            raise CompressError(f"GGUF file {p} lacks the tensor {name}")
    moe = hparam("expert_count", 0)
    for i in range(n_layer):            # stops at the first gap, so a corrupt block_count costs nothing
        for name in block:
            if (name in _ARCH_ONLY and arch not in _ARCH_ONLY[name]) or arch in _ARCH_NOT.get(name, ()):
                continue
            if name in (_DENSE_ONLY if moe else _EXPERTS_ONLY):
                continue
            if name.endswith(".weight") and f"blk.{i}.{name}" not in have:
                raise CompressError(f"GGUF file {p} lacks the tensor blk.{i}.{name} ({arch}.block_count is {n_layer})")
    for t in lay.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m and int(m.group(1)) >= n_layer:
            raise CompressError(f"corrupt GGUF file {p}: tensor {t.name} is beyond {arch}.block_count ({n_layer})")
        exp = block.get(m.group(2)) if m else globals_.get(t.name)
        if exp is not None and t.shape != tuple(n for n, _ in exp):
            raise CompressError(f"corrupt GGUF file {p}: tensor {t.name} is {' x '.join(map(str, t.shape))}, the "
                                f"metadata says {' x '.join(f'{n} ({what})' for n, what in exp)}")
    return lay

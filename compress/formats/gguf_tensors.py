"""The tensors of a GGUF model file under their Hugging Face names, decoded one at a time.

Each tensor is read from the file with plain reads (its offset and size from the checked tensor
table of :func:`compress.formats.gguf_file.check_gguf`; no mapping of the file), decoded to
float32 with this suite's bit-exact GGML decoders, for llama's query/key rows un-permuted and for
Gemma's norms less the 1 llama.cpp adds: the weights transformers' GGUF loader produces. A streamed run (``--stream``) reads a GGUF's
blocks this way; :func:`read_gguf_weights` reads them all.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CompressError
from .gguf_file import check_gguf

_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def unpermute_qk(t: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """Inverse of :func:`compress.export.gguf_arch.permute_qk` (what transformers' GGUF loader applies)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class GGUFTensors:
    """``name in src``, ``iter(src)`` (Hugging Face names) and ``src.read(names)`` (float32)."""

    def __init__(self, path: Path, blocks_prefix: str | None = None, layout=None):
        from ..export.gguf_arch import PERMUTED_QK, expert_hf_names, hf_name, spec_of
        self.path = Path(path)
        lay = layout or check_gguf(self.path)          # ``layout``: the file's, checked already
        arch = lay.kv["general.architecture"]
        spec = spec_of(arch)
        blocks_prefix = blocks_prefix or spec.blocks
        self.n_head = int(lay.kv[f"{arch}.attention.head_count"])
        self.n_kv = int(lay.kv.get(f"{arch}.attention.head_count_kv", self.n_head))
        self.permuted = arch in PERMUTED_QK
        self.arch = arch
        self.norm_offset = spec.norm_offset           # llama.cpp stores Gemma's norms as (1 + weight)
        self.data_offset = lay.data_offset
        n_expert = int(lay.kv.get(f"{arch}.expert_count") or 0)
        self.infos = {}                                 # name -> (tensor, expert or None)
        for t in lay.tensors:
            experts = expert_hf_names(t.name, blocks_prefix, arch, n_expert) if n_expert else None
            if experts is None:
                self.infos[hf_name(t.name, blocks_prefix, arch)] = (t, None)
            elif len(t.shape) != 3 or t.shape[0] != n_expert:
                raise CompressError(f"corrupt GGUF file {self.path}: {t.name} is {' x '.join(map(str, t.shape))}, "
                                    f"not {n_expert} ({arch}.expert_count) stacked matrices")
            else:
                self.infos.update((n, (t, e)) for e, n in enumerate(experts))

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __iter__(self):
        return iter(self.infos)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from ..export.gguf_arch import neox_qkv
        from . import kquants
        out = {}
        with open(self.path, "rb") as fh:
            for n in names:
                info, e = self.infos.get(n, (None, None))
                if info is None:
                    raise CompressError(f"{self.path}: tensor {n} is missing from the GGUF file")
                nbytes, offset, shape = info.nbytes, info.offset, info.shape
                if e is not None:                       # one expert's rows of the stacked tensor
                    nbytes //= shape[0]
                    offset, shape = offset + e * nbytes, shape[1:]
                raw = torch.empty(nbytes, dtype=torch.uint8)
                try:
                    fh.seek(self.data_offset + offset)
                    got = fh.readinto(memoryview(raw.numpy()))
                except OSError as err:
                    raise CompressError(f"cannot read {self.path}: {err.strerror or err}") from None
                if got != nbytes:
                    raise CompressError(f"truncated GGUF file {self.path}: tensor {info.name} ends past the end of the file")
                if info.type in _FLOATS:
                    w = raw.view(_FLOATS[info.type]).reshape(shape).to(torch.float32)
                else:
                    w = kquants.dequantize(raw, info.type, shape)
                if self.permuted and re.search(r"\.attn_q\.(weight|bias)$", info.name):
                    w = unpermute_qk(w, self.n_head, self.n_head)
                elif self.permuted and re.search(r"\.attn_k\.(weight|bias)$", info.name):
                    w = unpermute_qk(w, self.n_head, self.n_kv)
                elif self.arch == "gptneox" and re.search(r"\.attn_qkv\.(weight|bias)$", info.name):
                    w = neox_qkv(w, self.n_head, inverse=True)
                if self.norm_offset and n.endswith("norm.weight"):
                    w = w - self.norm_offset
                out[n] = w
        return out


def read_gguf_weights(path: Path, blocks_prefix: str | None = None, layout=None) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF model file as float32 under its Hugging Face name (module doc);
    ``layout``: the file's, checked already."""
    src = GGUFTensors(path, blocks_prefix, layout)
    return src.read(list(src))

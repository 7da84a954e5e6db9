"""Fake-quantized linears on the grids of GGML (llama.cpp) block types, and their exact conversion
to GGUF blocks.

A k-quant sub-block's grid is ``A = d * sc`` (and ``M = dmin * m``): a float16 super-block scale
times a small integer (:mod:`compress.formats.ggml_codec`). :class:`GGMLFakeQuantLinear` trains
the sub-block scales ``A`` (and mins ``M``) as floats and quantizes them in the forward pass as
the file will hold them: ``sc = clamp(round(A / d), lo, hi)`` with the block's ``d`` (kept from
the start), then ``A' = d * sc``; the weights are rounded onto that grid,
``c = clamp(round((W + M') / A'), cmin, cmax)``, and the layer computes with ``A' * c - M'``.
Rounding passes gradients straight through, so weights, sub-block scales and mins all learn; for
the legacy 32-weight types the trained scale is the block's float16 ``d`` (and ``m``) itself.
Every quantity the forward pass uses is what :meth:`GGMLFakeQuantLinear.blocks` writes (same
codes, integer sub-block scales, float16 scales, same float32 arithmetic), so the GGUF tensor
decodes to exactly the weight the model trained with.

:meth:`GGMLFakeQuantLinear.freeze_codes` is the end-to-end phase: the codes are fixed and only the
scales and mins train (PEQA-style).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import kquants
from ..formats.ggml_codec import BlockScales, _codec, block_scales, pack_codes, pack_scales, scale_grid, scale_layout
from .fakequant import round_ste


def fp16_signed_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 in the forward pass (sign kept, zero allowed), identity gradient."""
    return x + (x.detach().to(torch.float16).to(torch.float32) - x).detach()


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a / torch.where(b != 0, b, torch.ones_like(b))


class GGMLFakeQuantLinear(torch.nn.Module):
    """A linear trained on the grid of GGML type ``type_name``, starting exactly at the GGUF blocks
    ``start`` (uint8, ``N * K / block`` blocks in row order, e.g. GPTQ's solution on that grid).

    Parameters: ``weight (N, K)`` (its start is the decoded blocks), ``scale`` and (types with mins)
    ``min`` ``(blocks, sub-blocks)``; the bias, if any, is not trained."""

    def __init__(self, linear: torch.nn.Linear, type_name: str, start: torch.Tensor):
        super().__init__()
        n, k = linear.weight.shape
        self.type_name = type_name
        self.cd, self.lay = _codec(type_name), scale_layout(type_name)
        if k % self.cd.block:
            raise ValueError(f"{type_name} needs the row length ({k}) to be a multiple of {self.cd.block}")
        self.in_features, self.out_features = k, n
        blocks = start.reshape(-1, self.cd.size).to(torch.uint8).cpu()
        if blocks.shape[0] != n * k // self.cd.block:
            raise ValueError(f"{type_name} start holds {blocks.shape[0]} blocks, a ({n}, {k}) weight needs "
                             f"{n * k // self.cd.block}")
        self.register_buffer("template", blocks)
        s = block_scales(blocks, type_name)
        A, M = scale_grid(s, type_name)
        self.register_buffer("d", s.d)
        self.register_buffer("dmin", s.dmin if s.dmin is not None else torch.zeros_like(s.d))
        self.has_min = s.dmin is not None
        self.scale = torch.nn.Parameter(A.clone())
        self.min = torch.nn.Parameter((-M if self.lay.legacy else M).clone(), requires_grad=self.has_min)
        dec = kquants.dequantize(blocks, type_name, (n, k))
        self.weight = torch.nn.Parameter(dec.to(linear.weight.device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.float32).clone())
        self.register_buffer("codes", None)
        self.to(linear.weight.device)

    # ---------------------------------------------------------------- the grid the forward pass uses
    def _grid(self):
        """``(A', M', scales)``: per sub-block float32 ``(blocks, subs)`` and the scale fields they come from."""
        if self.lay.legacy:                       # the float16 scale (and min) themselves
            d = fp16_signed_ste(self.scale[:, 0])
            m = fp16_signed_ste(self.min[:, 0]) if self.has_min else None
            M = torch.zeros_like(d[:, None]) if m is None else -m[:, None]
            return d[:, None], M, BlockScales(d.detach(), None if m is None else m.detach())
        lo, hi = self.lay.sc_range
        sc = torch.clamp(round_ste(_safe_div(self.scale, self.d[:, None])), lo, hi)
        sc = torch.where(self.d[:, None] != 0, sc, torch.zeros_like(sc))
        A = self.d[:, None] * sc
        if self.has_min:
            lo, hi = self.lay.m_range
            m = torch.clamp(round_ste(_safe_div(self.min, self.dmin[:, None])), lo, hi)
            m = torch.where(self.dmin[:, None] != 0, m, torch.zeros_like(m))
            M = self.dmin[:, None] * m
        else:
            m, M = None, torch.zeros_like(A)
        return A, M, BlockScales(self.d, self.dmin if self.has_min else None, sc.detach().long(),
                                 None if m is None else m.detach().long())

    def _per_weight(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.cd.block // t.shape[1], dim=1)

    def _codes_and_grid(self):
        A, M, s = self._grid()
        Aw, Mw = self._per_weight(A), self._per_weight(M)
        if self.codes is not None:
            return self.codes, Aw, Mw, s
        w = self.weight.reshape(-1, self.cd.block)
        c = torch.clamp(round_ste(_safe_div(w + Mw, Aw)), self.cd.cmin, self.cd.cmax)
        c = torch.where(Aw != 0, c, torch.zeros_like(c))
        return c, Aw, Mw, s

    def quantized_weight(self) -> torch.Tensor:
        c, Aw, Mw, _ = self._codes_and_grid()
        return (Aw * c - Mw).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ---------------------------------------------------------------- phases and conversion
    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Fix the integer codes at their current values (the weights stop mattering)."""
        self.codes = self._codes_and_grid()[0].detach().clone()
        self.weight.requires_grad_(False)

    def quant_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained quantization parameters by name."""
        return {"scale": self.scale, "min": self.min} if self.has_min else {"scale": self.scale}

    @torch.no_grad()
    def blocks(self) -> torch.Tensor:
        """The GGUF rows ``(N, K / block * type_size)`` that decode to :meth:`quantized_weight`."""
        c, _, _, s = self._codes_and_grid()
        cpu = (lambda t: None if t is None else t.detach().cpu())    # noqa: E731
        s = BlockScales(cpu(s.d), cpu(s.dmin), cpu(s.sc), cpu(s.m))
        out = pack_codes(pack_scales(self.template.cpu(), self.type_name, s), c.detach().long().cpu(), self.type_name)
        return out.reshape(self.out_features, -1)

    @torch.no_grad()
    def start_blocks(self) -> torch.Tensor:
        return self.template.reshape(self.out_features, -1)


"""AWQ (Lin et al., 2023): activation-aware scaling as a function-preserving transform, plus a
weight-clipping search, before integer quantization.

Observing (hooks, the sequential runner) lives in :mod:`compress.pipeline`; this module holds the
pure parts:

* :class:`MeanAbsAccumulator`: per input channel mean ``|x|`` (a forward hook, like the
  accumulators of :mod:`calib.stats`).
* :func:`candidate_scales`: ``s = mean|x| ** alpha``, clamped at 1e-4 and normalised by
  ``sqrt(max(s) * min(s))`` (so the scales straddle 1).
* :func:`search_scale`: for ``alpha`` in ``{0, 1/n, ..., (n-1)/n}`` (n = 20), the group's weights
  are scaled (``W * s``, columns), fake-quantized on the scheme's integer grid
  (:func:`fake_quantize`: ``quantize_rtn`` + ``dequantize_values``, narrow last groups included)
  and scaled back (``/ s``); the alpha with the smallest output error wins. ``alpha = 0`` gives
  ``s = 1`` (no scaling), so the chosen scales are never worse than none on the objective.
  The objective is a callable; :func:`hessian_error` is the linear-output one,
  ``sum_l tr((W_l - W'_l) H (W_l - W'_l)^T)`` with ``H ~ X^T X`` of the group's input.
* :func:`apply_scale`: divide ``prev``'s output channels (a norm's weight and bias, or a linear's
  rows and bias) and multiply the group's weight columns: the float model computes the same
  function. :func:`can_scale` says when that is impossible (a linear ``prev`` whose output width
  differs from the group's input width, e.g. v_proj -> o_proj under grouped-query attention).
* :func:`clip_search`: per output row and quantization group, shrink the weight range to
  ``max|w| * (1 - i/n)`` for ``i < max_shrink * n`` and keep the one with the smallest error of
  that group's partial output ``x_g (w_g - q(clip(w_g)))^T``, measured with the diagonal block of
  ``H`` (all calibration tokens, not a subsample). ``i = 0`` is "no clipping".
* :func:`save_search` / :func:`load_search`: the search results (per group scales, per linear clip
  ranges, and for awq+gptq the Hessians GPTQ needs) in one safetensors file (no pickle).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from ..errors import CompressError
from ..quantizer import dequantize_values, grid_params, quantize_rtn, quantize_values
from ..scheme import IntScheme
from .scaling import apply_scale, can_scale  # noqa: F401  (re-exported: the AWQ transform)

SEARCH_FORMAT = "compress-awq-search"
SEARCH_VERSION = 1


@dataclass
class AWQOptions:
    """Search settings (the AWQ reference's defaults, except where noted).

    n_grid: alpha candidates ``i / n_grid`` for ``i < n_grid``.
    clip: run the clip search; None (default) clips for ``awq`` and not before GPTQ (``awq+gptq``):
    the clip ranges are chosen for round-to-nearest, and clipping before GPTQ removes weight mass
    that GPTQ then cannot compensate (it measured worse on SmolLM2; ``clip=True`` restores it).
    max_shrink: the clip search tries ranges down to ``(1 - max_shrink)`` of the max, in steps of
    ``1 / n_grid``.
    objective: ``"module"`` measures the scale search's error at the output of the module that
    consumes a group of several linears (their lowest common parent inside the block: the
    attention module for q/k/v, the MLP for gate/up); single-linear groups and groups without such
    a parent use the linear outputs. ``"linear"`` uses the linear outputs for every group, through
    the Hessian of the input (cost independent of the number of tokens: ~3x faster on CPU).
    search_windows: calibration windows the module objective runs over (each alpha re-runs the
    module on them): 8 by default (4096 tokens at seqlen 512) to bound the CPU time; None: all.
    clip_skip: linears (block-relative names) never clipped; None takes the architecture's
    ``qk_linears`` (query/key projections, whose error shows only through the attention scores;
    AWQ skips them too).
    """

    n_grid: int = 20
    clip: bool | None = None
    max_shrink: float = 0.5
    objective: str = "module"
    search_windows: int | None = 8
    clip_skip: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.n_grid < 1:
            raise CompressError(f"AWQ n_grid must be positive, got {self.n_grid}")
        if not 0 <= self.max_shrink < 1:
            raise CompressError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.objective not in ("module", "linear"):
            raise CompressError(f"AWQ objective must be 'module' or 'linear', got {self.objective!r}")
        if self.search_windows is not None and self.search_windows < 1:
            raise CompressError(f"AWQ search_windows must be positive, got {self.search_windows}")

    def to_dict(self) -> dict:
        return asdict(self)


class MeanAbsAccumulator:
    """Per input column mean ``|x|`` over every row of ``x.reshape(-1, K)`` (a forward hook)."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.sum_abs: torch.Tensor | None = None
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).to(torch.float32)
        s = x.abs().sum(dim=0)
        self.sum_abs = s if self.sum_abs is None else self.sum_abs + s
        self.nsamples += x.shape[0]

    def hook(self, module, args, output) -> None:
        self.add_batch(args[0])

    def mean(self) -> torch.Tensor:
        if not self.nsamples:
            raise ValueError("no samples accumulated yet")
        return self.sum_abs / self.nsamples


# --------------------------------------------------------------------------- quantization grid

def fake_quantize(w: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """``w (N, K)`` rounded to nearest on the scheme's grid and dequantized (float32)."""
    q, s, z, g = quantize_rtn(w, scheme)
    return dequantize_values(q, s, z, g).to(w.device)


def hessian_error(h: torch.Tensor, weights: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], float]:
    """Objective ``sum_l tr((W_l - W'_l) H (W_l - W'_l)^T)`` against the given original weights."""
    h = h.to(torch.float32)
    w0 = [w.detach().to(torch.float32) for w in weights]

    def err(new: list[torch.Tensor]) -> float:
        total = 0.0
        for a, b in zip(w0, new):
            d = a - b.to(a.device, torch.float32)
            total += float(((d @ h.to(d.device)) * d).sum())
        return total

    return err


# --------------------------------------------------------------------------- scale search

def candidate_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.to(torch.float32).pow(alpha).clamp(min=1e-4)
    return s / torch.sqrt(s.max() * s.min())


@dataclass
class ScaleSearch:
    scales: torch.Tensor          # (K,) float32; ones when alpha == 0
    alpha: float
    errors: list[float] = field(default_factory=list)   # objective per alpha candidate

    @property
    def baseline_error(self) -> float:
        """The objective without scaling (alpha = 0)."""
        return self.errors[0]

    @property
    def best_error(self) -> float:
        return min(self.errors)


def search_scale(weights: list[torch.Tensor], x_mean: torch.Tensor, scheme: IntScheme,
                 error_fn: Callable[[list[torch.Tensor]], float], n_grid: int = 20) -> ScaleSearch:
    """Grid search of the per-input-channel scale of a group of linears sharing one input.

    ``weights``: the group's ``(N_l, K)`` weights; ``x_mean``: ``(K,)`` mean ``|x|`` of the input;
    ``error_fn`` gets the effective weights ``q(W_l * s) / s`` and returns the output error.
    """
    k = x_mean.shape[0]
    for w in weights:
        if w.shape[1] != k:
            raise CompressError(f"weight with {w.shape[1]} input features in a group whose input has {k}")
    errors = []
    best = (math.inf, 0.0, None)
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(x_mean, alpha).to(weights[0].device)
        eff = [fake_quantize(w.to(torch.float32) * s, scheme) / s for w in weights]
        e = error_fn(eff)
        if not math.isfinite(e):
            raise CompressError(f"AWQ scale search: non-finite output error at alpha={alpha}")
        errors.append(e)
        if e < best[0]:
            best = (e, alpha, s)
    return ScaleSearch(scales=best[2].cpu(), alpha=best[1], errors=errors)


# --------------------------------------------------------------------------- clipping

@torch.no_grad()
def clip_search(w: torch.Tensor, h: torch.Tensor, scheme: IntScheme, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Best clip range per output row and quantization group: ``(N, G)`` float32.

    For the columns of group g, ``err(n) = d_n H_gg d_n^T`` with ``d = w_g - q(clip(w_g))``: the
    squared error of the group's partial output summed over the calibration tokens.
    """
    n, k = w.shape
    scheme.check_layer(k)
    w = w.to(torch.float32)
    h = h.to(w.device, torch.float32)
    gs = scheme.effective_group(k)
    out = []
    for g0 in range(0, k, gs):
        g1 = min(g0 + gs, k)
        wg = w[:, g0:g1]
        hg = h[g0:g1, g0:g1]
        amax = wg.abs().amax(dim=1, keepdim=True)
        best = amax.clone()
        best_err = torch.full((n,), math.inf, device=w.device)
        for i in range(max(1, int(max_shrink * n_grid))):
            mv = amax * (1 - i / n_grid)
            c = torch.clamp(wg, -mv, mv)
            scale, zero = grid_params(c, scheme.bits, scheme.sym)
            dq = (quantize_values(c, scale[:, None], zero[:, None], scheme.maxq) - zero[:, None]) * scale[:, None]
            d = dq - wg
            err = ((d @ hg) * d).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[:, None], mv, best)
        out.append(best)
    return torch.cat(out, dim=1)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """``w (N, K)`` clamped to ``[-max_val, max_val]`` of each row's group (``max_val (N, G)``)."""
    n, k = w.shape
    g = torch.arange(k, device=w.device) // scheme.effective_group(k)
    if tuple(max_val.shape) != (n, scheme.groups(k)):
        raise CompressError(f"clip ranges of shape {tuple(max_val.shape)} do not fit a {n}x{k} weight "
                            f"with {scheme.groups(k)} groups")
    mv = max_val.to(w.device, w.dtype)[:, g]
    return torch.clamp(w, -mv, mv)


# --------------------------------------------------------------------------- one layer

@dataclass
class AWQLayerResult:
    """AWQ on one linear: the scale, the clip ranges and the quantized scaled weight.

    ``q, qscales, zeros, g_idx`` quantize ``clip(W * s)`` (ready for ``gptq_int.pack``); the layer
    then reads ``x / s`` (``prev`` absorbs the division). :meth:`effective_weight` is the weight
    the *unscaled* input sees: ``dequantize(q) / s``.
    """

    scales: torch.Tensor
    alpha: float
    clip_max: torch.Tensor | None
    q: torch.Tensor
    qscales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    search: ScaleSearch

    def effective_weight(self) -> torch.Tensor:
        return dequantize_values(self.q, self.qscales, self.zeros, self.g_idx) / self.scales.to(self.q.device)


def awq_solve(w: torch.Tensor, h: torch.Tensor, x_mean: torch.Tensor, scheme: IntScheme, n_grid: int = 20,
              max_shrink: float = 0.5, clip: bool = True) -> AWQLayerResult:
    """AWQ for one ``(N, K)`` linear against the Hessian ``h ~ X^T X`` and mean ``|x|`` of its input:
    scale search (linear-output objective), clip search on the scaled weight (with the scaled
    input's Hessian ``h / (s s^T)``), round-to-nearest."""
    w = w.to(torch.float32)
    h = h.to(w.device, torch.float32)
    found = search_scale([w], x_mean, scheme, hessian_error(h, [w]), n_grid)
    s = found.scales.to(w.device)
    ws = w * s
    clip_max = None
    if clip:
        clip_max = clip_search(ws, h / s[:, None] / s[None, :], scheme, n_grid, max_shrink)
        ws = apply_clip(ws, clip_max, scheme)
    q, qs, z, g = quantize_rtn(ws, scheme)
    return AWQLayerResult(scales=s, alpha=found.alpha, clip_max=clip_max, q=q, qscales=qs, zeros=z, g_idx=g,
                          search=found)


# --------------------------------------------------------------------------- search results

@dataclass
class AWQSearch:
    """What the search found, by full module name; enough to redo the quantization without data.

    scales: group key -> (K,) (only groups that were scaled); alphas: group key -> alpha (also
    the skipped ones, as None); clips: linear name -> (N, G); hessians: group key -> (K, K) as
    collected for the quantizer (awq+gptq), else empty.
    """

    scheme: dict
    scales: dict = field(default_factory=dict)
    alphas: dict = field(default_factory=dict)
    clips: dict = field(default_factory=dict)
    hessians: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)


def save_search(path, res: AWQSearch) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, t in res.scales.items():
        tensors[f"{name}/scales"] = t.detach().cpu().to(torch.float32).contiguous()
    for name, t in res.clips.items():
        tensors[f"{name}/clip_max"] = t.detach().cpu().to(torch.float32).contiguous()
    for name, t in res.hessians.items():
        tensors[f"{name}/hessian"] = t.detach().cpu().to(torch.float32).contiguous()
    meta = {"format": SEARCH_FORMAT, "version": str(SEARCH_VERSION), "scheme": json.dumps(res.scheme),
            "alphas": json.dumps(res.alphas), "options": json.dumps(res.options)}
    save_file(tensors, str(path), metadata=meta)


def load_search(path) -> AWQSearch:
    from safetensors import safe_open

    from calib.stats import check_header

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        check_header(meta, SEARCH_FORMAT, SEARCH_VERSION, "an AWQ search file", path)
        res = AWQSearch(scheme=json.loads(meta["scheme"]), alphas=json.loads(meta.get("alphas", "{}")),
                        options=json.loads(meta.get("options", "{}")))
        for key in f.keys():
            name, _, kind = key.rpartition("/")
            target = {"scales": res.scales, "clip_max": res.clips, "hessian": res.hessians}.get(kind)
            if target is None:
                raise ValueError(f"unexpected tensor {key!r}")
            target[name] = f.get_tensor(key)
    return res

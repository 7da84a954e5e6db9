"""Statistics accumulators fed by forward hooks, and their safetensors save/load.

Each accumulator watches the input of one linear layer (``x`` of any shape ``(..., K)``; every
row of ``x.reshape(-1, K)`` is one sample, usually a token) and can be registered directly as a
forward hook: ``linear.register_forward_hook(acc.hook)``.

- :class:`HessianAccumulator`: ``H = 2/n * sum x x^T`` (GPTQ), kept as a running average.
- :class:`ImportanceAccumulator`: per input column ``sum x^2`` and a count; the importance is
  their ratio, the mean square (llama.cpp imatrix semantics).
- :class:`AbsMaxAccumulator`: per input column ``max |x|`` (SmoothQuant).
- :class:`MeanAbsAccumulator`: per input column ``sum |x|`` and a count; ``mean()`` is their ratio (AWQ).

Every accumulator has ``state()`` (its tensors), ``load_state(tensors, nsamples)`` and
``merge(other)``: accumulating two halves of the rows and merging gives what accumulating all of
them gives (exactly for the maxima and sums of integers, up to float rounding for sums), which is
what lets a run resume and statistics be summed across processes.

:func:`save_stats` / :func:`load_stats` store a ``{name: accumulator}`` dict in one safetensors
file (tensors plus a JSON description in the metadata; no pickle), and loading gives back
accumulators that can keep accumulating.
"""
from __future__ import annotations

import json

import torch

STATS_FORMAT = "compress-stats"
STATS_VERSION = 1


def _rows(x: torch.Tensor, in_features: int, dtype: torch.dtype, device) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected inputs with {in_features} features in the last dimension, got shape {tuple(x.shape)}")
    return x.detach().reshape(-1, in_features).to(device=device, dtype=dtype)


class _Accumulator:
    kind = ""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        if int(in_features) < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features}")
        self.in_features = int(in_features)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.nsamples = 0

    def _dev(self, x: torch.Tensor):
        if self.device is None:
            self.device = x.device
            self._to(self.device)
        return self.device

    def _to(self, device) -> None:
        raise NotImplementedError

    def add_batch(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def hook(self, module, args, output) -> None:
        """Forward-hook signature: accumulate the module's first positional input."""
        self.add_batch(args[0])

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, tensors: dict[str, torch.Tensor], nsamples: int) -> None:
        """Replace this accumulator's state by ``tensors`` (as :meth:`state` gives them) and ``nsamples``."""
        for key, empty in self.state().items():
            if key not in tensors:
                raise ValueError(f"{self.kind} state needs tensor {key!r}")
            if tuple(tensors[key].shape) != tuple(empty.shape):
                raise ValueError(f"{self.kind} state tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(empty.shape)}")
        self._set(tensors)
        self.nsamples = int(nsamples)

    def _set(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def merge(self, other: "_Accumulator") -> "_Accumulator":
        """Fold ``other`` (the same kind and width, other rows) into this one; returns self."""
        if type(other) is not type(self) or other.in_features != self.in_features:
            raise ValueError(f"cannot merge {other.kind} statistics of width {other.in_features} into "
                             f"{self.kind} statistics of width {self.in_features}")
        if other.nsamples:
            if self.device is None:
                self.device = other.device if other.device is not None else torch.device("cpu")
                self._to(self.device)
            self._merge({k: v.to(self.device, self.dtype) for k, v in other.state().items()}, other.nsamples)
            self.nsamples += other.nsamples
        return self

    def _merge(self, tensors: dict[str, torch.Tensor], nsamples: int) -> None:
        raise NotImplementedError


class HessianAccumulator(_Accumulator):
    """``H = 2/n * sum_rows x x^T`` over every row seen, ``(K, K)``.

    Kept as GPTQ keeps it, a running average: ``H <- H * n/(n+m) + 2/(n+m) X^T X`` for a batch of
    ``m`` rows, so any split of the same rows gives the same ``H`` up to rounding. ``n`` counts
    rows (tokens), so ``H`` does not grow with the amount of data. Use ``dtype=torch.float64``
    for very long calibration runs.
    """

    kind = "hessian"

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, dtype, device)
        self.H = torch.zeros((self.in_features, self.in_features), dtype=dtype, device=self.device)

    def _to(self, device) -> None:
        self.H = self.H.to(device)

    def add_batch(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features, self.dtype, self._dev(x))
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        self.H.mul_(self.nsamples / total)
        self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.nsamples = total

    def hessian(self) -> torch.Tensor:
        return self.H

    def state(self) -> dict[str, torch.Tensor]:
        return {"H": self.H}

    def _set(self, tensors):
        self.H = tensors["H"].to(self.dtype)

    def _merge(self, tensors, nsamples):
        total = self.nsamples + nsamples
        self.H.mul_(self.nsamples / total).add_(tensors["H"], alpha=nsamples / total)


class ImportanceAccumulator(_Accumulator):
    """Per input column ``sum x^2`` and the number of rows seen; ``importance() = sum / count``.

    The same quantities llama.cpp's imatrix stores (``in_sum2`` and ``counts``).
    """

    kind = "importance"

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, dtype, device)
        self.sum_sq = torch.zeros(self.in_features, dtype=dtype, device=self.device)

    def _to(self, device) -> None:
        self.sum_sq = self.sum_sq.to(device)

    def add_batch(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features, self.dtype, self._dev(x))
        self.sum_sq.add_((x * x).sum(dim=0))
        self.nsamples += x.shape[0]

    @property
    def count(self) -> int:
        return self.nsamples

    def importance(self) -> torch.Tensor:
        """Mean of ``x^2`` per input column, ``(K,)``."""
        if self.nsamples == 0:
            raise ValueError("no samples accumulated yet")
        return self.sum_sq / self.nsamples

    def state(self) -> dict[str, torch.Tensor]:
        return {"sum_sq": self.sum_sq}

    def _set(self, tensors):
        self.sum_sq = tensors["sum_sq"].to(self.dtype)

    def _merge(self, tensors, nsamples):
        self.sum_sq.add_(tensors["sum_sq"])


class AbsMaxAccumulator(_Accumulator):
    """Per input column ``max |x|`` over every row seen, ``(K,)``."""

    kind = "absmax"

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, dtype, device)
        self.max_abs = torch.zeros(self.in_features, dtype=dtype, device=self.device)

    def _to(self, device) -> None:
        self.max_abs = self.max_abs.to(device)

    def add_batch(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features, self.dtype, self._dev(x))
        if x.shape[0] == 0:
            return
        torch.maximum(self.max_abs, x.abs().amax(dim=0), out=self.max_abs)
        self.nsamples += x.shape[0]

    def absmax(self) -> torch.Tensor:
        return self.max_abs

    def state(self) -> dict[str, torch.Tensor]:
        return {"max_abs": self.max_abs}

    def _set(self, tensors):
        self.max_abs = tensors["max_abs"].to(self.dtype)

    def _merge(self, tensors, nsamples):
        torch.maximum(self.max_abs, tensors["max_abs"], out=self.max_abs)


class MeanAbsAccumulator(_Accumulator):
    """Per input column ``sum |x|`` and the number of rows seen; ``mean() = sum / count`` (AWQ)."""

    kind = "meanabs"

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, dtype, device)
        self.sum_abs = torch.zeros(self.in_features, dtype=dtype, device=self.device)

    def _to(self, device) -> None:
        self.sum_abs = self.sum_abs.to(device)

    def add_batch(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features, self.dtype, self._dev(x))
        self.sum_abs.add_(x.abs().sum(dim=0))
        self.nsamples += x.shape[0]

    def mean(self) -> torch.Tensor:
        if not self.nsamples:
            raise ValueError("no samples accumulated yet")
        return self.sum_abs / self.nsamples

    def state(self) -> dict[str, torch.Tensor]:
        return {"sum_abs": self.sum_abs}

    def _set(self, tensors):
        self.sum_abs = tensors["sum_abs"].to(self.dtype)

    def _merge(self, tensors, nsamples):
        self.sum_abs.add_(tensors["sum_abs"])


_KINDS = {c.kind: c for c in (HessianAccumulator, ImportanceAccumulator, AbsMaxAccumulator, MeanAbsAccumulator)}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def save_stats(path, stats: dict) -> None:
    """Write ``{name: accumulator or tensor}`` to a safetensors file (tensors on CPU, description in
    metadata). Plain tensors hold results of a search (e.g. AWQ's scales) next to the statistics."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name, acc in stats.items():
        if isinstance(acc, torch.Tensor):
            entries[name] = {"kind": "tensor"}
            tensors[f"{name}/value"] = acc.detach().cpu().contiguous()
            continue
        if not isinstance(acc, _Accumulator):
            raise TypeError(f"stats[{name!r}] is a {type(acc).__name__}, not a statistics accumulator or a tensor")
        dtype_name = str(acc.dtype).removeprefix("torch.")
        entries[name] = {"kind": acc.kind, "in_features": acc.in_features, "nsamples": acc.nsamples,
                         "dtype": dtype_name}
        for field, t in acc.state().items():
            tensors[f"{name}/{field}"] = t.detach().cpu().contiguous()
    meta = {"format": STATS_FORMAT, "version": str(STATS_VERSION), "entries": json.dumps(entries)}
    save_file(tensors, str(path), metadata=meta)


def check_header(meta: dict, fmt: str, version: int, what: str, path) -> None:
    """Refuse a safetensors side file whose metadata is not ``fmt`` at ``version``."""
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not {what} (format {meta.get('format')!r}, expected {fmt!r})")
    if meta.get("version") != str(version):
        raise ValueError(f"{path}: unsupported {what} version {meta.get('version')}; this version reads {version}")


def load_stats(path, device=None) -> dict:
    """Read a file written by :func:`save_stats` back into accumulators (which can keep accumulating)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        check_header(meta, STATS_FORMAT, STATS_VERSION, "a statistics file", path)
        entries = json.loads(meta["entries"])
        keys = set(f.keys())
        out: dict[str, _Accumulator] = {}
        for name, e in entries.items():
            if e["kind"] == "tensor":
                if f"{name}/value" not in keys:
                    raise ValueError(f"{path}: tensor {name + '/value'!r} is missing")
                out[name] = f.get_tensor(f"{name}/value")
                continue
            cls = _KINDS.get(e["kind"])
            if cls is None:
                raise ValueError(f"{path}: unknown accumulator kind {e['kind']!r} for {name!r}")
            acc = cls(e["in_features"], dtype=_DTYPES[e["dtype"]], device=device)
            tensors = {}
            for field in acc.state():
                key = f"{name}/{field}"
                if key not in keys:
                    raise ValueError(f"{path}: tensor {key!r} is missing")
                tensors[field] = f.get_tensor(key)
            try:
                acc.load_state(tensors, int(e["nsamples"]))
            except ValueError as err:
                raise ValueError(f"{path}: {name}: {err}") from None
            acc._to(acc.device if acc.device is not None else torch.device("cpu"))
            out[name] = acc
    return out

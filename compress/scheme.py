"""Quantization schemes: small frozen dataclasses, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import CompressError

FORMAT_VERSION = 2              # packed checkpoints written now (per-module schemes)
READABLE_VERSIONS = (1, 2)
INT_BITS = (2, 3, 4, 8)
GROUP_SIZES_DOC = "-1 (per-channel) or a positive integer such as 32, 64, 128"


@dataclass(frozen=True)
class IntScheme:
    """Integer group-wise weight quantization (stored in the GPTQ layout).

    bits: 2, 3, 4 or 8. group_size: -1 for one group per output channel, else the number
    of input columns sharing a scale (the last group may be narrower). sym: symmetric
    grid with a fixed zero-point of 2**(bits-1); otherwise an asymmetric min/max grid.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.bits not in INT_BITS:
            raise CompressError(f"bits must be one of {', '.join(map(str, INT_BITS))}, got {self.bits}")
        if not isinstance(self.group_size, int) or self.group_size == 0 or self.group_size < -1:
            raise CompressError(f"group size must be {GROUP_SIZES_DOC}, got {self.group_size}")
        if self.format_version not in READABLE_VERSIONS:
            raise CompressError(f"unsupported format version {self.format_version}; this version reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        """Number of scale rows for a layer with ``in_features`` inputs: ceil(K / group)."""
        self.check_layer(in_features)
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, in_features: int, name: str = "layer") -> None:
        if self.group_size > in_features:
            raise CompressError(
                f"group size {self.group_size} is larger than the input dimension {in_features} of {name}")

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.sym else 'asym'}{' act-order' if self.act_order else ''}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IntScheme":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def key(self) -> dict:
        """The fields that decide the packed tensors (what a per-module record compares)."""
        d = self.to_dict()
        d.pop("format_version", None)
        return d


ACT_SCHEMES = ("dynamic", "static")


@dataclass(frozen=True)
class W8A8Scheme(IntScheme):
    """SmoothQuant-style W8A8 (stored as "w8a8-int8"): int8 symmetric per-output-channel weights
    and int8 activations.

    The weight fields are fixed (bits 8, group_size -1, sym, no act-order) and validated;
    act_scheme: "dynamic" (per-token scales computed at run time) or "static" (one per-tensor
    scale per linear, calibrated as the max |x| over the calibration set).
    """

    bits: int = 8
    group_size: int = -1
    sym: bool = True
    act_scheme: str = "dynamic"

    def __post_init__(self):
        super().__post_init__()
        if self.bits != 8:
            raise CompressError(f"W8A8 weights are 8-bit: bits must be 8, got {self.bits}")
        if self.group_size != -1:
            raise CompressError(f"W8A8 weights are per-channel: group size must be -1, got {self.group_size}")
        if not self.sym:
            raise CompressError("W8A8 weights are symmetric: sym must be true")
        if self.act_order:
            raise CompressError("act_order applies to GPTQ only, not to W8A8")
        if self.act_scheme not in ACT_SCHEMES:
            raise CompressError(f"act_scheme must be one of {', '.join(ACT_SCHEMES)}, got {self.act_scheme!r}")

    def describe(self) -> str:
        act = "dynamic per-token" if self.act_scheme == "dynamic" else "static per-tensor"
        return f"w8a8 int8 per-channel sym, act int8 {act}"

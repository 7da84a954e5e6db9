"""Method options as frozen, validated dataclasses, and which modules a run touches.

A method's config is a frozen dataclass whose fields are declared with :func:`opt`: a default, a
help text, optional choices and bounds, and the command-line flag. Validation happens once, on
construction (``__post_init__``), with an error that names the option and the allowed values; the
CLI, the recipe reader and the Python API all build configs the same way (:meth:`from_dict`).

Targets: a run names the modules it touches and those it ignores, as full module names or
``re:`` patterns matched against the full name (``re:.*mlp\\.down_proj``), the way llm-compressor's
``targets``/``ignore`` work; overrides give a different scheme to the modules they match.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import CompressError
from .scheme import INT_BITS, IntScheme

GROUP_HELP = "Input columns per scale: -1 (per-channel), or a positive size such as 32, 64, 128."


def opt(default: Any, help: str, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, flag: str | None = None, open_min: bool = False, open_max: bool = False):
    """A config field: ``flag`` is the CLI flag (default ``--field-name``; ``--on/--off`` for a
    two-sided boolean); bounds are inclusive unless ``open_min``/``open_max``."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "flag": flag,
            "open_min": open_min, "open_max": open_max}
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def primary_flag(f: dataclasses.Field) -> str:
    """The flag as a user reads it in an error (``--sym/--asym`` -> ``--sym``)."""
    return flag_of(f).split("/")[0]


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options. Subclasses add fields with :func:`opt` and may override
    :meth:`check` for rules that tie several options together."""

    def __post_init__(self):
        for f in fields(self):
            if "help" not in f.metadata:
                continue
            v = getattr(self, f.name)
            m = f.metadata
            name = primary_flag(f)
            if m["choices"] is not None and v is not None and v not in m["choices"]:
                raise CompressError(f"{name} must be one of {', '.join(map(str, m['choices']))}, got {v!r}")
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            lo, hi = m["min"], m["max"]
            if lo is not None and (v <= lo if m["open_min"] else v < lo):
                raise CompressError(f"{name} must be {'>' if m['open_min'] else '>='} {lo}, got {v}")
            if hi is not None and (v >= hi if m["open_max"] else v > hi):
                raise CompressError(f"{name} must be {'<' if m['open_max'] else '<='} {hi}, got {v}")
        self.check()

    def check(self) -> None:
        """Rules across options; raise CompressError."""

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in fields(cls) if "help" in f.metadata]

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "MethodConfig":
        names = {f.name: f for f in cls.option_fields()}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise CompressError(f"{where}unknown option {unknown[0]!r} (options: {', '.join(names)})")
        conv = {}
        for k, v in d.items():
            t = names[k].type if isinstance(names[k].type, str) else getattr(names[k].type, "__name__", "")
            if t.startswith("int") and isinstance(v, str):
                try:
                    v = int(v)
                except ValueError:
                    raise CompressError(f"{where}{primary_flag(names[k])} must be an integer, got {v!r}") from None
            if t.startswith("float") and isinstance(v, (str, int)) and not isinstance(v, bool):
                try:
                    v = float(v)
                except ValueError:
                    raise CompressError(f"{where}{primary_flag(names[k])} must be a number, got {v!r}") from None
            conv[k] = v
        try:
            return cls(**conv)
        except CompressError as e:
            raise CompressError(f"{where}{e}") from None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in self.option_fields()}


@dataclass(frozen=True)
class IntOptions(MethodConfig):
    """Options of the integer grid (the packed gptq-int layout)."""

    bits: int = opt(4, "Bits per weight.", choices=INT_BITS)
    group_size: int = opt(128, GROUP_HELP)
    sym: bool = opt(False, "Symmetric or asymmetric grid.", flag="--sym/--asym")

    def check(self) -> None:
        self.scheme()

    def scheme(self, **override) -> IntScheme:
        d = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym,
             "act_order": bool(getattr(self, "act_order", False))}
        d.update(override)
        return IntScheme(**d)


# --------------------------------------------------------------------------- targets

def _matcher(pattern: str):
    if not isinstance(pattern, str) or not pattern:
        raise CompressError(f"a target must be a module name or 're:<pattern>', got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise CompressError(f"bad target pattern {pattern!r}: {e}") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: name == pattern or name.endswith("." + pattern)


def matches(name: str, patterns) -> bool:
    """Whether full module ``name`` is named by one of ``patterns``: an exact name, a name suffix
    after a dot (``mlp.down_proj``), or ``re:<regex>`` matching the whole name."""
    return any(_matcher(p)(name) for p in patterns)


@dataclass(frozen=True)
class Override:
    """A different scheme for the modules ``targets`` names (scheme fields only: bits, group_size, ...)."""

    targets: tuple[str, ...]
    scheme: dict

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), **self.scheme}


@dataclass(frozen=True)
class Targets:
    """Which modules a step touches: ``targets`` (default: every linear in the decoder blocks),
    minus ``ignore``; ``overrides`` change the scheme of the modules they match (the first match wins)."""

    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()

    def __post_init__(self):
        for p in self.targets + self.ignore + tuple(t for o in self.overrides for t in o.targets):
            _matcher(p)

    def selects(self, name: str) -> bool:
        return (not self.targets or matches(name, self.targets)) and not matches(name, self.ignore)

    def override_for(self, name: str) -> dict:
        for o in self.overrides:
            if matches(name, o.targets):
                return o.scheme
        return {}

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "ignore": list(self.ignore),
                "overrides": [o.to_dict() for o in self.overrides]}

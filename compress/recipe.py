"""Recipes: a list of steps (any registered method with its options and targets, then evaluation
and export steps), validated in full before any work starts.

A recipe is YAML (or JSON)::

    model: smollm2-135m                 # optional: the command line may give it
    calibration: {source: wikitext2, nsamples: 128, seqlen: 512, seed: 0}
    dtype: float16                      # storage dtype of the tensors left unquantized
    steps:
      - method: gptq
        bits: 4
        group_size: 128
        act_order: true
        ignore: [lm_head]
        overrides:                      # a different scheme for some modules
          - targets: ["re:model\\.layers\\.(0|29)\\.mlp\\.down_proj"]
            bits: 8
      - eval: {protocol: wt2-quick, max_windows: 8, base: true}
      - export: {format: gguf, out: model.gguf}

Every ``compress quantize`` command is a one-step recipe (``--save-recipe FILE`` writes it).
An unknown key, method or option is a one-line error naming the step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import MethodConfig, Override, Targets
from .errors import CompressError
from .registry import Method, get

TOP_KEYS = ("model", "calibration", "dtype", "device", "save_stats", "load_stats", "sparse_storage", "max_memory",
            "stream", "steps")
SPARSE_STORAGE = ("compact", "gptq")
STEP_KEYS = ("targets", "ignore", "overrides", "lm_head")
CALIB_KEYS = ("source", "nsamples", "seqlen", "seed", "data_dir")
DTYPES = ("float16", "bfloat16", "float32")
EVAL_KEYS = {"protocol": ("wt2-quick", "wt2-full"), "max_windows": None, "base": None, "json": None}
EXPORT_FORMATS = {"onnx": ("out", "target", "fmt", "kv_cache", "accuracy_level", "lm_head_bits"),
                  "gguf": ("out", "type", "imatrix", "pure")}


def _strs(v, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise CompressError(f"{what} must be a list of module names or 're:' patterns")
    return tuple(v)


@dataclass(frozen=True)
class Step:
    """One compression step: a registered method, its validated options and its targets."""

    method: str
    config: MethodConfig
    targets: Targets = field(default_factory=Targets)
    lm_head: bool = False

    @property
    def cls(self) -> type[Method]:
        return get(self.method)

    @property
    def writes(self) -> str | None:
        """The packed format this step writes (None: it leaves the weights float)."""
        return self.cls.writes(self.config)

    def to_dict(self) -> dict:
        d = {"method": self.method, **{k: v for k, v in self.config.to_dict().items() if v is not None}}
        t = self.targets.to_dict()
        d.update({k: v for k, v in t.items() if v})
        if self.lm_head:
            d["lm_head"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Step":
        d = dict(d)
        name = d.pop("method")
        m = get(name) if isinstance(name, str) else None
        if m is None:
            raise CompressError(f"{where}: method must be a name")
        where = f"{where} ({name})"
        targets = Targets(_strs(d.pop("targets", None), f"{where}: targets"),
                          _strs(d.pop("ignore", None), f"{where}: ignore"),
                          tuple(_override(o, where) for o in (d.pop("overrides", None) or [])))
        lm_head = d.pop("lm_head", False)
        if not isinstance(lm_head, bool):
            raise CompressError(f"{where}: lm_head must be true or false")
        if lm_head and not m.lm_head:
            raise CompressError(f"{where}: lm_head (--lm-head) works with {', '.join(n for n, c in _methods() if c.lm_head)}, "
                                f"not {name}")
        cfg = m.config.from_dict(d, f"{where}: ")
        if lm_head:
            try:
                m.check_head(cfg)
            except CompressError as e:
                raise CompressError(f"{where}: {e}") from None
        step = cls(name, cfg, targets, lm_head)
        inst = m(cfg)
        for o in targets.overrides:          # every override must make a valid scheme for the method
            try:
                inst.scheme_for(o.targets[0], o.scheme)
            except (CompressError, TypeError) as e:
                raise CompressError(f"{where}: override {o.to_dict()}: {e}") from None
        return step


def _methods():
    from .registry import methods
    return methods().items()


def _override(o, where: str) -> Override:
    if not isinstance(o, dict) or "targets" not in o:
        raise CompressError(f"{where}: each override needs 'targets' and scheme fields (e.g. bits: 8)")
    o = dict(o)
    targets = _strs(o.pop("targets"), f"{where}: override targets")
    if not targets or not o:
        raise CompressError(f"{where}: an override needs targets and at least one scheme field")
    return Override(targets, o)


@dataclass(frozen=True)
class EvalStep:
    protocol: str = "wt2-quick"
    max_windows: int | None = None
    base: bool = True
    json: str | None = None

    def to_dict(self) -> dict:
        return {"eval": {k: v for k, v in self.__dict__.items() if v is not None}}


@dataclass(frozen=True)
class ExportStep:
    format: str
    out: str
    options: tuple = ()

    def to_dict(self) -> dict:
        return {"export": {"format": self.format, "out": self.out, **dict(self.options)}}


def _eval(d, where) -> EvalStep:
    d = d or {}
    if not isinstance(d, dict):
        raise CompressError(f"{where}: eval takes a mapping of options")
    for k, v in d.items():
        if k not in EVAL_KEYS:
            raise CompressError(f"{where} (eval): unknown option {k!r} (options: {', '.join(EVAL_KEYS)})")
        if EVAL_KEYS[k] and v not in EVAL_KEYS[k]:
            raise CompressError(f"{where} (eval): {k} must be one of {', '.join(EVAL_KEYS[k])}, got {v!r}")
    mw = d.get("max_windows")
    if mw is not None and (not isinstance(mw, int) or mw < 1):
        raise CompressError(f"{where} (eval): max_windows must be a positive integer, got {mw!r}")
    return EvalStep(**d)


def _export(d, where) -> ExportStep:
    if not isinstance(d, dict) or d.get("format") not in EXPORT_FORMATS:
        raise CompressError(f"{where} (export): format must be one of {', '.join(EXPORT_FORMATS)}")
    d = dict(d)
    fmt = d.pop("format")
    for k in d:
        if k not in EXPORT_FORMATS[fmt]:
            raise CompressError(f"{where} (export {fmt}): unknown option {k!r} "
                                f"(options: {', '.join(EXPORT_FORMATS[fmt])})")
    if not d.get("out"):
        raise CompressError(f"{where} (export {fmt}): 'out' (the output path) is required")
    out = d.pop("out")
    if fmt == "gguf" and not str(out).endswith(".gguf"):
        raise CompressError(f"{where} (export gguf): out must end with .gguf, got {out}")
    if fmt == "onnx":
        from .export.onnx_options import resolve_target
        try:
            resolve_target(d.get("target", "balanced"), d.get("fmt"), d.get("accuracy_level"), None,
                           d.get("lm_head_bits"))
        except CompressError as e:
            raise CompressError(f"{where} (export onnx): {e}") from None
    return ExportStep(fmt, str(out), tuple(sorted(d.items())))


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    post: tuple = ()                         # EvalStep / ExportStep, run on the output
    model: str | None = None
    calibration: dict = field(default_factory=dict)
    dtype: str = "float16"
    device: str = "cpu"
    save_stats: str | None = None
    load_stats: str | None = None
    sparse_storage: str = "compact"          # pruned and quantized modules: compact codes, or plain GPTQ layout
    max_memory: str | None = None            # refuse a run whose estimated peak exceeds this (else: available memory)
    stream: bool = False                     # read each block's weights when the runner reaches it (compress.stream)

    def __post_init__(self):
        if self.max_memory is not None:
            from .memory import parse_size
            parse_size(self.max_memory)
        if self.sparse_storage not in SPARSE_STORAGE:
            raise CompressError(f"sparse_storage must be one of {', '.join(SPARSE_STORAGE)}, got {self.sparse_storage!r}")
        if not self.steps:
            raise CompressError("a recipe needs at least one compression step (a 'method' step)")
        if self.dtype not in DTYPES:
            raise CompressError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        outputs = {s.cls.output for s in self.steps}
        if "gguf" in outputs and len(self.steps) > 1:
            raise CompressError("a method writing a GGUF file (kquant, kquant-gptq) must be the only compression step")
        whole = [s.method for s in self.steps if s.cls.whole_model]
        if whole and len(self.steps) > 1:
            raise CompressError(f"{whole[0]} changes the model's shape: it must be the only compression step "
                                "(compress its output in a second run)")
        if self.stream:
            if len(self.steps) > 1 or whole:
                raise CompressError("stream runs one compression step (not structured pruning)")
        if whole and (self.save_stats or self.load_stats):
            raise CompressError(f"{whole[0]} keeps no statistics (save_stats/load_stats)")
        formats = {s.writes for s in self.steps} - {None}
        if len(formats) > 1:
            raise CompressError(f"the compression steps write different formats ({', '.join(sorted(formats))}); "
                                "one checkpoint holds one format")
        calibrated = [s for s in self.steps if s.cls.calibrated]
        if (self.save_stats or self.load_stats) and len(calibrated) != 1:
            raise CompressError("save_stats/load_stats need exactly one calibrated step "
                                f"(calibrated methods: {', '.join(n for n, c in _methods() if c.calibrated)})")
        if self.save_stats and self.load_stats:
            raise CompressError("save_stats and load_stats exclude each other")
        if self.calibration and not calibrated:
            raise CompressError(f"calibration options apply to calibrated methods, not to "
                                f"{', '.join(s.method for s in self.steps)}")

    @property
    def output(self) -> str:
        return self.steps[0].cls.output

    @property
    def quantizes(self) -> bool:
        """Whether a step quantizes (else the output is a float, pruned checkpoint)."""
        return any(s.writes is not None for s in self.steps)

    def calib_spec(self):
        from calib.data import CalibSpec
        c = {k: v for k, v in self.calibration.items() if k != "data_dir"}
        return CalibSpec(**{"seqlen": 512, **c})

    def to_dict(self) -> dict:
        d = {"model": self.model, "dtype": self.dtype}
        if self.device != "cpu":
            d["device"] = self.device
        if self.calibration:
            d["calibration"] = dict(self.calibration)
        for k in ("save_stats", "load_stats"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.sparse_storage != "compact":
            d["sparse_storage"] = self.sparse_storage
        if self.max_memory is not None:
            d["max_memory"] = self.max_memory
        if self.stream:
            d["stream"] = True
        d["steps"] = [s.to_dict() for s in self.steps] + [p.to_dict() for p in self.post]
        return {k: v for k, v in d.items() if v is not None}

    def fingerprint(self) -> str:
        """The recipe as it affects the output: steps, calibration and storage dtype."""
        d = self.to_dict()
        d["steps"] = [s.to_dict() for s in self.steps]
        for k in ("model", "save_stats", "device", "max_memory"):
            d.pop(k, None)
        d.get("calibration", {}).pop("data_dir", None)
        return json.dumps(d, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise CompressError("a recipe is a mapping with a 'steps' list")
        unknown = [k for k in d if k not in TOP_KEYS]
        if unknown:
            raise CompressError(f"recipe: unknown key {unknown[0]!r} (keys: {', '.join(TOP_KEYS)})")
        raw = d.get("steps")
        if not isinstance(raw, list) or not raw:
            raise CompressError("recipe: 'steps' must be a non-empty list")
        steps, post = [], []
        for n, s in enumerate(raw, 1):
            where = f"step {n}"
            if not isinstance(s, dict):
                raise CompressError(f"{where}: a step is a mapping with 'method', 'eval' or 'export'")
            kinds = [k for k in ("method", "eval", "export") if k in s]
            if len(kinds) != 1:
                raise CompressError(f"{where}: give exactly one of 'method', 'eval' or 'export' (got {sorted(s)})")
            if kinds[0] == "method":
                if post:
                    raise CompressError(f"{where}: compression steps come before eval and export steps")
                steps.append(Step.from_dict(s, where))
            elif len(s) != 1:
                raise CompressError(f"{where}: unknown key {sorted(set(s) - {kinds[0]})[0]!r} beside {kinds[0]!r}")
            else:
                post.append(_eval(s["eval"], where) if kinds[0] == "eval" else _export(s["export"], where))
        calib = d.get("calibration") or {}
        if not isinstance(calib, dict) or any(k not in CALIB_KEYS for k in calib):
            bad = [k for k in calib if k not in CALIB_KEYS] if isinstance(calib, dict) else [calib]
            raise CompressError(f"recipe: unknown calibration key {bad[0]!r} (keys: {', '.join(CALIB_KEYS)})")
        if calib:
            from calib.data import CalibError, CalibSpec
            try:
                CalibSpec(**{k: v for k, v in calib.items() if k != "data_dir"})
            except (CalibError, TypeError) as e:
                raise CompressError(f"recipe: calibration: {e}") from None
        return cls(tuple(steps), tuple(post), d.get("model"), dict(calib), d.get("dtype", "float16"),
                   d.get("device", "cpu"), d.get("save_stats"), d.get("load_stats"),
                   d.get("sparse_storage", "compact"), d.get("max_memory"), bool(d.get("stream", False)))


def read(path: Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CompressError(f"cannot read recipe {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CompressError(f"{path} is not a text file") from None
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CompressError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return Recipe.from_dict(data)


def write(recipe: Recipe, path: Path) -> None:
    import yaml

    from .fileio import atomic_text
    atomic_text(Path(path), yaml.safe_dump(recipe.to_dict(), sort_keys=False))

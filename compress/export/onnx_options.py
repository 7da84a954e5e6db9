"""The options of an ONNX export that depend on nothing heavy (no torch, no onnx): formats,
targets, accuracy levels, and the ONNX Runtime session config an exported folder is run with.
Recipes check export steps with these before any work starts."""
from __future__ import annotations

from ..errors import CompressError

FORMATS = ("matmulnbits", "qdq")
TARGETS = ("balanced", "decode", "prefill")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
FOLD_AT_LOAD = "session.disable_quant_qdq"      # ONNX Runtime then constant-folds DequantizeLinear


def check_level(level, what: str = "accuracy level") -> None:
    """Refuse an accuracy level MatMulNBits does not have."""
    if level not in ACCURACY_LEVELS:
        raise CompressError(f"{what} must be one of {', '.join(map(str, ACCURACY_LEVELS))}, got {level}")


def resolve_target(target: str, fmt: str | None, accuracy_level: int | None, contrib_ops: bool | None,
                   lm_head_bits: int | None) -> tuple[str, int, bool, bool]:
    """``(fmt, accuracy_level, contrib_ops, float_at_load)`` for a target and the explicit options
    (None: the target's); an option that contradicts the target or the format is a CompressError."""
    if target not in TARGETS:
        raise CompressError(f"ONNX target must be one of {', '.join(TARGETS)}, got {target!r}")
    if fmt is not None and fmt not in FORMATS:
        raise CompressError(f"ONNX format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if target == "prefill":
        if fmt == "matmulnbits":
            raise CompressError("target prefill writes DequantizeLinear weights that ONNX Runtime expands at load; "
                                "it does not go with the matmulnbits format")
        if accuracy_level is not None:
            raise CompressError("target prefill runs fp32 MatMuls: an accuracy level does not apply")
        if lm_head_bits is not None:
            raise CompressError("target prefill runs fp32 MatMuls: quantize the lm_head in the checkpoint instead")
        # the qdq weights with the contrib attention: folded, the graph is the fp32 export's
        return "qdq", 0, contrib_ops is not False, True
    fmt = fmt or "matmulnbits"
    level = (4 if target == "decode" else 0) if accuracy_level is None else accuracy_level
    check_level(level)
    if target == "decode" and level != 4:
        raise CompressError(f"target decode is accuracy level 4, got accuracy level {level}")
    if fmt == "qdq":
        if lm_head_bits is not None:
            raise CompressError("lm_head quantization is implemented for the matmulnbits format only")
        if contrib_ops:
            raise CompressError("the qdq format uses standard ONNX ops only (contrib_ops must be off)")
    return fmt, level, (fmt == "matmulnbits") if contrib_ops is None else bool(contrib_ops), False


def session_config(info: dict, qdq_accuracy_level: int | None = None) -> dict:
    """The ONNX Runtime session config entries an exported folder is run with (by
    :class:`compress.runtime_onnx.OnnxCausalLM` and, through genai_config.json, by ONNX Runtime
    GenAI): weights expanded at load for the prefill target, else for the qdq format the accuracy
    level of the MatMulNBits nodes ONNX Runtime fuses (``qdq_accuracy_level``, default: the export's)."""
    if info.get("weights_at_load") == "float":
        return {FOLD_AT_LOAD: "1"}
    if info.get("format") != "qdq":
        return {}
    level = info.get("accuracy_level", 0) if qdq_accuracy_level is None else qdq_accuracy_level
    check_level(level)
    return {"session.qdq_matmulnbits_accuracy_level": str(int(level))}

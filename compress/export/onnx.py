"""ONNX export of decoder-only checkpoints, for ONNX Runtime on CPU and edge devices.

``export_onnx(loaded, out_dir, fmt, kv_cache, accuracy_level)`` writes a folder holding
``model.onnx`` (the graph), ``model.onnx.data`` (every large initializer, one external-data file),
the tokenizer files, ``config.json``, ``export_info.json`` and, with the KV cache,
``genai_config.json`` (ONNX Runtime GenAI, :mod:`compress.export.genai`). The graph is built by
hand with ``onnx.helper`` from the architecture (no tracing), so every quantized linear keeps the
exact integers, scales and zero-points of the packed checkpoint. docs/ONNX.md describes the formats.

Formats
-------
``matmulnbits`` (default)
    Each quantized linear becomes ``com.microsoft::MatMulNBits`` (bits 2, 4 or 8; block sizes
    16..128, powers of two). 3-bit checkpoints are promoted to 4-bit losslessly (same values,
    scales and zero-points). Groups that are not a power-of-two block (per-channel, 256, 96, ...)
    are written as the largest power-of-two block that divides every group boundary, with the
    scales and zero-points repeated; a narrower last group is the padded last block MatMulNBits
    supports. Act-order checkpoints (a permuted ``g_idx``) are written with the input columns
    sorted by group and a ``Gather`` that permutes the activations the same way (exact; the
    fast MatMulNBits kernels do not take ``g_idx``). Attention uses the ORT contrib ops
    ``GroupQueryAttention`` (rotary embedding inside, from the model's own cos/sin table) and
    ``SkipSimplifiedLayerNormalization``; q/k/v and gate/up are fused into one MatMulNBits each.
``qdq``
    Standard ONNX only (opset 21): blocked ``DequantizeLinear`` (INT4 / UINT4 / INT8 / UINT8,
    zero-points for asymmetric grids) feeding ``MatMul``; RMSNorm, rotary embedding and attention
    decomposed into standard ops. ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits
    itself; other runtimes run it as written.

Targets
-------
``target`` picks the settings for the workload the file is run for (docs/ONNX.md has the
measurements behind them):

``balanced`` (default)
    The format as asked (MatMulNBits unless ``fmt="qdq"``) at accuracy level 0: the weights stay
    4-bit in memory, activations stay fp32 (exact); decode is faster than fp32, prefill close to it.
``decode``
    Accuracy level 4 (int8 activations inside MatMulNBits): the fastest decode, not exact, and a
    slower prefill than fp32 on CPUs without int8 dot-product instructions.
``prefill``
    The weights are written as blocked ``DequantizeLinear`` (the file is as small as the qdq
    format), with the contrib attention of the matmulnbits format, and the folder asks ONNX Runtime
    to expand them to fp32 once at load (session config ``session.disable_quant_qdq``: constant
    folding then folds every DequantizeLinear). After loading, the graph is the fp32 model's:
    prefill and decode run the fp32 kernels on every CPU, and memory is the fp32 model's.

Unquantized linears (an fp32 model, or the lm_head) are plain ``MatMul`` / ``Gemm``; a tensor
whose values are all float16-representable (the checkpoint stores them as float16) is written
as float16 with a ``Cast`` (lossless, half the bytes).

Graph inputs/outputs (KV cache): ``input_ids`` int64 (batch, sequence), ``attention_mask`` int64
(batch, total_sequence), ``position_ids`` int64 (batch, sequence),
``past_key_values.{i}.key|value`` float32 (batch, kv_heads, past_sequence, head_dim) ->
``logits`` float32 (batch, sequence, vocab), ``present.{i}.key|value`` (batch, kv_heads,
total_sequence, head_dim). Without the KV cache the past inputs and present outputs are absent.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import AtomicFolder
from ..errors import CompressError
from ..formats import gptq_int
from .genai import write_for_export
from .onnx_decoder import SUPPORTED_MODEL_TYPES, build_decoder
from .onnx_graph import DATA_FILE, EXTERNAL_MIN_BYTES, Graph, Options
from .onnx_options import FOLD_AT_LOAD, FORMATS, TARGETS, check_level, resolve_target, session_config
from .onnx_weights import (IntWeight, int_weight, pack_lowfirst, pack_matmulnbits, pack_qdq,  # noqa: F401 (API)
                           unpack_lowfirst)

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
INFO_FILE = "export_info.json"
EXPORT_FORMAT_VERSION = 1
IR_VERSION = 10              # ONNX Runtime 1.30 rejects the IR version onnx 1.23 writes by default
ONNX_OPSET = 21              # blocked DequantizeLinear with INT4/UINT4
MS_OPSET = 1
__all__ = ["export_onnx", "session_config", "resolve_target", "FORMATS", "TARGETS", "FOLD_AT_LOAD", "file_sizes",
           "copy_tokenizer", "IntWeight", "int_weight", "pack_lowfirst", "pack_matmulnbits", "pack_qdq",
           "unpack_lowfirst", "DATA_FILE", "EXTERNAL_MIN_BYTES", "MODEL_FILE", "INFO_FILE"]


# --------------------------------------------------------------------------- the public entry point

def export_onnx(loaded, out_dir, fmt: str | None = None, kv_cache: bool = True, accuracy_level: int | None = None, *,
                target: str = "balanced", lm_head_bits: int | None = None, lm_head_block_size: int = 32,
                lm_head_accuracy_level: int | None = None, contrib_ops: bool | None = None,
                check: bool = True) -> dict:
    """Export a model (a packed checkpoint or an unquantized one) to an ONNX folder.

    ``loaded``: a :class:`compress.models.Loaded` or anything :func:`compress.models.load` takes.
    ``fmt``: ``"matmulnbits"`` (ONNX Runtime contrib ops) or ``"qdq"`` (standard opset-21 ops);
    None: the target's. ``kv_cache``: past/present KV inputs and outputs for token-by-token
    generation; False gives a plain logits model. ``accuracy_level``: MatMulNBits' attribute (0 keeps
    fp32 activations; 4 quantizes activations to int8 inside the kernel: faster, not exact); None:
    the target's. ``target``: ``balanced``, ``decode`` or ``prefill`` (module docstring).
    ``lm_head_bits`` (4 or 8, matmulnbits only): also quantize the lm_head (round-to-nearest,
    asymmetric, blocks of ``lm_head_block_size``); with tied embeddings the embedding lookup then
    reads the same quantized table (GatherBlockQuantized). This changes the numbers compared with
    the checkpoint; the default keeps the lm_head as stored. ``lm_head_accuracy_level``: the
    lm_head node's accuracy level (default: 4 for an 8-bit lm_head, because ONNX Runtime 1.30 has
    no fast fp32-activation kernel for 8-bit MatMulNBits on CPU; else ``accuracy_level``).
    ``contrib_ops`` (matmulnbits only;
    default True): GroupQueryAttention / SkipSimplifiedLayerNormalization instead of standard ops.

    Writes atomically; returns what ``export_info.json`` records, plus ``out``, ``size_bytes``
    and ``seconds``. Raises CompressError on unsupported models or options.
    """
    t0 = time.perf_counter()
    fmt, accuracy_level, contrib, float_at_load = resolve_target(target, fmt, accuracy_level, contrib_ops,
                                                                 lm_head_bits)
    if lm_head_accuracy_level is None:
        lm_head_accuracy_level = 4 if lm_head_bits == 8 else accuracy_level
    check_level(lm_head_accuracy_level, "lm_head accuracy level")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'compress-suite[onnx]'") from None

    if not hasattr(loaded, "model"):
        from .. import models
        loaded = models.load(str(loaded))
    family = loaded.arch.family
    model_type = getattr(loaded.model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CompressError(f"ONNX export supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                            f"{loaded.source} is {model_type!r} ({family})")
    packed_format = (loaded.quant or {}).get("format")
    if loaded.kind == "packed" and packed_format != gptq_int.FORMAT_ID:
        raise CompressError(f"ONNX export reads {gptq_int.FORMAT_ID} checkpoints and unquantized models; "
                            f"{loaded.source} is a {packed_format} checkpoint")
    out_dir = Path(out_dir)
    opt = Options(fmt=fmt, accuracy_level=int(accuracy_level), contrib=contrib)
    with AtomicFolder(out_dir) as tmp:
        g = Graph(tmp / DATA_FILE)
        try:
            with torch.no_grad():
                meta = build_decoder(g, loaded, opt, kv_cache, lm_head_bits, lm_head_block_size,
                                    int(lm_head_accuracy_level))
        finally:
            g.close()
        graph = onnx.helper.make_graph(g.nodes, "compress_decoder", g.inputs, g.outputs, g.inits)
        opsets = [onnx.helper.make_opsetid("", ONNX_OPSET)]
        if any(n.domain == "com.microsoft" for n in g.nodes):
            opsets.append(onnx.helper.make_opsetid("com.microsoft", MS_OPSET))
        proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                       producer_name="compress-suite", producer_version=__version__)
        onnx.save_model(proto, str(tmp / MODEL_FILE))
        if check:
            try:
                onnx.checker.check_model(str(tmp / MODEL_FILE))
            except onnx.checker.ValidationError as e:
                raise CompressError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        else:
            copy_tokenizer(Path(loaded.path), tmp)
        cfg = loaded.model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        gen = getattr(loaded.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        info = _export_info(loaded, opt, kv_cache, meta, lm_head_bits, lm_head_block_size, g,
                            {o.domain or "ai.onnx": o.version for o in opsets})
        info.update(target=target, weights_at_load="float" if float_at_load else "packed")
        info["genai_config"] = (write_for_export(tmp, loaded, session_config(info), meta, info, MODEL_FILE)
                                if kv_cache else None)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    if fmt == "matmulnbits" and accuracy_level < 4 and 8 in info["onnx_bits"]:
        log.warning("8-bit MatMulNBits at accuracy level %d: exact, but ONNX Runtime 1.30 on CPU dequantizes the "
                    "whole 8-bit weight at every call on this path (slower than fp32); accuracy_level=4 is the "
                    "fast 8-bit path", accuracy_level)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.name in (MODEL_FILE, DATA_FILE))
    return {**info, "out": str(out_dir), "size_bytes": size, "seconds": round(time.perf_counter() - t0, 3)}


def _export_info(loaded, opt: Options, kv_cache: bool, meta: dict, lm_head_bits, lm_head_block, g: Graph,
                 opsets: dict) -> dict:
    import onnx
    quant = [r for r in opt.layers if r["kind"] != "fp32"]
    bits = sorted({r["bits"] for r in quant})
    onnx_bits = sorted({r["onnx_bits"] for r in quant})
    blocks = sorted({r["block_size"] for r in quant})
    notes = []
    if 3 in bits:
        notes.append("3-bit weights are stored as 4-bit (same values, scales and zero-points; lossless)")
    if any(r["permuted"] for r in quant):
        notes.append("act-order layers: input columns sorted by group, activations permuted by a Gather")
    if opt.fmt == "qdq" and 2 in bits:
        notes.append("2-bit weights are stored as 4-bit DequantizeLinear inputs (lossless)")
    if lm_head_bits is not None:
        notes.append(f"lm_head quantized to {lm_head_bits} bits at export (round-to-nearest, asymmetric, "
                     f"block {lm_head_block}): not in the checkpoint")
    scheme = loaded.quant.get("scheme") if loaded.quant else None
    io_in = [v.name for v in g.inputs]
    io_out = [v.name for v in g.outputs]
    return {
        "export_format": "compress-onnx", "export_format_version": EXPORT_FORMAT_VERSION,
        "format": opt.fmt, "kv_cache": kv_cache, "accuracy_level": opt.accuracy_level, "contrib_ops": opt.contrib,
        "bits": bits, "onnx_bits": onnx_bits, "block_size": blocks[0] if len(blocks) == 1 else blocks,
        "quantized_linears": sum(len(r["modules"]) for r in quant),
        "fp32_linears": sum(len(r["modules"]) for r in opt.layers if r["kind"] == "fp32"),
        "onnx_matmuls": len(opt.layers),
        "lm_head_bits": lm_head_bits, "lm_head_block_size": lm_head_block if lm_head_bits else None,
        "lm_head_accuracy_level": meta.get("lm_head_accuracy_level"),
        "source": str(loaded.source), "source_path": str(loaded.path), "source_kind": loaded.kind,
        "source_scheme": scheme, "source_label": loaded.scheme_label,
        "model": meta, "inputs": io_in, "outputs": io_out,
        "files": {"model": MODEL_FILE, "data": DATA_FILE if (Path(g._data_path).exists()) else None},
        "ir_version": IR_VERSION, "opsets": opsets,
        "notes": notes, "layers": opt.layers,
        "package_version": __version__, "onnx_version": onnx.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def file_sizes(out_dir) -> dict:
    """Bytes of the graph and its external data in an exported folder."""
    out_dir = Path(out_dir)
    sizes = {p.name: p.stat().st_size for p in (out_dir / MODEL_FILE, out_dir / DATA_FILE) if p.exists()}
    sizes["total"] = sum(sizes.values())
    return sizes


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of ``src`` (used when the loaded model carries no tokenizer object)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "chat_template.jinja"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)

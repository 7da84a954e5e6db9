"""Packed checkpoints rewritten in the compressed-tensors layout, the format vLLM and llm-compressor
load natively (written without that library; tests read it back with its own decompressors).

* gptq-int linears at 4 or 8 bits -> ``pack-quantized``: ``<m>.weight_packed`` int32
  ``(N, ceil(K / (32 / bits)))`` holding the codes as signed integers ``q - 2**(bits-1)`` shifted back
  by ``2**(bits-1)`` and packed little-end first along the input dimension; ``<m>.weight_scale``
  ``(N, G)`` (float16, the checkpoint's own); ``<m>.weight_zero_point`` for asymmetric grids, the
  signed zero-points packed the same way along the output dimension ``(ceil(N / (32 / bits)), G)``;
  ``<m>.weight_g_idx`` int32 ``(K,)`` when the groups are not in column order (act-order);
  ``<m>.weight_shape`` int32 ``(2,)``. ``W = (q_signed - zp_signed) * scale``, the same numbers.
* W8A8 linears -> ``int-quantized``: ``<m>.weight`` int8 ``(N, K)``, ``<m>.weight_scale`` float32
  ``(N, 1)``, ``<m>.input_scale`` for static activations; activations per token and dynamic, or per
  tensor and static.

``config.json``'s ``quantization_config`` lists one config group per scheme (targets: the exact
module names) and ``ignore`` for the linears left in float. 2- and 3-bit grids (no vLLM kernel
reads them) and pruned modules stored compactly are refused with a one-line error.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CompressError
from ..formats import gptq_int
from ..formats.gptq_int import pack_bitstream
from ..formats.sparse import CT_VERSION, QUANT_METHOD

PACKED = "pack-quantized"
NAIVE = "int-quantized"
PACKED_BITS = (4, 8)


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``values`` (int, in ``[-2**(bits-1), 2**(bits-1))``) packed ``32 // bits`` per int32
    along ``dim`` (0 or 1), the first value in the lowest bits; the last word zero-padded: the
    GPTQ bit stream (:func:`compress.formats.gptq_int.pack_bitstream`) of the values shifted to unsigned."""
    u = values.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        return pack_bitstream(u, bits)
    return pack_bitstream(u.t().contiguous(), bits).t().contiguous()


def _int_tensors(p: gptq_int.PackedInt, sym: bool) -> dict[str, torch.Tensor]:
    q, zeros = gptq_int.unpack(p)                                   # (N, K) codes, (G, N) zero-points
    off = 1 << (p.bits - 1)
    out = {"weight_packed": pack_int32(q.to(torch.int64) - off, p.bits, dim=1),
           "weight_scale": p.scales.t().contiguous(),
           "weight_shape": torch.tensor([p.out_features, p.in_features], dtype=torch.int32)}
    if not sym:
        out["weight_zero_point"] = pack_int32(zeros.t().to(torch.int64) - off, p.bits, dim=0)
    g = p.g_idx.to(torch.int64)
    if not torch.equal(g, torch.sort(g).values):
        out["weight_g_idx"] = p.g_idx.to(torch.int32).contiguous()
    return out


def _int_scheme(scheme, names: list[str], act_order: bool) -> dict:
    grouped = scheme.group_size not in (None, -1)
    return {"targets": names, "input_activations": None, "output_activations": None,
            "weights": {"num_bits": scheme.bits, "type": "int", "symmetric": bool(scheme.sym),
                        "strategy": "group" if grouped else "channel",
                        "group_size": scheme.group_size if grouped else None, "dynamic": False,
                        "actorder": "group" if act_order else None, "block_structure": None, "observer": None}}


def _w8a8_scheme(static: bool, names: list[str]) -> dict:
    acts = ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
            if static else {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True})
    return {"targets": names, "output_activations": None, "input_activations": {**acts, "group_size": None},
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                        "dynamic": False}}


def export(spec: str, out: Path, dtype: str = "float16") -> dict:
    """Rewrite the packed checkpoint ``spec`` in the compressed-tensors layout at ``out`` (atomically)."""
    from .. import models
    from ..checkpoint import model_tensors, write_folder
    from ..qlinear import QuantLinear, W8A8Linear
    out = Path(out)
    if out.suffix == ".gguf" or (out.exists() and not out.is_dir()):
        raise CompressError(f"compressed-tensors export writes a checkpoint folder, got {out}")
    loaded = models.load(spec)
    if loaded.kind != "packed":
        if loaded.quant.get("sparse_modules") is not None:
            raise CompressError(f"{spec} is a sparse checkpoint, already in the compressed-tensors layout")
        raise CompressError(f"{spec} is not a packed checkpoint; quantize it first (compress quantize ...)")
    if loaded.quant.get("compact_modules"):
        raise CompressError(f"{spec} stores pruned codes compactly; quantize with --sparse-storage gptq to export it")
    schemes = loaded.quant.get("modules") or {}
    tensors = model_tensors(loaded, dtype)
    groups: dict[tuple, list[str]] = {}
    formats = set()
    for name, mod in loaded.model.named_modules():
        if isinstance(mod, QuantLinear):
            sc = schemes[name]
            if mod.bits not in PACKED_BITS:
                raise CompressError(f"{name} is {mod.bits}-bit: compressed-tensors' pack-quantized layout is "
                                    f"read at {' or '.join(map(str, PACKED_BITS))} bits")
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                tensors.pop(f"{name}.{k}")
            t = _int_tensors(mod.packed(), sc.sym)
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
            key = ("int", sc.bits, sc.group_size, bool(sc.sym), "weight_g_idx" in t)
            formats.add(PACKED)
        elif isinstance(mod, W8A8Linear):
            static = mod.input_scale is not None
            tensors[f"{name}.weight_scale"] = mod.weight_scale.to(torch.float32).reshape(-1, 1).contiguous()
            if static:
                tensors[f"{name}.input_scale"] = mod.input_scale.to(torch.float32).reshape(1).contiguous()
            key = ("w8a8", static)
            formats.add(NAIVE)
        else:
            continue
        groups.setdefault(key, []).append(name)
    if len(formats) != 1:
        raise CompressError(f"{spec} mixes weight-only and W8A8 linears; compressed-tensors needs one format")
    fmt = formats.pop()
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        if key[0] == "int":
            sc = schemes[names[0]]
            config_groups[f"group_{i}"] = _int_scheme(sc, names, key[4])
        else:
            config_groups[f"group_{i}"] = _w8a8_scheme(key[1], names)
    quantized = {n for names in groups.values() for n in names}
    ignore = sorted(n for n, m in loaded.model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n not in quantized)
    cfg = loaded.model.config.to_dict()
    cfg.pop("compress", None)
    cfg["torch_dtype"] = dtype
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format": fmt, "quantization_status": "compressed", "version": CT_VERSION,
        "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}}
    from .. import __version__
    cfg["compress"] = {"exported_from": str(loaded.path), "source_format": loaded.quant.get("format"),
                       "package_version": __version__}
    write_folder(loaded, out, tensors, cfg, {"compress_format": f"compressed-tensors/{fmt}"})
    return {"out": str(out), "format": fmt, "modules": len(quantized), "groups": len(config_groups),
            "size_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}

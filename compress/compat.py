"""What differs between the transformers majors the suite reads models with (4.57 and 5.x): where
``no_init_weights`` lives, GPT-NeoX's head (``embed_out`` in 4.57, ``lm_head`` in 5.x), and the
rotary settings (4.57: ``rope_theta`` and ``rope_scaling`` attributes, Gemma 3's local base as
``rope_local_base_freq``; 5.x: one ``rope_parameters`` dict, per layer type for models that mix
sliding and full attention)."""
from __future__ import annotations

from importlib.metadata import version

TRANSFORMERS_MAJOR = int(version("transformers").split(".")[0])
NEOX_HEAD = "lm_head" if TRANSFORMERS_MAJOR >= 5 else "embed_out"


def no_init_weights():
    """A context in which ``from_config`` leaves the weights uninitialised."""
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:
        from transformers.modeling_utils import no_init_weights as ctx
    return ctx()


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """``{"rope_theta": ..., "rope_type": ..., <scaling keys>}`` of ``config``'s layers of
    ``layer_type`` (the full-attention layers unless asked otherwise)."""
    p = getattr(config, "rope_parameters", None)
    if isinstance(p, dict) and p:
        if all(isinstance(v, dict) for v in p.values()):
            p = p.get(layer_type) or p.get("full_attention") or next(iter(p.values()))
        return dict(p)
    out = dict(getattr(config, "rope_scaling", None) or {})
    if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        return {"rope_theta": float(config.rope_local_base_freq), "rope_type": "default"}
    out.setdefault("rope_theta", float(getattr(config, "rope_theta", 10000.0)))
    out.setdefault("rope_type", out.get("type", "default"))
    return out


def rope_scaling(config) -> dict | None:
    """The full-attention layers' rotary scaling; None when positions are not scaled."""
    p = rope_parameters(config)
    return None if (p.get("rope_type") or p.get("type") or "default") == "default" else p


def gguf_dense() -> dict:
    """Keyword arguments for ``from_pretrained(..., gguf_file=...)`` that give a plain float model:
    transformers 5 otherwise marks a GGUF-loaded model as quantized (``.float()``/``.half()``
    refused) and, with the ``kernels`` package present, keeps its weights in GGUF blocks."""
    if TRANSFORMERS_MAJOR < 5:
        return {}
    from transformers import GgufConfig
    return {"quantization_config": GgufConfig(dequantize=True)}

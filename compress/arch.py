"""Architecture descriptions as data.

Each family says where its decoder blocks live, which linears each block holds and which of
them share an input (with the module that produces that input: a norm, or a preceding linear).
Calibrated methods walk these descriptions; nothing else in the suite knows model classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CompressError


@dataclass(frozen=True)
class LinearGroup:
    """Linears inside a block that read the same input, in execution order.

    ``prev`` is the block-relative name of the module whose output is that input (a norm or a
    linear); a function-preserving rescale of the input channels divides ``prev``'s output
    (its weight rows, and bias) and multiplies the group's weight columns, where ``scalable``.
    """

    prev: str
    linears: tuple[str, ...]
    scalable: bool = True             # False: ``prev``'s output is not this group's input channel for channel
                                      # (a fused projection of which only a slice feeds the group)


@dataclass(frozen=True)
class Widths:
    """Where a block's prunable widths live, for structured pruning: the attention projections
    that read the hidden state and produce heads (``qkv``), the one that reads the heads back
    (``attn_out``), the MLP's input and output linears, the block's norms, and the ``config.json``
    key of each width."""

    q: str
    k: str
    v: str
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    norms: tuple[str, ...]
    head_norms: tuple[str, ...] = ()    # per-head norms (Qwen3's q/k norms): head_dim wide, never cut
    attn_fn: str = "self_attn"          # module whose ``layer_idx`` addresses the KV cache
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    mlp_key: str = "intermediate_size"
    hidden_key: str = "hidden_size"
    layers_key: str = "num_hidden_layers"


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks: str                       # dotted path to the ModuleList of decoder blocks
    embeddings: tuple[str, ...]       # modules before the blocks
    final_norm: str
    lm_head: str
    groups: tuple[LinearGroup, ...]   # in execution order inside a block
    qk_linears: tuple[str, ...] = ()  # query/key projections: their error shows only through attention scores
    # config.json keys the weight shapes come from: transformers fills a missing one with its own
    # default (hidden_size 4096 for llama) and only fails later, on a size mismatch in the weights
    required_config: tuple[str, ...] = ()
    widths: Widths | None = None      # None: structured pruning is not described for this family
    norm_offset: float = 0.0          # the norms multiply by (offset + weight): Gemma's RMSNorm has 1.0

    @property
    def block_linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)

    def get_blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.blocks)

    def linear_names(self, model: torch.nn.Module) -> list[str]:
        """Full names of every linear in every decoder block, block by block."""
        n = len(self.get_blocks(model))
        return [f"{self.blocks}.{i}.{name}" for i in range(n) for name in self.block_linears]


LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),     # qwen3: q/k norms per head, after the projections
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    lm_head="lm_head",
    groups=(
        LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    qk_linears=("self_attn.q_proj", "self_attn.k_proj"),
    required_config=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    widths=Widths(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", attn_out="self_attn.o_proj",
                  mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
                  norms=("input_layernorm", "post_attention_layernorm"),
                  head_norms=("self_attn.q_norm", "self_attn.k_norm")),
)

OPT = ArchSpec(
    family="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    groups=(
        LinearGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("self_attn.v_proj", ("self_attn.out_proj",)),
        LinearGroup("final_layer_norm", ("fc1",)),
        LinearGroup("fc1", ("fc2",)),
    ),
    qk_linears=("self_attn.q_proj", "self_attn.k_proj"),
    required_config=("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"),
)

PHI3 = ArchSpec(
    family="phi3",
    model_types=("phi3",),
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    lm_head="lm_head",
    groups=(            # fused projections, quantized as stored; only the norms can take a rescale
        LinearGroup("input_layernorm", ("self_attn.qkv_proj",)),
        LinearGroup("self_attn.qkv_proj", ("self_attn.o_proj",), scalable=False),
        LinearGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
        LinearGroup("mlp.gate_up_proj", ("mlp.down_proj",), scalable=False),
    ),
    required_config=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
)

NEOX = ArchSpec(
    family="gpt_neox",
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    embeddings=("gpt_neox.embed_in",),
    final_norm="gpt_neox.final_layer_norm",
    lm_head="embed_out",
    groups=(            # attention and MLP in parallel, each behind its own norm; GELU between the MLP linears
        LinearGroup("input_layernorm", ("attention.query_key_value",)),
        LinearGroup("attention.query_key_value", ("attention.dense",), scalable=False),
        LinearGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        LinearGroup("mlp.dense_h_to_4h", ("mlp.dense_4h_to_h",), scalable=False),
    ),
    required_config=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
)

GEMMA = ArchSpec(
    family="gemma",
    model_types=("gemma2", "gemma3_text"),   # gemma3_text: q/k norms per head; both: sliding-window layers
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    lm_head="lm_head",
    groups=(            # pre- and post-norms around attention and MLP: the pre-norms feed the groups
        LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        LinearGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    qk_linears=("self_attn.q_proj", "self_attn.k_proj"),
    required_config=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    norm_offset=1.0,
)

ARCHS: tuple[ArchSpec, ...] = (LLAMA, OPT, PHI3, NEOX, GEMMA)


def check_calibration_length(config: dict, seqlen: int) -> None:
    """Calibration replays every block with the attention mask block 0 received: with both
    sliding-window and full layers, windows must fit the sliding window, where the two masks agree."""
    types = set(config.get("layer_types") or [])
    window = config.get("sliding_window")
    if len(types) > 1 and window and seqlen > window:
        raise CompressError(f"--seqlen {seqlen} is longer than this model's sliding window ({window}) and its "
                            f"layers mix {' and '.join(sorted(types))}: calibrate with --seqlen {window} or less")


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def arch_for(model_type: str | None, architectures=None) -> ArchSpec:
    for a in ARCHS:
        if model_type in a.model_types:
            return a
    got = model_type or (architectures[0] if architectures else "unknown")
    raise CompressError(
        f"unsupported architecture '{got}'; supported model types: {', '.join(supported_model_types())}")

"""Architecture descriptions as data.

Each family says where its decoder blocks live, which linears each block holds and which of
them share an input (with the module that produces that input: a norm, or a preceding linear).
Calibrated methods walk these descriptions; nothing else in the suite knows model classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .compat import NEOX_HEAD
from .errors import CompressError

if TYPE_CHECKING:       # torch is imported where it is used: the early architecture check needs none of it
    import torch


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


# config keys that transformers 5 writes under another name (Qwen3-MoE's expert count)
CONFIG_ALIASES = {"num_experts": ("num_local_experts",)}


def config_get(config: dict, key: str):
    """``config[key]``, or the same value under one of its other names; None when absent."""
    for k in (key, *CONFIG_ALIASES.get(key, ())):
        if k in config:
            return config[k]
    return None


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
    # mixture of experts: groups whose names hold "{e}" repeat once per expert, this config key
    # giving the count (:meth:`for_config`); the router is not listed, so it stays in float
    experts_key: str | None = None

    @property
    def block_linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)

    def get_blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.blocks)

    def for_config(self, config: dict) -> "ArchSpec":
        """This description for one model's config: expert groups repeated per expert."""
        if not self.experts_key:
            return self
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
            raise CompressError(f"{config.get('model_type')}: some blocks have a dense MLP instead of experts "
                                "(mlp_only_layers / decoder_sparse_step); blocks that differ are not described")
        n = int(config_get(config, self.experts_key) or 0)
        if n < 1:
            raise CompressError(f"config.json lacks '{self.experts_key}', the number of experts")
        groups = []
        for g in self.groups:
            if "{e}" in g.prev or any("{e}" in name for name in g.linears):
                groups += [LinearGroup(g.prev.format(e=e), tuple(x.format(e=e) for x in g.linears), g.scalable)
                           for e in range(n)]
            else:
                groups.append(g)
        return dataclasses.replace(self, groups=tuple(groups), experts_key=None)

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
    lm_head=NEOX_HEAD,
    groups=(            # attention and MLP in parallel, each behind its own norm; GELU between the MLP linears
        LinearGroup("input_layernorm", ("attention.query_key_value",)),
        LinearGroup("attention.query_key_value", ("attention.dense",), scalable=False),
        LinearGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        LinearGroup("mlp.dense_h_to_4h", ("mlp.dense_4h_to_h",), scalable=False),
    ),
    required_config=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
)

GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    groups=(            # Conv1D layers, held as nn.Linear (compress.conv1d); fused c_attn; GELU in the MLP
        LinearGroup("ln_1", ("attn.c_attn",)),
        LinearGroup("attn.c_attn", ("attn.c_proj",), scalable=False),
        LinearGroup("ln_2", ("mlp.c_fc",)),
        LinearGroup("mlp.c_fc", ("mlp.c_proj",), scalable=False),
    ),
    required_config=("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
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

# Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration): the same text blocks under
# model.language_model; the vision tower and its projector stay in float, untouched
GEMMA3_MM = dataclasses.replace(GEMMA, model_types=("gemma3",), blocks="model.language_model.layers",
                                embeddings=("model.language_model.embed_tokens",),
                                final_norm="model.language_model.norm")


def text_config(config: dict) -> dict:
    """The language model's part of ``config.json`` (a multimodal checkpoint nests it under
    ``text_config``)."""
    return config.get("text_config") or config


def _moe(family: str, model_types: tuple[str, ...], moe: str, experts_key: str, gate: str, up: str, down: str,
         shared: str | None = None) -> ArchSpec:
    """A Llama-style block whose MLP is a mixture of experts under ``moe`` (plus a shared expert)."""
    expert = f"{moe}.experts.{{e}}"
    groups = [LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              LinearGroup("self_attn.v_proj", ("self_attn.o_proj",))]
    if shared:                        # the router reads the norm too: no rescale of the norm
        groups += [LinearGroup("post_attention_layernorm", (f"{shared}.{gate}", f"{shared}.{up}"), scalable=False),
                   LinearGroup(f"{shared}.{up}", (f"{shared}.{down}",))]
    groups += [LinearGroup("post_attention_layernorm", (f"{expert}.{gate}", f"{expert}.{up}"), scalable=False),
               LinearGroup(f"{expert}.{up}", (f"{expert}.{down}",))]
    return ArchSpec(family=family, model_types=model_types, blocks="model.layers", embeddings=("model.embed_tokens",),
                    final_norm="model.norm", lm_head="lm_head", groups=tuple(groups),
                    qk_linears=("self_attn.q_proj", "self_attn.k_proj"),
                    required_config=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     experts_key), experts_key=experts_key)


MIXTRAL = _moe("mixtral", ("mixtral",), "block_sparse_moe", "num_local_experts", "w1", "w3", "w2")
QWEN_MOE = _moe("qwen3_moe", ("qwen3_moe",), "mlp", "num_experts", "gate_proj", "up_proj", "down_proj")
QWEN2_MOE = _moe("qwen2_moe", ("qwen2_moe",), "mlp", "num_experts", "gate_proj", "up_proj", "down_proj",
                 shared="mlp.shared_expert")
ARCHS: tuple[ArchSpec, ...] = (LLAMA, OPT, PHI3, NEOX, GPT2, GEMMA, GEMMA3_MM, MIXTRAL, QWEN_MOE, QWEN2_MOE)


def check_calibration_length(config: dict, seqlen: int) -> None:
    """Calibration replays every block with the attention mask block 0 received: with both
    sliding-window and full layers, windows must fit the sliding window, where the two masks agree."""
    config = text_config(config)
    types = set(config.get("layer_types") or [])
    window = config.get("sliding_window")
    if len(types) > 1 and window and seqlen > window:
        raise CompressError(f"--seqlen {seqlen} is longer than this model's sliding window ({window}) and its "
                            f"layers mix {' and '.join(sorted(types))}: calibrate with --seqlen {window} or less")


GENERIC = "generic"


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def _causal_lm(architectures) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in (architectures or []))


def _generic_possible(model_type: str | None, architectures) -> bool:
    """A causal LM whose model type transformers itself knows (no remote code)."""
    from transformers import CONFIG_MAPPING
    return bool(model_type) and model_type in CONFIG_MAPPING and _causal_lm(architectures)


def _unsupported(model_type: str | None, architectures) -> CompressError:
    got = model_type or (architectures[0] if architectures else "unknown")
    return CompressError(
        f"unsupported architecture '{got}'; supported model types: {', '.join(supported_model_types())} "
        "(and, by the generic path, any other causal LM that transformers knows)")


def check_early(config: dict) -> None:
    """The part of :func:`arch_for`'s check that needs neither torch nor transformers (a described
    model type, or a causal LM the generic path may take), so that a command refuses an unsupported
    model from its ``config.json`` before those libraries are imported."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if not any(model_type in a.model_types for a in ARCHS) and not _causal_lm(architectures):
        raise _unsupported(model_type, architectures)


def arch_for(model_type: str | None, architectures=None, generic: bool = True) -> ArchSpec:
    """The family description of ``model_type``; for another causal LM that transformers knows, the
    generic path (a placeholder that :func:`generic_arch` completes from the built model)."""
    for a in ARCHS:
        if model_type in a.model_types:
            return a
    if generic and _generic_possible(model_type, architectures):
        return ArchSpec(family=GENERIC, model_types=(model_type,), blocks="", embeddings=(), final_norm="",
                        lm_head="lm_head", groups=())
    raise _unsupported(model_type, architectures)


def describe(arch: ArchSpec, model: torch.nn.Module, config: dict) -> ArchSpec:
    """``arch`` completed for one built model: the generic path traced, expert groups repeated."""
    return generic_arch(model, config.get("model_type")) if arch.family == GENERIC else arch.for_config(config)


def path_label(arch: ArchSpec) -> str:
    """Which path a run took, as the report and the checkpoint's metadata record it."""
    return "generic" if arch.family == GENERIC else f"described ({arch.family})"


def _block_list(model: torch.nn.Module, n_layers: int | None) -> str:
    """The dotted path of the model's repeated decoder blocks: the ModuleList of same-class modules
    holding ``num_hidden_layers`` of them (else the longest such list)."""
    import torch
    best, best_len = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if n_layers and len(mod) == n_layers:
                return name
            if len(mod) > best_len:
                best, best_len = name, len(mod)
    if best is None:
        raise CompressError(f"{type(model).__name__}: no repeated block list found for the generic path")
    return best


def generic_arch(model: torch.nn.Module, model_type: str) -> ArchSpec:
    """The generic path's description of a built model: its repeated block list, and the linears of a
    block in the order a traced forward pass reaches them, grouped where consecutive linears read the
    same input tensor. No group can take a rescale (nothing says what produced its input)."""
    import torch
    blocks = _block_list(model, getattr(model.config, "num_hidden_layers", None))
    block = model.get_submodule(blocks)[0]
    order: list[tuple[str, torch.Tensor]] = []     # the inputs are held, so identity compares tensors
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: order.append((name, a[0])))
             for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=next(model.parameters()).device),
                  use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    seen, groups = set(), []
    for name, src in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and groups[-1][1] is src:
            groups[-1][0].append(name)
        else:
            groups.append(([name], src))
    if not groups:
        raise CompressError(f"{model_type}: its blocks hold no torch.nn.Linear the generic path can compress")
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "lm_head")
    return ArchSpec(family=GENERIC, model_types=(model_type,), blocks=blocks, embeddings=(), final_norm="",
                    lm_head=head, groups=tuple(LinearGroup("", tuple(g), scalable=False) for g, _ in groups))

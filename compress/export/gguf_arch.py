"""llama.cpp's architectures as the GGUF exporter writes them: which architecture a transformers
model type becomes, what llama.cpp calls each tensor (per architecture), how it orders some rows
(llama's q/k rotary halves, GPT-NeoX's fused q/k/v), how it stores Gemma's norms, and the
hyperparameters and family metadata of a file, with the refusals where llama.cpp would run
another function than transformers."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..compat import NEOX_HEAD, rope_parameters, rope_scaling
from ..errors import CompressError

# Hugging Face model type -> llama.cpp architecture written
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
              "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2", "gpt_neox": "gptneox",
              "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
SUPPORTED_MODEL_TYPES = tuple(GGUF_ARCHS)
# architectures with LayerNorm (weight and bias) rather than RMSNorm; those with learned positions (no rotary)
LAYER_NORM_ARCHS = ("gpt2", "gptneox")
LEARNED_POSITION_ARCHS = ("gpt2",)
# architectures whose q/k rows llama.cpp's converter permutes (rotary halves interleaved)
PERMUTED_QK = ("llama",)
QUANTIZATION_VERSION = 2
# whether llama.cpp renormalizes the chosen experts' routing weights (a fixed choice per architecture;
# transformers' Qwen-MoE models follow norm_topk_prob, Mixtral always does)
NORMALIZED_TOP_K = {"qwen2_moe": False, "qwen3_moe": True}
# Gemma's 27B sizes, whose query scale llama.cpp takes as 1/sqrt(hidden/heads) (else 1/sqrt(head_dim))
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

# block-relative Hugging Face module -> llama.cpp tensor base name
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",          # qwen3: per-head norms after the projections
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    # mixtures of experts: the router, a shared expert (qwen2moe); the experts are stacked (EXPERTS)
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# where a family's block names differ from llama's (as gguf-py's tensor name map has them)
_GEMMA_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
FAMILY_BLOCK_NAMES = {"phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
                      "gemma2": _GEMMA_NAMES, "gemma3": _GEMMA_NAMES,
                      "gpt2": {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
                      "gptneox": {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
                                  "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                                  "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
                      "qwen2moe": {"mlp.gate": "ffn_gate_inp"}, "qwen3moe": {"mlp.gate": "ffn_gate_inp"}}
FAMILY_GLOBAL_NAMES = {"gpt2": {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
                                "transformer.ln_f": "output_norm", "lm_head": "output"},
                       "gptneox": {"gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm",
                                   NEOX_HEAD: "output"}}
# each expert's linear -> the 3-D tensor (experts, rows, cols) llama.cpp stacks them into
EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
           "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)")
# where each expert lives in the Hugging Face model, per llama.cpp architecture (llama: Mixtral)
EXPERT_MODULES = {"llama": ("block_sparse_moe", ("w1", "w3", "w2")),
                  "qwen2moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                  "qwen3moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def expert_index(hf_name: str) -> int | None:
    """The expert a tensor of a mixture of experts belongs to (None outside the experts)."""
    m = _EXPERT.search(hf_name)
    return int(m.group(1)) if m else None


_ORDER = [*BLOCK_NAMES.values(), "attn_qkv", "post_attention_norm", "post_ffw_norm", "ffn_gate_exps", "ffn_up_exps",
          "ffn_down_exps"]


def block_names(gguf_arch: str = "llama") -> dict[str, str]:
    """Block-relative Hugging Face module -> llama.cpp tensor base name, for one llama.cpp arch."""
    names = dict(BLOCK_NAMES)
    for hf, g in FAMILY_BLOCK_NAMES.get(gguf_arch, {}).items():
        names = {k: v for k, v in names.items() if v != g}      # the llama module that had this name
        names[hf] = g
    return names


def global_names(gguf_arch: str = "llama") -> dict[str, str]:
    """Hugging Face module outside the blocks -> llama.cpp tensor base name."""
    return FAMILY_GLOBAL_NAMES.get(gguf_arch, GLOBAL_NAMES)


def is_gguf_name(name: str) -> bool:
    """``name`` is already a llama.cpp tensor name (``blk.N...`` or one outside the blocks)."""
    base = name.split(".")[0]
    return name.startswith("blk.") or any(base in names.values() for names in (GLOBAL_NAMES, *FAMILY_GLOBAL_NAMES.values()))


@lru_cache(maxsize=None)
def spec_of(gguf_arch: str):
    """The suite's description (:class:`compress.arch.ArchSpec`) of a llama.cpp architecture: where
    its blocks live, the offset its norms multiply by."""
    from ..arch import arch_for
    return arch_for(next(t for t, a in GGUF_ARCHS.items() if a == gguf_arch), generic=False)


def gguf_arch(config) -> str:
    """The llama.cpp architecture of a transformers config (llama for types GGUF export refuses)."""
    return GGUF_ARCHS.get(getattr(config, "model_type", None), "llama")


# --------------------------------------------------------------------------------------------
# names and hyperparameters
# --------------------------------------------------------------------------------------------

def gguf_name(hf_name: str, blocks_prefix: str = "model.layers", arch: str = "llama") -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (llama.cpp's names for
    the llama.cpp architecture ``arch``)."""
    base, _, suffix = hf_name.rpartition(".")
    glob = global_names(arch)
    if base in glob:
        return f"{glob[base]}.{suffix}"
    names = block_names(arch)
    m = re.fullmatch(re.escape(blocks_prefix) + r"\.(\d+)\.(.+)", base)
    if m and m.group(2) in names:
        return f"blk.{m.group(1)}.{names[m.group(2)]}.{suffix}"
    e = _EXPERT.fullmatch(m.group(2)) if m else None
    if e and e.group(2) in EXPERTS:
        return f"blk.{m.group(1)}.{EXPERTS[e.group(2)]}.{suffix}"
    raise CompressError(f"tensor {hf_name} has no llama.cpp name (unsupported module for GGUF export)")


def hf_name(name: str, blocks_prefix: str = "model.layers", arch: str = "llama") -> str:
    """Inverse of :func:`gguf_name`: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, suffix = name.rpartition(".")
    glob = {v: k for k, v in global_names(arch).items()}
    if base in glob:
        return f"{glob[base]}.{suffix}"
    inv = {v: k for k, v in block_names(arch).items()}
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in inv:
        return f"{blocks_prefix}.{m.group(1)}.{inv[m.group(2)]}.{suffix}"
    raise CompressError(f"unknown llama.cpp tensor name {name}")


def expert_hf_names(name: str, blocks_prefix: str, arch: str, n_expert: int) -> list[str] | None:
    """The Hugging Face names of the experts stacked in llama.cpp's tensor ``name``, in expert
    order (None when ``name`` is not a stacked expert tensor)."""
    m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\w+)", name)
    if m is None:
        return None
    if arch not in EXPERT_MODULES:
        raise CompressError(f"llama.cpp architecture {arch} has no mixture of experts here ({name})")
    moe, (gate, up, down) = EXPERT_MODULES[arch]
    lin = {"gate": gate, "up": up, "down": down}[m.group(2)]
    return [f"{blocks_prefix}.{m.group(1)}.{moe}.experts.{e}.{lin}.{m.group(3)}" for e in range(n_expert)]


def check_exportable(config) -> None:
    """Refuse, in one line, a model llama.cpp would run as another function than transformers."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CompressError(f"GGUF export supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}, not '{mt}'")
    rope = rope_scaling(config)
    if rope and not (mt == "gemma3_text" and (rope.get("rope_type") or rope.get("type")) == "linear"):
        raise CompressError(f"GGUF export does not handle rope scaling ({rope})")
    if mt != "gpt_neox" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise CompressError("GGUF export does not handle linear biases (attention_bias / mlp_bias)")
    if mt in ("gemma2", "gemma3_text"):
        _check_gemma(config, GGUF_ARCHS[mt])
    if mt in NORMALIZED_TOP_K and bool(getattr(config, "norm_topk_prob", False)) != NORMALIZED_TOP_K[mt]:
        does = "renormalizes" if NORMALIZED_TOP_K[mt] else "does not renormalize"
        raise CompressError(f"llama.cpp's {GGUF_ARCHS[mt]} {does} the chosen experts' weights; this {mt} has "
                            f"norm_topk_prob={config.norm_topk_prob}, so llama.cpp would compute another function")


def _check_gemma(config, arch: str) -> None:
    """llama.cpp fixes what Gemma's config.json states: the sliding-window layers (every other one
    for gemma2, five of every six for gemma3), the query scale (1/sqrt(head_dim), or
    1/sqrt(hidden/heads) for the 27B models) and gemma3's local rotary base (10000)."""
    n, every = int(config.num_hidden_layers), {"gemma2": 2, "gemma3": 6}[arch]
    want = ["sliding_attention" if i % every < every - 1 else "full_attention" for i in range(n)]
    if list(getattr(config, "layer_types", None) or want) != want:
        raise CompressError(f"GGUF export: llama.cpp's {arch} makes {'every other layer' if every == 2 else 'every sixth layer'} "
                            f"a full-attention layer; this model's layer_types are {config.layer_types}")
    head_dim = int(config.head_dim)
    qpas = getattr(config, "query_pre_attn_scalar", head_dim)
    big = n == GEMMA_27B_LAYERS[arch] and qpas == config.hidden_size // config.num_attention_heads
    if qpas != head_dim and not big:
        raise CompressError(f"GGUF export: llama.cpp's {arch} scales queries by 1/sqrt(head_dim={head_dim}); "
                            f"this model's query_pre_attn_scalar is {qpas}")
    local = float(rope_parameters(config, "sliding_attention")["rope_theta"]) if arch == "gemma3" else 10000.0
    if local != 10000.0:
        raise CompressError(f"GGUF export: llama.cpp's gemma3 uses a local rotary base of 10000; this model's "
                            f"rope_local_base_freq is {local:g}")


def _family_kvs(config, arch: str, head_dim: int) -> tuple:
    """The metadata llama.cpp's converter writes for a family beyond the llama keys:
    ``(key after '<arch>.', value, 'u32'|'f32'|'str')``."""
    c = config
    if arch == "phi3":
        orig = getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings
        return (("rope.scaling.original_context_length", int(orig), "u32"),
                ("attention.sliding_window", int(getattr(c, "sliding_window", None) or 0), "u32"))
    n_expert = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
    if n_expert:
        kv = [("expert_count", int(n_expert), "u32"), ("expert_used_count", int(c.num_experts_per_tok), "u32")]
        if getattr(c, "moe_intermediate_size", None):
            kv.append(("expert_feed_forward_length", int(c.moe_intermediate_size), "u32"))
        if getattr(c, "shared_expert_intermediate_size", None):
            kv.append(("expert_shared_feed_forward_length", int(c.shared_expert_intermediate_size), "u32"))
        return tuple(kv)
    if arch == "gptneox":
        return (("use_parallel_residual", bool(getattr(c, "use_parallel_residual", True)), "bool"),)
    if arch not in ("gemma2", "gemma3"):
        return ()
    kv = [("attention.key_length", head_dim, "u32"), ("attention.value_length", head_dim, "u32"),
          ("attention.sliding_window", int(c.sliding_window), "u32")]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None) is not None:
            kv.append((key, float(getattr(c, key)), "f32"))
    scaling = rope_scaling(c)
    if scaling:
        kv += [("rope.scaling.type", "linear", "str"), ("rope.scaling.factor", float(scaling["factor"]), "f32")]
    return tuple(kv)


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    vocab: int
    tied: bool
    arch: str = "llama"              # llama.cpp architecture
    rope_dims: int = 0               # rotated dimensions of a head (0: all of them)
    n_expert: int = 0                # experts per block (a mixture of experts)
    family: tuple = ()               # the family's own metadata (:func:`_family_kvs`)

    @property
    def permuted(self) -> bool:
        return self.arch in PERMUTED_QK

    @classmethod
    def from_config(cls, config) -> "HParams":
        check_exportable(config)
        n_head = int(config.num_attention_heads)
        n_embd = int(config.hidden_size)
        head_dim = int(getattr(config, "head_dim", None) or n_embd // n_head)
        arch = GGUF_ARCHS[config.model_type]
        rot = float(getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
                    or rope_parameters(config).get("partial_rotary_factor") or 1.0)
        n_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * n_embd
        return cls(n_layer=int(config.num_hidden_layers), n_embd=n_embd, n_ff=int(n_ff),
                   n_head=n_head, n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
                   head_dim=head_dim,
                   n_ctx=int(config.max_position_embeddings), rope_theta=float(rope_parameters(config)["rope_theta"]),
                   rms_eps=float(getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_epsilon", None)
                                 or config.layer_norm_eps),
                   vocab=int(config.vocab_size),
                   tied=bool(getattr(config, "tie_word_embeddings", False)), arch=arch,
                   rope_dims=int(rot * n_embd) // n_head if rot != 1.0 else head_dim,
                   family=_family_kvs(config, arch, head_dim),
                   n_expert=int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0))


def permute_qk(t: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py, llama arch): within each head the
    rows of the two rotary halves are interleaved. Works on any tensor whose dim 0 is the rows
    (float weights, biases, or uint8 GGUF rows: quantization is row by row, so it commutes)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise CompressError(f"cannot permute {rows} rows into {n_head} heads of two rotary halves")
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def neox_qkv(t: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """GPT-NeoX's fused query_key_value rows, (q, k, v) per head, into llama.cpp's order: every
    head's q rows, then every k, then every v (its converter's reordering); ``inverse`` undoes it.
    Rows only: it applies to quantized rows as well."""
    rows = t.shape[0]
    hd = rows // (3 * n_head)
    if inverse:
        return t.reshape(3, n_head, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t.reshape(n_head, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def as_stored(hf: str, t: torch.Tensor, arch: str) -> torch.Tensor:
    """A tensor as llama.cpp (architecture ``arch``) stores it: a Gemma norm's weight with the 1 of
    its (1 + weight) added, as llama.cpp's converter does (its RMSNorm multiplies by the weight)."""
    offset = spec_of(arch).norm_offset
    if offset and hf.endswith("norm.weight"):
        return t + offset
    return t


def file_order(name: str):
    if name.startswith("token_embd"):
        return (0, 0, 0)
    m = re.match(r"blk\.(\d+)\.(\w+)", name)
    if m:
        return (1, int(m.group(1)), _ORDER.index(m.group(2)) if m.group(2) in _ORDER else 99)
    return (2, 0 if name.startswith("output_norm") else 1, 0)

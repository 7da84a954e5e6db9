"""A GGUF model file as a float32 transformers model and its tokenizer.

transformers' GGUF reader builds the config for the architectures it reads correctly, and the
model too except for llama files, whose weights this suite's reader gives faster (the same tensors).
For those it does not (GPT-NeoX, which it has no reader for; llama files holding experts, which are Mixtral;
Qwen2-MoE, whose experts it splits as if there were 60), the config is built from the file's header
and the weights come from this suite's reader (:mod:`compress.formats.gguf_tensors`), which
unstacks the experts; a GPT-2-style tokenizer is built from the file's vocabulary and merges.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..compat import TRANSFORMERS_MAJOR, gguf_dense
from ..moe_layout import per_expert_layout
from ..errors import CompressError, first_line
from .gguf_file import check_gguf

# transformers' GGUF reader sets the expert widths to its defaults: the header has them
_EXPERT_WIDTHS = (("expert_feed_forward_length", "moe_intermediate_size"),
                  ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"))


def own_reader(layout) -> bool:
    """The file is read with this suite's reader rather than transformers' (module doc)."""
    arch = layout.kv["general.architecture"]
    return arch in ("gptneox", "qwen2moe") or (arch == "llama" and int(layout.kv.get("llama.expert_count") or 0) > 0)


def gguf_config(path: Path, layout=None):
    """The transformers config of a checked GGUF file, from its header (no tensor read). Settings
    that transformers' GGUF reader leaves at their defaults are taken from the header as llama.cpp
    reads them: Gemma's query scale (1/sqrt(key length), or 1/sqrt(hidden/heads) for the 27B
    models) and soft-caps, GPT-2's MLP width, the experts' count and widths."""
    from transformers import AutoConfig

    from ..export.gguf_arch import GEMMA_27B_LAYERS
    lay = layout or check_gguf(path)                 # ``layout``: the file's, checked already
    kv, arch = lay.kv, lay.kv["general.architecture"]
    if own_reader(lay):
        return _header_config(lay)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as e:
        raise CompressError(f"cannot load GGUF file {path}: {first_line(e)}") from None
    if arch in ("gemma2", "gemma3"):
        n_layer = int(kv[f"{arch}.block_count"])
        big = n_layer == GEMMA_27B_LAYERS[arch]
        config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads if big
                                        else int(kv.get(f"{arch}.attention.key_length", config.head_dim)))
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            setattr(config, key, kv.get(f"{arch}.{key}", getattr(config, key, None) if arch == "gemma2" else None))
    if arch == "gpt2" and "gpt2.feed_forward_length" in kv:       # transformers assumes 4 x hidden
        config.n_inner = int(kv["gpt2.feed_forward_length"])
    for key, attr in _EXPERT_WIDTHS:
        if f"{arch}.{key}" in kv:
            setattr(config, attr, int(kv[f"{arch}.{key}"]))
    if arch == "qwen3moe":                  # llama.cpp renormalizes the chosen experts' weights
        config.norm_topk_prob = True
    return config


def _header_config(lay):
    """The config of a file transformers does not read, from its header as llama.cpp reads it."""
    from transformers import GPTNeoXConfig, MixtralConfig, Qwen2MoeConfig
    kv, arch = lay.kv, lay.kv["general.architecture"]

    def g(key, default=None):
        return kv.get(f"{arch}.{key}", default)
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", n_embd // n_head))
    common = dict(vocab_size=kv["tokenizer.ggml.tokens"].count, hidden_size=n_embd, num_attention_heads=n_head,
                  num_hidden_layers=int(g("block_count")), intermediate_size=int(g("feed_forward_length")),
                  max_position_embeddings=int(g("context_length", 2048)),
                  tie_word_embeddings=not any(t.name == "output.weight" for t in lay.tensors),
                  bos_token_id=kv.get("tokenizer.ggml.bos_token_id"), eos_token_id=kv.get("tokenizer.ggml.eos_token_id"))
    if arch == "gptneox":
        pct, base = int(g("rope.dimension_count", head_dim)) / head_dim, float(g("rope.freq_base", 10000.0))
        rope = (dict(rope_parameters={"rope_type": "default", "rope_theta": base, "partial_rotary_factor": pct})
                if TRANSFORMERS_MAJOR >= 5 else dict(rotary_pct=pct, rotary_emb_base=base))
        return GPTNeoXConfig(**common, **rope, layer_norm_eps=float(g("attention.layer_norm_epsilon", 1e-5)),
                             use_parallel_residual=bool(g("use_parallel_residual", True)))
    common.update(num_key_value_heads=int(g("attention.head_count_kv", n_head)), rope_theta=float(g("rope.freq_base", 10000.0)),
                  rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
                  num_experts_per_tok=int(g("expert_used_count")))
    if arch == "qwen2moe":
        return Qwen2MoeConfig(**common, num_experts=int(g("expert_count")),
                              moe_intermediate_size=int(g("expert_feed_forward_length")),
                              shared_expert_intermediate_size=int(g("expert_shared_feed_forward_length")))
    return MixtralConfig(**common, num_local_experts=int(g("expert_count")), head_dim=head_dim)   # llama + experts


def gguf_tokenizer(path: Path, layout=None):
    from transformers import AutoTokenizer
    lay = layout or check_gguf(path)
    if lay.kv["general.architecture"] == "gptneox":
        return _gpt2_tokenizer(lay)
    if lay.kv.get("tokenizer.ggml.model") == "llama":
        return _spm_tokenizer(lay)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CompressError(f"cannot load the tokenizer of GGUF file {path}: {first_line(e)}") from None


def _vocab(kv) -> tuple[list[str], list[int]]:
    """A GGUF vocabulary's pieces and token types (NORMAL where the file gives none)."""
    tokens = [str(t) for t in kv["tokenizer.ggml.tokens"].values]
    types = kv.get("tokenizer.ggml.token_type")
    return tokens, [int(t) for t in types.values] if types is not None else [1] * len(tokens)


def _special(kv, tokens: list[str], key: str) -> str | None:
    """The piece of ``tokenizer.ggml.{key}_token_id``; None when absent or out of range."""
    i = kv.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def _fast(tok, kv, tokens: list[str], types: list[int]):
    """``tok`` with the file's CONTROL pieces as special tokens, as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast
    tok.add_special_tokens([tokens[i] for i, t in enumerate(types) if t == 3])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": _special(kv, tokens, key) for k, key in
                                   (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))})


def _spm_tokenizer(lay):
    """A SentencePiece-style BPE tokenizer from a GGUF's ``llama`` vocabulary (pieces, scores, token
    types), built as transformers 4.57 builds it and the same under every transformers version:
    each normal piece's splits into two pieces are its merges, ranked by the piece's score; byte
    pieces as byte fallback; a "▁" before the text when ``add_space_prefix`` (Llama; not Gemma)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    kv = lay.kv
    tokens, types = _vocab(kv)
    scores = kv["tokenizer.ggml.scores"].values if "tokenizer.ggml.scores" in kv else [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = sorted((-float(scores[i]), i, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:])
                    for i, p in enumerate(tokens) if types[i] == 1
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in ranked], unk_token=_special(kv, tokens, "unknown"),
                               byte_fallback=True, fuse_unk=True))
    prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * prefix
                                          + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    bos, eos = _special(kv, tokens, "bos"), _special(kv, tokens, "eos")
    pre = [bos] if bos and kv.get("tokenizer.ggml.add_bos_token", True) else []
    post = [eos] if eos and kv.get("tokenizer.ggml.add_eos_token", False) else []
    if pre or post:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(pre + ["$A"] + post), pair=" ".join(pre + ["$A"] + post + ["$B"]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(pre + post)])
    return _fast(tok, kv, tokens, types)


def _gpt2_tokenizer(lay):
    """A byte-level BPE tokenizer from a GGUF's ``gpt2`` vocabulary, merges and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    kv = lay.kv
    if kv.get("tokenizer.ggml.model") != "gpt2":
        raise CompressError(f"{lay.path}: a {kv.get('tokenizer.ggml.model')!r} tokenizer in a "
                            f"{kv['general.architecture']} file is not read here (only gpt2-style BPE)")
    tokens, types = _vocab(kv)
    merges = [tuple(m.split(" ", 1)) for m in kv["tokenizer.ggml.merges"].values] \
        if "tokenizer.ggml.merges" in kv else []
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _fast(tok, kv, tokens, types)


def gguf_model(path: Path, layout=None, outside: bool = False):
    """The float32 transformers model of a GGUF file (:func:`gguf_config`). Llama files' weights
    are also read with this suite's reader: the same tensors as transformers' reader gives, faster
    (its Python dequantization is the slow part). ``outside``: transformers'
    reader wherever it reads the architecture (the tests' outside check of what we write)."""
    from transformers import AutoModelForCausalLM

    from ..models import built
    lay = layout or check_gguf(path)
    config = gguf_config(path, lay)
    own = own_reader(lay) or (not outside and _own_weights(lay))
    return built(f"cannot load GGUF file {path}", lambda: _own_model(path, lay, config) if own else
                 AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                      dtype=torch.float32, trust_remote_code=False,
                                                      **gguf_dense()))


def _own_weights(lay) -> bool:
    """A llama file whose every tensor has a Hugging Face name here (not, e.g., one holding llama
    3's rope_freqs, which transformers' reader skips): its weights are read with this suite's reader."""
    from ..export.gguf_arch import hf_name
    if lay.kv["general.architecture"] != "llama":
        return False
    try:
        for t in lay.tensors:
            hf_name(t.name, "model.layers", "llama")
    except CompressError:
        return False
    return True


def _own_model(path: Path, lay, config):
    from transformers import AutoModelForCausalLM

    from ..arch import arch_for
    from .gguf_tensors import read_gguf_weights
    model = per_expert_layout(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    weights = read_gguf_weights(path, arch_for(config.model_type, generic=False).blocks, lay)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    head = model.get_output_embeddings().weight
    tied = {k for k, v in model.state_dict(keep_vars=True).items() if v is head} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]         # the output matrix is the token embedding
    if missing or unexpected:
        raise CompressError(f"GGUF file {path} does not hold the model its header describes: "
                            f"{'missing ' + ', '.join(missing[:3]) if missing else ''}"
                            f"{' unexpected ' + ', '.join(unexpected[:3]) if unexpected else ''}")
    return model

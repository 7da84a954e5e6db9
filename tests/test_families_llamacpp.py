"""llama.cpp's own tools on every family's GGUF files, when they are built (docs/GGUF.md says how):
``llama-quantize`` picks the types this suite plans, ``llama-tokenize`` splits text as the original
tokenizer, ``llama-perplexity`` computes the model transformers computes. Skipped, with the reason,
where the tools are not built."""
from __future__ import annotations

import re

import pytest
import torch

from compress import models
from tests.conftest import build_tiny
from tests.test_cli import run
from tests.test_families import GGUF_FAMILIES


@pytest.mark.parametrize("family,experts", [(f, 4) for f in GGUF_FAMILIES] + [("mixtral", 8), ("qwen2_moe", 8)])
def test_mix_types_equal_llama_quantize(family, experts, tmp_path):
    """Every family at widths the k-quants fit (256 columns), 8 blocks: for each mix, the types this
    suite plans are the types ``llama-quantize --dry-run`` picks for the F32 GGUF this suite wrote
    (8 experts: llama.cpp's rules for the 8-expert model). Runs when llama.cpp's tools are built."""
    from compress.export.gguf import HParams, model_tensors, plan_types
    from tests.llamacpp import dry_run_types, llama_bin
    lq = llama_bin("llama-quantize")
    if lq is None:
        pytest.skip("llama.cpp's llama-quantize is not built (docs/GGUF.md says how)")
    folder = build_tiny(tmp_path / family, family, hidden=256, ffn=768, layers=8, experts=experts)
    f32 = tmp_path / "f32.gguf"
    res = run(["export", "gguf", folder, "--type", "F32", "-o", f32])
    assert res.exit_code == 0, res.output
    loaded = models.load(str(folder))
    hp = HParams.from_config(loaded.model.config)
    floats = model_tensors(loaded.model, loaded.arch)
    for mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"):
        plan = plan_types(floats, mix, hp, False, False)
        assert dry_run_types(lq, f32, mix, tmp_path) == {n: c.type for n, c in plan.items()}, mix


@pytest.mark.parametrize("family,prefix", [("gemma3_text", False), ("gemma2", False), ("phi3", True), ("mixtral", True)])
def test_a_sentencepiece_family_gguf_tokenizes_in_llama_cpp_as_the_original(family, prefix, tmp_path):
    """Gemma, Phi-3 and Mixtral ship SentencePiece tokenizers: exported without an original GGUF,
    the file's ``llama`` tokenizer keys make llama.cpp's ``llama-tokenize`` split text (byte
    fallback included) exactly as the original tokenizer does. (transformers' GGUF readers are no
    oracle here: its Gemma reader treats the scores as a unigram model's, its Phi-3 reader needs
    merges, which llama.cpp's SentencePiece files do not have.) Runs when llama.cpp is built."""
    import subprocess
    from ast import literal_eval

    from tests.conftest import spm_tokenizer, synthetic_text
    from tests.llamacpp import llama_bin
    lt = llama_bin("llama-tokenize")
    if lt is None:
        pytest.skip("llama.cpp's llama-tokenize is not built (docs/GGUF.md says how)")
    tok = spm_tokenizer(prefix)
    if family == "phi3":                   # llama.cpp looks this Phi-3 token up in a model named phi3
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    out = tmp_path / "m.gguf"
    res = run(["export", "gguf", build_tiny(tmp_path / family, family, tokenizer=tok), "--type", "F32", "-o", out])
    assert res.exit_code == 0, res.output
    for text in (synthetic_text(60, seed=7), "naïve café, 42 €  and a tab\there", " leading", "x<|endoftext|>y"):
        p = subprocess.run([str(lt), "-m", str(out), "-p", text, "--ids", "--no-bos"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (p.returncode, p.stdout[-500:], p.stderr[-1000:])
        assert literal_eval(p.stdout.strip().splitlines()[-1]) == tok(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_llama_cpp_computes_the_models_perplexity(family, tmp_path):
    """llama.cpp runs this suite's F32 GGUF of each family as the model transformers runs:
    ``llama-perplexity`` (4 chunks of 64 tokens, the second half of each scored) gives the perplexity
    computed here with transformers on the same tokens, to 1e-3 (measured: 1e-5 to 9e-5). Runs
    when llama.cpp's tools are built."""
    import math
    import subprocess

    from tests.conftest import spm_tokenizer, synthetic_text
    from tests.llamacpp import llama_bin
    lp = llama_bin("llama-perplexity")
    if lp is None:
        pytest.skip("llama.cpp's llama-perplexity is not built (docs/GGUF.md says how)")
    tok = None
    if family == "phi3":                   # a Phi-3 vocabulary: llama.cpp looks its special tokens up
        tok = spm_tokenizer(True)
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    folder = build_tiny(tmp_path / family, family, tokenizer=tok)
    out, text = tmp_path / "m.gguf", tmp_path / "t.txt"
    text.write_text(synthetic_text(400, seed=11))
    assert run(["export", "gguf", folder, "--type", "F32", "-o", out]).exit_code == 0
    p = subprocess.run([str(lp), "-m", str(out), "-f", str(text), "-c", "64", "-b", "64", "--chunks", "4", "-t", "2"],
                       capture_output=True, text=True, timeout=300)
    found = re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout + p.stderr)
    assert found, (p.stdout + p.stderr)[-1500:]
    ref = models.load(str(folder))
    ids = ref.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    nll = []
    with torch.no_grad():
        for c in range(4):
            chunk = torch.tensor([ids[c * 64:(c + 1) * 64]])
            logp = ref.model(chunk, use_cache=False).logits[0].double().log_softmax(-1)
            nll += [-float(logp[j, chunk[0, j + 1]]) for j in range(32, 63)]
    ours = math.exp(sum(nll) / len(nll))
    assert abs(float(found.group(1)) - ours) / ours < 1e-3, (float(found.group(1)), ours)

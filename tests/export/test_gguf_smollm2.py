"""GGUF on the real model (slow): SmolLM2-135M through our mixes and llama.cpp, and SentencePiece
tokenizers (every file written here is read back: tests/export/gguf_helpers.py)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.conftest import build_tiny
from tests.llamacpp import dry_run_types, llama_bin
from tests.export.gguf_helpers import _reader
from tests.test_cli import run


# --------------------------------------------------------------------------------------------
# the real model (slow)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_q4_k_m(smollm2, real_data, tmp_path):
    """`compress quantize smollm2-135m --method kquant --type Q4_K_M`, then eval ppl on 2 windows.
    The file's metadata equals the original GGUF's (tokenizer included) except the file type."""
    from compress import models
    out = tmp_path / "x.gguf"
    res = run(["quantize", "smollm2-135m", "--method", "kquant", "--type", "Q4_K_M", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    counts = {}
    for t in r.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert counts == {"Q5_0": 166, "Q8_0": 15, "Q6_K": 14, "Q4_K": 16}
    src = _reader(models.source_gguf("smollm2-135m"))
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k == "general.file_type":
            continue
        assert k in r.fields, k
        assert r.fields[k].contents() == f.contents() and r.fields[k].types == f.types, k
    assert r.fields["general.file_type"].contents() == 15
    assert {t.name for t in r.tensors} == {t.name for t in src.tensors}
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", "smollm2-135m", "--max-windows", 2, "--data-dir", real_data, "--json", js])
    assert res.exit_code == 0, res.output
    rep = json.loads(js.read_text())
    assert rep["kind"] == "gguf" and rep["windows"] == 2
    assert 0 < rep["kld"] < 0.15 and rep["ppl"] < 1.2 * rep["base_ppl"]
    assert 6.0 < rep["bits_per_weight"] < 6.3


@pytest.mark.slow
def test_smollm2_llama_cpp_runs_our_gguf(smollm2, real_data, tmp_path):
    """llama.cpp's own evaluator loads and runs a GGUF we wrote (when its tools are built)."""
    lp = llama_bin("llama-perplexity")
    if lp is None:
        pytest.skip("llama.cpp's llama-perplexity is not built")
    out = tmp_path / "q8.gguf"
    assert run(["quantize", "smollm2-135m", "--method", "kquant", "--type", "Q8_0", "--pure", "-o", out]).exit_code == 0
    p = subprocess.run([str(lp), "-m", str(out), "-f", str(real_data / "wikitext-2-raw" / "test.joined.txt"),
                        "-c", "512", "--chunks", "2"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    import re
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout + p.stderr).group(1))
    assert 10 < ppl < 60


@pytest.mark.slow
def test_smollm2_types_equal_llama_quantize_dry_run(tmp_path):
    """On SmolLM2's 272 tensors, every mix (plain, --pure, with an imatrix) picks exactly the
    types `llama-quantize --dry-run` picks (when llama.cpp's tools are built)."""
    from compress import imatrix as imx
    from compress import models
    from compress.formats.ggml_mix import select_types
    lq = llama_bin("llama-quantize")
    src = models.source_gguf("smollm2-135m")
    if lq is None or src is None:
        pytest.skip("needs llama.cpp's llama-quantize and the cached SmolLM2 source GGUF")
    r = _reader(src)
    tensors = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    im = tmp_path / "ones.gguf"        # any imatrix with every block linear (only its presence matters)
    names = [n for n, s in tensors if n.startswith("blk.") and len(s) == 2]
    shapes = dict(tensors)
    imx.write(im, imx.IMatrix(sums={n: torch.ones(shapes[n][1]) for n in names}, counts={n: 1.0 for n in names},
                              datasets=["ones"], chunk_count=1, chunk_size=1))
    for mix in ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
                "Q4_0", "Q4_1", "Q5_0", "Q5_1"]:
        for pure, use_im in ((False, False), (True, False), (False, True)):
            got = dry_run_types(lq, src, mix, tmp_path, pure, im if use_im else None)
            plan = select_types(tensors, mix, n_layer=30, n_head=9, n_head_kv=3, pure=pure, has_imatrix=use_im)
            assert got == {n: c.type for n, c in plan.items()}, (mix, pure, use_im)


@pytest.mark.parametrize("prefix", [True, False], ids=["llama2-style", "gemma-style"])
def test_sentencepiece_tokenizer_derived_from_tokenizer_json(prefix, tmp_path):
    """A SentencePiece BPE tokenizer.json (Llama 2 with its "▁" prefix, Gemma without, as
    transformers converts their tokenizer.model) becomes llama.cpp's ``llama`` tokenizer: scores
    from the merges' ranks, byte pieces BYTE, <unk> UNKNOWN, <s> and </s> CONTROL. The suite's
    GGUF tokenizer (which rebuilds the merges from the scores) and llama.cpp's own ``llama-tokenize``
    (when built) split text, byte fallback included, exactly as the original tokenizer does."""
    import ast

    from compress import models
    from tests.conftest import spm_tokenizer, synthetic_text
    tok = spm_tokenizer(prefix)
    out = tmp_path / "m.gguf"
    res = run(["export", "gguf", build_tiny(tmp_path / "m", "llama", tokenizer=tok), "--type", "F32", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    field = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}
    assert field["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in field
    assert field["tokenizer.ggml.add_space_prefix"] is prefix and field["tokenizer.ggml.add_bos_token"] is False
    types, scores = field["tokenizer.ggml.token_type"], field["tokenizer.ggml.scores"]
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    made = [s for s in scores[259:] if s != 0]
    assert len(made) > 100 and made == sorted(made, reverse=True)       # pieces by id: merge order
    texts = [synthetic_text(80, seed=5), "naïve café, 123 € and  two  spaces", " a leading space", "x"]
    back = models.gguf_tokenizer(out)
    for t in texts:
        want = tok(t, add_special_tokens=False)["input_ids"]
        assert back(t, add_special_tokens=False)["input_ids"] == want, t
    lt = llama_bin("llama-tokenize")
    if lt is None:
        return
    for t in texts:
        p = subprocess.run([str(lt), "-m", str(out), "-p", t, "--ids", "--no-bos", "--log-disable"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-1000:]
        assert ast.literal_eval(p.stdout.strip().splitlines()[-1]) == tok(t, add_special_tokens=False)["input_ids"], t


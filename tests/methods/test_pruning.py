"""Pruning methods end to end through the CLI and recipes on a tiny random Llama."""
from __future__ import annotations

import json

import pytest
import torch

from compress import models
from compress.solvers.masks import follows_pattern, sparsity_of
from tests.test_cli import assert_clean_error, no_leftovers, run

CAL = ["--nsamples", 8, "--seqlen", 64]


def _linears(model):
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prune_writes_a_sparse_checkpoint_that_loads_as_the_pruned_model(method, pattern, tiny_llama, env, tmp_path):
    out = tmp_path / "p"
    args = ["prune", tiny_llama, "--method", method, "-o", out] + (["--pattern", pattern] if pattern else
                                                                     ["--sparsity", 0.5])
    res = run(args + (CAL if method != "magnitude" else []))
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert sc["format"] == ("sparse-24-bitmask" if pattern else "sparse-bitmask")
    loaded = models.load(str(out))
    ws = _linears(loaded.model)
    assert len(ws) == 14
    for n, w in ws.items():
        if pattern:
            assert follows_pattern(w, (2, 4)), n
        else:
            assert abs(sparsity_of(w) - 0.5) < 0.02, n
    # the file is smaller than the dense float16 model's weights
    dense = sum(w.numel() * 2 for w in ws.values())
    info = json.loads(run(["inspect", out, "--json"]).output)
    # values (half) + a bit per weight (1/16) [+ an int64 offset per row, 4 % on these 96-wide layers]
    assert info["pruned_bytes"] < (0.57 if pattern else 0.61) * dense
    assert all(abs(l["sparsity"] - 0.5) < 0.02 for l in info["layers"])


def test_sparse_checkpoint_gives_the_masked_dense_models_outputs(tiny_llama, env, tmp_path):
    out = tmp_path / "p"
    assert run(["prune", tiny_llama, "--method", "sparsegpt", *CAL, "--dtype", "float32", "-o", out]).exit_code == 0
    theirs = pytest.importorskip("compressed_tensors.compressors").ModelCompressor
    cfg = json.loads((out / "config.json").read_text())
    dense = dict(theirs.from_compression_config(cfg["quantization_config"]).sparsity_compressor.decompress(str(out)))
    ref = models.load(str(tiny_llama)).model
    ref.load_state_dict({k: v for k, v in dense.items()}, strict=False)
    ours = models.load(str(out)).model
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ref(x).logits)


def test_ignore_leaves_modules_dense_and_owl_records_block_sparsity(tiny_llama, env, tmp_path):
    out = tmp_path / "owl"
    res = run(["prune", tiny_llama, "--method", "wanda", "--sparsity", 0.6, "--profile", "owl", *CAL,
               "--ignore", "re:.*(q|k)_proj", "-o", out])
    assert res.exit_code == 0, res.output
    ws = _linears(models.load(str(out)).model)
    assert all(sparsity_of(w) == 0 for n, w in ws.items() if n.endswith(("q_proj", "k_proj")))
    steps = json.loads((out / "config.json").read_text())["compress"]["steps"]
    per_block = steps[0]["options"]["block_sparsity"]
    assert len(per_block) == 2 and per_block[0] != per_block[1]
    assert abs(sum(per_block) / 2 - 0.6) < 1e-6
    for n, w in ws.items():
        if not n.endswith(("q_proj", "k_proj")):
            assert abs(sparsity_of(w) - per_block[int(n.split(".")[2])]) < 0.02, n


def test_joint_sparsegpt_writes_a_packed_checkpoint_with_the_mask(tiny_llama, env, tmp_path):
    out = tmp_path / "j"
    res = run(["prune", tiny_llama, "--method", "sparsegpt", "--pattern", "2:4", "--bits", 4, "--group-size", 32,
               *CAL, "-o", out])
    assert res.exit_code == 0, res.output
    loaded = models.load(str(out))
    assert loaded.kind == "packed"
    for name, m in loaded.model.named_modules():
        if hasattr(m, "packed") and ".layers." in name:
            assert follows_pattern(m.packed().dequantize(), (2, 4)), name


def test_compact_codes_are_smaller_and_load_to_the_same_model(tiny_llama, env, tmp_path):
    """Pruned and quantized layers store a bitmask and the codes that are not their zero point:
    the same codes come back as with the plain GPTQ layout, in fewer bytes; a tampered bitmask is
    a one-line error."""
    import safetensors.torch as st
    args = ["prune", tiny_llama, "--method", "sparsegpt", "--pattern", "2:4", "--bits", 4, "--group-size", 32, *CAL]
    assert run(args + ["-o", tmp_path / "c"]).exit_code == 0
    assert run(args + ["--sparse-storage", "gptq", "-o", tmp_path / "g"]).exit_code == 0
    c, g = models.load(str(tmp_path / "c")), models.load(str(tmp_path / "g"))
    assert len(c.quant["compact_modules"]) == 14 and c.quant["format_version"] == 3
    assert "compact_modules" not in g.quant and g.quant["format_version"] == 2
    cs, gs = (dict(m.model.named_buffers()) for m in (c, g))
    assert cs.keys() == gs.keys() and all(torch.equal(cs[k], gs[k]) for k in cs)
    tc = st.load_file(str(tmp_path / "c" / "model.safetensors"))
    tg = st.load_file(str(tmp_path / "g" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.qweight" not in tc and f"{name}.qweight" in tg

    def linear_bytes(t):
        return sum(v.numel() * v.element_size() for k, v in t.items() if ".layers." in k and not k.endswith("norm.weight"))
    # 2 of 4 codes kept (2 bits a weight) + a bit a weight, against 4 bits a weight, plus the same scales
    assert linear_bytes(tc) < 0.85 * linear_bytes(tg)
    tc[f"{name}.codes_bitmask"] = tc[f"{name}.codes_bitmask"] ^ 1
    st.save_file(tc, str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    from compress.errors import CompressError
    with pytest.raises(CompressError, match="codes"):
        models.load(str(tmp_path / "c"))


def test_lm_head_pruning_of_an_untied_head_leaves_the_table_dense(tiny_llama, env, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM
    src = tmp_path / "untied"
    shutil.copytree(tiny_llama, src)
    m = AutoModelForCausalLM.from_pretrained(src, tie_word_embeddings=False)
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone() * 1.5)
    m.save_pretrained(src, safe_serialization=True)
    out = tmp_path / "h"
    res = run(["prune", src, "--method", "wanda", "--pattern", "2:4", "--lm-head", *CAL, "-o", out])
    assert res.exit_code == 0, res.output
    model = models.load(str(out)).model
    assert sparsity_of(model.get_input_embeddings().weight) == 0
    assert follows_pattern(model.get_output_embeddings().weight, (2, 4))
    assert set(json.loads((out / "config.json").read_text())["compress"]["patterns"]) >= {"lm_head"}


def _run_recipe(tiny_llama, tiny_data, tmp_path, steps: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\ncalibration: {{nsamples: 8, seqlen: 64, data_dir: {tiny_data}}}\n"
                      f"steps:\n{steps}")
    out = tmp_path / "pg"
    res = run(["run", recipe, "-o", out])
    assert res.exit_code == 0, res.output
    return models.load(str(out))


def test_gptq_after_pruning_in_a_recipe_keeps_the_zeros(tiny_llama, tiny_data, tmp_path):
    loaded = _run_recipe(tiny_llama, tiny_data, tmp_path, "  - {method: wanda, sparsity: 0.5}\n"
                                                          "  - {method: gptq, bits: 4, group_size: 32}\n")
    meta = loaded.quant
    assert set(meta["sparsity"]) == set(meta["quantized_modules"])
    for name, m in loaded.model.named_modules():
        if hasattr(m, "packed") and ".layers." in name:
            assert sparsity_of(m.packed().dequantize()) >= 0.5, name
    # and quantizing a pruned checkpoint later keeps them too
    p = tmp_path / "p"
    assert run(["prune", tiny_llama, "--method", "magnitude", "-o", p]).exit_code == 0
    q = tmp_path / "q"
    res = run(["quantize", p, "--method", "gptq", "--group-size", 32, *CAL, "-o", q], env={"COMPRESS_DATA_DIR": str(tiny_data)})
    assert res.exit_code == 0, res.output
    for name, m in models.load(str(q)).model.named_modules():
        if hasattr(m, "packed") and ".layers." in name:
            assert sparsity_of(m.packed().dequantize()) >= 0.5, name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_lm_head_pruning_prunes_a_tied_table_once_and_stores_it_sparse(method, tiny_llama, env, tmp_path):
    """--lm-head on a tied model prunes the one embedding/lm_head matrix (it stays tied), stores it
    in the sparse layout, and compressed-tensors' decompressor reads it back to the same table."""
    out = tmp_path / "h"
    res = run(["prune", tiny_llama, "--method", method, "--sparsity", 0.5, "--lm-head", "--dtype", "float32",
               *(CAL if method != "magnitude" else []), "-o", out])
    assert res.exit_code == 0, res.output
    loaded = models.load(str(out))
    emb = loaded.model.get_input_embeddings().weight
    assert loaded.model.get_output_embeddings().weight is emb and loaded.model.config.tie_word_embeddings
    assert abs(sparsity_of(emb) - 0.5) < 0.01
    if method == "wanda":               # per output row (a token's row of the table)
        assert bool(((emb == 0).float().mean(1) - 0.5).abs().max() < 0.02)
    cfg = json.loads((out / "config.json").read_text())
    assert "model.embed_tokens" in cfg["compress"]["sparsity"]
    import safetensors.torch as st
    t = st.load_file(str(out / "model.safetensors"))
    assert "model.embed_tokens.bitmask" in t and "model.embed_tokens.weight" not in t and "lm_head.weight" not in t
    theirs = pytest.importorskip("compressed_tensors.compressors").ModelCompressor
    dense = dict(theirs.from_compression_config(cfg["quantization_config"]).sparsity_compressor.decompress(str(out)))
    assert torch.equal(dense["model.embed_tokens.weight"], emb.detach())


def test_gptq_on_a_pruned_lm_head_keeps_its_zeros(tiny_llama, tiny_data, tmp_path):
    model = _run_recipe(tiny_llama, tiny_data, tmp_path, "  - {method: wanda, sparsity: 0.5, lm_head: true}\n"
                                                         "  - {method: gptq, bits: 4, group_size: 32, lm_head: true}\n").model
    head = model.get_output_embeddings().packed().dequantize()
    table = model.get_input_embeddings().weight
    assert bool((head[table == 0] == 0).all()) and sparsity_of(head) >= 0.5


@pytest.mark.parametrize("args,needle", [
    (["--sparsity", 1.5], "--sparsity"),
    (["--sparsity", 0], "--sparsity"),
    (["--pattern", "3:2"], "N:M"),
    (["--method", "wanda", "--pattern", "2:5"], "divisible by 5"),
    (["--pattern", "2:6"], "multiple of the pattern"),
    (["--pattern", "2:4", "--sparsity", 0.7], "disagrees"),
    (["--pattern", "2:4", "--profile", "owl"], "--profile"),
    (["--method", "magnitude", "--profile", "owl"], "activations"),
    (["--method", "wanda", "--bits", 4], "--bits applies to sparsegpt"),
    (["--method", "magnitude", "--nsamples", 8], "calibrated methods"),
    (["--owl-lambda", 0.9], "--owl-lambda"),
    (["--method", "sparsegpt", "--bits", 4, "--lm-head"], "later step"),
])
def test_bad_prune_options_are_one_line_errors_with_nothing_written(args, needle, tiny_llama, env, tmp_path):
    out = tmp_path / "bad"
    res = run(["prune", tiny_llama, *args, "-o", out])
    assert_clean_error(res, needle)
    assert no_leftovers(tmp_path, "bad")


def test_quantize_does_not_offer_pruning_methods(tiny_llama, env, tmp_path):
    res = run(["quantize", tiny_llama, "--method", "wanda", "-o", tmp_path / "x"])
    assert res.exit_code != 0 and "wanda" in res.output

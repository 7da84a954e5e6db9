"""Structured pruning: cutting heads, MLP channels, blocks and hidden channels into a smaller dense
model, the importance measures, and the command end to end on a tiny random Llama."""
from __future__ import annotations

import json

import pytest
import torch

from compress import models
from compress.methods.structured import activation_scores, gradient_scores, make_plan, top
from compress.structure import Plan, apply_plan, full_plan, widths_of
from tests.conftest import build_tiny
from tests.test_cli import assert_clean_error, no_leftovers, run

CAL = ["--nsamples", 8, "--seqlen", 64]


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """Three blocks, 4 query heads in 2 key-value groups, MLP 192, hidden 96."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama3", "llama", layers=3)


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


def _logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


X = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


def test_pruning_nothing_reproduces_the_outputs_exactly(tiny3):
    m = models.load(str(tiny3))
    new = apply_plan(m.model, m.arch, full_plan(widths_of(m.model, m.arch)))
    assert new is not m.model
    assert torch.equal(_logits(new, X), _logits(m.model, X))


def test_a_removed_head_group_takes_its_query_heads_and_equals_zeroing_them(tiny3):
    """Cutting a KV group (its K/V head, its 2 query heads, their o_proj columns) and MLP channels
    in every block gives the outputs of the full model with those parts zeroed."""
    m = models.load(str(tiny3))
    d = widths_of(m.model, m.arch)
    groups = {0: (1,), 1: (0,), 2: (1,)}
    mlp = {0: tuple(range(0, d.mlp, 2)), 1: tuple(range(1, d.mlp, 2)), 2: tuple(range(d.mlp // 2))}
    new = apply_plan(m.model, m.arch, Plan((0, 1, 2), groups, mlp, tuple(range(d.hidden))))
    assert (new.config.num_attention_heads, new.config.num_key_value_heads, new.config.head_dim) == (2, 1, 24)
    assert new.config.intermediate_size == d.mlp // 2
    ref = models.load(str(tiny3)).model
    width = d.rep * d.head_dim                       # the query heads of one group
    with torch.no_grad():
        for i, blk in enumerate(ref.model.layers):
            gone = 1 - groups[i][0]
            blk.self_attn.o_proj.weight[:, gone * width:(gone + 1) * width] = 0
            blk.mlp.down_proj.weight[:, [c for c in range(d.mlp) if c not in mlp[i]]] = 0
    torch.testing.assert_close(_logits(new, X), _logits(ref, X), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(new, X), _logits(m.model, X), atol=1e-3)


def test_removing_a_block_renumbers_the_cache(tiny3):
    m = models.load(str(tiny3))
    d = widths_of(m.model, m.arch)
    p = full_plan(d)
    new = apply_plan(m.model, m.arch, Plan((0, 2), {i: p.kv_groups[i] for i in (0, 2)},
                                           {i: p.mlp[i] for i in (0, 2)}, p.hidden))
    assert [b.self_attn.layer_idx for b in new.model.layers] == [0, 1]
    with torch.no_grad():   # incremental decoding through the KV cache agrees with the full forward pass
        full = new(X[:1]).logits[0, -1]
        out = new(X[:1, :-1], use_cache=True)
        step = new(X[:1, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_all_equal_importance_is_deterministic():
    d = type("D", (), {})()
    scores = {"layers": torch.ones(4), "heads": torch.ones(4, 3), "mlp": torch.ones(4, 8), "hidden": torch.ones(16)}
    counts = {"layers": 2, "kv_groups": 2, "mlp": 5, "hidden": 12}
    a, b = make_plan(scores, counts, d), make_plan(dict(scores), counts, d)
    assert a == b
    assert a.layers == (0, 1) and a.kv_groups[0] == (0, 1) and a.mlp[1] == (0, 1, 2, 3, 4)
    assert a.hidden == tuple(range(12))
    assert top(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2) == (1, 2)


@pytest.mark.parametrize("measure", [activation_scores, gradient_scores])
def test_both_importances_find_parts_that_do_nothing(measure, tiny3):
    """A head group whose values are zero, an MLP channel whose up projection is zero and a block
    whose outputs are zero contribute nothing: both measures give them the lowest importance."""
    m = models.load(str(tiny3))
    d = widths_of(m.model, m.arch)
    with torch.no_grad():
        blk = m.model.model.layers[0]
        blk.self_attn.v_proj.weight[d.head_dim:] = 0                    # KV group 1 of block 0
        blk.mlp.up_proj.weight[7] = 0                                   # MLP channel 7 of block 0
        mid = m.model.model.layers[1]
        mid.self_attn.o_proj.weight.zero_()
        mid.mlp.down_proj.weight.zero_()                                # block 1 adds nothing
    wins = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    s = measure(m.model, m.arch, d, wins, progress=False)
    assert float(s["heads"][0, 1]) < 1e-9 < float(s["heads"][0, 0])
    assert int(s["mlp"][0].argmin()) == 7 and float(s["mlp"][0, 7]) < 1e-9
    assert int(s["layers"].argmin()) == 1 and float(s["layers"][1]) < 1e-9 < float(s["layers"].max())
    assert s["hidden"].shape == (d.hidden,) and bool((s["hidden"] > 0).all())
    assert all(p.grad is None for p in m.model.parameters())


@pytest.mark.parametrize("importance", ["activation", "gradient"])
def test_structured_prune_writes_a_plain_smaller_model(importance, tiny3, env, tmp_path):
    out = tmp_path / "s"
    res = run(["prune", tiny3, "--method", "structured", "--heads", 0.5, "--mlp", 0.25, "--layers", 1,
               "--hidden", 0.25, "--multiple-of", 8, "--importance", importance, *CAL, "--dtype", "float32", "-o", out])
    assert res.exit_code == 0, res.output
    assert "blocks 3->2" in res.output and "hidden 96->72" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 2, 1)
    assert (cfg["intermediate_size"], cfg["hidden_size"], cfg["head_dim"]) == (144, 72, 24)
    assert "quantization_config" not in cfg
    st = cfg["compress"]["structured"]
    assert st["importance"] == importance and len(st["removed_layers"]) == 1
    assert st["parameters_after"] < st["parameters_before"]
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = models.load(str(out)).model
    assert torch.equal(_logits(plain, X), _logits(ours, X))
    info = json.loads(run(["inspect", out, "--json"]).output)
    assert info["widths_after"]["layers"] == 2 and info["parameters_after"] == sum(p.numel() for p in plain.parameters())


def test_structured_model_exports_to_gguf_and_onnx(tiny3, env, tmp_path):
    out = tmp_path / "s"
    assert run(["prune", tiny3, "--method", "structured", "--heads", 0.5, "--hidden", 0.25, "--multiple-of", 8,
                *CAL, "--dtype", "float32", "-o", out]).exit_code == 0
    ref = run(["eval", "ppl", out, "--max-windows", 2, "--json", tmp_path / "ref.json"])
    assert ref.exit_code == 0, ref.output
    assert run(["export", "gguf", out, "--type", "f32", "-o", tmp_path / "s.gguf"]).exit_code == 0
    assert run(["export", "onnx", out, "-o", tmp_path / "onnx"]).exit_code == 0
    pytest.importorskip("onnxruntime")
    want = json.loads((tmp_path / "ref.json").read_text())["ppl"]
    for args in ([tmp_path / "s.gguf"], [tmp_path / "onnx", "--runtime", "onnxruntime"]):
        res = run(["eval", "ppl", *args, "--max-windows", 2, "--json", tmp_path / "x.json"])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / "x.json").read_text())["ppl"] == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("args,needle", [
    (["--heads", 1.0], "--heads"),
    (["--heads", 0.9], "removes all 2 key-value head groups"),
    (["--heads", 0.1], "removes no head group"),
    (["--layers", 3], "has 3 decoder blocks"),
    (["--mlp", 0.99, "--multiple-of", 64], "nothing left"),
    ([], "needs something to remove"),
    (["--mlp", 0.25, "--sparsity", 0.5], "not to structured"),
    (["--mlp", 0.25, "--ignore", "lm_head"], "takes no targets"),
])
def test_bad_structured_options_are_one_line_errors(args, needle, tiny3, env, tmp_path):
    res = run(["prune", tiny3, "--method", "structured", *args, *CAL, "-o", tmp_path / "bad"])
    assert_clean_error(res, needle)
    assert no_leftovers(tmp_path, "bad")


def test_structured_is_refused_for_an_undescribed_family_and_in_a_longer_recipe(tiny_opt, env, tmp_path):
    assert_clean_error(run(["prune", tiny_opt, "--method", "structured", "--mlp", 0.25, *CAL, "-o", tmp_path / "o"]),
                       "not described for the opt family")
    from compress.api import make_step
    from compress.errors import CompressError
    from compress.recipe import Recipe
    with pytest.raises(CompressError, match="only compression step"):
        Recipe((make_step("structured", mlp=0.25), make_step("rtn", bits=4)))

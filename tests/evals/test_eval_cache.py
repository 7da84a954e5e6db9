"""A model's per-window results are kept: `eval ppl Q --base M` followed by `eval ppl M` on the same
windows evaluates M once, with the same numbers; other windows, another model or a changed model
file are evaluated afresh."""
from __future__ import annotations

import json

import pytest

from tests.test_cli import run


@pytest.fixture
def env(tiny_llama, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    q = tmp_path / "q"
    assert run(["quantize", tiny_llama, "--method", "rtn", "--bits", 4, "--group-size", 32, "-o", q]).exit_code == 0
    return tiny_llama, q


def _ppl(args, out):
    res = run(["eval", "ppl", *args, "--max-windows", 3, "--json", out])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text()), res.output


def test_base_results_are_reused_with_the_same_numbers(env, tmp_path, monkeypatch):
    base, q = env
    first, _ = _ppl([q, "--base", base], tmp_path / "q.json")
    from evals import perplexity
    calls = []
    real = perplexity.evaluate
    monkeypatch.setattr(perplexity, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, out = _ppl([base], tmp_path / "b.json")
    assert calls == [] and "reusing" in out
    assert again["ppl"] == pytest.approx(first["base_ppl"], rel=1e-12)
    monkeypatch.setattr(perplexity, "evaluate", real)
    fresh, _ = _ppl([base], tmp_path / "b2.json")     # the same model evaluated directly gives that number
    assert fresh["ppl"] == again["ppl"]


def test_other_windows_and_changed_files_are_evaluated_afresh(env, tmp_path, monkeypatch):
    base, q = env
    _ppl([q], tmp_path / "a.json")
    from evals import perplexity
    calls = []
    real = perplexity.evaluate
    monkeypatch.setattr(perplexity, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = run(["eval", "ppl", q, "--max-windows", 2, "--json", tmp_path / "c.json"])
    assert res.exit_code == 0 and calls == [1]                       # other windows
    cfg = json.loads((q / "config.json").read_text())
    cfg["touched"] = True
    (q / "config.json").write_text(json.dumps(cfg))
    _ppl([q], tmp_path / "d.json")
    assert calls == [1, 1]                                           # the model's files changed

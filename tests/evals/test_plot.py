"""`compress report --plot` and `--format html`: the Pareto front, a PNG the report embeds, one
self-contained HTML page, and one-line errors without matplotlib or with a wrong file name."""
from __future__ import annotations

import json

import pytest

from tests.test_cli import assert_clean_error, run


def _result(path, scheme, ppl, kld, bpw, size, quantized=True):
    path.write_text(json.dumps({"model": f"m-{scheme}", "scheme": scheme, "protocol": "wt2-quick", "ppl": ppl,
                                "kld": kld, "top1": 0.9, "bits_per_weight": bpw, "size_bytes": size,
                                "quantized": quantized, "tokens": 1000}))
    return path


@pytest.fixture
def results(tmp_path):
    return [_result(tmp_path / "base.json", "fp32", 30.0, None, 32.0, 540e6, quantized=False),
            _result(tmp_path / "q4.json", "int4 g128", 33.0, 0.05, 4.1, 110e6),
            _result(tmp_path / "q3.json", "int3 g128", 52.0, 0.5, 3.1, 95e6),
            _result(tmp_path / "bad.json", "int4 bad", 40.0, 0.2, 4.3, 115e6)]     # dominated by int4 g128


def test_pareto_front_keeps_the_undominated_points():
    from evals.plot import pareto
    pts = [(32, 30), (4.1, 33), (3.1, 52), (4.3, 40), (4.1, 33)]
    assert pareto(pts[:4]) == [2, 1, 0]
    assert 3 not in pareto(pts)


def test_report_draws_and_embeds_the_plot(results, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (plot extra) is not installed")
    from PIL import Image
    res = run(["report", *results, "--plot", tmp_path / "figs" / "q.png", "-o", tmp_path / "r.md"])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "figs" / "q.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 600      # two rows of panels
    assert "![perplexity and KL divergence against size](figs/q.png)" in (tmp_path / "r.md").read_text()


def test_html_report_is_one_self_contained_page(results, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (plot extra) is not installed")
    res = run(["report", *results, "--plot", tmp_path / "q.png", "--format", "html", "-o", tmp_path / "r.html"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert page.count("<tr>") == 5 and "int3 g128" in page and "src=\"q.png\"" not in page


def test_plot_without_matplotlib_is_one_line(results, tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    res = run(["report", *results, "--plot", tmp_path / "q.png", "-o", tmp_path / "r.md"])
    assert_clean_error(res, "matplotlib")
    assert not (tmp_path / "q.png").exists() and not (tmp_path / "r.md").exists()


def test_plot_name_must_be_png(results, tmp_path):
    assert_clean_error(run(["report", *results, "--plot", tmp_path / "q.jpg", "-o", tmp_path / "r.md"]), ".png")
    assert not (tmp_path / "r.md").exists()

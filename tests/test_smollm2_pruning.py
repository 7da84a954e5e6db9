"""Pruning the real model through the CLI, on a few windows (marked slow)."""
from __future__ import annotations

import json

import pytest

from tests.test_cli import run

pytestmark = pytest.mark.slow


def _ppl(out, tmp_path, name):
    js = tmp_path / f"{name}.json"
    res = run(["eval", "ppl", out, "--max-windows", 2, "--json", js])
    assert res.exit_code == 0, res.output
    return json.loads(js.read_text())["ppl"]


def test_wanda_beats_magnitude_and_the_file_shrinks(smollm2, real_data, tmp_path):
    outs = {}
    for method, extra in (("magnitude", []), ("wanda", ["--nsamples", 8, "--seqlen", 256])):
        outs[method] = out = tmp_path / method
        res = run(["prune", "smollm2-135m", "--method", method, "--sparsity", 0.5, *extra, "-o", out])
        assert res.exit_code == 0, res.output
    info = json.loads(run(["inspect", outs["wanda"], "--json"]).output)
    assert len(info["layers"]) == 210
    assert all(abs(l["sparsity"] - 0.5) < 0.01 for l in info["layers"])
    assert info["pruned_bytes"] < 0.57 * info["pruned_dense_bytes"]
    base = _ppl("smollm2-135m", tmp_path, "base")
    mag, wanda = _ppl(outs["magnitude"], tmp_path, "m"), _ppl(outs["wanda"], tmp_path, "w")
    assert base < wanda < mag

"""The memory preflight: sizes, the estimate, and refusing a run that does not fit before any work."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from calib.data import CalibSpec
from compress.api import make_step
from compress.errors import CompressError
from compress.memory import GiB, checkpoint_numel, estimate, parse_size
from tests.test_cli import assert_clean_error, no_leftovers, run

CONFIG = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30,
          "vocab_size": 49152}


@pytest.mark.parametrize("text,want", [("8GiB", 8 * GiB), ("8g", 8 * GiB), ("512MB", 512 << 20), ("1.5G", 3 * GiB // 2),
                                       ("1000", 1000)])
def test_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "-1G", "8 parsecs", "0", "G8"])
def test_bad_sizes(bad):
    with pytest.raises(CompressError, match="--max-memory"):
        parse_size(bad)


def test_checkpoint_numel_reads_the_headers(tiny_llama):
    state = load_file(str(tiny_llama / "model.safetensors"))
    assert checkpoint_numel(tiny_llama) == sum(t.numel() for t in state.values())


def test_estimate_follows_the_calibration_and_the_spill_budget():
    steps = [make_step("gptq", bits=4)]
    small = estimate(CONFIG, 135_000_000, steps, CalibSpec("wikitext2", 32, 512, 0), 8 * GiB)
    big = estimate(CONFIG, 135_000_000, steps, CalibSpec("wikitext2", 256, 512, 0), 8 * GiB)
    assert big.parts["calibration activations"] == 8 * small.parts["calibration activations"]
    assert small.parts["weights"] == 4 * 135_000_000
    capped = estimate(CONFIG, 135_000_000, steps, CalibSpec("wikitext2", 256, 512, 0), 100 << 20)
    assert capped.parts["calibration activations"] == 200 << 20        # beyond the budget they go to disk
    rtn = estimate(CONFIG, 135_000_000, [make_step("rtn", bits=4)], None, 8 * GiB)
    assert "calibration activations" not in rtn.parts and rtn.total < small.total
    grad = estimate(CONFIG, 135_000_000, [make_step("structured", mlp=0.25, importance="gradient")],
                    CalibSpec("wikitext2", 32, 512, 0), 8 * GiB)
    assert grad.parts["gradients"] == grad.parts["weights"] and grad.total > small.total


def test_a_run_that_does_not_fit_is_refused_before_any_work(tiny_llama, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))
    res = run(["quantize", tiny_llama, "--method", "gptq", "--bits", 4, "--group-size", 32, "--nsamples", 64,
               "--seqlen", 512, "--max-memory", "0.62GiB", "-o", tmp_path / "o"])
    assert_clean_error(res, "needs about", "--max-memory is 0.62 GiB", "--nsamples")
    assert no_leftovers(tmp_path, "o")
    ok = run(["quantize", tiny_llama, "--method", "rtn", "--bits", 4, "--group-size", 32, "--max-memory", "4GiB",
              "-o", tmp_path / "r"])
    assert ok.exit_code == 0 and "memory: estimated peak" in ok.output
    assert_clean_error(run(["quantize", tiny_llama, "--max-memory", "lots", "-o", tmp_path / "x"]), "--max-memory")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\nmax_memory: 100MB\nsteps:\n  - method: rtn\n    bits: 4\n    group_size: 32\n")
    assert_clean_error(run(["run", recipe, "-o", tmp_path / "y"]), "--max-memory is 0.10 GiB")

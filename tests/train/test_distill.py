"""`compress distill` on tiny models: the student moves toward the teacher, the output loads with plain
transformers, a killed run resumes to the same weights, and bad input is refused with nothing written."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import build_tiny
from tests.test_cli import assert_clean_error, run
from tests.train.helpers import edited, kill_resume_and_compare

ARGS = ["--nsamples", 8, "--seqlen", 32, "--batch", 2, "--lr", 3e-3, "--eval-windows", 0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("kd")
    return build_tiny(d / "teacher", layers=2, seed=0), build_tiny(d / "student", layers=1, seed=1, ffn=96)


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


def _kl(teacher, student, ids):
    from transformers import AutoModelForCausalLM
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    with torch.no_grad():
        lt, ls = t(ids).logits.log_softmax(-1), s(ids).logits.log_softmax(-1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def test_distilled_student_is_closer_to_the_teacher_and_loads(pair, env, tmp_path):
    teacher, student = pair
    out = tmp_path / "s"
    res = run(["distill", "--teacher", teacher, "--student", student, *ARGS, "--steps", 12, "--report",
               tmp_path / "r.json", "-o", out])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["loss_last"] < rep["loss_first"]
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(4))
    assert _kl(teacher, out, ids) < 0.9 * _kl(teacher, student, ids)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compress"]["method"] == "distill" and cfg["num_hidden_layers"] == 1
    assert not list(tmp_path.glob(".s.work"))           # the checkpoint folder is gone once the output is written


def test_killed_distillation_resumes_to_the_same_weights(pair, env, tmp_path, monkeypatch):
    teacher, student = pair
    args = ["distill", "--teacher", teacher, "--student", student, *ARGS, "--steps", 6, "--checkpoint-every", 2]
    kill_resume_and_compare(monkeypatch, args, tmp_path, die_at=2, resumed_step=4)   # checkpoints at 2 and 4


@pytest.mark.parametrize("case", ["vocab", "steps", "text", "not-causal", "divergence"])
def test_bad_input_is_one_line_error_with_nothing_written(case, pair, env, tmp_path):
    teacher, student = pair
    extra, needle = [], ""
    if case == "vocab":
        teacher, needle = edited(teacher, tmp_path / "t2", vocab_size=999), "vocabulary"
    elif case == "steps":
        extra, needle = ["--steps", 0], "--steps"
    elif case == "text":
        extra, needle = ["--data", tmp_path / "missing.txt"], "missing.txt"
    elif case == "not-causal":
        student, needle = edited(student, tmp_path / "s2", architectures=["LlamaForSequenceClassification"]), \
            "not a causal language model"
    else:
        extra, needle = ["--divergence", "sideways"], "sideways"
    out = tmp_path / "o"
    res = run(["distill", "--teacher", teacher, "--student", student, *ARGS, *extra, "-o", out])
    if case == "divergence":
        assert res.exit_code == 2 and needle in res.output
    else:
        assert_clean_error(res, needle)
    assert not out.exists() and not list(tmp_path.glob(".o.work"))


def test_torchrun_with_two_processes_follows_the_one_process_run(pair, tiny_data, env, tmp_path):
    import os
    import subprocess
    import sys
    teacher, student = pair
    env = {**os.environ, "COMPRESS_DATA_DIR": str(tiny_data), "OMP_NUM_THREADS": "1"}
    args = ["distill", "--teacher", teacher, "--student", student, *map(str, ARGS), "--steps", "4"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "compress", *map(str, args), "--report", str(tmp_path / "two.json"), "-o",
                    str(tmp_path / "two")], env=env, check=True, capture_output=True, timeout=600)
    assert run([*args, "--report", tmp_path / "one.json", "-o", tmp_path / "one"]).exit_code == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)


def test_black_box_trains_on_cached_teacher_text(pair, env, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    teacher, student = pair
    args = ["distill", "--teacher", teacher, "--student", student, *ARGS, "--steps", 6, "--generate", 6,
            "--prompt-tokens", 8]
    res = run([*args, "--report", tmp_path / "r.json", "-o", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    cached = list((tmp_path / "cache" / "generated").glob("*.safetensors"))
    assert len(cached) == 1
    from safetensors.torch import load_file
    ids = load_file(cached[0])["ids"]
    assert ids.shape == (6, 32)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["mode"] == "black-box" and rep["loss_last"] < rep["loss_first"]
    res = run([*args, "-o", tmp_path / "b"])
    assert res.exit_code == 0 and "reusing the teacher's generated text" in res.output
    a, b = (json.loads((tmp_path / n / "config.json").read_text())["compress"] for n in ("a", "b"))
    assert a["mode"] == "black-box" and a["loss_last"] == b["loss_last"]

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


def test_topk_divergence_with_the_whole_vocabulary_is_the_full_one():
    from compress.train.losses import kd_loss, kd_loss_topk
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g) * 3
    v, i = t.topk(40, dim=-1)
    assert float(kd_loss_topk(s, v, i, 2.0)) == pytest.approx(float(kd_loss(s, t, 2.0)), rel=1e-5)
    v8, i8 = t.topk(8, dim=-1)           # fewer tokens: another, finite number
    assert 0 < float(kd_loss_topk(s, v8, i8, 2.0)) != pytest.approx(float(kd_loss(s, t, 2.0)), rel=1e-3)


def test_cached_teacher_topk_is_computed_once_and_reused_without_the_teacher(pair, env, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    teacher, student = pair
    args = ["distill", "--teacher", teacher, "--student", student, *ARGS, "--steps", 12, "--teacher-topk", 32]
    res = run([*args, "--report", tmp_path / "r.json", "-o", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "cache" / "teacher-topk").glob("*.safetensors"))) == 1
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["loss_last"] < rep["loss_first"]
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(4))
    assert _kl(teacher, tmp_path / "a", ids) < 0.9 * _kl(teacher, student, ids)
    from compress import models
    real = models.load

    def no_teacher(spec, *a, **k):
        assert str(spec) != str(teacher), "the teacher was loaded although its logits are cached"
        return real(spec, *a, **k)
    monkeypatch.setattr(models, "load", no_teacher)
    res = run([*args, "-o", tmp_path / "b"])
    assert res.exit_code == 0 and "reusing the teacher's top-32 logits" in res.output, res.output
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layer_pairs_follow_the_blocks_a_pruned_student_kept():
    from compress.train.losses import layer_pairs
    assert layer_pairs("auto", 3, 5, [0, 2, 4]) == [(0, 0), (1, 2), (2, 4)]
    assert layer_pairs("auto", 2, 4) == [(0, 1), (1, 3)]
    assert layer_pairs("0:1,1:3", 2, 4) == [(0, 1), (1, 3)]


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A teacher and a student of another hidden width (64 against 96)."""
    d = tmp_path_factory.mktemp("narrow")
    return build_tiny(d / "t", layers=2, seed=0), build_tiny(d / "s", layers=1, seed=1, hidden=64, ffn=96)


def test_hidden_state_matching_trains_a_projection_between_widths(narrow, env, tmp_path):
    """A narrower student (another hidden width): the hidden-state loss goes down with the learned
    projection, and the output is the student alone."""
    teacher, student = narrow
    args = ["distill", "--teacher", teacher, "--student", student, *ARGS, "--steps", 12, "--hidden-weight", 1.0]
    res = run([*args, "--report", tmp_path / "r.json", "-o", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["loss_last"] < rep["loss_first"]
    from safetensors.torch import load_file
    state = load_file(tmp_path / "a" / "model.safetensors")
    assert not any("hidden_match" in k for k in state)
    plain = run(["distill", "--teacher", teacher, "--student", student, *ARGS, "--steps", 12,
                 "--report", tmp_path / "p.json", "-o", tmp_path / "p"])
    assert plain.exit_code == 0
    assert rep["loss_first"] > json.loads((tmp_path / "p.json").read_text())["loss_first"]   # the MSE term is there


def test_killed_run_with_hidden_matching_resumes_to_the_same_weights(narrow, env, tmp_path, monkeypatch):
    """A resumed run restores the learned projections too."""
    teacher, student = narrow
    args = ["distill", "--teacher", teacher, "--student", student, *ARGS, "--steps", 6, "--checkpoint-every", 2,
            "--hidden-weight", 1.0]
    kill_resume_and_compare(monkeypatch, args, tmp_path, die_at=2, resumed_step=4)


@pytest.mark.parametrize("extra,needle", [
    (["--teacher-topk", 8, "--generate", 4, "--prompt-tokens", 8], "--generate"),
    (["--teacher-topk", 8, "--divergence", "reverse"], "forward"),
    (["--teacher-topk", -1], "--teacher-topk"),
    (["--hidden-weight", 1, "--hidden-layers", "0:7"], "out of range"),
    (["--hidden-weight", 1, "--hidden-layers", "x"], "STUDENT:TEACHER"),
    (["--hidden-weight", 1, "--teacher-topk", 8], "--hidden-weight")])
def test_teacher_topk_and_hidden_matching_misuse_is_refused(extra, needle, pair, env, tmp_path):
    teacher, student = pair
    res = run(["distill", "--teacher", teacher, "--student", student, *ARGS, *extra, "-o", tmp_path / "o"])
    assert_clean_error(res, needle)
    assert not (tmp_path / "o").exists()

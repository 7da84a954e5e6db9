"""What the training CLI tests share: killing a run right after a checkpoint and resuming it, and
model folders with an edited config."""
from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from tests.test_cli import run


def kill_resume_and_compare(monkeypatch, args, tmp_path, die_at: int, resumed_step: int,
                            weights: str = "model.safetensors") -> None:
    """Run ``args`` to ``ref``; run them again to ``b``, killed right after its ``die_at``-th
    checkpoint (nothing written); run them once more, which must resume at ``resumed_step`` and
    write exactly ``ref``'s ``weights`` file."""
    from compress.train import loop
    assert run([*args, "-o", tmp_path / "ref"]).exit_code == 0
    real = loop.Trainer.save
    calls = {"n": 0}

    def save_then_die(self):
        real(self)
        if self.ckpt_dir is not None:
            calls["n"] += 1
            if calls["n"] == die_at:
                raise KeyboardInterrupt
    monkeypatch.setattr(loop.Trainer, "save", save_then_die)
    res = run([*args, "-o", tmp_path / "b"])
    assert res.exit_code != 0 and calls["n"] == die_at and not (tmp_path / "b").exists()   # click: Aborted!
    monkeypatch.setattr(loop.Trainer, "save", real)
    res = run([*args, "-o", tmp_path / "b"])
    assert res.exit_code == 0, res.output
    assert f"resuming at step {resumed_step}" in res.output
    a, b = load_file(tmp_path / "ref" / weights), load_file(tmp_path / "b" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def edited(src, dst, **changes):
    """A copy of model folder ``src`` at ``dst`` with ``changes`` made to its config.json."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst

"""The shared training loop: a run killed after a checkpoint and resumed ends with the same weights
as an uninterrupted one; two gloo processes follow the one-process loss curve for the same global
batch; bad options are refused."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from compress.errors import CompressError
from compress.train.loop import Trainer, TrainSpec, batch_indices
from compress.train.losses import kd_loss, next_token_ce

VOCAB, LEN = 50, 12


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, VOCAB))


def _data(n=10):
    return torch.randint(0, VOCAB, (n, LEN), generator=torch.Generator().manual_seed(3))


def _trainer(model, spec, ckpt=None, kill_at=None):
    calls = {"n": 0}
    model.train()

    def loss_fn(ids):
        calls["n"] += 1
        if kill_at is not None and calls["n"] == kill_at:
            raise KeyboardInterrupt
        return next_token_ce(model(ids), ids)

    params = dict(model.named_parameters())
    return Trainer(params, spec, _data(), loss_fn, ckpt, {"test": 1}, progress=False)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    spec = TrainSpec(steps=7, lr=1e-2, batch=4, accum=2, warmup=0.3, checkpoint_every=2, seed=5)
    ref = _model()
    hist = _trainer(ref, spec).run()
    assert hist[-1]["loss"] < hist[0]["loss"]
    killed = _model()
    with pytest.raises(KeyboardInterrupt):
        _trainer(killed, spec, tmp_path / "ck", kill_at=2 * 5 + 1).run()     # during step 6: checkpoint at 4
    assert json.loads((tmp_path / "ck" / "train-state.json").read_text())["step"] == 4
    resumed = _model(seed=99)                          # other initial weights: the checkpoint must restore them
    hist2 = _trainer(resumed, spec, tmp_path / "ck").run()
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in hist2] == [h["loss"] for h in hist]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    _trainer(_model(), TrainSpec(steps=2, batch=2), tmp_path / "ck").run()
    with pytest.raises(CompressError, match="different training run"):
        _trainer(_model(), TrainSpec(steps=3, batch=2), tmp_path / "ck").run()


def test_batches_cover_every_window_once_per_epoch():
    spec = TrainSpec(steps=10, batch=3, seed=1)
    seen = [i for s in range(10) for i in batch_indices(10, spec, s)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]                 # a new order each epoch


def test_bf16_autocast_trains_float32_tensors_and_resumes_exactly(tmp_path):
    """Under bfloat16 autocast (as on CUDA by default; here forced on the CPU) the products run in
    bfloat16, so the losses differ from float32's a little, while the weights and the optimizer
    state stay float32, and a killed run still resumes to the uninterrupted run's weights."""
    spec = TrainSpec(steps=5, lr=1e-2, batch=4, checkpoint_every=2, seed=2, precision="bf16")
    ref32 = _model()
    h32 = _trainer(ref32, TrainSpec(steps=5, lr=1e-2, batch=4, checkpoint_every=2, seed=2, precision="fp32")).run()
    ref = _model()
    t = _trainer(ref, spec)
    h = t.run()
    assert t.bf16 and all(p.dtype == torch.float32 for p in ref.parameters())
    assert all(v.dtype == torch.float32 for st in t.opt.state.values() for v in st.values() if torch.is_tensor(v)
               and v.dim())
    a, b = [x["loss"] for x in h], [x["loss"] for x in h32]
    assert a != b and max(abs(x - y) / y for x, y in zip(a, b)) < 0.05
    assert not _trainer(_model(), TrainSpec(steps=1, batch=4)).bf16          # auto on the CPU: float32
    killed = _model()
    with pytest.raises(KeyboardInterrupt):
        _trainer(killed, spec, tmp_path / "ck", kill_at=4).run()
    resumed = _model(seed=99)
    _trainer(resumed, spec, tmp_path / "ck").run()
    assert all(torch.equal(x, y) for x, y in zip(ref.parameters(), resumed.parameters()))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2, batch=3, accum=2), dict(steps=2, lr=0.0),
                                 dict(steps=2, warmup=1.0), dict(steps=2, precision="fp16")])
def test_bad_options_are_refused(bad):
    with pytest.raises(CompressError):
        TrainSpec(**bad)


def test_kd_loss_is_zero_for_equal_distributions_and_refuses_other_vocabularies():
    t = torch.randn(2, 5, 30)
    for d in ("forward", "reverse", "mix"):
        assert float(kd_loss(t, t, 2.0, d)) == pytest.approx(0.0, abs=1e-6)
        assert float(kd_loss(t + torch.randn_like(t), t, 2.0, d)) > 0.01
    with pytest.raises(CompressError, match="another vocabulary"):
        kd_loss(torch.randn(2, 5, 31), t)


# --------------------------------------------------------------------------- two processes

def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        model.eval()                 # no dropout: the processes' random streams differ
        spec = TrainSpec(steps=5, lr=1e-2, batch=4, accum=1, seed=2)
        params = dict(model.named_parameters())
        hist = Trainer(params, spec, _data(), lambda ids: next_token_ce(model(ids), ids), progress=False).run()
        if rank == 0:
            torch.save({"loss": torch.tensor([h["loss"] for h in hist]),
                        **{k: v.detach() for k, v in model.state_dict().items()}}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_follow_the_one_process_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    model = _model()
    model.eval()
    spec = TrainSpec(steps=5, lr=1e-2, batch=4, accum=1, seed=2)
    hist = Trainer(dict(model.named_parameters()), spec, _data(), lambda ids: next_token_ce(model(ids), ids),
                   progress=False).run()
    torch.testing.assert_close(two["loss"], torch.tensor([h["loss"] for h in hist]), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6)

import pytest
import torch

from calib.data import CalibError, CalibSpec, calibration_windows
from calib.dist import Plan
from calib.runner import InputStore, capture_first_block_inputs, run_sequential
from compress import models


def test_sequential_replay_reproduces_the_model(tiny_llama):
    """Capturing block 0's inputs and advancing block by block gives the model's own logits."""
    loaded = models.load(str(tiny_llama))
    model, arch = loaded.model, loaded.arch
    wins = torch.randint(0, 300, (5, 24))
    inputs = capture_first_block_inputs(model, arch, wins)
    inputs.plan = Plan(5, batch=2)
    assert len(inputs) == 5
    for block in arch.get_blocks(model):
        inputs.advance(block)
    with torch.no_grad():
        head = model.get_submodule(arch.lm_head)
        norm = model.get_submodule(arch.final_norm)
        ours = torch.cat([head(norm(inputs.store[i])) for i in range(5)])
        ref = model(input_ids=wins).logits
    assert torch.allclose(ours, ref, atol=1e-4)


def test_stop_at_ends_the_forward_early(tiny_llama):
    loaded = models.load(str(tiny_llama))
    block = loaded.arch.get_blocks(loaded.model)[0]
    inputs = capture_first_block_inputs(loaded.model, loaded.arch, torch.randint(0, 300, (3, 16)))
    calls = {"q": 0, "down": 0}
    h1 = block.self_attn.q_proj.register_forward_hook(lambda *a: calls.__setitem__("q", calls["q"] + 1))
    h2 = block.mlp.down_proj.register_forward_hook(lambda *a: calls.__setitem__("down", calls["down"] + 1))
    inputs.plan = Plan(3, batch=1)
    inputs.run(block, stop_at=block.self_attn.v_proj)
    assert calls == {"q": 3, "down": 0}
    inputs.run(block)
    assert calls == {"q": 6, "down": 3}
    h1.remove(), h2.remove()


def test_process_block_sees_every_block_in_order(tiny_opt):
    loaded = models.load(str(tiny_opt))
    seen = []
    run_sequential(loaded.model, loaded.arch, torch.randint(0, 300, (2, 16)),
                   lambda i, block, inputs: seen.append((i, len(inputs))), progress=False)
    assert seen == [(0, 2), (1, 2)]


def test_input_store_spills_to_disk():
    store = InputStore(budget=3 * 4 * 100)
    ts = [torch.randn(1, 10, 10) for _ in range(6)]
    for i, t in enumerate(ts):
        store[i] = t
    assert store.spilled and len(store.mem) == 3
    for i, t in enumerate(ts):
        assert torch.equal(store[i], t)
    d = store.dir
    store.close()
    assert not d.exists()


def test_calibration_windows(tiny_llama, tiny_data):
    tok = models.load(str(tiny_llama)).tokenizer
    a = calibration_windows(tok, CalibSpec("wikitext2", nsamples=4, seqlen=32, seed=0), tiny_data)
    b = calibration_windows(tok, CalibSpec("wikitext2", nsamples=4, seqlen=32, seed=0), tiny_data)
    c = calibration_windows(tok, CalibSpec("wikitext2", nsamples=4, seqlen=32, seed=1), tiny_data)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_errors(tiny_llama, tmp_path):
    tok = models.load(str(tiny_llama)).tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(CalibError, match="empty"):
        calibration_windows(tok, CalibSpec(str(empty), 2, 8), None)
    with pytest.raises(CalibError, match="neither a file"):
        calibration_windows(tok, CalibSpec(str(tmp_path / "nope.txt"), 2, 8), None)
    with pytest.raises(CalibError, match="nsamples"):
        CalibSpec("wikitext2", 0, 8)

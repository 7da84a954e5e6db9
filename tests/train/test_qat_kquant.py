"""Quantization-aware training onto GGML grids: the fake-quantized layer converts exactly into GGUF
blocks of every type, `compress qat --method qat-kquant` writes a GGUF file that computes the
trained model, a block that training made worse keeps kquant-gptq's blocks byte for byte, a run
killed in the end-to-end phase resumes to the same tensors, and bad input is refused."""
from __future__ import annotations

import json

import pytest
import torch

from compress import models
from compress.formats import kquants
from compress.formats.ggml_codec import CODECS
from compress.train.fakequant_ggml import GGMLFakeQuantLinear
from tests.conftest import build_tiny
from tests.test_cli import assert_clean_error, run
from tests.train.helpers import edited

CAL = ["--nsamples", 8, "--seqlen", 64, "--batch", 2]


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    """Rows of 256 and 512 weights: the k-quant types apply without fallbacks."""
    return build_tiny(tmp_path_factory.mktemp("kq") / "llama", "llama", hidden=256, ffn=512)


def _tensors(path) -> dict:
    import gguf
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("type_name", list(CODECS))
def test_fake_quantized_layer_converts_exactly_and_passes_gradients(type_name):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(512, 8)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
    start = kquants.quantize(lin.weight.detach(), type_name)
    fq = GGMLFakeQuantLinear(lin, type_name, start)
    assert torch.equal(fq.blocks(), start)                                   # it starts exactly there
    assert torch.equal(fq.quantized_weight(), kquants.dequantize(start, type_name, (8, 512)))
    fq(torch.randn(4, 512, generator=g)).pow(2).sum().backward()
    assert fq.weight.grad.abs().sum() > 0 and fq.scale.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fq.quant_parameters().values())
    with torch.no_grad():                                                    # somewhere else on the grid
        fq.weight.add_(torch.randn(fq.weight.shape, generator=g) * 0.01)
        fq.scale.mul_(1 + 0.2 * torch.randn(fq.scale.shape, generator=g))
        fq.min.mul_(1 + 0.2 * torch.randn(fq.min.shape, generator=g))
    q = fq.quantized_weight()
    blocks = fq.blocks()
    assert not torch.equal(blocks, start)
    assert torch.equal(q, kquants.dequantize(blocks, type_name, (8, 512)))
    fq.freeze_codes()                                                        # end-to-end: codes fixed
    with torch.no_grad():
        fq.weight.add_(1.0)
        fq.scale.mul_(1.01)
    assert torch.equal(fq.quantized_weight(), kquants.dequantize(fq.blocks(), type_name, (8, 512)))


def test_qat_kquant_writes_a_gguf_that_computes_the_trained_model(llama256, env, tmp_path, monkeypatch):
    from compress.methods.qat_kquant import QATKQuant
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    seen = {}
    real = QATKQuant.finish

    def finish_and_look(self, run_):
        real(self, run_)
        with torch.no_grad():
            seen["logits"] = run_.model(ids, use_cache=False).logits.clone()
    monkeypatch.setattr(QATKQuant, "finish", finish_and_look)
    out = tmp_path / "q.gguf"
    res = run(["qat", llama256, "--method", "qat-kquant", "--type", "Q4_K_M", *CAL, "--block-epochs", 1,
               "--e2e-steps", 6, "--e2e-lr", 1e-3, "--report", tmp_path / "r.json", "-o", out])
    assert res.exit_code == 0, res.output
    extra = json.loads((tmp_path / "r.json").read_text())["steps"][0]["extra"]
    assert set(extra["qat_blocks"]) == {"0", "1"} and extra["qat_e2e"]["steps"] == 6
    assert extra["qat_e2e"]["loss_last"] < extra["qat_e2e"]["loss_first"]
    types = {t for t, _ in _tensors(out).values()}
    assert {"Q4_K", "Q6_K"} <= types
    loaded = models.load(str(out)).model.float().eval()
    with torch.no_grad():
        got = loaded(ids, use_cache=False).logits
    ref = seen["logits"]
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), float((got - ref).abs().max())
    # and the file is not kquant-gptq's: training moved it
    assert run(["quantize", llama256, "--method", "kquant-gptq", "--type", "Q4_K_M", "--nsamples", 8, "--seqlen", 64,
                "-o", tmp_path / "g.gguf"]).exit_code == 0
    a, b = _tensors(out), _tensors(tmp_path / "g.gguf")
    assert a.keys() == b.keys() and any(a[k] != b[k] for k in a if k.startswith("blk."))


def test_blocks_that_training_made_worse_keep_kquant_gptq_bytes(llama256, env, tmp_path):
    # a learning rate this large on a tiny model only leaves GPTQ's solution
    res = run(["qat", llama256, "--method", "qat-kquant", "--type", "Q4_K_M", *CAL, "--block-epochs", 1,
               "--block-lr", 1e-1, "--scale-lr", 1e-1, "--e2e-steps", 0, "--report", tmp_path / "r.json",
               "-o", tmp_path / "q.gguf"])
    assert res.exit_code == 0, res.output
    blocks = json.loads((tmp_path / "r.json").read_text())["steps"][0]["extra"]["qat_blocks"]
    assert all(b["kept"] == "start" for b in blocks.values())
    assert run(["quantize", llama256, "--method", "kquant-gptq", "--type", "Q4_K_M", "--nsamples", 8, "--seqlen", 64,
                "-o", tmp_path / "g.gguf"]).exit_code == 0
    assert _tensors(tmp_path / "q.gguf") == _tensors(tmp_path / "g.gguf")


def test_killed_in_the_end_to_end_phase_resumes_to_the_same_tensors(llama256, env, tmp_path, monkeypatch):
    from compress.train import loop
    args = ["qat", llama256, "--method", "qat-kquant", "--type", "Q3_K_M", *CAL, "--no-blockwise",
            "--e2e-steps", 4, "--e2e-lr", 1e-3, "--checkpoint-every", 2]
    assert run([*args, "-o", tmp_path / "ref.gguf"]).exit_code == 0
    real = loop.Trainer.save

    def save_then_die(self):
        real(self)
        if self.ckpt_dir is not None:
            raise KeyboardInterrupt
    monkeypatch.setattr(loop.Trainer, "save", save_then_die)
    res = run([*args, "-o", tmp_path / "b.gguf"])
    assert res.exit_code != 0 and not (tmp_path / "b.gguf").exists()
    monkeypatch.setattr(loop.Trainer, "save", real)
    res = run([*args, "-o", tmp_path / "b.gguf"])
    assert res.exit_code == 0, res.output
    assert "resuming at step 2" in res.output
    assert _tensors(tmp_path / "ref.gguf") == _tensors(tmp_path / "b.gguf")


@pytest.mark.parametrize("case", ["teacher-vocab", "no-type", "int-option", "nothing-trained"])
def test_bad_input_is_refused_before_any_work(case, llama256, env, tmp_path):
    extra, needle = ["--type", "Q4_K_M"], ""
    if case == "teacher-vocab":
        extra += ["--teacher", edited(llama256, tmp_path / "t", vocab_size=999)]
        needle = "vocabulary"
    elif case == "no-type":
        extra, needle = [], "--type"
    elif case == "int-option":
        extra += ["--bits", 3]
        needle = "--bits"
    else:
        extra += ["--no-blockwise", "--e2e-steps", 0]
        needle = "--e2e-steps"
    res = run(["qat", llama256, "--method", "qat-kquant", *CAL, *extra, "-o", tmp_path / "o.gguf"])
    assert_clean_error(res, needle)
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / ".o.gguf.work").exists()

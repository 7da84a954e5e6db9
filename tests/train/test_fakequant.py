"""Fake-quantized layers: gradients reach weights, scales and zero-points through the rounding, and
the packed layer they convert into computes exactly what they computed."""
from __future__ import annotations

import pytest
import torch

from compress.qlinear import QuantLinear, set_submodule
from compress.scheme import IntScheme
from compress.train.fakequant import FakeQuantLinear, ScaleTunedLinear


def _linear(n=48, k=96, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1)
    return lin


@pytest.mark.parametrize("sym", [False, True])
def test_straight_through_gradients_reach_weights_and_grid(sym):
    fq = FakeQuantLinear(_linear(), IntScheme(bits=3, group_size=32, sym=sym))
    with torch.no_grad():     # a narrower grid clips: the zero-point only matters where values clip
        fq.scale.mul_(0.6)
    x = torch.randn(5, 96)
    fq(x).pow(2).sum().backward()
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    if sym:
        assert not fq.zero.requires_grad and set(fq.quant_parameters()) == {"scale"}
    else:
        assert fq.zero.grad is not None and fq.zero.grad.abs().sum() > 0
    assert fq.bias.grad is None          # the bias is not trained


@pytest.mark.parametrize("bits,group,sym", [(3, 32, False), (2, 16, False), (4, -1, True), (4, 40, False)])
def test_conversion_to_packed_weights_is_exact(bits, group, sym):
    fq = FakeQuantLinear(_linear(), IntScheme(bits=bits, group_size=group, sym=sym))
    with torch.no_grad():             # move the grid off its round-to-nearest start, as training does
        fq.scale.mul_(1 + 0.2 * torch.rand_like(fq.scale))
        fq.zero.add_(torch.randn_like(fq.zero) * (0 if sym else 0.7))
        fq.weight.add_(torch.randn_like(fq.weight) * 0.01)
    packed = fq.packed()
    assert torch.equal(packed.dequantize(), fq.quantized_weight().detach())
    ql = QuantLinear.from_packed(packed, fq.bias)
    x = torch.randn(7, 96)
    with torch.no_grad():
        assert torch.equal(ql(x), fq(x))


def test_fake_quantized_model_and_packed_model_give_the_same_logits(tiny_llama):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    fakes = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"):
            fakes[name] = FakeQuantLinear(m, IntScheme(bits=3, group_size=32, sym=False))
            with torch.no_grad():
                fakes[name].scale.mul_(1.1)
            set_submodule(model, name, fakes[name])
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = model(ids).logits
        for name, fq in fakes.items():
            set_submodule(model, name, QuantLinear.from_packed(fq.packed(), fq.bias))
        packed = model(ids).logits
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-6)


def test_scale_tuned_layer_round_trips_and_changes_only_scales():
    fq = FakeQuantLinear(_linear(bias=False), IntScheme(bits=4, group_size=32, sym=False))
    p0 = fq.packed()
    st = ScaleTunedLinear(p0, None)
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(st(x), QuantLinear.from_packed(p0, None)(x))
        st.scale.mul_(1.05)
    st(x).sum().backward()
    assert st.scale.grad.abs().sum() > 0
    p1 = st.packed()
    assert torch.equal(p1.qweight, p0.qweight) and torch.equal(p1.qzeros, p0.qzeros)
    assert not torch.equal(p1.scales, p0.scales)
    with torch.no_grad():
        assert torch.equal(QuantLinear.from_packed(p1, None)(x), st(x))


def test_a_gptq_start_is_computed_exactly():
    from compress.solvers.int_grid import gptq_solve
    lin = _linear(bias=False)
    x = torch.randn(256, 96)
    scheme = IntScheme(bits=3, group_size=32, sym=False, act_order=True)
    res = gptq_solve(lin.weight.detach(), x.t() @ x, scheme, static_groups=True, grid="mse")
    fq = FakeQuantLinear(lin, scheme, start=(res.dequantize(), res.scales, res.zeros))
    assert torch.equal(fq.quantized_weight().detach(), res.dequantize())
    p = fq.packed()
    assert torch.equal(p.dequantize(), res.dequantize())

import pytest
import torch

from compress.errors import CompressError
from compress.quantizer import dequantize_values, grid_params, quantize_rtn
from compress.scheme import IntScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_bound(bits, group_size, sym):
    """Unclamped weights land within half a step of the grid; the rounded zero-point and the
    fp16 scale may clip a group's extreme values by at most one more half step."""
    torch.manual_seed(7 * bits)
    w = torch.randn(64, 576) * 0.05
    w[3, 5] = 1.0  # an outlier
    scheme = IntScheme(bits=bits, group_size=group_size, sym=sym)
    q, scales, zeros, g_idx = quantize_rtn(w, scheme)
    deq = dequantize_values(q, scales, zeros, g_idx)
    step = scales.t()[:, g_idx.long()]
    err = (deq - w).abs()
    inner = (q > 0) & (q < scheme.maxq)
    assert torch.all(err[inner] <= 0.5 * step[inner] * (1 + 1e-4) + 1e-7)
    assert torch.all(err <= step * (1 + 1e-3) + 1e-7)
    assert int(q.min()) >= 0 and int(q.max()) <= scheme.maxq
    assert int(zeros.min()) >= 1


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    errs = []
    for bits in (2, 3, 4, 8):
        q, s, z, g = quantize_rtn(w, IntScheme(bits=bits, group_size=64))
        errs.append(float((dequantize_values(q, s, z, g) - w).pow(2).mean()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]


def test_narrow_last_group_uses_its_own_range():
    w = torch.cat([torch.full((4, 128), 10.0), torch.linspace(-0.01, 0.01, 64).repeat(4, 1)], dim=1)
    q, s, z, g = quantize_rtn(w, IntScheme(bits=4, group_size=128))
    assert s.shape == (2, 4)
    assert float(s[1].max()) < 0.01  # the 64-wide last group has a scale fitted to its own values
    assert torch.equal(g, torch.arange(192, dtype=torch.int32) // 128)


def test_symmetric_zero_is_midpoint_and_scales_are_fp16():
    w = torch.randn(8, 64)
    s, z = grid_params(w, 4, sym=True)
    assert torch.all(z == 8)
    assert torch.equal(s, s.half().float())


def test_all_positive_group_keeps_zero_at_least_one():
    w = torch.rand(4, 32) + 0.5
    q, s, z, g = quantize_rtn(w, IntScheme(bits=4, group_size=32))
    assert int(z.min()) >= 1
    assert float((dequantize_values(q, s, z, g) - w).abs().max()) <= 0.5 * float(s.max()) * 1.001


@pytest.mark.parametrize("kwargs", [{"bits": 5}, {"group_size": 0}, {"group_size": -2}, {"format_version": 3}])
def test_scheme_validation(kwargs):
    with pytest.raises(CompressError):
        IntScheme(**kwargs)


def test_group_larger_than_layer():
    with pytest.raises(CompressError, match="larger than the input dimension"):
        quantize_rtn(torch.randn(4, 64), IntScheme(bits=4, group_size=128))

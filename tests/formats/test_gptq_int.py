import pytest
import torch

from compress.formats import gptq_int
from compress.quantizer import dequantize_values, quantize_rtn
from compress.scheme import IntScheme
from kernels.reference import unpack_bitstream


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [32, 40, 96, 100, 576])
def test_bitstream_round_trip(bits, count):
    g = torch.Generator().manual_seed(bits * 1000 + count)
    v = torch.randint(0, 1 << bits, (count, 7), generator=g)
    packed = gptq_int.pack_bitstream(v, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (gptq_int.packed_words(count, bits), 7)
    assert torch.equal(unpack_bitstream(packed, bits, count), v.to(torch.int32))


def test_bitstream_bit_order():
    # 4-bit: value i sits in bits [4i, 4i+4) of word 0, lowest first (GPTQ order)
    v = torch.arange(8).view(8, 1)
    assert int(gptq_int.pack_bitstream(v, 4)[0, 0]) == 0x76543210
    # 3-bit: value 10 straddles words 0 and 1 (bits 30..32)
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[10] = 0b111
    p = gptq_int.pack_bitstream(v, 3)
    assert p.shape == (3, 1)
    assert int(p[0, 0]) & 0xFFFFFFFF == 0b11 << 30 and int(p[1, 0]) == 1 and int(p[2, 0]) == 0


def test_bitstream_rejects_out_of_range():
    with pytest.raises(ValueError):
        gptq_int.pack_bitstream(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        gptq_int.pack_bitstream(torch.tensor([[1]]), 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_unpack_exact_and_dequantize(bits, group_size, sym):
    torch.manual_seed(bits + group_size)
    w = torch.randn(72, 576) * torch.rand(72, 1)  # rows of different magnitude; 576 = 4 x 128 + 64
    scheme = IntScheme(bits=bits, group_size=group_size, sym=sym)
    q, scales, zeros, g_idx = quantize_rtn(w, scheme)
    assert scales.shape == (scheme.groups(576), 72)
    p = gptq_int.pack(q, scales, zeros, g_idx, bits)
    q2, z2 = gptq_int.unpack(p)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)
    assert p.qweight.shape == (576 * bits // 32, 72)
    assert p.qzeros.shape == (scheme.groups(576), gptq_int.packed_words(72, bits))
    assert p.scales.dtype == torch.float16
    # the packed checkpoint reproduces exactly the weights the quantizer produced
    assert torch.equal(p.dequantize(), dequantize_values(q, scales, zeros, g_idx))


def test_zero_points_of_zero_are_rejected():
    q = torch.zeros(4, 32, dtype=torch.int32)
    with pytest.raises(ValueError):
        gptq_int.pack(q, torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.int32), torch.zeros(32, dtype=torch.int32), 4)

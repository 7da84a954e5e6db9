"""GPTQ dequant-GEMM: the Triton kernel against its torch twin (interpreter on CPU, real on GPU).

Shapes are small with ragged tails: N = 72 is not a multiple of the 128-wide N tile; K = 176
leaves a narrow last group for group sizes 32 (16 columns), 64 (48) and 128 (48), is not a
multiple of the K tile, and makes 3-bit values straddle int32 words.
"""
import pytest
import torch

from kernels import gptq_gemm
from kernels.gptq_gemm import DECODE_MAX_M, gptq_linear_triton, path_for
from kernels.reference import gptq_linear_ref

# relative Frobenius error vs the torch twin, per activation dtype: float16/bfloat16 round the
# dequantized weight tile (and the output) to the activation dtype; float32 uses an IEEE dot
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
N, K = 72, 176
MS = [1, 3, 16, 64]
BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]


def _inputs(m, k, n, dtype, device, seed, bias=True):
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device) if bias else None
    return x, b


def _run(t, bits, x, b):
    args = (x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, b)
    return gptq_linear_triton(*args), gptq_linear_ref(*args)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("act_order", [False, True])
def test_twin_equals_float_weight(make_gptq, rel_err, device, bits, group, act_order):
    """The twin unpacks the bit stream to the weight the integer values stand for."""
    t, w = make_gptq(N, K, bits, group, act_order=act_order, seed=bits * 10 + group)
    x, b = _inputs(5, K, N, torch.float32, device, seed=bits)
    ref = gptq_linear_ref(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, b)
    assert rel_err(ref, x @ w.t() + b) < 1e-6


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_kernel_matches_twin(make_gptq, rel_err, device, bits, group, m):
    t, _ = make_gptq(N, K, bits, group, seed=bits * 100 + group + m)
    x, b = _inputs(m, K, N, torch.float16, device, seed=m + bits, bias=m % 2 == 1)
    y, ref = _run(t, bits, x, b)
    assert y.shape == (m, N) and y.dtype == torch.float16
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < REL_TOL[torch.float16]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 128])
def test_kernel_act_order(make_gptq, rel_err, device, bits, group, m):
    t, _ = make_gptq(N, K, bits, group, act_order=True, seed=7 * bits + group + m)
    g = t["g_idx"].cpu()
    assert not torch.equal(g, torch.sort(g).values), "act-order g_idx should not be sorted"
    x, b = _inputs(m, K, N, torch.float16, device, seed=3 * m + bits)
    y, ref = _run(t, bits, x, b)
    assert rel_err(y, ref) < REL_TOL[torch.float16]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, True)])
def test_kernel_dtypes(make_gptq, rel_err, device, dtype, bits, sym, m):
    t, _ = make_gptq(N, K, bits, 64, sym=sym, seed=11 * m + bits)
    x, b = _inputs(m, K, N, dtype, device, seed=5 * m + bits)
    y, ref = _run(t, bits, x, b)
    assert y.dtype == dtype and y.shape == (m, N)
    assert rel_err(y, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("m", [1, 24])
@pytest.mark.parametrize("n,k,bits,group", [
    (40, 576, 4, 128),   # SmolLM2's 576-wide layers at group 128: last group of 64
    (9, 33, 3, 32),      # one column past a group; 3-bit straddles; tiny N
    (130, 96, 2, -1),    # per-channel, two N tiles
])
def test_kernel_odd_shapes(make_gptq, rel_err, device, n, k, bits, group, m):
    t, _ = make_gptq(n, k, bits, group, act_order=(m == 24), seed=n + k)
    x, b = _inputs(m, k, n, torch.float16, device, seed=k)
    y, ref = _run(t, bits, x, b)
    assert rel_err(y, ref) < REL_TOL[torch.float16]


@pytest.mark.parametrize("m", [2, 40])
def test_kernel_strided_x_and_int64_gidx(make_gptq, rel_err, device, m):
    t, _ = make_gptq(N, K, 4, 32, act_order=True, seed=m)
    x_full, _ = _inputs(K, 2 * m, N, torch.float16, device, seed=m, bias=False)
    x = x_full.t()[::2]              # (m, K) with strides (2, 2m): neither dimension contiguous
    assert not x.is_contiguous()
    g64 = t["g_idx"].to(torch.int64)
    y = gptq_linear_triton(x, t["qweight"], t["qzeros"], t["scales"], g64, 4)
    ref = gptq_linear_ref(x.contiguous(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    assert rel_err(y, ref) < REL_TOL[torch.float16]


def test_kernel_sees_a_changed_weight(make_gptq, rel_err, device):
    """The comparison is sharp enough to notice one changed group of scales."""
    t, _ = make_gptq(N, K, 4, 64, seed=1)
    x, _ = _inputs(16, K, N, torch.float32, device, seed=2, bias=False)
    y, ref = _run(t, 4, x, None)
    t2 = dict(t, scales=t["scales"].clone())
    t2["scales"][2] *= 1.01                       # the narrow last group (48 columns)
    y2, _ = _run(t2, 4, x, None)
    assert rel_err(y, ref) < REL_TOL[torch.float32]
    assert rel_err(y2, ref) > 100 * REL_TOL[torch.float32]


def test_path_for_threshold():
    assert path_for(1) == path_for(DECODE_MAX_M) == "decode"
    assert path_for(DECODE_MAX_M + 1) == "gemm"


def test_empty_batch(make_gptq, device):
    t, _ = make_gptq(N, K, 4, 64)
    x = torch.empty(0, K, dtype=torch.float16, device=device)
    assert gptq_linear_triton(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4).shape == (0, N)


def _bad(t, x, bits):
    """Invalid variants of a valid 4-bit (N=72, K=176, G=3) call."""
    qw, qz, s, g = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    return {
        "bits5": (x, qw, qz, s, g, 5, None),
        "x_int": (x.to(torch.int32), qw, qz, s, g, bits, None),
        "x_wrong_k": (x[:, :-1], qw, qz, s, g, bits, None),
        "x_3d": (x[None], qw, qz, s, g, bits, None),
        "qweight_rows": (x, qw[:-1], qz, s, g, bits, None),
        "qweight_float": (x, qw.float(), qz, s, g, bits, None),
        "scales_n": (x, qw, qz, s[:, :-1], g, bits, None),
        "qzeros_shape": (x, qw, qz[:-1], s, g, bits, None),
        "g_idx_len": (x, qw, qz, s, g[:-1], bits, None),
        "g_idx_float": (x, qw, qz, s, g.float(), bits, None),
        "g_idx_range": (x, qw, qz, s, g + 1, bits, None),
        "bias_shape": (x, qw, qz, s, g, bits, torch.zeros(N + 1, device=x.device)),
        "bits_mismatch": (x, qw, qz, s, g, 8, None),
    }


BAD_CASES = ["bits5", "x_int", "x_wrong_k", "x_3d", "qweight_rows", "qweight_float", "scales_n",
             "qzeros_shape", "g_idx_len", "g_idx_float", "g_idx_range", "bias_shape", "bits_mismatch"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_invalid_configurations_raise(make_gptq, device, case):
    t, _ = make_gptq(N, K, 4, 64)
    x, _ = _inputs(3, K, N, torch.float16, device, seed=0)
    cases = _bad(t, x, 4)
    assert set(cases) == set(BAD_CASES)
    args = cases[case]
    with pytest.raises(ValueError):
        gptq_linear_triton(*args)


def test_group_layout_detects_natural_order(make_gptq):
    t, _ = make_gptq(N, K, 4, 64)
    assert gptq_gemm.group_layout(t["g_idx"], 3) == (True, 64)
    ta, _ = make_gptq(N, K, 4, 64, act_order=True)
    assert gptq_gemm.group_layout(ta["g_idx"], 3) == (False, 0)
    g = t["g_idx"].clone()
    assert gptq_gemm.group_layout(g, 3) == (True, 64)
    g[5] = 2                                   # in-place change: the cached answer is refreshed
    assert gptq_gemm.group_layout(g, 3) == (False, 0)


# ---------------------------------------------------------------------------------------------
# Real sizes (GPU only)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 512])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 11008), (1536, 576)])
@pytest.mark.parametrize("bits,group,act_order", [(4, 128, False), (4, 128, True), (3, 128, False),
                                                   (8, -1, False), (2, 64, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_sizes(make_gptq, rel_err, n, k, bits, group, act_order, dtype, m):
    t, _ = make_gptq(n, k, bits, group, act_order=act_order, seed=0, device="cuda")   # shared across m
    x, b = _inputs(m, k, n, dtype, "cuda", seed=m)
    y, ref = _run(t, bits, x, b)
    assert rel_err(y, ref) < REL_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 128])
def test_gpu_float32_is_ieee(make_gptq, rel_err, m):
    t, _ = make_gptq(4096, 4096, 4, 128, device="cuda")
    x, b = _inputs(m, 4096, 4096, torch.float32, "cuda", seed=m)
    y, ref = _run(t, 4, x, b)
    assert rel_err(y, ref) < 1e-5

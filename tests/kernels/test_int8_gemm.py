"""W8A8 int8 GEMM: per-token quantization, the torch twin (exact int32 sums) and the Triton kernel."""
import pytest
import torch

from kernels.int8_gemm import int8_linear_triton
from kernels.reference import (INT8_FLOAT_CHUNK, int8_linear_ref, int8_matmul_float_ref, int8_matmul_ref,
                               quantize_per_token_int8)

MS = [1, 3, 16, 64]
SHAPES = [(72, 96), (130, 200)]          # (N, K): ragged against 128-wide N and 64-deep K tiles
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _operands(m, n, k, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * (1 + torch.rand(m, 1, generator=gen) * 4)
    w = torch.randn(n, k, generator=gen) * 0.05
    x_q, x_s = quantize_per_token_int8(x)
    w_q, w_s = quantize_per_token_int8(w)
    b = torch.randn(n, generator=gen)
    return [t.to(device) for t in (x, w, x_q, x_s, w_q, w_s, b)]


def _exact(x_q, x_s, w_q, w_s, b):
    """int64 sums on CPU, then the same float32 epilogue."""
    acc = (x_q.cpu().to(torch.int64) @ w_q.cpu().to(torch.int64).t()).to(torch.float32)
    y = acc * x_s.cpu()[:, None] * w_s.cpu()[None, :]
    return y + b.cpu() if b is not None else y


def test_quantize_per_token_int8():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 40, generator=gen) * torch.rand(5, 3, 1, generator=gen) * 10
    x[1, 2] = 0.0
    x_q, s = quantize_per_token_int8(x.to(torch.float16))
    assert x_q.dtype == torch.int8 and x_q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (5, 3)
    amax = x.to(torch.float16).float().abs().amax(-1)
    nz = amax > 0
    assert torch.equal(x_q.abs().amax(-1)[nz], torch.full_like(x_q.abs().amax(-1)[nz], 127))
    err = (x_q.float() * s[..., None] - x.to(torch.float16).float()).abs()
    assert (err <= s[..., None] / 2 * (1 + 1e-5)).all()
    assert s[1, 2] == 1 and (x_q[1, 2] == 0).all()


@pytest.mark.parametrize("m,n,k", [(1, 8, 8), (3, 5, 7), (17, 16, 9), (33, 24, 64), (64, 72, 96)])
def test_int8_matmul_ref_is_exact(m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    got = int8_matmul_ref(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64).t())


# The exact float32 path (CPU): chunks of INT8_FLOAT_CHUNK columns, each summed exactly in float32.
FLOAT_SHAPES = [(1, 40, 1537), (1, 16, 3000), (5, 24, 1536), (7, 9, 3000), (3, 8, 2), (17, 33, 1024),
                (4, 12, 1025), (2, 5, 2048)]                  # (M, N, K): ragged and exact multiples of 1024


def _int8(shape, gen):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


def test_float_chunk_bound():
    """Every partial sum of one chunk is at most 2**24 in magnitude: exactly representable in float32."""
    assert INT8_FLOAT_CHUNK * 128 * 128 <= 2 ** 24
    assert float(torch.tensor(2 ** 24, dtype=torch.float32)) == 2 ** 24


@pytest.mark.parametrize("m,n,k", FLOAT_SHAPES)
def test_float_path_equals_int_mm(m, n, k):
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    a, b = _int8((m, k), gen), _int8((n, k), gen)
    want = torch._int_mm(a, b.t())
    got = int8_matmul_float_ref(a, b)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, want)
    assert torch.equal(got.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64).t())
    # the float32 output is the same integer rounded once, as int32 -> float32 rounds it
    assert torch.equal(int8_matmul_float_ref(a, b, torch.float32), want.to(torch.float32))
    assert torch.equal(int8_matmul_ref(a, b, "float"), want)
    assert torch.equal(int8_matmul_ref(a, b, "intmm"), want)


@pytest.mark.parametrize("k", [1024, 1025, 1537, 3000])
@pytest.mark.parametrize("case", ["min_min", "min_max", "max_max", "mixed_odd"])
def test_float_path_extreme_values(k, case):
    """All -128 (each product 2**14: a full chunk sums to exactly 2**24), -128 x 127, 127 x 127, and a
    mix with odd totals above 2**24 that a float32 sum over all of K would have to round."""
    gen = torch.Generator().manual_seed(k)
    m, n = 6, 10
    if case == "mixed_odd":
        a = torch.where(torch.rand(m, k, generator=gen) < 0.97, -128, 127).to(torch.int8)
        b = torch.where(torch.rand(n, k, generator=gen) < 0.97, -128, 127).to(torch.int8)
        a[:, 0] = 1
        b[:, 0] = 1
    else:
        lo, hi = {"min_min": (-128, -128), "min_max": (-128, 127), "max_max": (127, 127)}[case]
        a = torch.full((m, k), lo, dtype=torch.int8)
        b = torch.full((n, k), hi, dtype=torch.int8)
        a[1::2] = hi                              # rows of both signs
    want = a.to(torch.int64) @ b.to(torch.int64).t()
    assert torch.equal(torch._int_mm(a, b.t()).to(torch.int64), want)
    got = int8_matmul_float_ref(a, b)
    assert torch.equal(got.to(torch.int64), want)
    assert torch.equal(int8_matmul_float_ref(a, b, torch.float32), want.to(torch.float32))
    if case == "min_min":
        assert int(want.max()) == k * 2 ** 14
    if case == "mixed_odd" and k >= 1537:
        assert int(want.abs().max()) > 2 ** 24 and bool((want % 2 == 1).any())
        # what the chunks guard against: one float32 matmul over all of K rounds these sums
        assert not torch.equal((a.float() @ b.float().t()).to(torch.int64), want)


@pytest.mark.parametrize("matmul", ["auto", "intmm", "float"])
def test_k1_is_exact_in_every_mode(matmul):
    """torch._int_mm on CPU returns garbage for K == 1 (torch 2.13); the twin routes it to the float path."""
    gen = torch.Generator().manual_seed(1)
    a, b = _int8((5, 1), gen), _int8((8, 1), gen)
    a[0, 0], b[0, 0] = -128, -128
    want = a.to(torch.int64) @ b.to(torch.int64).t()
    assert torch.equal(int8_matmul_ref(a, b, matmul).to(torch.int64), want)
    assert torch.equal(int8_matmul_float_ref(a, b).to(torch.int64), want)


def test_float_path_strided_operands():
    gen = torch.Generator().manual_seed(11)
    a = _int8((9, 2 * 1300), gen)[:, ::2]         # (M, K) with a column stride of 2
    b = _int8((1300, 21), gen).t()                # (N, K) transposed view
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(int8_matmul_float_ref(a, b), torch._int_mm(a.contiguous(), b.t().contiguous()))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 1537), (5, 24, 1536), (7, 9, 3000)])
def test_twin_matmul_choices_are_bit_identical(m, n, k, out_dtype):
    x, _, x_q, x_s, w_q, w_s, b = _operands(m, n, k, "cpu", seed=k)
    x_q[0, :] = -128                               # extreme rows too
    w_q[0, :] = -128
    outs = [int8_linear_ref(x_q, x_s, w_q, w_s, b, out_dtype, matmul=mm) for mm in ("auto", "intmm", "float")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0].float(), _exact(x_q, x_s, w_q, w_s, b).to(out_dtype).float())


def test_bad_matmul_choice_raises():
    gen = torch.Generator().manual_seed(0)
    a, b = _int8((2, 8), gen), _int8((3, 8), gen)
    with pytest.raises(ValueError, match="matmul"):
        int8_matmul_ref(a, b, "vnni")
    with pytest.raises(ValueError, match="matmul"):
        int8_linear_ref(a, torch.ones(2), b, torch.ones(3), matmul="vnni")
    with pytest.raises(ValueError, match="out_dtype"):
        int8_matmul_float_ref(a, b, torch.float64)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_twin_and_kernel(rel_err, device, m, n, k, out_dtype):
    x, w, x_q, x_s, w_q, w_s, b = _operands(m, n, k, device, seed=m * 1000 + n)
    bias = b if m % 2 else None
    ref = int8_linear_ref(x_q, x_s, w_q, w_s, bias, out_dtype)
    exact = _exact(x_q, x_s, w_q, w_s, bias)
    # the twin: exact int32 sums, float32 epilogue, one rounding to out_dtype
    assert torch.equal(ref.cpu(), exact.to(out_dtype))
    y = int8_linear_triton(x_q, x_s, w_q, w_s, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    # the kernel may fuse the epilogue's multiply-adds on a GPU: a few float32 ulps, then rounding
    assert rel_err(y, ref) < (1e-6 if out_dtype == torch.float32 else 1e-3)
    # and W8A8 is close to the float product it stands for
    full = x @ w.t() + (bias if bias is not None else 0)
    assert rel_err(y, full) < 3e-2


def test_kernel_int32_accumulation(device):
    """Sums far above float16 range and 2**24, with extreme int8 values: exact in int32."""
    m, n, k = 16, 24, 1600
    gen = torch.Generator().manual_seed(3)
    x_q = torch.where(torch.rand(m, k, generator=gen) < 0.97, 127, -128).to(torch.int8).to(device)
    w_q = torch.where(torch.rand(n, k, generator=gen) < 0.97, 127, -127).to(torch.int8).to(device)
    x_q[0, 0] = 1                                  # odd totals: float32 sums would have to round
    ones_m = torch.ones(m, device=device)
    ones_n = torch.ones(n, device=device)
    y = int8_linear_triton(x_q, ones_m, w_q, ones_n, None, torch.float32)
    exact = x_q.cpu().to(torch.int64) @ w_q.cpu().to(torch.int64).t()
    assert exact.abs().max() > 2 ** 24
    assert torch.equal(y.cpu(), exact.to(torch.float32))


def test_kernel_strided_weight(rel_err, device):
    _, _, x_q, x_s, w_q, w_s, _ = _operands(20, 48, 80, device, seed=9)
    w_big = torch.zeros(80, 2 * 48, dtype=torch.int8, device=device)
    w_big[:, ::2] = w_q.t()
    w_view = w_big[:, ::2].t()                    # (N, K) with strides (2, 96)
    assert not w_view.is_contiguous()
    y = int8_linear_triton(x_q, x_s, w_view, w_s, None, torch.float32)
    assert rel_err(y, int8_linear_ref(x_q, x_s, w_q, w_s, None, torch.float32)) < 1e-6


BAD = ["x_float", "w_float", "k_mismatch", "x_scale_shape", "x_scale_dtype", "w_scale_shape",
       "bias_shape", "out_int", "x_1d"]


@pytest.mark.parametrize("fn", [int8_linear_ref, int8_linear_triton], ids=["ref", "triton"])
@pytest.mark.parametrize("case", BAD)
def test_invalid_configurations_raise(device, fn, case):
    _, _, x_q, x_s, w_q, w_s, b = _operands(4, 24, 32, device, seed=1)
    cases = {
        "x_float": (x_q.float(), x_s, w_q, w_s, None, torch.float16),
        "w_float": (x_q, x_s, w_q.half(), w_s, None, torch.float16),
        "k_mismatch": (x_q, x_s, w_q[:, :-1], w_s, None, torch.float16),
        "x_scale_shape": (x_q, x_s[:-1], w_q, w_s, None, torch.float16),
        "x_scale_dtype": (x_q, x_s.half(), w_q, w_s, None, torch.float16),
        "w_scale_shape": (x_q, x_s, w_q, w_s[:, None], None, torch.float16),
        "bias_shape": (x_q, x_s, w_q, w_s, b[:-1], torch.float16),
        "out_int": (x_q, x_s, w_q, w_s, None, torch.int32),
        "x_1d": (x_q[0], x_s, w_q, w_s, None, torch.float16),
    }
    assert set(cases) == set(BAD)
    with pytest.raises(ValueError):
        fn(*cases[case])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 128, 512])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_real_sizes(rel_err, m, n, k):
    x, w, x_q, x_s, w_q, w_s, b = _operands(m, n, k, "cuda", seed=m)
    y = int8_linear_triton(x_q, x_s, w_q, w_s, b, torch.float16)
    ref = int8_linear_ref(x_q, x_s, w_q, w_s, b, torch.float16)
    assert rel_err(y, ref) < 1e-3

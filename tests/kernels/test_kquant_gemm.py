"""GGUF block-quant dequant-GEMM (kernels.kquant_gemm): twin vs gguf, kernel vs twin, dispatch, errors.

Two outside-written oracles pin the decode: ``gguf.quants.dequantize`` (llama.cpp's decoder
ported to numpy) for the twin, and, through an identity activation in float32 (``I @ W.T``
is exact), for the kernel's own decode. Weights come from ``compress.formats.kquants.quantize``
(valid blocks as llama.cpp writes them) and from raw random bytes with finite float16 d fields
(every bit pattern of the packed scales, hmask and qh). Shapes are small with ragged tails:
N = 40 is not a multiple of the 64-wide N tile; K = 576 (SmolLM2's width, 32-blocks only) is
not a multiple of the 128-deep K tile.
"""
import functools

import gguf
import numpy as np
import pytest
import torch

from compress.formats import kquants
from kernels import dispatch, kquant_gemm
from kernels.kquant_gemm import DECODE_MAX_M, kquant_linear_triton, path_for
from kernels.reference import GGUF_BLOCK_TYPES, dequantize_gguf_ref, kquant_linear_ref

# relative Frobenius error vs the torch twin, per activation dtype: float16/bfloat16 round the
# decoded weight tile (and the output) to the activation dtype; float32 uses an IEEE dot
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SMALL = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]      # blocks of 32
TYPES = KQUANTS + SMALL
N = 40
MS = [1, 3, 16, 64]
# relative error of the decoded weight vs a random normal weight, per type (measured: Q2_K 0.28,
# Q3_K 0.15, Q4_K 0.07, Q4_0 0.09, Q5_K 0.036, Q5_0 0.042, Q6_K 0.018, Q8_0 0.005)
MAX_QUANT_ERR = {"Q2_K": 0.35, "Q3_K": 0.2, "Q4_K": 0.1, "Q4_0": 0.12, "Q4_1": 0.1, "Q5_K": 0.05,
                 "Q5_0": 0.06, "Q5_1": 0.05, "Q6_K": 0.025, "Q8_0": 0.008}
# byte offsets of the float16 fields (d, dmin, m) in each block: REFERENCE.md section 4
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def test_type_table_matches_gguf():
    assert set(TYPES) == set(GGUF_BLOCK_TYPES) == set(kquant_gemm.SUPPORTED)
    for name, (bs, ts) in GGUF_BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (bs, ts)
        assert kquant_gemm.QTYPE_IDS[name] == int(gguf.GGMLQuantizationType[name])


def _gguf_decode(data: torch.Tensor, qtype: str) -> torch.Tensor:
    out = gguf.quants.dequantize(data.cpu().contiguous().numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def random_bytes(n: int, k: int, qtype: str, seed: int, d_scale: float = 1e-3) -> torch.Tensor:
    """Raw random GGUF bytes for an (n, k) weight whose float16 fields are finite: random
    signed values of magnitude ``d_scale * [0.5, 1)`` (a few exactly 0, a few subnormal)."""
    bs, ts = GGUF_BLOCK_TYPES[qtype]
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, k // bs, ts), generator=gen, dtype=torch.uint8)
    for off in F16_FIELDS[qtype]:
        mag = (torch.rand(n, k // bs, generator=gen) * 0.5 + 0.5) * d_scale
        sign = torch.randint(0, 2, (n, k // bs), generator=gen) * 2 - 1
        v = (mag * sign).to(torch.float16)
        v.view(-1)[::7] = 0.0
        v.view(-1)[3::11] = 3e-6          # float16 subnormal
        data[:, :, off:off + 2] = v.unsqueeze(-1).view(torch.uint8)
    return data.reshape(n, k // bs * ts)


@functools.lru_cache(maxsize=None)
def _quantized(qtype: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of a random normal (n, k) weight quantized as llama.cpp does, and that weight. Cached:
    do not modify in place."""
    gen = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    return kquants.quantize(w, qtype), w


def _x(m, k, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(2000 + seed)
    return torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)


def _rel_err(y, ref):
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# The twin decodes bit-exactly as llama.cpp / gguf-py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
def test_twin_equals_gguf_on_quantized_weights(qtype):
    k = 512
    data, w = _quantized(qtype, 8, k)
    ours = dequantize_gguf_ref(data, qtype, k)
    theirs = _gguf_decode(data, qtype).reshape(8, k)
    assert torch.equal(ours, theirs)
    assert _rel_err(ours, w) < MAX_QUANT_ERR[qtype]      # the bytes do stand for w


@pytest.mark.parametrize("qtype", TYPES)
def test_twin_equals_gguf_on_random_bytes(qtype):
    k = 512
    data = random_bytes(24, k, qtype, seed=TYPES.index(qtype), d_scale=10.0)
    ours = dequantize_gguf_ref(data, qtype, k)
    theirs = _gguf_decode(data, qtype).reshape(24, k)
    assert torch.isfinite(theirs).all()
    assert torch.equal(ours, theirs)
    assert (ours != 0).float().mean() > 0.5            # not vacuous


# ---------------------------------------------------------------------------------------------
# The kernel: exact decode, then the matmul against the twin
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_decodes_exactly(qtype):
    """``I @ W.T`` in float32 is exact, so the kernel's output is its decoded weight, bit for bit."""
    k = 256 if qtype in KQUANTS else 160      # 160: one full 128-deep K tile and a masked tail
    data = random_bytes(N, k, qtype, seed=7, d_scale=10.0)
    eye = torch.eye(k, dtype=torch.float32)
    y = kquant_linear_triton(eye, data, qtype)                     # gemm path, (K, N)
    assert torch.equal(y.t(), _gguf_decode(data, qtype).reshape(N, k))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0"])
def test_kernel_decode_path_decodes_exactly(qtype):
    """The decode (split-K) kernel on 16 identity rows picked across K."""
    k = 512 if qtype in KQUANTS else 576
    data = random_bytes(N, k, qtype, seed=8)
    cols = torch.tensor([0, 15, 16, 31, 32, 63, 64, 127, 128, 191, 255, 256, 300, 383, 448, k - 1])
    x = torch.zeros(16, k)
    x[torch.arange(16), cols] = 1.0
    y = kquant_linear_triton(x, data, qtype)
    assert torch.equal(y.t(), _gguf_decode(data, qtype).reshape(N, k)[:, cols])


def _k_for(qtype):
    return [256, 512] if qtype in KQUANTS else [256, 576]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_matches_twin(qtype, m):
    k_full = _k_for(qtype)[1]
    data_full, _ = _quantized(qtype, N, k_full)
    for k in _k_for(qtype):
        bs, ts = GGUF_BLOCK_TYPES[qtype]
        data = data_full[:, :k // bs * ts]       # the first k columns; rows strided when k < k_full
        x = _x(m, k, torch.float16, seed=m + k)
        bias = _x(1, N, torch.float32, seed=99)[0] if m % 2 == 1 else None
        y = kquant_linear_triton(x, data, qtype, bias)
        ref = kquant_linear_ref(x, data, qtype, bias)
        assert y.shape == (m, N) and y.dtype == torch.float16
        assert torch.isfinite(y).all()
        assert _rel_err(y, ref) < REL_TOL[torch.float16], (k, _rel_err(y, ref))


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "Q6_K", "Q8_0"])
def test_kernel_dtypes(qtype, dtype, m):
    k = 512 if qtype in KQUANTS else 576
    data = random_bytes(N, k, qtype, seed=m, d_scale=1e-3)
    x = _x(m, k, dtype, seed=3 * m)
    bias = _x(1, N, torch.float32, seed=5)[0]
    y = kquant_linear_triton(x, data, qtype, bias)
    ref = kquant_linear_ref(x, data, qtype, bias)
    assert y.dtype == dtype and y.shape == (m, N)
    assert _rel_err(y, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("m", [2, 40])
def test_kernel_strided_x_and_data(m):
    data_full, _ = _quantized("Q5_K", N, 512)
    data = data_full[:, :176]                                  # K = 256: row stride 352 bytes
    assert data.stride() == (352, 1)
    x_full = _x(256, 2 * m, torch.float16, seed=m)
    x = x_full.t()[::2]                                          # (m, 256), neither dim contiguous
    assert not x.is_contiguous()
    y = kquant_linear_triton(x, data, "Q5_K")
    ref = kquant_linear_ref(x.contiguous(), data.contiguous(), "Q5_K")
    assert _rel_err(y, ref) < REL_TOL[torch.float16]


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_kernel_reads_nothing_past_k(qtype, m):
    """K = 576 ends inside a 128-deep K tile; the blocks right after each row's end hold a NaN d
    (as if they were the next row's or unowned bytes), so reading them would poison the output."""
    bs, ts = GGUF_BLOCK_TYPES[qtype]
    k = 576
    data_full = random_bytes(N, k + 64, qtype, seed=m).reshape(N, -1, ts)
    data_full[:, k // bs:, 0:2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)   # float16 NaN
    data = data_full.reshape(N, -1)[:, :k // bs * ts]
    x = _x(m, k, torch.float32, seed=m)
    y = kquant_linear_triton(x, data, qtype)
    assert torch.isfinite(y).all()
    assert _rel_err(y, kquant_linear_ref(x, data, qtype)) < REL_TOL[torch.float32]


def test_kernel_sees_one_changed_scale():
    """The fp16 comparison is sharp enough to notice one sub-block's 6-bit scale changing by one."""
    data, _ = _quantized("Q4_K", N, 256)
    x = _x(16, 256, torch.float16, seed=4)
    ref = kquant_linear_ref(x, data, "Q4_K")
    bad = data.clone()
    bad[:, 4] ^= 1                                              # scale of sub-block 0, lowest bit
    assert not torch.equal(dequantize_gguf_ref(bad, "Q4_K", 256), dequantize_gguf_ref(data, "Q4_K", 256))
    y_bad = kquant_linear_triton(x, bad, "Q4_K")
    assert _rel_err(y_bad, ref) > 5 * REL_TOL[torch.float16]


def test_path_for_threshold():
    assert path_for(1) == path_for(DECODE_MAX_M) == "decode"
    assert path_for(DECODE_MAX_M + 1) == "gemm"


def test_empty_batch():
    data, _ = _quantized("Q8_0", N, 576)
    x = torch.empty(0, 576, dtype=torch.float16)
    y = kquant_linear_triton(x, data, "Q8_0")
    assert y.shape == (0, N) and y.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Invalid configurations
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    data, _ = _quantized("Q4_K", N, 512)
    x = _x(3, 512, torch.float16, seed=0)
    x544 = _x(3, 544, torch.float16, seed=0)         # a multiple of 32, not of 256
    return {
        "unknown_type": (x, data, "Q4_2", None),
        "lowercase_type": (x, data, "q4_k", None),
        "float_type": (x, data, "F16", None),
        "type_not_str": (x, data, 12, None),
        "k_not_multiple_of_256": (x544, torch.zeros(N, 2 * 144, dtype=torch.uint8), "Q4_K", None),
        "wrong_type_for_bytes": (x, data, "Q5_K", None),
        "x_int": (x.to(torch.int32), data, "Q4_K", None),
        "x_wrong_k": (x[:, :256], data, "Q4_K", None),
        "x_3d": (x[None], data, "Q4_K", None),
        "data_int8": (x, data.view(torch.int8), "Q4_K", None),
        "data_1d": (x, data.reshape(-1), "Q4_K", None),
        "data_short_rows": (x, data[:, :-1], "Q4_K", None),
        "bias_shape": (x, data, "Q4_K", torch.zeros(N + 1)),
        "bias_int": (x, data, "Q4_K", torch.zeros(N, dtype=torch.int32)),
        "q8_k_not_multiple_of_32": (_x(3, 40, torch.float16, seed=0), torch.zeros(N, 34, dtype=torch.uint8),
                                    "Q8_0", None),
    }


BAD_CASES = ["unknown_type", "lowercase_type", "float_type", "type_not_str", "k_not_multiple_of_256",
             "wrong_type_for_bytes", "x_int", "x_wrong_k", "x_3d", "data_int8", "data_1d", "data_short_rows",
             "bias_shape", "bias_int", "q8_k_not_multiple_of_32"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_invalid_configurations_raise(case):
    cases = _bad_cases()
    assert set(cases) == set(BAD_CASES)
    with pytest.raises(ValueError):
        kquant_linear_triton(*cases[case])
    if case != "x_3d":   # the dispatcher and the twin take leading batch dimensions; the rest raises there too
        with pytest.raises(ValueError):
            dispatch.kquant_linear(*cases[case])
        with pytest.raises(ValueError):
            kquant_linear_ref(*cases[case])


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def _clean_dispatch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.reset_path_counts()
    yield
    dispatch.reset_path_counts()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_dispatch_auto_on_cpu_uses_the_twin(_clean_dispatch):
    data, _ = _quantized("Q6_K", N, 512)
    x = _x(5, 512, torch.float16, seed=1)
    y = dispatch.kquant_linear(x, data, "Q6_K")
    assert torch.equal(y, kquant_linear_ref(x, data, "Q6_K"))
    assert dispatch.path_counts("kquant") == {"triton-gemm": 0, "triton-decode": 0, "torch": 1}
    assert dispatch.path_counts("gptq") == {"triton-gemm": 0, "triton-decode": 0, "torch": 0}


@pytest.mark.parametrize("lead,path", [((), "triton-decode"), ((2, 3), "triton-decode"), ((3, 7), "triton-gemm")])
def test_dispatch_forced_triton_paths_and_batch_dims(_clean_dispatch, monkeypatch, lead, path):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    data, _ = _quantized("Q3_K", N, 512)
    gen = torch.Generator().manual_seed(len(lead))
    x = torch.randn(lead + (512,), generator=gen).to(torch.float16)
    bias = torch.randn(N, generator=gen)
    y = dispatch.kquant_linear(x, data, "Q3_K", bias)
    assert y.shape == lead + (N,) and y.dtype == x.dtype
    ref = kquant_linear_ref(x.reshape(-1, 512), data, "Q3_K", bias).reshape(lead + (N,))
    assert _rel_err(y, ref) < REL_TOL[torch.float16]
    expected = {"triton-gemm": 0, "triton-decode": 0, "torch": 0}
    expected[path] = 1
    assert dispatch.path_counts("kquant") == expected


def test_dispatch_forced_triton_needs_the_interpreter_off_gpu(_clean_dispatch, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(kquant_gemm, "INTERPRET", False)
    data, _ = _quantized("Q8_0", N, 576)
    with pytest.raises(dispatch.KernelUnavailableError, match="TRITON_INTERPRET"):
        dispatch.kquant_linear(_x(2, 576, torch.float16, seed=0), data, "Q8_0")
    assert sum(dispatch.path_counts().values()) == 0


# ---------------------------------------------------------------------------------------------
# Real sizes (GPU only)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _gpu_bytes(n, k, qtype):
    return random_bytes(n, k, qtype, seed=n + k, d_scale=2e-4).cuda()


# every new (qtype, dtype) autotunes over all configs: bfloat16 on two types only
GPU_CASES = [(4096, 4096, "Q4_K", torch.float16), (4096, 11008, "Q4_K", torch.float16),
             (11008, 4096, "Q6_K", torch.float16), (4096, 4096, "Q5_K", torch.float16),
             (4096, 4096, "Q3_K", torch.float16), (4096, 4096, "Q2_K", torch.float16),
             (4096, 4096, "Q8_0", torch.float16), (1536, 576, "Q5_0", torch.float16),
             (576, 576, "Q4_0", torch.float16), (576, 1536, "Q6_K", torch.float16),
             (1536, 576, "Q5_1", torch.float16), (576, 576, "Q4_1", torch.float16),
             (4096, 4096, "Q4_K", torch.bfloat16), (576, 1536, "Q6_K", torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 512])
@pytest.mark.parametrize("n,k,qtype,dtype", GPU_CASES)
def test_gpu_real_sizes(n, k, qtype, dtype, m):
    data = _gpu_bytes(n, k, qtype)
    x = _x(m, k, dtype, seed=m, device="cuda")
    bias = _x(1, n, torch.float32, seed=1, device="cuda")[0]
    y = kquant_linear_triton(x, data, qtype, bias)
    ref = kquant_linear_ref(x, data, qtype, bias)
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) < REL_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES)
def test_gpu_decodes_exactly(qtype):
    k = 1024 if qtype in KQUANTS else 576
    data = random_bytes(300, k, qtype, seed=3, d_scale=10.0).cuda()
    y = kquant_linear_triton(torch.eye(k, device="cuda"), data, qtype)
    assert torch.equal(y.t().cpu(), _gguf_decode(data, qtype).reshape(300, k))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 128])
def test_gpu_float32_is_ieee(m):
    data = _gpu_bytes(4096, 4096, "Q4_K")
    x = _x(m, 4096, torch.float32, seed=m, device="cuda")
    assert _rel_err(kquant_linear_triton(x, data, "Q4_K"), kquant_linear_ref(x, data, "Q4_K")) < 1e-5

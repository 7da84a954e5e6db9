"""kernels.dispatch: path choice, COMPRESS_KERNEL, batch reshaping, path counters, errors."""
import logging

import pytest
import torch

from kernels import dispatch, gptq_gemm
from kernels.reference import gptq_linear_ref, int8_linear_ref, quantize_per_token_int8

N, K = 72, 176


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.reset_path_counts()
    yield
    dispatch.reset_path_counts()


def _x(shape, dtype=torch.float16, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _gptq_args(t):
    return t["qweight"], t["qzeros"], t["scales"], t["g_idx"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_on_cpu_uses_torch_and_logs_once(make_gptq, caplog):
    t, _ = make_gptq(N, K, 4, 64)
    x = _x((3, K))
    with caplog.at_level(logging.INFO, logger="kernels.dispatch"):
        y = dispatch.gptq_linear(x, *_gptq_args(t), 4)
        dispatch.gptq_linear(x, *_gptq_args(t), 4)
    assert torch.equal(y, gptq_linear_ref(x, *_gptq_args(t), 4))
    assert dispatch.path_counts() == {"triton-gemm": 0, "triton-decode": 0, "torch": 2}
    why = [r.getMessage() for r in caplog.records if r.name == "kernels.dispatch"]
    assert len(why) == 1 and "CUDA" in why[0]


def test_forced_torch(make_gptq, monkeypatch, device):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    t, _ = make_gptq(N, K, 3, 32, device=device)
    x = _x((2, 5, K), device=device)
    y = dispatch.gptq_linear(x, *_gptq_args(t), 3)
    assert y.shape == (2, 5, N)
    assert torch.equal(y.reshape(10, N), gptq_linear_ref(x.reshape(10, K), *_gptq_args(t), 3))
    assert dispatch.path_counts("gptq") == {"triton-gemm": 0, "triton-decode": 0, "torch": 1}


@pytest.mark.parametrize("lead,path", [((), "triton-decode"), ((2, 3), "triton-decode"),
                                       ((4, 17), "triton-gemm"), ((17,), "triton-gemm")])
def test_forced_triton_paths_and_batch_dims(make_gptq, rel_err, monkeypatch, device, lead, path):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    t, _ = make_gptq(N, K, 4, 128, act_order=True, device=device)
    x = _x(lead + (K,), device=device, seed=len(lead))
    bias = _x((N,), torch.float32, device=device, seed=9)
    y = dispatch.gptq_linear(x, *_gptq_args(t), 4, bias)
    assert y.shape == lead + (N,) and y.dtype == x.dtype
    ref = gptq_linear_ref(x.reshape(-1, K), *_gptq_args(t), 4, bias).reshape(lead + (N,))
    assert rel_err(y, ref) < 2e-3
    expected = {"triton-gemm": 0, "triton-decode": 0, "torch": 0}
    expected[path] = 1
    assert dispatch.path_counts() == expected


def test_forced_triton_needs_the_interpreter_off_gpu(make_gptq, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(gptq_gemm, "INTERPRET", False)
    t, _ = make_gptq(N, K, 4, 64, device="cpu")
    with pytest.raises(dispatch.KernelUnavailableError, match="TRITON_INTERPRET"):
        dispatch.gptq_linear(_x((2, K)), *_gptq_args(t), 4)
    assert sum(dispatch.path_counts().values()) == 0


def test_bad_mode_raises(make_gptq, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-please")
    t, _ = make_gptq(N, K, 4, 64, device="cpu")
    with pytest.raises(ValueError, match="COMPRESS_KERNEL"):
        dispatch.gptq_linear(_x((2, K)), *_gptq_args(t), 4)


@pytest.mark.parametrize("mode", ["torch", "triton"])
@pytest.mark.parametrize("case", ["bits", "x_k", "scales_n", "g_idx_len", "x_dtype", "qzeros", "x_scalar",
                                  "bias"])
def test_gptq_invalid_raise_in_every_mode(make_gptq, monkeypatch, device, mode, case):
    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    t, _ = make_gptq(N, K, 4, 64, device=device)
    qw, qz, s, g = _gptq_args(t)
    x = _x((2, 3, K), device=device)
    args = {
        "bits": (x, qw, qz, s, g, 6),
        "x_k": (x[..., :-8], qw, qz, s, g, 4),
        "scales_n": (x, qw, qz, s[:, :8], g, 4),
        "g_idx_len": (x, qw, qz, s, g[:100], 4),
        "x_dtype": (x.to(torch.float64), qw, qz, s, g, 4),
        "qzeros": (x, qw, qz[:, :-1], s, g, 4),
        "x_scalar": (x[0, 0, 0], qw, qz, s, g, 4),
        "bias": (x, qw, qz, s, g, 4, torch.zeros(3, N, device=device)),
    }[case]
    with pytest.raises(ValueError):
        dispatch.gptq_linear(*args)


@pytest.mark.parametrize("mode,path", [("torch", "torch"), ("triton", "triton-gemm")])
@pytest.mark.parametrize("scale_shape", ["flat", "keepdim"])
def test_int8_dispatch(monkeypatch, device, rel_err, mode, path, scale_shape):
    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    x = _x((2, 5, 96), torch.float32, device=device, seed=1)
    w = _x((40, 96), torch.float32, device=device, seed=2)
    x_q, x_s = quantize_per_token_int8(x)
    w_q, w_s = quantize_per_token_int8(w)
    assert x_s.shape == (2, 5)
    if scale_shape == "keepdim":
        x_s = x_s[..., None]
    y = dispatch.int8_linear(x_q, x_s, w_q, w_s, None, torch.bfloat16)
    assert y.shape == (2, 5, 40) and y.dtype == torch.bfloat16
    ref = int8_linear_ref(x_q.reshape(10, 96), x_s.reshape(10), w_q, w_s, None, torch.bfloat16)
    assert rel_err(y.reshape(10, 40), ref) < 1e-3
    assert dispatch.path_counts("int8")[path] == 1
    assert dispatch.path_counts("gptq") == {"triton-gemm": 0, "triton-decode": 0, "torch": 0}


def test_int8_bad_scale_shape_raises(device):
    x_q = torch.ones(2, 5, 16, dtype=torch.int8, device=device)
    w_q = torch.ones(8, 16, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="x_scale"):
        dispatch.int8_linear(x_q, torch.ones(10, device=device), w_q, torch.ones(8, device=device))


def test_path_counts_api():
    with pytest.raises(ValueError):
        dispatch.path_counts("fp8")
    assert set(dispatch.path_counts()) == set(dispatch.PATHS)


@pytest.mark.gpu
def test_auto_on_cuda_uses_triton(make_gptq, rel_err):
    t, _ = make_gptq(4096, 4096, 4, 128, device="cuda")
    for m in (1, 64):
        x = _x((m, 4096), device="cuda", seed=m)
        y = dispatch.gptq_linear(x, *_gptq_args(t), 4)
        assert rel_err(y, gptq_linear_ref(x, *_gptq_args(t), 4)) < 2e-3
    assert dispatch.path_counts() == {"triton-gemm": 1, "triton-decode": 1, "torch": 0}

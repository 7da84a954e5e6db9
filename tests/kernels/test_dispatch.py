"""kernels.dispatch: path choice, COMPRESS_KERNEL, batch reshaping, path counters, errors."""
import logging

import pytest
import torch

from kernels import dispatch, gptq_gemm
from kernels import reference
from kernels.reference import gptq_linear_ref, int8_linear_ref, quantize_per_token_int8

N, K = 72, 176
NO_INT8_SPLIT = {"torch/intmm": 0, "torch/float": 0}      # path_counts() for all ops has these keys too


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.INT8_CPU_ENV, raising=False)
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
    assert dispatch.path_counts() == {"triton-gemm": 0, "triton-decode": 0, "torch": 2, **NO_INT8_SPLIT}
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
    expected = {"triton-gemm": 0, "triton-decode": 0, "torch": 0, **NO_INT8_SPLIT}
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
    assert set(dispatch.path_counts()) == set(dispatch.PATHS + dispatch.INT8_CPU_PATHS)
    assert set(dispatch.path_counts("int8")) == set(dispatch.PATHS + dispatch.INT8_CPU_PATHS)
    assert set(dispatch.path_counts("gptq")) == set(dispatch.PATHS)
    with pytest.raises(ValueError):
        dispatch.record("gptq", "torch/float")          # the split exists for int8 only
    dispatch.record("int8", "torch/float")              # ... and is part of the torch count
    assert dispatch.path_counts("int8") == {"triton-gemm": 0, "triton-decode": 0, "torch": 1,
                                            "torch/intmm": 0, "torch/float": 1}


# --------------------------------------------------------------------------------------------
# int8 on CPU: torch._int_mm or the exact float32 path (COMPRESS_INT8_CPU, or measured once)
# --------------------------------------------------------------------------------------------

def _int8_operands(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    x_q[0] = -128                                       # extreme products: (-128)*(-128), -128*127
    w_q[0] = -128
    w_q[-1] = 127
    x_s = torch.rand(m, generator=gen) * 1e-2 + 1e-3
    w_s = torch.rand(n, generator=gen) * 1e-2 + 1e-3
    bias = torch.randn(n, generator=gen)
    return x_q, x_s, w_q, w_s, bias


def _boom(*args, **kwargs):
    raise AssertionError("this path must not run")


@pytest.mark.parametrize("m,k,n", [(1, 1537, 24), (6, 1536, 40), (3, 3000, 17)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_int8_cpu_override_forces_each_path(monkeypatch, m, k, n, out_dtype):
    """Each override runs only its own path, is counted under it, and both give the same bits."""
    args = _int8_operands(m, k, n, seed=k + m)
    want = int8_linear_ref(*args, out_dtype, matmul="intmm")
    results = {}
    for mode, other in (("intmm", (reference, "int8_matmul_float_ref")), ("float", (torch, "_int_mm"))):
        monkeypatch.setenv(dispatch.INT8_CPU_ENV, mode)
        dispatch.reset_path_counts()
        with monkeypatch.context() as mp:
            mp.setattr(*other, _boom)
            mp.setattr(dispatch, "_measure_int8_cpu", _boom)    # an override never measures
            results[mode] = dispatch.int8_linear(*args, out_dtype)
        expected = {"triton-gemm": 0, "triton-decode": 0, "torch": 1, "torch/intmm": 0, "torch/float": 0}
        expected[f"torch/{mode}"] = 1
        assert dispatch.path_counts("int8") == expected
        assert dispatch.int8_cpu_matmul() == mode
    assert torch.equal(results["intmm"], want)
    assert torch.equal(results["float"], want)


def test_int8_cpu_override_logs_once(monkeypatch, caplog):
    monkeypatch.setenv(dispatch.INT8_CPU_ENV, " Float ")  # case and spaces are forgiven
    args = _int8_operands(4, 64, 8, seed=3)
    with caplog.at_level(logging.INFO, logger="kernels.dispatch"):
        dispatch.int8_linear(*args)
        dispatch.int8_linear(*args)
    msgs = [r.getMessage() for r in caplog.records if r.name == "kernels.dispatch" and "CPU sums" in r.getMessage()]
    assert msgs == ["int8: CPU sums by float (COMPRESS_INT8_CPU=float)"]
    assert dispatch.path_counts("int8")["torch/float"] == 2


@pytest.mark.parametrize("value", ["fast", "int_mm", "fp32"])
def test_int8_cpu_bad_override_raises(monkeypatch, value):
    monkeypatch.setenv(dispatch.INT8_CPU_ENV, value)
    args = _int8_operands(2, 32, 8, seed=0)
    with pytest.raises(ValueError, match=r"COMPRESS_INT8_CPU=.*is not one of auto, intmm, float"):
        dispatch.int8_linear(*args)
    with pytest.raises(ValueError, match="COMPRESS_INT8_CPU"):
        dispatch.int8_cpu_matmul()
    assert sum(dispatch.path_counts().values()) == 0


@pytest.mark.parametrize("t_int,t_float,choice", [(9.0, 1.0, "float"), (1.0, 9.0, "intmm")])
def test_int8_cpu_auto_keeps_the_faster_and_measures_once(monkeypatch, caplog, t_int, t_float, choice):
    """The measured choice follows the timings (faked here: no timing in tests), is logged once and
    cached for the process, survives reset_path_counts, and is what the counters show."""
    monkeypatch.setattr(dispatch, "_int8_cpu_measured", None)
    times = iter([t_int, t_float])
    calls = []
    monkeypatch.setattr(dispatch, "_best_ms", lambda fn: (calls.append(fn), fn(), next(times))[2])
    args = _int8_operands(5, 1100, 12, seed=7)
    with caplog.at_level(logging.INFO, logger="kernels.dispatch"):
        y1 = dispatch.int8_linear(*args, torch.float32)
        dispatch.reset_path_counts()
        y2 = dispatch.int8_linear(*args, torch.float32)
    assert len(calls) == 2                              # one measurement: intmm, then float
    msgs = [r.getMessage() for r in caplog.records if r.name == "kernels.dispatch" and "CPU sums" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith(f"int8: CPU sums by {choice} (measured")
    assert dispatch.int8_cpu_matmul() == choice
    assert dispatch.path_counts("int8")[f"torch/{choice}"] == 1 and dispatch.path_counts("int8")["torch"] == 1
    want = int8_linear_ref(*args, torch.float32, matmul="intmm")
    assert torch.equal(y1, want) and torch.equal(y2, want)


def test_int8_cpu_auto_without_int_mm_uses_float(monkeypatch):
    def no_int_mm(*a, **k):
        raise RuntimeError("_int_mm: not supported here")
    monkeypatch.setattr(dispatch, "_int8_cpu_measured", None)
    monkeypatch.setattr(torch, "_int_mm", no_int_mm)
    args = _int8_operands(3, 40, 8, seed=2)
    y = dispatch.int8_linear(*args, torch.float32)
    assert dispatch.int8_cpu_matmul() == "float"
    assert dispatch.path_counts("int8")["torch/float"] == 1
    exact = (args[0].to(torch.int64) @ args[2].to(torch.int64).t()).to(torch.float32)
    assert torch.equal(y, exact * args[1][:, None] * args[3][None, :] + args[4])


def test_int8_cpu_auto_refuses_a_float_path_that_disagrees(monkeypatch, caplog):
    """A float32 matmul that does not sum integers exactly (simulated) must not be chosen."""
    monkeypatch.setattr(dispatch, "_int8_cpu_measured", None)
    monkeypatch.setattr(reference, "int8_matmul_float_ref", lambda a, b, out_dtype=torch.int32:
                        (a.to(torch.float32) @ b.to(torch.float32).t() + 1).to(out_dtype))
    monkeypatch.setattr(dispatch, "_best_ms", _boom)   # no timing once the check has failed
    with caplog.at_level(logging.WARNING, logger="kernels.dispatch"):
        assert dispatch.int8_cpu_matmul() == "intmm"
    assert any(r.levelno == logging.WARNING and "differs" in r.getMessage() for r in caplog.records)


def test_int8_cpu_auto_real_measurement(monkeypatch):
    """The real probe runs, picks one of the two and caches it (no assertion on which: that is the
    CPU's business)."""
    monkeypatch.setattr(dispatch, "_int8_cpu_measured", None)
    choice = dispatch.int8_cpu_matmul()
    assert choice in ("intmm", "float")
    monkeypatch.setattr(dispatch, "_measure_int8_cpu", _boom)
    assert dispatch.int8_cpu_matmul() == choice


@pytest.mark.parametrize("mode", ["intmm", "float"])
def test_int8_cpu_override_does_not_touch_triton_or_cuda_paths(monkeypatch, device, mode):
    """COMPRESS_INT8_CPU is about the CPU twin; with COMPRESS_KERNEL=triton the kernel still runs."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv(dispatch.INT8_CPU_ENV, mode)
    args = [t.to(device) for t in _int8_operands(4, 64, 16, seed=5)]
    dispatch.int8_linear(*args, torch.float32)
    assert dispatch.path_counts("int8") == {"triton-gemm": 1, "triton-decode": 0, "torch": 0,
                                            "torch/intmm": 0, "torch/float": 0}


@pytest.mark.gpu
def test_auto_on_cuda_uses_triton(make_gptq, rel_err):
    t, _ = make_gptq(4096, 4096, 4, 128, device="cuda")
    for m in (1, 64):
        x = _x((m, 4096), device="cuda", seed=m)
        y = dispatch.gptq_linear(x, *_gptq_args(t), 4)
        assert rel_err(y, gptq_linear_ref(x, *_gptq_args(t), 4)) < 2e-3
    assert dispatch.path_counts() == {"triton-gemm": 1, "triton-decode": 1, "torch": 0, **NO_INT8_SPLIT}

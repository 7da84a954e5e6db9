"""GGML quant formats (compress.formats.kquants) against outside decoders and llama.cpp itself.

Oracles nobody on this project wrote:
* llama.cpp's quantizers (``ggml_quantize_chunk``), built by the ``ggml_oracle`` fixture
  (tests/formats/conftest.py); skipped with the reason when it cannot be built;
* gguf-py's ``gguf.quants.dequantize`` (every type) and ``gguf.quants.quantize`` (Q4_0..Q8_0).

Inputs are fresh random draws each run; the seed is in every failure message
(set ``KQUANTS_TEST_SEED`` to replay one).
"""
from __future__ import annotations

import os
import secrets
import zlib

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES  # noqa: E402
from gguf import quants as gguf_quants  # noqa: E402

from compress.formats import kquants  # noqa: E402
from compress.formats.kquants import dequantize, get_type, quantize  # noqa: E402

SEED = int(os.environ.get("KQUANTS_TEST_SEED", secrets.randbits(32)))

ALL = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# ggml type ids, weights per block, bytes per block, bits per weight (docs/KQUANTS.md)
SPEC = {
    "Q4_0": (2, 32, 18, 4.5), "Q4_1": (3, 32, 20, 5.0), "Q5_0": (6, 32, 22, 5.5),
    "Q5_1": (7, 32, 24, 6.0), "Q8_0": (8, 32, 34, 8.5), "Q2_K": (10, 256, 84, 2.625),
    "Q3_K": (11, 256, 110, 3.4375), "Q4_K": (12, 256, 144, 4.5), "Q5_K": (13, 256, 176, 5.5),
    "Q6_K": (14, 256, 210, 6.5625),
}
# relative RMS error bounds of dequantize(quantize(w)) on N(0, 1) weights, no imatrix
# (measured: Q2_K 0.30, Q3_K 0.15, Q4_0 0.086, Q4_1 0.079, Q4_K 0.072, Q5_0 0.042, Q5_1 0.038,
# Q5_K 0.036, Q6_K 0.0176, Q8_0 0.0054; ordering by bits is asserted separately)
RMSE_BOUND = {
    "Q2_K": 0.37, "Q3_K": 0.19, "Q4_0": 0.11, "Q4_1": 0.10, "Q4_K": 0.09, "Q5_0": 0.055,
    "Q5_1": 0.05, "Q5_K": 0.046, "Q6_K": 0.022, "Q8_0": 0.0068,
}


def _rng(*salt: int | str) -> np.random.Generator:
    return np.random.default_rng([SEED, *[zlib.crc32(str(s).encode()) for s in salt]])


def _ctx(**kw) -> str:
    return f"seed={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items())


def make_weights(rng: np.random.Generator, kind: str, rows: int, cols: int) -> np.ndarray:
    """Random float32 weights: 'normal', 'heavy' (Student t, df 2.5), 'special' (edge-case
    blocks) or 'extreme' (each 32-block at a random magnitude from denormal to 1e30)."""
    scale = np.float32(rng.uniform(0.005, 3.0))
    if kind == "extreme":
        mags = np.array([1e-44, 1e-39, 1e-30, 1e-8, 1.0, 1e4, 1e8, 1e18, 1e30], np.float32)
        w = rng.standard_normal((rows, cols)).astype(np.float32).reshape(-1, 32)
        w *= mags[rng.integers(len(mags), size=(w.shape[0], 1))]
        return w.reshape(rows, cols)
    if kind == "normal":
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if kind == "heavy":
        return (rng.standard_t(2.5, (rows, cols)) * scale).astype(np.float32)
    assert kind == "special"
    w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    blocks = w.reshape(-1, 32)                      # views into w
    nb = blocks.shape[0]
    picks = rng.permutation(nb)
    cases = [
        lambda b: b.fill(0.0),                                            # zero block
        lambda b: b.fill(np.float32(rng.uniform(0.1, 2.0))),              # constant > 0
        lambda b: b.fill(np.float32(-rng.uniform(0.1, 2.0))),             # constant < 0
        lambda b: b.__setitem__(rng.integers(32), b[0] * 1000 + 50),      # one huge outlier
        lambda b: b.__setitem__(slice(None), np.where(rng.random(32) < 0.5, -0.0, 0.0)),  # +-0
        lambda b: b.__setitem__(slice(None), b * np.float32(1e-7)),       # fp16 scale underflow
        lambda b: b.__setitem__(slice(None), b * np.float32(3e3)),        # large values
        lambda b: b.__setitem__(slice(None), np.abs(b)),                  # all positive
        lambda b: b.__setitem__(slice(None), -np.abs(b)),                 # all negative
        lambda b: b.__setitem__(rng.integers(32), -b[0] * 300),           # one negative outlier
    ]
    for i, idx in enumerate(picks[: min(nb, 3 * len(cases))]):
        cases[i % len(cases)](blocks[idx])
    if cols >= 256:                                   # a whole super-block zero and one constant
        w[0, :256] = 0.0
        w[-1, -256:] = np.float32(0.75)
    return w


def make_imatrix(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Mean squared activations: positive, heavy tailed, a few dead (zero) columns."""
    im = np.exp(rng.normal(0.0, 1.5, cols)).astype(np.float32)
    im[rng.random(cols) < 0.03] = 0.0
    return im


def _qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def _block_mismatch(a: np.ndarray, b: np.ndarray, type_size: int) -> str:
    a, b = a.reshape(-1, type_size), b.reshape(-1, type_size)
    bad = np.flatnonzero((a != b).any(axis=1))
    if bad.size == 0:
        return "no mismatch"
    i = bad[0]
    return (f"{bad.size}/{a.shape[0]} blocks differ; first block {i}: "
            f"bytes {np.flatnonzero(a[i] != b[i])[:12].tolist()} ours {a[i][:24].tolist()} "
            f"llama.cpp {b[i][:24].tolist()}")


# ----------------------------------------------------------------------------------------------
# registry and layout constants
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_registry_constants_match_ggml(name):
    type_id, block, size, bpw = SPEC[name]
    t = kquants.TYPES[name]
    assert (t.name, t.type_id, t.block_size, t.type_size, t.bpw) == (name, type_id, block, size, bpw)
    assert get_type(name) is t and get_type(type_id) is t and get_type(name.lower()) is t
    assert int(_qtype(name)) == type_id                      # gguf-py's enum
    assert GGML_QUANT_SIZES[_qtype(name)] == (block, size)   # gguf-py's layout table


def test_registry_is_exactly_the_ten_types():
    assert sorted(kquants.TYPES) == sorted(ALL)


@pytest.mark.parametrize("bad", ["Q4_K_M", "F16", "", 0, 1, 9, 15, 99])
def test_get_type_rejects_unknown(bad):
    with pytest.raises(ValueError, match="unknown GGML"):
        get_type(bad)


# ----------------------------------------------------------------------------------------------
# decoding: bit-exact against gguf-py on arbitrary bytes
# ----------------------------------------------------------------------------------------------

def _assert_same_floats(ours: np.ndarray, ref: np.ndarray, msg: str) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape, msg
    nan_o, nan_r = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_o, nan_r), f"NaN positions differ: {msg}"
    same = ours.view(np.uint32)[~nan_o] == ref.astype(np.float32).view(np.uint32)[~nan_r]
    assert same.all(), f"{(~same).sum()} values differ bitwise: {msg}"


@pytest.mark.parametrize("name", ALL)
def test_dequantize_random_bytes_matches_gguf(name):
    t = get_type(name)
    rng = _rng("bytes", name)
    rows, nbr = 8, 8
    data = rng.integers(0, 256, (rows, nbr * t.type_size), dtype=np.uint8)
    ours = dequantize(torch.from_numpy(data), name, (rows, nbr * t.block_size)).numpy()
    with np.errstate(invalid="ignore", over="ignore"):      # random fp16 fields hold inf/NaN
        ref = gguf_quants.dequantize(data, _qtype(name))
    _assert_same_floats(ours, ref, _ctx(type=name))


@pytest.mark.parametrize("name", ALL)
def test_dequantize_own_output_matches_gguf(name):
    t = get_type(name)
    rng = _rng("roundtrip", name)
    w = make_weights(rng, "heavy", 4, 2 * 256)
    q = quantize(torch.from_numpy(w), name)
    ours = dequantize(q, name, w.shape).numpy()
    _assert_same_floats(ours, gguf_quants.dequantize(q.numpy(), _qtype(name)), _ctx(type=name))
    assert np.isfinite(ours).all()
    assert t.type_size * w.size // t.block_size == q.numel()


# ----------------------------------------------------------------------------------------------
# legacy types: bytes against gguf-py's (llama.cpp-identical) quantizers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "heavy", "special"])
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_quantize_matches_gguf(name, kind):
    rng = _rng("gguf-q", name, kind)
    w = make_weights(rng, kind, 6, 32 * 12)
    ours = quantize(torch.from_numpy(w), name).numpy()
    ref = gguf_quants.quantize(w, _qtype(name))
    assert ours.shape == ref.shape
    # In blocks of only +-0 gguf-py's numpy reductions pick another sign of zero than llama.cpp's
    # loops (llama.cpp: d = +0/-8 = -0.0); the llama.cpp tests check those bits. Here the sign
    # bits of the fp16 fields (d, and m for Q4_1/Q5_1) of such blocks are left out.
    zero_blocks = (w.reshape(-1, 32) == 0).all(axis=1)
    header = 4 if name in ("Q4_1", "Q5_1") else 2
    for arr in (ours, ref):
        blocks = arr.reshape(-1, get_type(name).type_size)
        blocks[zero_blocks, 1:header:2] &= 0x7F
    assert np.array_equal(ours, ref), _ctx(type=name, kind=kind) + " " + _block_mismatch(
        ours, ref, get_type(name).type_size)


# ----------------------------------------------------------------------------------------------
# all types: bytes against llama.cpp itself
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "heavy", "special", "extreme"])
@pytest.mark.parametrize("name", ALL)
def test_matches_llama_cpp_reference(ggml_oracle, name, kind):
    t = get_type(name)
    rng = _rng("ref", name, kind)
    rows, cols = 6, 256 * int(rng.integers(2, 5))
    w = make_weights(rng, kind, rows, cols)
    assert ggml_oracle.row_size(t.type_id, cols) == cols // t.block_size * t.type_size
    ref = ggml_oracle.quantize(w, t.type_id)
    ours = quantize(torch.from_numpy(w), name).numpy()
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), _ctx(type=name, kind=kind, shape=w.shape) + " " + \
        _block_mismatch(ours, ref, t.type_size)


@pytest.mark.parametrize("kind", ["normal", "heavy", "special", "extreme"])
@pytest.mark.parametrize("name", ALL)
def test_matches_llama_cpp_imatrix(ggml_oracle, name, kind):
    t = get_type(name)
    rng = _rng("imatrix", name, kind)
    rows, cols = 6, 256 * int(rng.integers(2, 5))
    w = make_weights(rng, kind, rows, cols)
    im = make_imatrix(rng, cols)
    ref = ggml_oracle.quantize(w, t.type_id, im)
    ours = quantize(torch.from_numpy(w), name, torch.from_numpy(im)).numpy()
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), _ctx(type=name, kind=kind, shape=w.shape) + " " + \
        _block_mismatch(ours, ref, t.type_size)


def test_imatrix_changes_the_kquant_bytes():
    """The importance-weighted path is a different algorithm: with a skewed imatrix the bytes differ."""
    rng = _rng("imatrix-differs")
    w = make_weights(rng, "normal", 4, 512)
    im = make_imatrix(rng, 512)
    for name in KQ:
        a = quantize(torch.from_numpy(w), name).numpy()
        b = quantize(torch.from_numpy(w), name, torch.from_numpy(im)).numpy()
        assert not np.array_equal(a, b), _ctx(type=name)


def test_chunks_and_worker_threads_do_not_change_bytes(monkeypatch):
    """Many chunks spread over worker threads give the one-chunk bytes; caller's threads kept."""
    rng = _rng("chunks")
    w = torch.from_numpy(make_weights(rng, "heavy", 12, 512))
    im = torch.from_numpy(make_imatrix(rng, 512))
    cases = [(name, imx) for name in ("Q4_0", "Q4_1", "Q3_K", "Q4_K") for imx in (None, im)]
    whole = {(n, i is None): quantize(w, n, i) for n, i in cases}      # 12 x 512 is one chunk
    monkeypatch.setattr(kquants, "_CHUNK_WEIGHTS", 1024)               # -> 2 rows per chunk
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, i in cases:
            assert torch.equal(quantize(w, n, i), whole[(n, i is None)]), _ctx(type=n, imatrix=i is not None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# format properties
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_output_shape_dtype_and_size(name):
    t = get_type(name)
    rng = _rng("size", name)
    rows, cols = 3, 2 * 256
    w = torch.from_numpy(make_weights(rng, "normal", rows, cols))
    q = quantize(w, name)
    assert q.dtype == torch.uint8 and q.shape == (rows, cols // t.block_size * t.type_size)
    assert q.numel() * 8 == pytest.approx(w.numel() * t.bpw)
    d = dequantize(q, name, (rows, cols))
    assert d.dtype == torch.float32 and d.shape == (rows, cols)


def test_rmse_bounds_and_ordering_by_bits():
    rng = _rng("rmse")
    w = rng.standard_normal((8, 1024)).astype(np.float32)
    err = {}
    for name in ALL:
        d = dequantize(quantize(torch.from_numpy(w), name), name, w.shape).numpy()
        err[name] = float(np.sqrt(np.mean((d - w) ** 2) / np.mean(w ** 2)))
        assert err[name] < RMSE_BOUND[name], _ctx(type=name, rel_rmse=err[name])
    chain = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    assert all(err[a] > err[b] for a, b in zip(chain, chain[1:])), _ctx(errors=err)
    assert err["Q4_0"] > err["Q5_0"] > err["Q8_0"] and err["Q4_1"] > err["Q5_1"], _ctx(errors=err)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_max_error_is_half_a_step(name):
    """Round-to-nearest on a uniform grid: a weight lands within half a step (+ fp16 slack).

    The symmetric types have one level fewer on the side opposite the block's extreme, so a
    weight there may be clamped: up to one step.
    """
    rng = _rng("maxerr", name)
    w = make_weights(rng, "heavy", 8, 32 * 16)
    d = dequantize(quantize(torch.from_numpy(w), name), name, w.shape).numpy()
    b, db = w.reshape(-1, 32).astype(np.float64), d.reshape(-1, 32).astype(np.float64)
    levels = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 127, "Q4_1": 15, "Q5_1": 31}[name]
    if name in ("Q4_1", "Q5_1"):
        step = ((b.max(1) - b.min(1)) / levels)[:, None]
        # fp16 d and fp16 min move a level by at most half an fp16 ulp each
        slack = np.abs(b.min(1))[:, None] * 2.0 ** -11 + step * levels * 2.0 ** -11
        clamped = np.zeros(b.shape, bool)
    else:
        amax_signed = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
        step = np.abs(amax_signed) / levels
        slack = step * levels * 2.0 ** -11
        # weights beyond the last level on the short side (sign opposite to the extreme)
        clamped = (b * -np.sign(amax_signed)) > (levels - 1) * step
    err = np.abs(db - b)
    assert (err <= step / 2 + slack + 1e-30)[~clamped].all(), _ctx(type=name)
    assert (err <= step + slack + 1e-30).all(), _ctx(type=name)


@pytest.mark.parametrize("name", ALL)
def test_zero_blocks_decode_to_exact_zeros(name):
    for w in (np.zeros((2, 512), np.float32), np.full((2, 512), -0.0, np.float32)):
        d = dequantize(quantize(torch.from_numpy(w), name), name, w.shape).numpy()
        assert (d == 0).all(), _ctx(type=name)


@pytest.mark.parametrize("name", ALL)
def test_constant_blocks(name):
    rng = _rng("const", name)
    c = np.float32(rng.uniform(0.2, 3.0)) * rng.choice([-1, 1])
    w = np.full((2, 512), c, np.float32)
    d = dequantize(quantize(torch.from_numpy(w), name), name, w.shape).numpy()
    # a constant needs no grid at all; every type gets it to fp16/6-bit-scale precision
    assert np.abs(d - c).max() <= abs(c) * 0.03, _ctx(type=name, c=c, got=np.unique(d)[:4])


@pytest.mark.parametrize("name", ALL)
def test_block_with_one_huge_outlier(name):
    rng = _rng("outlier", name)
    w = (rng.standard_normal((2, 512)) * 0.01).astype(np.float32)
    pos = int(rng.integers(512))
    w[1, pos] = np.float32(50.0)
    d = dequantize(quantize(torch.from_numpy(w), name), name, w.shape).numpy()
    # the outlier sets the scale of its block: it comes back within a few percent
    assert abs(d[1, pos] - 50.0) <= 50.0 * 0.06, _ctx(type=name, got=d[1, pos])
    # rows without the outlier are unaffected by it
    assert np.sqrt(np.mean((d[0] - w[0]) ** 2)) <= 0.01 * RMSE_BOUND[name] * 1.5, _ctx(type=name)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cols", [("Q4_K", 128), ("Q6_K", 300), ("Q4_0", 48), ("Q2_K", 0)])
def test_columns_not_a_multiple_of_the_block(name, cols):
    with pytest.raises(ValueError, match=rf"{name}.*block size {get_type(name).block_size}.*\(3, {cols}\)"):
        quantize(torch.zeros(3, cols), name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_non_finite_weights_raise(name, bad):
    w = torch.randn(2, 256)
    w[1, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(w, name)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(256), "Q4_K")
    with pytest.raises(ValueError, match="float32"):
        quantize(torch.zeros(2, 256, dtype=torch.float64), "Q4_K")
    with pytest.raises(ValueError, match="one value per column"):
        quantize(torch.zeros(2, 256), "Q4_K", torch.ones(255))
    with pytest.raises(ValueError, match="imatrix holds NaN"):
        quantize(torch.zeros(2, 256), "Q4_K", torch.full((256,), float("nan")))
    with pytest.raises(ValueError, match="needs 288 uint8 bytes"):
        dequantize(torch.zeros(287, dtype=torch.uint8), "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="unknown GGML"):
        quantize(torch.zeros(2, 256), "Q7_K")

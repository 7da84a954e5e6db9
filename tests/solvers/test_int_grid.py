"""GPTQ solve on synthetic layers with a known Hessian built from correlated inputs."""
from __future__ import annotations

import logging

import pytest
import torch

from compress.errors import CompressError
from compress.formats import gptq_int
from compress.solvers.int_grid import GPTQResult, gptq_solve
from compress.solvers.obs import output_error
from compress.quantizer import dequantize_values, grid_params, quantize_rtn, quantize_values
from compress.scheme import IntScheme


def correlated_hessian(k: int, gen: torch.Generator, n: int | None = None, uneven: bool = False) -> torch.Tensor:
    """``2/n X^T X`` for inputs with a random covariance (a random mixing plus a little noise).

    ``uneven``: also scale the input channels by factors spread over [0.1, 2.1] (diag(H) spread
    about 400x, as in LLM activations); that is where act-order matters.
    """
    n = n or 2 * k
    mix = torch.randn(k, k, generator=gen) / k ** 0.5
    x = torch.randn(n, k, generator=gen) @ mix + 0.05 * torch.randn(n, k, generator=gen)
    if uneven:
        x = x * (torch.rand(k, generator=gen) * 2 + 0.1)
    return 2.0 / n * x.t() @ x


def rtn_error(w: torch.Tensor, h: torch.Tensor, scheme: IntScheme) -> float:
    q, s, z, g = quantize_rtn(w, scheme)
    return output_error(w, dequantize_values(q, s, z, g), h)


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The Hessian GPTQ actually solved with: dead diagonal set to 1, then relative dampening."""
    h = h.to(torch.float64).clone()
    d = torch.diagonal(h)
    d[d == 0] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    return h


def check_result(r: GPTQResult, w: torch.Tensor, h: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """Shape/range checks plus GPTQ's own loss identity; returns the dequantized weight.

    The per-column losses err^2 / d^2 / 2 add up to tr(D H' D^T) / 2 with D = W - Q only if Q is
    exactly the weight the error propagation used, so this also checks dequantize_values(q, ...).
    """
    n, k = w.shape
    g = scheme.groups(k)
    assert r.q.shape == (n, k) and r.q.dtype == torch.int32
    assert r.scales.shape == (g, n) and r.scales.dtype == torch.float32
    assert r.zeros.shape == (g, n) and r.zeros.dtype == torch.int32
    assert r.g_idx.shape == (k,) and r.g_idx.dtype == torch.int32
    assert int(r.q.min()) >= 0 and int(r.q.max()) <= scheme.maxq
    assert int(r.zeros.min()) >= 1 and int(r.zeros.max()) <= scheme.maxq
    assert torch.equal(r.scales, r.scales.half().float())
    assert sorted(set(r.g_idx.tolist())) == list(range(g))
    q_w = dequantize_values(r.q, r.scales, r.zeros, r.g_idx)
    w_used = w.clone()
    w_used[:, torch.diagonal(h) == 0] = 0
    d = w_used.double() - q_w.double()
    solved = float(((d @ damped(h, r.damp)) * d).sum())
    assert r.loss == pytest.approx(0.5 * solved, rel=2e-3)
    assert r.info["output_error"] == pytest.approx(output_error(w, q_w, h), rel=1e-5)
    return q_w


def naive_gptq(w: torch.Tensor, h: torch.Tensor, scheme: IntScheme, damp: float = 0.01) -> torch.Tensor:
    """Textbook GPTQ in float64, one column at a time with full updates, natural order, no dead
    columns: returns the dequantized weight. Group grids on the current weights at group start."""
    w = w.double().clone()
    k = w.shape[1]
    gs = scheme.effective_group(k)
    h = h.double() + damp * float(torch.diagonal(h).mean()) * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for i in range(k):
        if i % gs == 0:
            s, z = grid_params(w[:, i:i + gs].float(), scheme.bits, scheme.sym)
            s, z = s.double(), z.double()
        qv = quantize_values(w[:, i], s, z, scheme.maxq)
        out[:, i] = (qv - z) * s
        err = (w[:, i] - out[:, i]) / u[i, i]
        w[:, i:] -= torch.outer(err, u[i, i:])
    return out


SCHEMES = [IntScheme(bits=b, group_size=g, sym=s, act_order=a)
           for b in (2, 3, 4, 8) for g in (-1, 32, 128) for s in (False, True) for a in (False, True)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_gptq_beats_rtn(scheme):
    gen = torch.Generator().manual_seed(1000 + scheme.bits * 7 + max(scheme.group_size, 0))
    n, k = 64, 256
    w = torch.randn(n, k, generator=gen) * 0.05
    h = correlated_hessian(k, gen)
    r = gptq_solve(w, h, scheme)
    assert r.fallback is None and r.damp == 0.01
    check_result(r, w, h, scheme)
    assert r.info["output_error"] < 0.8 * rtn_error(w, h, scheme)


def test_act_order_rescues_two_bits_on_uneven_channels():
    """With uneven input channels and 2-bit groups, plain GPTQ pushes the compensation of strong
    columns into weak ones, whose grown weights widen their groups' grids: it can lose to RTN here
    (the textbook float64 version does too). Act-order quantizes the weak columns last, together."""
    gen = torch.Generator().manual_seed(1021)
    w = torch.randn(64, 256, generator=gen) * 0.05
    h = correlated_hessian(256, gen, uneven=True)
    plain = gptq_solve(w, h, IntScheme(bits=2, group_size=32, sym=True))
    ordered = gptq_solve(w, h, IntScheme(bits=2, group_size=32, sym=True, act_order=True))
    rtn = rtn_error(w, h, IntScheme(bits=2, group_size=32, sym=True))
    assert ordered.info["output_error"] < 0.7 * rtn
    assert ordered.info["output_error"] < 0.7 * plain.info["output_error"]


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("act_order", (False, True))
def test_gptq_narrow_last_group(bits, sym, act_order):
    """K = 576 with group 128: groups of 128, 128, 128, 128 and 64."""
    gen = torch.Generator().manual_seed(2000 + bits)
    scheme = IntScheme(bits=bits, group_size=128, sym=sym, act_order=act_order)
    n, k = 48, 576
    w = torch.randn(n, k, generator=gen) * 0.05
    h = correlated_hessian(k, gen)
    r = gptq_solve(w, h, scheme)
    check_result(r, w, h, scheme)
    assert r.scales.shape == (5, n)
    assert torch.bincount(r.g_idx.long()).tolist() == [128, 128, 128, 128, 64]
    assert r.info["output_error"] < 0.8 * rtn_error(w, h, scheme)


@pytest.mark.parametrize("scheme", [IntScheme(4, 64, False), IntScheme(3, -1, True), IntScheme(2, 48, False)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_matches_textbook_gptq(scheme):
    """Blocked, float32, lazily-updated solve == an independent column-by-column float64 one."""
    gen = torch.Generator().manual_seed(3)
    n, k = 40, 200                   # group 48: narrow last group of 8; block 64: groups cross blocks
    w = torch.randn(n, k, generator=gen)
    h = correlated_hessian(k, gen)
    ref = naive_gptq(w, h, scheme)
    r = gptq_solve(w, h, scheme, block_size=64)
    q_w = dequantize_values(r.q, r.scales, r.zeros, r.g_idx).double()
    # float32 vs float64 rounding may flip a rare value sitting on a rounding boundary
    mismatch = ((q_w - ref).abs() > 1e-6 * ref.abs().max()).float().mean().item()
    assert mismatch < 0.01
    assert output_error(w, q_w.float(), h) == pytest.approx(output_error(w, ref.float(), h), rel=0.02)


@pytest.mark.parametrize("block_size", (1, 37, 128, 1000))
def test_block_size_does_not_change_the_result(block_size):
    gen = torch.Generator().manual_seed(4)
    scheme = IntScheme(bits=4, group_size=96, sym=False, act_order=True)
    w = torch.randn(32, 288, generator=gen)
    h = correlated_hessian(288, gen, uneven=True)
    ref = gptq_solve(w, h, scheme, block_size=288)
    r = gptq_solve(w, h, scheme, block_size=block_size)
    assert (r.q != ref.q).float().mean().item() < 0.01
    assert torch.equal(r.g_idx, ref.g_idx)
    assert r.loss == pytest.approx(ref.loss, rel=1e-2)


@pytest.mark.parametrize("scheme", [IntScheme(4, 32, False, True), IntScheme(3, 128, True, True),
                                    IntScheme(2, 64, False, True), IntScheme(8, 128, False, True)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_act_order_checkpoint_reproduces_the_solved_weights(scheme):
    gen = torch.Generator().manual_seed(5 + scheme.bits)
    n, k = 72, 576
    w = torch.randn(n, k, generator=gen) * 0.05
    h = correlated_hessian(k, gen, uneven=True)
    r = gptq_solve(w, h, scheme)
    q_w = check_result(r, w, h, scheme)
    g = r.g_idx.long()
    assert bool((g[1:] < g[:-1]).any()), "g_idx is monotone: columns were not reordered"
    perm = r.info["perm"]
    assert torch.equal(torch.sort(perm).values, torch.arange(k))
    assert torch.equal(r.g_idx[perm].long(), torch.arange(k) // scheme.group_size)
    packed = gptq_int.pack(r.q, r.scales, r.zeros, r.g_idx, scheme.bits)
    assert torch.equal(packed.dequantize(torch.float32), q_w)
    q2, z2 = gptq_int.unpack(packed)
    assert torch.equal(q2, r.q) and torch.equal(z2, r.zeros)


@pytest.mark.parametrize("act_order", (False, True))
def test_static_groups(act_order):
    gen = torch.Generator().manual_seed(6)
    scheme = IntScheme(bits=4, group_size=128, sym=False, act_order=act_order)
    n, k = 64, 576
    w = torch.randn(n, k, generator=gen) * 0.05
    h = correlated_hessian(k, gen, uneven=True)
    r = gptq_solve(w, h, scheme, static_groups=True)
    check_result(r, w, h, scheme)
    assert torch.equal(r.g_idx, torch.arange(k, dtype=torch.int32) // 128)
    _, s_up_front, z_up_front, _ = quantize_rtn(w, scheme)   # grids of the untouched natural-order groups
    assert torch.equal(r.scales, s_up_front) and torch.equal(r.zeros, z_up_front)
    assert r.info["output_error"] < 0.8 * rtn_error(w, h, scheme)
    packed = gptq_int.pack(r.q, r.scales, r.zeros, r.g_idx, scheme.bits)
    assert torch.equal(packed.dequantize(), dequantize_values(r.q, r.scales, r.zeros, r.g_idx))


def indefinite_hessian(k: int, gen: torch.Generator, neg: float) -> torch.Tensor:
    """A correlated Hessian whose smallest eigenvalue is pushed to ``-neg * mean(diag)``."""
    h = correlated_hessian(k, gen).double()
    lam, vec = torch.linalg.eigh(h)
    v = vec[:, 0]
    m = float(torch.diagonal(h).mean())
    h = h - (lam[0] + neg * m) * torch.outer(v, v)
    return h.float()


def test_damp_increase_on_indefinite_hessian(caplog):
    gen = torch.Generator().manual_seed(7)
    scheme = IntScheme(bits=4, group_size=64)
    w = torch.randn(32, 192, generator=gen)
    h = indefinite_hessian(192, gen, neg=0.3)
    assert float(torch.linalg.eigvalsh(h.double())[0]) < 0
    with caplog.at_level(logging.WARNING, logger="compress.methods.gptq"):
        r = gptq_solve(w, h, scheme, damp=0.01)
    assert r.fallback == "damp-increased:1"      # 0.01 and 0.1 cannot lift -0.3 * mean(diag); 1.0 can
    assert r.damp == pytest.approx(1.0)
    assert r.info["damp_tries"] == 3
    assert len([m for m in caplog.messages if "Cholesky failed" in m]) == 2
    check_result(r, w, h, scheme)


def test_too_few_damp_tries_falls_back_to_rtn(caplog):
    gen = torch.Generator().manual_seed(8)
    scheme = IntScheme(bits=4, group_size=64)
    w = torch.randn(32, 192, generator=gen)
    h = indefinite_hessian(192, gen, neg=0.3)
    with caplog.at_level(logging.WARNING, logger="compress.methods.gptq"):
        r = gptq_solve(w, h, scheme, damp=0.01, max_damp_tries=1)
    assert r.fallback == "rtn"
    assert any("round-to-nearest" in m for m in caplog.messages)


@pytest.mark.parametrize("kind", ("negative-definite", "nan"))
def test_impossible_hessian_ends_in_rtn(kind, caplog):
    gen = torch.Generator().manual_seed(9)
    scheme = IntScheme(bits=3, group_size=32, sym=False, act_order=True)
    w = torch.randn(24, 128, generator=gen)
    h = -correlated_hessian(128, gen)
    if kind == "nan":
        h = h.abs()
        h[3, 5] = float("nan")
    with caplog.at_level(logging.WARNING, logger="compress.methods.gptq"):
        r = gptq_solve(w, h, scheme)
    assert r.fallback == "rtn"
    assert r.info["damp_tries"] == 6
    assert any("round-to-nearest" in m for m in caplog.messages)
    q, s, z, g = quantize_rtn(w, scheme)
    assert torch.equal(r.q, q) and torch.equal(r.scales, s) and torch.equal(r.zeros, z) and torch.equal(r.g_idx, g)
    packed = gptq_int.pack(r.q, r.scales, r.zeros, r.g_idx, scheme.bits)
    assert torch.isfinite(packed.dequantize()).all()


@pytest.mark.parametrize("act_order", (False, True))
def test_dead_columns(act_order):
    gen = torch.Generator().manual_seed(10)
    scheme = IntScheme(bits=4, group_size=32, sym=False, act_order=act_order)
    n, k = 48, 160
    dead = torch.zeros(k, dtype=torch.bool)
    dead[torch.randperm(k, generator=gen)[:13]] = True
    mix = torch.randn(k, k, generator=gen) / k ** 0.5
    x = torch.randn(2 * k, k, generator=gen) @ mix
    x[:, dead] = 0                                    # inputs that never fire
    h = 2.0 / x.shape[0] * x.t() @ x
    assert torch.equal(torch.diagonal(h) == 0, dead)
    w = torch.randn(n, k, generator=gen)
    r = gptq_solve(w, h, scheme)
    assert r.fallback is None
    assert r.info["dead_columns"] == 13
    q_w = check_result(r, w, h, scheme)
    assert torch.equal(q_w[:, dead], torch.zeros(n, 13))
    assert torch.isfinite(torch.tensor(r.loss))
    assert r.info["output_error"] < 0.8 * rtn_error(w, h, scheme)


def test_inputs_are_not_modified_and_bad_shapes_raise():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(16, 64, generator=gen)
    h = correlated_hessian(64, gen)
    w0, h0 = w.clone(), h.clone()
    gptq_solve(w, h, IntScheme(4, 32, act_order=True))
    assert torch.equal(w, w0) and torch.equal(h, h0)
    with pytest.raises(CompressError, match="Hessian shape"):
        gptq_solve(w, h[:32, :32], IntScheme(4, 32))
    with pytest.raises(CompressError, match="group size"):
        gptq_solve(w, h, IntScheme(4, 128))
    with pytest.raises(CompressError, match="block size"):
        gptq_solve(w, h, IntScheme(4, 32), block_size=0)


# --------------------------------------------------------------------------- the "mse" grid

def test_grid_search_never_worse_per_row():
    """grid_search keeps p = 1 unless a shrunken range lowers the row's weighted error: Gaussian
    rows get a clipped range and a much lower error; rows with a large outlier keep most of it."""
    from compress.quantizer import grid_search
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(32, 128, generator=gen)
    w[::2, 7] = 12.0                                          # an outlier in every other row
    cw = torch.rand(128, generator=gen) + 0.1

    def row_err(s, z, bits):
        d = (quantize_values(w, s[:, None], z[:, None], (1 << bits) - 1) - z[:, None]) * s[:, None] - w
        return (d.abs().pow(2.4) * cw).sum(1)

    for bits, sym in ((2, False), (3, True), (4, False)):
        s0, z0 = grid_params(w, bits, sym)
        s1, z1 = grid_search(w, bits, sym, col_weight=cw)
        assert torch.equal(s1, s1.half().float()) and int(z1.min()) >= 1 and int(z1.max()) <= (1 << bits) - 1
        e0, e1 = row_err(s0, z0, bits), row_err(s1, z1, bits)
        assert bool((e1 <= e0 * (1 + 1e-6)).all())
        assert float(e1[1::2].sum()) < 0.95 * float(e0[1::2].sum())
        assert float((s1[1::2] < s0[1::2]).float().mean()) > 0.5
        assert float(e1[::2].sum()) > 0.8 * float(e0[::2].sum())


@pytest.mark.parametrize("scheme", [IntScheme(bits=b, group_size=g, sym=False, act_order=a)
                                    for b, g, a in ((2, 64, True), (3, 128, False), (4, -1, True), (4, 32, True))],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_mse_grid_is_a_valid_gptq_solve_and_lowers_the_error(scheme):
    """The loss identity (the checkpoint reproduces what the error propagation used) holds with the
    searched grids, and on heavy-tailed weights the layer error is below the min-max grid's."""
    gen = torch.Generator().manual_seed(77 + scheme.bits)
    n, k = 64, 256
    w = torch.distributions.StudentT(3.0).sample((n, k)) * 0.02
    h = correlated_hessian(k, gen, uneven=True)
    r0 = gptq_solve(w, h, scheme)
    r1 = gptq_solve(w, h, scheme, grid="mse")
    check_result(r1, w, h, scheme)
    assert r1.info["output_error"] < r0.info["output_error"]


def test_mse_grid_with_static_groups_keeps_natural_groups():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 200, generator=gen) * 0.05
    h = correlated_hessian(200, gen, uneven=True)
    scheme = IntScheme(bits=3, group_size=64, sym=False, act_order=True)
    r = gptq_solve(w, h, scheme, static_groups=True, grid="mse")
    check_result(r, w, h, scheme)
    assert torch.equal(r.g_idx, torch.arange(200, dtype=torch.int32) // 64)


def test_unknown_grid_raises():
    with pytest.raises(CompressError, match="unknown GPTQ grid"):
        gptq_solve(torch.randn(8, 32), torch.eye(32), IntScheme(bits=4, group_size=32), grid="best")


def test_a_layer_no_calibration_input_reached_is_rounded_to_nearest_not_zeroed():
    """An all-zero Hessian (an expert no calibration token was routed to) gives round-to-nearest,
    recorded as the fallback, instead of the dead-column rule zeroing every weight."""
    from compress.scheme import IntScheme
    from compress.solvers.int_grid import gptq_solve, quantize_rtn
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    sc = IntScheme(bits=4, group_size=32, sym=False)
    r = gptq_solve(w, torch.zeros(64, 64), sc, damp=0.01, block_size=32, static_groups=True, grid="minmax")
    assert r.fallback == "rtn:no-calibration-input"
    assert torch.equal(r.q, quantize_rtn(w, sc)[0]) and float(r.dequantize().abs().sum()) > 0

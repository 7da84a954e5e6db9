"""Statistics accumulators: Hessian, importance (imatrix), abs-max; safetensors save/load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from calib.stats import (AbsMaxAccumulator, HessianAccumulator, ImportanceAccumulator, load_stats,
                         save_stats)

K = 48


def batches(gen: torch.Generator) -> list[torch.Tensor]:
    """Inputs of mixed shapes (..., K), as a linear layer would see them, with a random covariance."""
    mix = torch.randn(K, K, generator=gen)
    shapes = [(3, 17, K), (5, K), (2, 2, 9, K), (1, K), (40, K)]
    return [(torch.randn(*s, generator=gen) @ mix) + 0.5 for s in shapes]


def rows(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1, K) for x in xs]).double()


def test_hessian_equals_two_over_n_xtx_for_any_split():
    gen = torch.Generator().manual_seed(0)
    xs = batches(gen)
    x = rows(xs)
    direct = 2.0 / x.shape[0] * x.t() @ x
    one = HessianAccumulator(K)
    one.add_batch(x.float())
    split = HessianAccumulator(K)
    for b in xs:
        split.add_batch(b)
    assert one.nsamples == split.nsamples == x.shape[0]
    for acc in (one, split):
        assert acc.hessian().shape == (K, K)
        torch.testing.assert_close(acc.hessian().double(), direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))
    f64 = HessianAccumulator(K, dtype=torch.float64)
    for b in reversed(xs):
        f64.add_batch(b)
    torch.testing.assert_close(f64.hessian(), direct, rtol=1e-10, atol=0)


def test_accumulators_as_forward_hooks():
    gen = torch.Generator().manual_seed(1)
    xs = batches(gen)
    lin = torch.nn.Linear(K, 8)
    accs = [HessianAccumulator(K), ImportanceAccumulator(K), AbsMaxAccumulator(K)]
    handles = [lin.register_forward_hook(a.hook) for a in accs]
    with torch.no_grad():
        for b in xs:
            lin(b)
    for hdl in handles:
        hdl.remove()
    x = rows(xs)
    torch.testing.assert_close(accs[0].hessian().double(), 2.0 / x.shape[0] * x.t() @ x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(accs[1].importance().double(), (x * x).mean(0), rtol=1e-5, atol=0)
    assert all(a.nsamples == x.shape[0] for a in accs)


def test_importance_is_the_mean_square_with_a_count():
    gen = torch.Generator().manual_seed(2)
    xs = batches(gen)
    acc = ImportanceAccumulator(K)
    for b in xs:
        acc.add_batch(b)
    x = rows(xs)
    assert acc.count == x.shape[0]
    torch.testing.assert_close(acc.sum_sq.double(), (x * x).sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(acc.importance().double(), (x * x).mean(0), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="no samples"):
        ImportanceAccumulator(K).importance()


def test_absmax_per_input_channel():
    gen = torch.Generator().manual_seed(3)
    xs = batches(gen)
    xs[1][2, 7] = -1e4                      # a large negative outlier must count by magnitude
    acc = AbsMaxAccumulator(K)
    for b in xs:
        acc.add_batch(b)
    x = rows(xs)
    assert torch.equal(acc.absmax().double(), x.abs().amax(0))
    assert float(acc.absmax()[7]) == 1e4


def test_wrong_feature_count_raises():
    for cls in (HessianAccumulator, ImportanceAccumulator, AbsMaxAccumulator):
        with pytest.raises(ValueError, match="48 features"):
            cls(K).add_batch(torch.randn(4, K + 1))


def test_save_load_round_trip_and_continue(tmp_path):
    gen = torch.Generator().manual_seed(4)
    xs = batches(gen)
    stats = {"model.layers.0.self_attn.q_proj": HessianAccumulator(K),
             "model.layers.0.mlp.down_proj": ImportanceAccumulator(K),
             "model.layers.0.mlp.up_proj": AbsMaxAccumulator(K),
             "h64": HessianAccumulator(K, dtype=torch.float64)}
    for acc in stats.values():
        for b in xs[:3]:
            acc.add_batch(b)
    path = tmp_path / "stats.safetensors"
    save_stats(path, stats)
    loaded = load_stats(path)
    assert loaded.keys() == stats.keys()
    for name, acc in stats.items():
        back = loaded[name]
        assert type(back) is type(acc)
        assert back.nsamples == acc.nsamples and back.in_features == K and back.dtype == acc.dtype
        for field, t in acc.state().items():
            assert torch.equal(back.state()[field], t)
    # a reloaded accumulator keeps accumulating as if it had never stopped
    for name, acc in stats.items():
        for b in xs[3:]:
            acc.add_batch(b)
            loaded[name].add_batch(b)
        for field, t in acc.state().items():
            assert torch.equal(loaded[name].state()[field], t)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.randn(3, 3)}, str(path))
    with pytest.raises(ValueError, match="not a statistics file"):
        load_stats(path)
    with pytest.raises(TypeError, match="not a statistics accumulator"):
        save_stats(tmp_path / "x.safetensors", {"w": [1.0, 2.0]})


# --------------------------------------------------------------------------- state and merge

from calib.stats import MeanAbsAccumulator  # noqa: E402

KINDS = [HessianAccumulator, ImportanceAccumulator, AbsMaxAccumulator, MeanAbsAccumulator]


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("split", [1, 37, 99])
def test_two_halves_merged_equal_the_whole(cls, split):
    gen = torch.Generator().manual_seed(split)
    x = torch.randn(100, 24, generator=gen) * torch.linspace(0.1, 5, 24)
    whole, a, b = cls(24), cls(24), cls(24)
    whole.add_batch(x[:split])
    whole.add_batch(x[split:])
    a.add_batch(x[:split])
    b.add_batch(x[split:])
    merged = a.merge(b)
    assert merged is a and merged.nsamples == whole.nsamples == 100
    for k, v in whole.state().items():
        got = merged.state()[k]
        if cls is AbsMaxAccumulator:
            assert torch.equal(got, v)
        else:
            assert torch.allclose(got, v, rtol=1e-5, atol=1e-6), (k, float((got - v).abs().max()))
    # merged state is not the unmerged half's
    assert not torch.allclose(a.state()[next(iter(a.state()))], cls(24).state()[next(iter(a.state()))])


@pytest.mark.parametrize("cls", KINDS)
def test_state_round_trip_and_merge_into_empty(cls):
    x = torch.randn(30, 8)
    acc = cls(8)
    acc.add_batch(x)
    fresh = cls(8)
    fresh.load_state({k: v.clone() for k, v in acc.state().items()}, acc.nsamples)
    assert fresh.nsamples == 30 and all(torch.equal(fresh.state()[k], v) for k, v in acc.state().items())
    empty = cls(8).merge(acc)
    assert all(torch.equal(empty.state()[k], v) for k, v in acc.state().items())
    assert cls(8).merge(cls(8)).nsamples == 0


def test_merge_and_load_state_refuse_mismatches():
    with pytest.raises(ValueError, match="cannot merge"):
        HessianAccumulator(8).merge(AbsMaxAccumulator(8))
    with pytest.raises(ValueError, match="cannot merge"):
        HessianAccumulator(8).merge(HessianAccumulator(9))
    with pytest.raises(ValueError, match="shape"):
        HessianAccumulator(8).load_state({"H": torch.zeros(9, 9)}, 3)
    with pytest.raises(ValueError, match="needs tensor"):
        MeanAbsAccumulator(8).load_state({}, 3)


def test_save_load_tensors_beside_accumulators(tmp_path):
    acc = MeanAbsAccumulator(4)
    acc.add_batch(torch.randn(5, 4))
    save_stats(tmp_path / "s.safetensors", {"a": acc, "a/scales": torch.arange(4.0)})
    back = load_stats(tmp_path / "s.safetensors")
    assert torch.equal(back["a/scales"], torch.arange(4.0))
    assert torch.equal(back["a"].mean(), acc.mean()) and back["a"].nsamples == 5

"""Keep-masks and the SparseGPT solve on layers with a known Hessian."""
from __future__ import annotations

import pytest
import torch

from compress.errors import CompressError
from compress.scheme import IntScheme
from compress.solvers.int_grid import gptq_solve
from compress.solvers.masks import follows_pattern, keep_mask, parse_pattern, sparsity_of
from compress.solvers.obs import output_error
from compress.solvers.sparsegpt import sparsegpt_solve


def _layer(n=64, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(2048, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :8] *= 6                                        # a few outlier input channels
    return w, 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_mask_has_exactly_the_asked_sparsity(sparsity):
    score = torch.rand(48, 96, generator=torch.Generator().manual_seed(1))
    keep = keep_mask(score, sparsity)
    assert int((~keep).sum()) == round(sparsity * score.numel())
    per_row = keep_mask(score, sparsity, per_row=True)
    assert ((~per_row).sum(1) == round(sparsity * 96)).all()
    # the pruned entries are the lowest scores
    assert score[~keep].max() <= score[keep].min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_mask_keeps_n_of_every_m(pattern):
    n, m = parse_pattern(pattern)
    score = torch.rand(32, 64, generator=torch.Generator().manual_seed(2))
    keep = keep_mask(score, nm=(n, m))
    assert (keep.reshape(32, 64 // m, m).sum(-1) == n).all()


def test_equal_scores_give_the_same_mask_every_time():
    score = torch.ones(8, 16)
    assert torch.equal(keep_mask(score, 0.5), keep_mask(score, 0.5))
    assert torch.equal(keep_mask(score, nm=(2, 4)), keep_mask(score.clone(), nm=(2, 4)))


@pytest.mark.parametrize("bad", ["3:2", "2:2", "0:4", "2-4", "a:b", "2:4:8"])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(CompressError):
        parse_pattern(bad)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_layer_error_below_magnitude(nm):
    w, h = _layer()
    res = sparsegpt_solve(w, h, 0.5, nm)
    mag = w * keep_mask(w.abs(), 0.5, nm)
    assert abs(sparsity_of(res.weight) - 0.5) < 0.01
    if nm:
        assert follows_pattern(res.weight, nm)
    assert res.info["output_error"] < 0.8 * output_error(w, mag, h)


def test_sparsegpt_joint_mode_keeps_the_mask_and_quantizes():
    w, h = _layer()
    scheme = IntScheme(bits=4, group_size=32)
    joint = sparsegpt_solve(w, h, 0.5, (2, 4), scheme)
    assert follows_pattern(joint.weight, (2, 4))
    # every weight is on the grid: the dequantized codes are the weight
    from compress.quantizer import dequantize_values
    assert torch.equal(dequantize_values(joint.q, joint.scales, joint.zeros, joint.g_idx), joint.weight)
    # pruning then round-to-nearest of the kept weights is worse than the joint sweep
    from compress.quantizer import quantize_rtn
    pruned = sparsegpt_solve(w, h, 0.5, (2, 4)).weight
    q, s, z, g = quantize_rtn(pruned, scheme)
    assert joint.info["output_error"] < output_error(w, dequantize_values(q, s, z, g), h)


def test_gptq_keep_mask_does_not_revive_pruned_weights():
    w, h = _layer()
    pruned = sparsegpt_solve(w, h, 0.5).weight
    for act_order in (False, True):
        res = gptq_solve(pruned, h, IntScheme(bits=4, group_size=32, act_order=act_order), keep=pruned != 0)
        assert ((res.dequantize() == 0) | (pruned != 0)).all()
        assert sparsity_of(res.dequantize()) >= sparsity_of(pruned)
    free = gptq_solve(pruned, h, IntScheme(bits=4, group_size=32))
    assert sparsity_of(free.dequantize()) < 0.4           # without the mask GPTQ fills the zeros back in

"""The sparse float layouts: exact round trips, refusal of tampered tensors, and compressed-tensors
reading what we write."""
from __future__ import annotations

import pytest
import torch

from compress.errors import CompressError
from compress.formats import sparse
from compress.solvers.masks import keep_mask


def _pruned(nm=None, seed=0, shape=(64, 256)):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    return w * keep_mask(w.abs().float(), 0.5, nm)


@pytest.mark.parametrize("fmt,nm", [(sparse.BITMASK, None), (sparse.BITMASK, (2, 4)), (sparse.BITMASK_24, (2, 4))])
def test_round_trip_is_exact(fmt, nm):
    w = _pruned(nm)
    t = sparse.encode(w, fmt)
    assert torch.equal(sparse.decode(t, fmt), w)
    stored = sum(v.numel() * v.element_size() for v in t.values())
    assert stored < 0.6 * w.numel() * w.element_size()


def test_24_with_fewer_than_two_nonzeros_in_a_group():
    w = _pruned((2, 4))
    w[0, :4] = 0
    assert torch.equal(sparse.decode(sparse.encode(w, sparse.BITMASK_24), sparse.BITMASK_24), w)


def test_24_refuses_a_weight_that_is_not_24():
    with pytest.raises(CompressError, match="not 2:4"):
        sparse.encode(_pruned(None), sparse.BITMASK_24)


@pytest.mark.parametrize("tamper,needle", [
    (lambda t: t.update(compressed=t["compressed"][:-1]), "holds"),
    (lambda t: t.update(row_offsets=t["row_offsets"] + 1), "row_offsets"),
    (lambda t: t.update(bitmask=t["bitmask"][:, :-1]), "bitmask"),
    (lambda t: t.pop("compressed"), "missing"),
    (lambda t: t.update(shape=torch.tensor([64])), "shape"),
])
def test_tampered_tensors_are_refused(tamper, needle):
    t = sparse.encode(_pruned(), sparse.BITMASK)
    tamper(t)
    with pytest.raises(CompressError, match=needle):
        sparse.decode(t, sparse.BITMASK, "m")


def test_compressed_tensors_decompresses_our_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_bitmask")
    ct24 = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask")
    w = _pruned()
    t = sparse.encode(w, sparse.BITMASK)
    assert torch.equal(ct.BitmaskTensor(**t).decompress(), w)
    w24 = _pruned((2, 4))
    t24 = sparse.encode(w24, sparse.BITMASK_24)
    assert torch.equal(ct24.Sparse24BitMaskTensor.from_compressed_data(**t24).decompress(), w24)
    # and we read what it writes
    theirs = ct.BitmaskTensor.from_dense(w)
    assert torch.equal(sparse.decode({"shape": torch.tensor(theirs.shape), "compressed": theirs.compressed,
                                      "bitmask": theirs.bitmask, "row_offsets": theirs.row_offsets},
                                     sparse.BITMASK), w)

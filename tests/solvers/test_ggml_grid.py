"""The GGML block codec (compress.formats.ggml_codec) and GPTQ onto GGML grids (compress.solvers.ggml_grid)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.errors import CompressError
from compress.formats import ggml_codec as C
from compress.formats import kquants
from compress.solvers import ggml_grid as K
from compress.solvers.obs import output_error

# --------------------------------------------------------------------------------------------
# block codec
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", list(C.CODECS))
def test_codec_matches_decoders(type_name):
    """A * c - M equals kquants.dequantize and gguf-py's decoder bit for bit, on quantizer output
    and on blocks with random codes; codes survive pack/unpack."""
    import gguf
    g = torch.Generator().manual_seed(hash(type_name) % 1000)
    w = torch.randn(16, 512, generator=g) * torch.rand(16, 1, generator=g)
    data = kquants.quantize(w, type_name, torch.rand(512, generator=g) + 0.1)
    qt = kquants.get_type(type_name)
    blocks = data.reshape(-1, qt.type_size)
    ref = kquants.dequantize(data, type_name, w.shape).reshape(-1, qt.block_size)
    assert torch.equal(C.decode_blocks(blocks, type_name), ref)
    codes = C.block_codes(blocks, type_name)
    assert torch.equal(C.pack_codes(blocks, codes, type_name), blocks)
    cd = C.CODECS[type_name]
    rnd = torch.randint(cd.cmin, cd.cmax + 1, codes.shape, generator=g)
    rb = C.pack_codes(blocks, rnd, type_name)
    assert torch.equal(C.block_codes(rb, type_name), rnd)
    dec = C.decode_blocks(rb, type_name)
    assert torch.equal(dec, kquants.dequantize(rb.reshape(data.shape), type_name, w.shape).reshape(dec.shape))
    theirs = gguf.quants.dequantize(rb.reshape(data.shape).numpy(), gguf.GGMLQuantizationType[type_name])
    assert np.array_equal(theirs.reshape(dec.shape), dec.numpy())
    with pytest.raises(ValueError):
        C.pack_codes(blocks, rnd + (cd.cmax - cd.cmin + 1), type_name)


@pytest.mark.parametrize("type_name", list(C.CODECS))
def test_scale_fields_read_and_write_back(type_name):
    """Scales read from quantizer output write back to the same bytes; new scales in range change
    exactly the decoded grid (A = d * sc, M = dmin * m), the codes stay; out of range is refused."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 512, generator=g)
    blocks = kquants.quantize(w, type_name).reshape(-1, kquants.get_type(type_name).type_size)
    s = C.block_scales(blocks, type_name)
    assert torch.equal(C.pack_scales(blocks, type_name, s), blocks)
    lay = C.scale_layout(type_name)
    d = (s.d * 1.5).to(torch.float16).float()
    dmin = None if s.dmin is None else (s.dmin * 0.5).to(torch.float16).float()
    rnd = (lambda r, like: None if like is None else torch.randint(r[0], r[1] + 1, like.shape, generator=g))
    new = C.BlockScales(d, dmin, rnd(lay.sc_range, s.sc), rnd(lay.m_range, s.m))
    out = C.pack_scales(blocks, type_name, new)
    assert torch.equal(C.block_codes(out, type_name), C.block_codes(blocks, type_name))
    back = C.block_scales(out, type_name)
    assert torch.equal(back.d, d) and (dmin is None or torch.equal(back.dmin, dmin))
    assert (s.sc is None or torch.equal(back.sc, new.sc)) and (s.m is None or torch.equal(back.m, new.m))
    A, M = C.block_grid(out, type_name)
    rep = A.shape[1] // (1 if lay.legacy else lay.subs)
    A2, M2 = C.scale_grid(new, type_name)
    assert torch.equal(A, A2.repeat_interleave(rep, 1)) and torch.equal(M, M2.repeat_interleave(rep, 1))
    if not lay.legacy:
        with pytest.raises(ValueError, match="sub-block scales"):
            C.pack_scales(blocks, type_name, C.BlockScales(d, dmin, new.sc + (lay.sc_range[1] - lay.sc_range[0] + 1),
                                                          new.m))


# --------------------------------------------------------------------------------------------
# GPTQ onto GGML grids
# --------------------------------------------------------------------------------------------

def _layer(n=96, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.1)
    x = x @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)   # correlated inputs
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(n, k, generator=g) * 0.05
    return w, h


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gptq_kquant_beats_plain_and_imatrix(type_name):
    block = kquants.get_type(type_name).block_size
    w, h = _layer(n=32, k=2 * max(block, 128), seed=len(type_name))
    res = K.gptq_ggml_solve(w, h, type_name)
    # the bytes decode to exactly the weights GPTQ used for its error propagation
    assert torch.equal(kquants.dequantize(res.data, type_name, w.shape), res.weight)
    assert res.data.shape == (w.shape[0], w.shape[1] // kquants.get_type(type_name).block_size
                              * kquants.get_type(type_name).type_size)
    plain = output_error(w, kquants.dequantize(kquants.quantize(w, type_name), type_name, w.shape), h)
    imp = torch.diagonal(h) / 2
    weighted = output_error(w, kquants.dequantize(kquants.quantize(w, type_name, imp), type_name, w.shape), h)
    err = output_error(w, res.weight, h)
    assert res.info["output_error"] == pytest.approx(err, rel=1e-5)
    assert err < plain and err < weighted, (err, plain, weighted)
    assert res.fallback is None


def test_gptq_kquant_rows_must_fit_blocks():
    w, h = _layer(k=96)
    with pytest.raises(CompressError, match="multiple of 256"):
        K.gptq_ggml_solve(w, h, "Q4_K")
    with pytest.raises(CompressError, match="does not match"):
        K.gptq_ggml_solve(w, h[:64, :64], "Q4_0")


def test_gptq_kquant_dead_columns_and_fallback():
    w, h = _layer(n=32, k=256)
    h[:, 5] = 0
    h[5, :] = 0
    res = K.gptq_ggml_solve(w, h, "Q4_0")
    assert res.info["dead_columns"] == 1
    assert torch.equal(kquants.dequantize(res.data, "Q4_0", w.shape), res.weight)
    bad = -torch.eye(256)                     # never positive definite: dampening cannot help
    res = K.gptq_ggml_solve(w, bad, "Q4_K", max_damp_tries=1)
    assert res.fallback == "rtn"
    assert torch.equal(kquants.dequantize(res.data, "Q4_K", w.shape), res.weight)

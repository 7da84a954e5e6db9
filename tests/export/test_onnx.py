"""ONNX export: exact repacking, ONNX Runtime parity with the torch checkpoint, KV cache, errors.

Tiny random Llama models in the default run; the real model (SmolLM2-135M) is marked slow.
Two tiny shapes: ``tiny_llama`` (hidden 96, head_dim 24: ORT's GroupQueryAttention needs a
multiple of 16, so attention falls back to standard ops) and ``tiny_gqa`` (hidden 192, FFN 320,
head_dim 48: GroupQueryAttention, and group 128 leaves narrow last groups of 64 on every layer,
as on SmolLM2).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from compress import api, models  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.export import onnx as xo  # noqa: E402
from compress.formats import gptq_int  # noqa: E402
from compress.qlinear import QuantLinear, set_submodule  # noqa: E402
from compress.quantizer import quantize_rtn  # noqa: E402
from compress.runtime_onnx import OnnxCausalLM, is_onnx_dir  # noqa: E402
from compress.scheme import IntScheme  # noqa: E402
from tests.conftest import build_tiny  # noqa: E402

VOCAB = 320


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama192", "llama", seed=1, hidden=192, ffn=320)


@pytest.fixture(scope="module")
def base_gqa(tiny_gqa):
    return models.load(str(tiny_gqa)).model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Quantize a tiny model once per (model, scheme); returns the checkpoint folder."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def make(model_dir, bits, group, sym):
        key = (str(model_dir), bits, group, sym)
        if key not in cache:
            out = root / f"{model_dir.name}-{bits}-{group}-{'sym' if sym else 'asym'}"
            api.quantize_to_folder(str(model_dir), out, progress=False, bits=bits, group_size=group, sym=sym)
            cache[key] = out
        return cache[key]
    return make


def fresh_ids(seed: int, t: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def torch_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def torch_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    for _ in range(n):
        nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def act_order(loaded, seed: int = 0) -> None:
    """Re-quantize every QuantLinear of ``loaded`` with a random column order (as GPTQ act-order
    does): groups are formed over the permuted columns, ``g_idx`` is no longer sorted. Linears that
    share an input (q/k/v, gate/up) share the permutation, as they share the Hessian in GPTQ."""
    scheme = loaded.quant["scheme_obj"]
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    for name, m in list(loaded.model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        k = m.in_features
        layer, leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[0], name.rsplit(".", 1)[1]
        shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}
        key = (layer, shared.get(leaf, leaf))
        if key not in perms:
            perms[key] = torch.randperm(k, generator=gen)
        perm = perms[key]
        w = m.dequantize()
        q, s, z, _ = quantize_rtn(w[:, perm], scheme)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = torch.arange(k, dtype=torch.int32) // scheme.effective_group(k)
        q_orig = torch.empty_like(q)
        q_orig[:, perm] = q
        packed = gptq_int.pack(q_orig, s, z, g_idx, scheme.bits)
        set_submodule(loaded.model, name, QuantLinear.from_packed(packed, m.bias))


# --------------------------------------------------------------------------- exact repacking (no ORT)

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 96, 128, 256, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_repack_is_exact(bits, group, sym):
    """MatMulNBits and QDQ layouts dequantize bit-for-bit to the checkpoint's weight, including
    narrow last groups (K=576, 320) and act-order permutations."""
    gen = torch.Generator().manual_seed(bits * 100 + abs(group) + sym)
    for k, n in ((576, 40), (320, 24)):
        if group > k:
            continue
        scheme = IntScheme(bits=bits, group_size=group, sym=sym)
        w = torch.randn(n, k, generator=gen)
        for permuted in (False, True):
            perm = torch.randperm(k, generator=gen) if permuted else torch.arange(k)
            q, s, z, _ = quantize_rtn(w[:, perm], scheme)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = torch.arange(k, dtype=torch.int32) // scheme.effective_group(k)
            q_orig = torch.empty_like(q)
            q_orig[:, perm] = q
            m = QuantLinear.from_packed(gptq_int.pack(q_orig, s, z, g_idx, bits), None)
            ref = m.dequantize().numpy()
            iw = xo.int_weight(m)
            np.testing.assert_array_equal(iw.dequantize(), ref)
            p = xo.pack_matmulnbits(iw)
            assert p.bits == (4 if bits == 3 else bits) and p.block_size in (16, 32, 64, 128)
            assert p.b.dtype == np.uint8 and p.b.shape == (n, -(-k // p.block_size), p.block_size * p.bits // 8)
            assert p.scales.shape == (n, p.b.shape[1])
            assert (p.perm is not None) == (permuted and group != -1)  # one group: no reordering needed
            if group in (16, 32, 64, 128):
                assert p.block_size == group
            np.testing.assert_array_equal(p.dequantize(), ref)
            d = xo.pack_qdq(iw)
            assert d.dtype == ("INT" if sym else "UINT") + ("8" if bits == 8 else "4")
            assert (d.zero_points is None) == sym
            assert d.block_size == p.block_size          # a block ORT can fuse into MatMulNBits
            np.testing.assert_array_equal(d.dequantize(), ref)


def test_pack_lowfirst_order():
    v = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert xo.pack_lowfirst(v, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert xo.pack_lowfirst(np.array([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    for bits in (2, 4, 8):
        r = np.random.default_rng(bits).integers(0, 1 << bits, (5, 37))
        np.testing.assert_array_equal(xo.unpack_lowfirst(xo.pack_lowfirst(r, bits), bits, 37), r)


def test_zero_point_overflow_is_promoted():
    """A GPTQ v1 stored zero of 2**bits - 1 means an actual zero-point of 2**bits: it does not fit
    the checkpoint's width, so the export takes the next width that holds it (still exact)."""
    q = np.random.default_rng(0).integers(0, 16, (8, 64))
    w = xo.IntWeight(q=q, zeros=np.full((2, 8), 16), scales=np.full((2, 8), 0.5, np.float32),
                     g_idx=np.arange(64) // 32, bits=4)
    p = xo.pack_matmulnbits(w)
    assert p.bits == 8
    np.testing.assert_array_equal(p.dequantize(), w.dequantize())


def test_groups_without_a_power_of_two_block_are_rejected():
    k = 96
    w = xo.IntWeight(q=np.zeros((4, k), np.int32), zeros=np.ones((4, 4), np.int32),
                     scales=np.ones((4, 4), np.float32), g_idx=np.arange(k) // 24, bits=4)
    with pytest.raises(CompressError, match="cannot be written as MatMulNBits blocks"):
        xo.pack_matmulnbits(w, "layer.x")
    d = xo.pack_qdq(w)        # standard DequantizeLinear takes any block size
    assert d.block_size == 24


# --------------------------------------------------------------------------- ORT parity

PARITY = [  # (bits, group, sym)
    (2, 32, False), (3, 128, True), (3, 64, False), (4, 128, False), (4, 64, True),
    (4, 32, False), (8, -1, True), (8, 128, False), (4, 96, False),
]


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("bits,group,sym", PARITY)
def test_logits_parity(tiny_gqa, base_gqa, ckpt, tmp_path, fmt, bits, group, sym):
    """ORT logits equal the torch packed model's at float tolerance (accuracy level 0)."""
    loaded = models.load(str(ckpt(tiny_gqa, bits, group, sym)))
    ids = fresh_ids(bits * 7 + abs(group))
    ref = torch_logits(loaded.model, ids)
    info = xo.export_onnx(loaded, tmp_path / "onnx", fmt=fmt)
    assert info["bits"] == [bits] and info["quantized_linears"] > 0
    if fmt == "matmulnbits":
        assert info["model"]["attention"] == "GroupQueryAttention"
        assert info["onnx_bits"] == [4 if bits == 3 else bits]
    out = OnnxCausalLM(tmp_path / "onnx", threads=2)(input_ids=ids, use_cache=False).logits
    assert out.dtype == torch.float32 and out.shape == (1, ids.shape[1], VOCAB)
    assert rel_err(out, ref) < 1e-5
    # the quantization itself is visible: the fp32 model differs far more than the export does
    base = torch_logits(base_gqa, ids)
    assert rel_err(base, ref) > 100 * rel_err(out, ref)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_parity_standard_attention_and_act_order(tiny_llama, ckpt, tmp_path, fmt):
    """head_dim 24 (standard-op attention even in the matmulnbits format) and act-order g_idx."""
    loaded = models.load(str(ckpt(tiny_llama, 4, 32, False)))
    act_order(loaded)
    ids = fresh_ids(3)
    ref = torch_logits(loaded.model, ids)
    info = xo.export_onnx(loaded, tmp_path / "onnx", fmt=fmt)
    assert info["model"]["attention"] == "standard ops"
    assert all(layer["permuted"] for layer in info["layers"] if layer["kind"] != "fp32")
    m = onnx.load(str(tmp_path / "onnx" / xo.MODEL_FILE), load_external_data=False)
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and n.attribute[0].i == -1]
    assert len(gathers) == 2 * 4      # per layer: one for q/k/v, o, gate/up, down
    out = OnnxCausalLM(tmp_path / "onnx")(input_ids=ids).logits
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_gptq_act_order_checkpoint(tiny_gqa, tiny_data, tmp_path, fmt):
    """A real GPTQ act-order checkpoint (calibrated on the tiny data folder): permuted g_idx,
    narrow last groups, exact in both formats."""
    from calib.data import CalibSpec
    out = tmp_path / "gptq"
    api.quantize_to_folder(str(tiny_gqa), out, "gptq", progress=False, calib=CalibSpec(nsamples=8, seqlen=64),
                           data_dir=str(tiny_data), bits=4, group_size=64, sym=False, act_order=True,
                           static_groups=False)
    loaded = models.load(str(out))
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert not bool((q.g_idx[1:] >= q.g_idx[:-1]).all())           # really permuted
    info = xo.export_onnx(loaded, tmp_path / "onnx", fmt=fmt)
    assert any(layer["permuted"] for layer in info["layers"])
    ids = fresh_ids(13)
    out_logits = OnnxCausalLM(tmp_path / "onnx")(input_ids=ids).logits
    assert rel_err(out_logits, torch_logits(loaded.model, ids)) < 1e-5


def test_narrow_group_not_power_of_two_in_qdq(tiny_gqa, ckpt, tmp_path):
    """Group 24: no MatMulNBits block fits (clear error, nothing written); qdq is exact."""
    src = ckpt(tiny_gqa, 4, 24, False)
    loaded = models.load(str(src))
    with pytest.raises(CompressError, match="MatMulNBits blocks"):
        xo.export_onnx(loaded, tmp_path / "mnb")
    assert not (tmp_path / "mnb").exists() and not list(tmp_path.glob(".mnb*"))
    ids = fresh_ids(11)
    xo.export_onnx(loaded, tmp_path / "qdq", fmt="qdq")
    out = OnnxCausalLM(tmp_path / "qdq")(input_ids=ids).logits
    assert rel_err(out, torch_logits(loaded.model, ids)) < 1e-5


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_unquantized_model_exports_as_fp32(tiny_gqa, tmp_path, fmt):
    loaded = models.load(str(tiny_gqa))
    ids = fresh_ids(5)
    info = xo.export_onnx(loaded, tmp_path / "onnx", fmt=fmt)
    assert info["quantized_linears"] == 0 and info["bits"] == []
    m = onnx.load(str(tmp_path / "onnx" / xo.MODEL_FILE), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    assert "MatMul" in ops and "MatMulNBits" not in ops and "DequantizeLinear" not in ops
    out = OnnxCausalLM(tmp_path / "onnx")(input_ids=ids).logits
    assert rel_err(out, torch_logits(loaded.model, ids)) < 1e-5


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_qwen2_biases_and_untied_lm_head(tmp_path, fmt):
    """Another Llama-family member: q/k/v biases, untied lm_head (fp32 MatMul), GQA head_dim 32."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.conftest import _tokenizer
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(tmp_path / "qwen2")
    _tokenizer().save_pretrained(tmp_path / "qwen2")
    api.quantize_to_folder(str(tmp_path / "qwen2"), tmp_path / "q", progress=False, bits=4, group_size=32)
    loaded = models.load(str(tmp_path / "q"))
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    info = xo.export_onnx(loaded, tmp_path / "onnx", fmt=fmt)
    assert info["model"]["tied_embeddings"] is False and info["model"]["lm_head"] == "MatMul fp32"
    ids = fresh_ids(12)
    out = OnnxCausalLM(tmp_path / "onnx")(input_ids=ids).logits
    assert rel_err(out, torch_logits(loaded.model, ids)) < 1e-5


# --------------------------------------------------------------------------- KV cache and generation

@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_kv_cache_equals_recomputation(tiny_gqa, ckpt, tmp_path, fmt):
    loaded = models.load(str(ckpt(tiny_gqa, 4, 128, False)))
    xo.export_onnx(loaded, tmp_path / "kv", fmt=fmt)
    xo.export_onnx(loaded, tmp_path / "plain", fmt=fmt, kv_cache=False)
    kv, plain = OnnxCausalLM(tmp_path / "kv"), OnnxCausalLM(tmp_path / "plain")
    assert kv.kv_cache and not plain.kv_cache
    assert "past_key_values.0.key" in kv.input_names and "present.1.value" in kv.output_names
    assert plain.input_names == ["input_ids", "attention_mask", "position_ids"] and plain.output_names == ["logits"]
    ids = fresh_ids(21, 30)
    full = plain(input_ids=ids).logits
    chunks, past = [], None
    for a, b in ((0, 13), (13, 14), (14, 22), (22, 23), (23, 30)):
        o = kv(input_ids=ids[:, a:b], use_cache=True, past_key_values=past)
        past = o.past_key_values
        chunks.append(o.logits)
        assert tuple(past[0].shape()) == (1, 2, b, 48)      # (batch, kv heads, total, head_dim)
    assert rel_err(torch.cat(chunks, dim=1), full) < 1e-5
    prompt = ids[0, :6]
    assert torch.equal(kv.generate(prompt, 24), plain.generate(prompt, 24))


def test_in_place_kv_decoder_equals_past_present(tiny_gqa, tiny_llama, ckpt, tmp_path):
    """One buffer per layer bound as past and present (GroupQueryAttention appends in place):
    the same logits as passing the growing past tensors back, chunk by chunk, and the buffer
    holds exactly the keys the other path returns."""
    loaded = models.load(str(ckpt(tiny_gqa, 4, 128, False)))
    xo.export_onnx(loaded, tmp_path / "kv")
    kv = OnnxCausalLM(tmp_path / "kv")
    assert kv.in_place_kv
    ids = fresh_ids(31, 30)
    dec = kv.decoder(40)
    past = None
    for a, b in ((0, 13), (13, 14), (14, 22), (22, 23), (23, 30)):
        o = kv(input_ids=ids[:, a:b], use_cache=True, past_key_values=past)
        past = o.past_key_values
        got = dec(ids[:, a:b])
        assert got.shape == (1, b - a, VOCAB) and dec.length == b
        assert rel_err(torch.from_numpy(got), o.logits) < 1e-6
    buf = dec._kv[0].numpy()
    assert buf.shape == (1, 2, 40, 48)
    assert np.array_equal(buf[:, :, :30], past[0].numpy()) and not buf[:, :, 30:].any()
    with pytest.raises(CompressError, match="exceed the decoder's 40 positions"):
        dec(ids[:, :11])
    dec.reset()
    assert rel_err(torch.from_numpy(dec(ids[:, :5])), kv(input_ids=ids[:, :5]).logits) < 1e-6
    with pytest.raises(CompressError, match=r"\(1, t\) token ids"):
        dec(np.zeros((2, 3), np.int64))
    # standard-op attention (head_dim 24) keeps the concatenating cache
    xo.export_onnx(models.load(str(ckpt(tiny_llama, 4, 32, False))), tmp_path / "std")
    std = OnnxCausalLM(tmp_path / "std")
    assert std.kv_cache and not std.in_place_kv
    with pytest.raises(CompressError, match="GroupQueryAttention"):
        std.decoder(16)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_greedy_generation_matches_torch_8bit(tiny_gqa, ckpt, tmp_path, fmt):
    loaded = models.load(str(ckpt(tiny_gqa, 8, 128, False)))
    xo.export_onnx(loaded, tmp_path / "onnx", fmt=fmt)
    prompt = fresh_ids(8, 7)
    got = OnnxCausalLM(tmp_path / "onnx").generate(prompt, max_new_tokens=32)
    want = torch_greedy(loaded.model, prompt, 32)
    assert got.shape == (1, 7 + 32)
    assert torch.equal(got, want)
    assert len(set(got[0, 7:].tolist())) > 1      # not a degenerate repetition


def test_sampling_is_seeded(tiny_gqa, ckpt, tmp_path):
    loaded = models.load(str(ckpt(tiny_gqa, 8, 128, False)))
    xo.export_onnx(loaded, tmp_path / "onnx")
    m = OnnxCausalLM(tmp_path / "onnx")
    prompt = fresh_ids(9, 5)
    a = m.generate(prompt, 12, greedy=False, temperature=1.5, seed=3)
    assert torch.equal(a, m.generate(prompt, 12, greedy=False, temperature=1.5, seed=3))
    assert not torch.equal(a, m.generate(prompt, 12, greedy=True))


def test_perplexity_evaluator_runs_unchanged(tiny_gqa, ckpt, tmp_path):
    from evals.perplexity import evaluate
    loaded = models.load(str(ckpt(tiny_gqa, 4, 64, True)))
    xo.export_onnx(loaded, tmp_path / "onnx")
    m = OnnxCausalLM(tmp_path / "onnx")
    wins = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    r = evaluate(m, wins, base=loaded.model, progress=False)
    assert r.tokens == 3 * 39
    assert abs(r.ppl / r.base_ppl - 1) < 1e-5 and r.kld < 1e-6 and r.top1 == 1.0


# --------------------------------------------------------------------------- options

def test_accuracy_level_4_is_close_not_exact(tiny_gqa, ckpt, tmp_path):
    loaded = models.load(str(ckpt(tiny_gqa, 4, 32, False)))
    info = xo.export_onnx(loaded, tmp_path / "onnx", accuracy_level=4)
    assert info["accuracy_level"] == 4
    m = onnx.load(str(tmp_path / "onnx" / xo.MODEL_FILE), load_external_data=False)
    levels = {a.i for n in m.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    ids = fresh_ids(4)
    err = rel_err(OnnxCausalLM(tmp_path / "onnx")(input_ids=ids).logits, torch_logits(loaded.model, ids))
    assert 1e-6 < err < 5e-2


@pytest.mark.parametrize("head_bits", [8, 4])
def test_quantized_lm_head(tiny_gqa, ckpt, tmp_path, head_bits):
    """lm_head_bits: MatMulNBits lm_head and a GatherBlockQuantized embedding over the same table.
    Oracle: the torch model with its tied embedding replaced by the same RTN-quantized table."""
    src = ckpt(tiny_gqa, 4, 128, False)
    loaded = models.load(str(src))
    plain = xo.export_onnx(loaded, tmp_path / "plain")
    default = xo.export_onnx(loaded, tmp_path / "default", lm_head_bits=head_bits)
    assert default["lm_head_accuracy_level"] == (4 if head_bits == 8 else 0)   # 8-bit: ORT's fast path
    assert default["size_bytes"] < plain["size_bytes"]
    info = xo.export_onnx(loaded, tmp_path / "onnx", lm_head_bits=head_bits, lm_head_block_size=32,
                          lm_head_accuracy_level=0)
    assert "GatherBlockQuantized" in info["model"]["embedding"]
    emb = loaded.model.get_input_embeddings().weight
    q, s, z, g = quantize_rtn(emb.detach(), IntScheme(bits=head_bits, group_size=32, sym=False))
    with torch.no_grad():
        emb.copy_(torch.from_numpy(xo.IntWeight(q.numpy(), z.numpy(), s.numpy(), g.numpy(), head_bits).dequantize()))
    ids = fresh_ids(6)
    out = OnnxCausalLM(tmp_path / "onnx")(input_ids=ids).logits
    assert rel_err(out, torch_logits(loaded.model, ids)) < 1e-5
    with pytest.raises(CompressError, match="matmulnbits format only"):
        xo.export_onnx(loaded, tmp_path / "bad", fmt="qdq", lm_head_bits=8)


# --------------------------------------------------------------------------- the folder

def test_folder_contents_checker_and_external_data(tiny_gqa, ckpt, tmp_path):
    src = ckpt(tiny_gqa, 3, 128, False)
    out = tmp_path / "onnx"
    xo.export_onnx(str(src), out)                 # a path works as well as a Loaded
    assert is_onnx_dir(out) and not is_onnx_dir(src)
    onnx.checker.check_model(str(out / xo.MODEL_FILE))
    m = onnx.load(str(out / xo.MODEL_FILE), load_external_data=False)
    assert m.ir_version == 10
    assert {o.domain: o.version for o in m.opset_import} == {"": 21, "com.microsoft": 1}
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all(e.value == xo.DATA_FILE for t in ext for e in t.external_data if e.key == "location")
    data = (out / xo.DATA_FILE).stat().st_size
    assert data > 20 * (out / xo.MODEL_FILE).stat().st_size
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer
               if len(t.raw_data) >= xo.EXTERNAL_MIN_BYTES)
    files = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", xo.INFO_FILE} <= files
    assert not list(tmp_path.glob(".onnx.tmp-*"))
    saved = json.loads((out / xo.INFO_FILE).read_text())
    assert saved["format"] == "matmulnbits" and saved["bits"] == [3] and saved["onnx_bits"] == [4]
    assert saved["block_size"] == 128 and saved["accuracy_level"] == 0 and saved["kv_cache"] is True
    assert saved["source_path"] == str(src) and saved["package_version"]
    assert any("3-bit" in n for n in saved["notes"])
    ops = {n.op_type for n in m.graph.node}
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops
    tok = OnnxCausalLM(out).tokenizer
    assert tok("the river")["input_ids"] == loaded_tokenizer_ids(src, "the river")
    # re-export over an existing folder replaces it atomically
    xo.export_onnx(str(src), out, fmt="qdq")
    assert json.loads((out / xo.INFO_FILE).read_text())["format"] == "qdq"


def loaded_tokenizer_ids(folder, text):
    return models.load_tokenizer(folder)(text)["input_ids"]


def test_qdq_uses_standard_ops_only(tiny_gqa, ckpt, tmp_path):
    for bits, sym, want in ((4, True, "INT4"), (4, False, "UINT4"), (8, True, "INT8"), (8, False, "UINT8")):
        loaded = models.load(str(ckpt(tiny_gqa, bits, 64, sym)))
        out = tmp_path / f"q{bits}{sym}"
        xo.export_onnx(loaded, out, fmt="qdq")
        onnx.checker.check_model(str(out / xo.MODEL_FILE), full_check=True)
        m = onnx.load(str(out / xo.MODEL_FILE), load_external_data=False)
        assert [o.domain for o in m.opset_import] == [""]
        assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
        dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 2 * 4
        types = {t.data_type for t in m.graph.initializer if t.name.endswith(".qweight")}
        assert types == {getattr(onnx.TensorProto, want)}


# --------------------------------------------------------------------------- errors

def test_errors(tiny_opt, tiny_gqa, ckpt, tmp_path):
    with pytest.raises(CompressError, match="ONNX export supports the model types"):
        xo.export_onnx(str(tiny_opt), tmp_path / "opt")
    with pytest.raises(CompressError, match="no such file or folder"):
        xo.export_onnx(str(tmp_path / "missing" / "ckpt"), tmp_path / "x")
    src = str(ckpt(tiny_gqa, 4, 128, False))
    with pytest.raises(CompressError, match="ONNX format must be one of"):
        xo.export_onnx(src, tmp_path / "x", fmt="tflite")
    with pytest.raises(CompressError, match="accuracy level must be one of"):
        xo.export_onnx(src, tmp_path / "x", accuracy_level=7)
    with pytest.raises(CompressError, match="lm_head_bits must be one of"):
        xo.export_onnx(src, tmp_path / "x", lm_head_bits=3)
    with pytest.raises(CompressError, match="standard ONNX ops only"):
        xo.export_onnx(src, tmp_path / "x", fmt="qdq", contrib_ops=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "opt").exists()
    other = models.load(src)
    other.quant = {**other.quant, "format": "w8a8-int8"}
    with pytest.raises(CompressError, match="reads gptq-int checkpoints"):
        xo.export_onnx(other, tmp_path / "x")
    with pytest.raises(CompressError, match="not an exported ONNX folder"):
        OnnxCausalLM(src)
    with pytest.raises(CompressError, match="no such folder"):
        OnnxCausalLM(tmp_path / "nothing")
    xo.export_onnx(src, tmp_path / "plain", kv_cache=False)
    m = OnnxCausalLM(tmp_path / "plain")
    first = m(input_ids=fresh_ids(1, 4), use_cache=True)
    assert first.past_key_values is None
    with pytest.raises(CompressError, match="without a KV cache"):
        m(input_ids=fresh_ids(1, 1), past_key_values=[torch.zeros(1, 2, 4, 48)] * 4)


# --------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_4bit_perplexity_and_8bit_generation(smollm2, real_data, tmp_path):
    from evals.data import PROTOCOLS, read_text
    from evals.perplexity import evaluate, tokenize, windows

    proto = PROTOCOLS["wt2-quick"]
    q4 = tmp_path / "q4"
    api.quantize_to_folder("smollm2-135m", q4, progress=False, bits=4, group_size=128, sym=False)
    loaded = models.load(str(q4))
    info = xo.export_onnx(loaded, tmp_path / "q4-onnx")
    assert info["quantized_linears"] == 210 and info["block_size"] == 128
    assert info["size_bytes"] < 0.3 * (smollm2 / "model.safetensors").stat().st_size
    ort_model = OnnxCausalLM(tmp_path / "q4-onnx", threads=2)
    tokens = tokenize(loaded.tokenizer, read_text(real_data / proto.file))
    wins = windows(tokens, proto.seqlen, 2)
    r = evaluate(ort_model, wins, base=loaded.model, progress=False)
    assert r.tokens == 2 * 511
    assert abs(r.ppl / r.base_ppl - 1) < 0.005
    assert r.kld < 1e-4 and r.top1 > 0.99

    q8 = tmp_path / "q8"
    api.quantize_to_folder("smollm2-135m", q8, progress=False, bits=8, group_size=128, sym=True)
    loaded8 = models.load(str(q8))
    xo.export_onnx(loaded8, tmp_path / "q8-onnx")
    prompt = torch.tensor([loaded8.tokenizer("The history of the city of", add_special_tokens=False)["input_ids"]])
    got = OnnxCausalLM(tmp_path / "q8-onnx", threads=2).generate(prompt, max_new_tokens=32)
    assert torch.equal(got, torch_greedy(loaded8.model, prompt, 32))


@pytest.mark.slow
def test_smollm2_4bit_with_lm_head(smollm2, real_data, tmp_path):
    """A checkpoint 4-bit throughout (--lm-head): MatMulNBits lm_head, file well under 0.3x, the
    same perplexity as its torch model, and in-place KV generation equal to the concatenating one."""
    from evals.data import PROTOCOLS, read_text
    from evals.perplexity import evaluate, tokenize, windows

    proto = PROTOCOLS["wt2-quick"]
    q4 = tmp_path / "q4h"
    api.quantize_to_folder("smollm2-135m", q4, progress=False, bits=4, group_size=128, sym=False, lm_head=True)
    loaded = models.load(str(q4))
    info = xo.export_onnx(loaded, tmp_path / "onnx")
    assert info["quantized_linears"] == 211 and info["model"]["lm_head"] == "quantized (checkpoint)"
    assert info["size_bytes"] < 0.3 * (smollm2 / "model.safetensors").stat().st_size
    ort_model = OnnxCausalLM(tmp_path / "onnx", threads=2)
    tokens = tokenize(loaded.tokenizer, read_text(real_data / proto.file))
    r = evaluate(ort_model, windows(tokens, proto.seqlen, 2), base=loaded.model, progress=False)
    assert abs(r.ppl / r.base_ppl - 1) < 0.005 and r.kld < 1e-4
    prompt = tokens[None, :40]
    got = ort_model.generate(prompt, max_new_tokens=24)
    ort_model.in_place_kv = False
    assert torch.equal(got, ort_model.generate(prompt, max_new_tokens=24))


# --------------------------------------------------------------------------- what the CLI calls

def test_eval_ppl_onnx_matches_api_eval_ppl(tiny_gqa, ckpt, tiny_data, tmp_path):
    from compress.runtime_onnx import eval_ppl_onnx
    src = str(ckpt(tiny_gqa, 4, 64, False))
    xo.export_onnx(src, tmp_path / "onnx")
    want = api.eval_ppl(src, "wt2-quick", 2, base_spec=str(tiny_gqa), data_dir=str(tiny_data), progress=False)
    got = eval_ppl_onnx(tmp_path / "onnx", "wt2-quick", 2, base_spec=str(tiny_gqa), data_dir=str(tiny_data),
                        threads=2, progress=False)
    assert got["tokens"] == want["tokens"] == 2 * 511 and got["runtime"] == "onnxruntime"
    assert abs(got["ppl"] / want["ppl"] - 1) < 1e-5 and abs(got["kld"] - want["kld"]) < 1e-5
    with pytest.raises(CompressError, match="unknown protocol"):
        eval_ppl_onnx(tmp_path / "onnx", "wt3", data_dir=str(tiny_data))


def test_generate_text(tiny_gqa, ckpt, tmp_path):
    from compress.runtime_onnx import generate_text
    src = ckpt(tiny_gqa, 8, 128, False)
    xo.export_onnx(str(src), tmp_path / "onnx")
    r = generate_text(tmp_path / "onnx", "the river", max_new_tokens=10, stop_at_eos=False)
    assert r["new_tokens"] == 10 and len(r["token_ids"]) == 10 and r["tokens_per_second"] > 0
    loaded = models.load(str(src))
    prompt = torch.tensor([loaded.tokenizer("the river", add_special_tokens=False)["input_ids"]])
    want = torch_greedy(loaded.model, prompt, 10)[0, prompt.shape[1]:].tolist()
    assert r["token_ids"] == want
    assert r["text"] == "the river" + loaded.tokenizer.decode(want, skip_special_tokens=True)
    sampled = generate_text(tmp_path / "onnx", "the river", max_new_tokens=10, temperature=1.5, seed=1,
                            stop_at_eos=False)
    assert sampled["token_ids"] != want
    with pytest.raises(CompressError, match="must not be empty"):
        generate_text(tmp_path / "onnx", "")

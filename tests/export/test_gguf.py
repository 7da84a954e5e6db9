"""GGUF export and llama.cpp mixes through the CLI, and the gptq-int -> GGUF mapping (every file
written here is read back: tests/export/gguf_helpers.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.export.gguf_helpers import _READ_BACK, _assert_llama_cpp_bytes, _logits, _plan_types, _reader, _source_weight, _tensor, check_model_round_trip
from tests.test_cli import assert_clean_error, run


def test_round_trip_check_sees_a_difference(f32_gguf, tiny_llama):
    """The round-trip check passes on the real declaration of a written file and fails on a
    declaration that differs in one value, one type, or one name."""
    from compress import models
    from compress.export.gguf import GGMLTensor, HParams, model_tensors
    assert str(f32_gguf) in _READ_BACK
    m = models.load(str(tiny_llama))
    hp = HParams.from_config(m.model.config)
    tensors = [GGMLTensor(n, "F32", tuple(w.shape), w) for n, w in model_tensors(m.model, m.arch).items()]
    assert check_model_round_trip(f32_gguf, [], tensors, hp) == []
    t = tensors[3]
    changed = t.data.clone()
    changed.view(-1)[5] += 1e-3
    for wrong in (GGMLTensor(t.name, "F32", t.shape, changed), GGMLTensor(t.name, "F16", t.shape, t.data),
                  GGMLTensor(t.name.replace("attn", "xattn"), "F32", t.shape, t.data)):
        problems = check_model_round_trip(f32_gguf, [], tensors[:3] + [wrong] + tensors[4:], hp)
        assert len(problems) == 1 and (t.name in problems[0] or "first difference at #3" in problems[0]), problems


# --------------------------------------------------------------------------------------------
# export of an unquantized model
# --------------------------------------------------------------------------------------------

def test_f32_export_layout(f32_gguf, tiny_llama):
    r = _reader(f32_gguf)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert f["general.file_type"] == 0 and f["general.quantization_version"] == 2
    cfg = json.loads((tiny_llama / "config.json").read_text())
    assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == 96
    assert f["llama.feed_forward_length"] == 192 and f["llama.context_length"] == 1024
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 24 and f["llama.vocab_size"] == 320
    theta = cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"]   # 4.57 / 5.x
    assert f["llama.rope.freq_base"] == pytest.approx(theta)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    # tokenizer derived from tokenizer.json: byte-level BPE
    tj = json.loads((tiny_llama / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    toks = f["tokenizer.ggml.tokens"]
    assert len(toks) == 320 and toks[:300] == sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    assert toks[300] == "[PAD300]" and f["tokenizer.ggml.token_type"][300] == 5
    assert f["tokenizer.ggml.token_type"][0] == 3 and f["tokenizer.ggml.token_type"][50] == 1
    assert f["tokenizer.ggml.merges"][:2] == [" ".join(m) for m in tj["model"]["merges"][:2]]
    assert f["tokenizer.ggml.eos_token_id"] == 0 and f["tokenizer.ggml.add_bos_token"] is False
    names = [t.name for t in r.tensors]
    assert names[0] == "token_embd.weight" and names[-1] == "output_norm.weight"
    assert "output.weight" not in names                      # tied embeddings
    want = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    assert {n.split(".")[2] for n in names if n.startswith("blk.0.")} == want
    shapes = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    assert shapes["blk.0.attn_k.weight"] == ("F32", [96, 48])     # ggml ne: (cols, rows)
    assert shapes["blk.1.ffn_down.weight"] == ("F32", [192, 96])
    assert shapes["blk.0.attn_norm.weight"] == ("F32", [96])


def test_f32_export_permutes_qk_and_loads_exactly(f32_gguf, tiny_llama):
    from safetensors.torch import load_file

    from compress.export.gguf import permute_qk
    src = load_file(str(tiny_llama / "model.safetensors"))
    r = _reader(f32_gguf)
    t = {x.name: np.array(x.data) for x in r.tensors}
    q = src["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(t["blk.0.attn_q.weight"], permute_qk(q, 4, 4).numpy())
    assert not np.array_equal(t["blk.0.attn_q.weight"], q.numpy())
    assert np.array_equal(t["blk.0.attn_k.weight"], permute_qk(src["model.layers.0.self_attn.k_proj.weight"], 4, 2).numpy())
    assert np.array_equal(t["blk.0.attn_v.weight"], src["model.layers.0.self_attn.v_proj.weight"].numpy())
    ids = torch.randint(0, 300, (1, 48))
    assert torch.equal(_logits(f32_gguf, ids), _logits(tiny_llama, ids))


def test_gguf_tokenizer_round_trip(f32_gguf, tiny_llama):
    from compress import models
    text = "the river of the north album was the first city"
    a = models.load(str(tiny_llama)).tokenizer(text, add_special_tokens=False)["input_ids"]
    b = models.load(str(f32_gguf)).tokenizer(text, add_special_tokens=False)["input_ids"]
    assert a == b


def test_q8_0_export_close_logits_and_eval(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "q8.gguf"
    res = run(["export", "gguf", tiny_llama, "--type", "Q8_0", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert len(types) == 20 and {v for k, v in types.items() if "norm" not in k} == {"Q8_0"}
    assert {v for k, v in types.items() if "norm" in k} == {"F32"}
    assert r.fields["general.file_type"].contents() == 7                          # LLAMA_FTYPE_MOSTLY_Q8_0
    _assert_llama_cpp_bytes(r, "blk.1.ffn_down.weight", _source_weight(tiny_llama, "model.layers.1.mlp.down_proj.weight"),
                            "Q8_0")
    _assert_llama_cpp_bytes(r, "token_embd.weight", _source_weight(tiny_llama, "model.embed_tokens.weight"), "Q8_0")
    ids = torch.randint(0, 300, (1, 48))
    a, b = _logits(tiny_llama, ids), _logits(out, ids)
    assert not torch.equal(a, b) and float((a - b).abs().max()) < 0.15
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", tiny_llama, "--max-windows", 2, "--data-dir", tiny_data, "--json", js])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    assert r["kind"] == "gguf" and r["kld"] < 1e-3 and r["gguf_file_type"] == "Q8_0"
    assert r["bits_per_weight"] == pytest.approx(8.5)


# --------------------------------------------------------------------------------------------
# mixes through `compress quantize --method kquant`
# --------------------------------------------------------------------------------------------

def test_quantize_q4_k_m_mix_and_inspect(tiny_llama, tmp_path):
    from compress.formats import kquants
    from compress.formats.ggml_mix import select_types
    out = tmp_path / "q4km.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    plan = select_types([(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors],
                        "Q4_K_M", n_layer=2, n_head=4, n_head_kv=2)
    assert types == {n: c.type for n, c in plan.items()}
    # 2 layers: use_more_bits(i, 2) holds for i >= 7*2/8 = 1 only -> layer 1's attn_v and ffn_down want
    # Q6_K and fall back to Q8_0 at 96/192 columns; layer 0's want Q4_K -> Q5_0
    assert types["blk.1.attn_v.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_v.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "Q5_0"
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["token_embd.weight"] == "Q8_0"
    assert r.fields["general.file_type"].contents() == 15
    # the stored bytes are llama.cpp's quantizer output for the (permuted) rows
    from safetensors.torch import load_file
    w = load_file(str(tiny_llama / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    t = next(x for x in r.tensors if x.name == "blk.1.ffn_up.weight")
    assert np.array_equal(np.array(t.data).reshape(-1), kquants.quantize(w, "Q5_0").numpy().reshape(-1))
    # transformers' GGUF loader (our `models.load`) and our own decoders agree bit for bit
    from compress import models
    from compress.formats.gguf_tensors import read_gguf_weights
    sd = models.load(str(out)).model.state_dict()
    mine = read_gguf_weights(out)
    assert set(mine) == set(sd) - {"lm_head.weight"}
    assert all(torch.equal(mine[k], sd[k]) for k in mine)
    res = run(["inspect", out])
    assert res.exit_code == 0 and "fallback Q4_K->Q5_0" in res.output and "Q4_K_M" in res.output
    info = json.loads(run(["inspect", out, "--json"]).output)
    assert info["type_counts"] == {"Q8_0": 3, "Q5_0": 12}
    assert 5.5 < info["bits_per_weight_matrices"] < 8.5


def test_quantize_pure_and_legacy(tiny_llama, tmp_path):
    from compress.export.gguf import permute_qk
    out = tmp_path / "p.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--pure", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == _plan_types(r, "Q4_K_M", pure=True)
    assert {v for k, v in types.items() if "norm" not in k} == {"Q5_0"}   # Q4_K, falling back at 96/192 columns
    assert r.fields["compress.pure"].contents() is True and r.fields["general.file_type"].contents() == 15
    gate = _source_weight(tiny_llama, "model.layers.1.mlp.gate_proj.weight")
    _assert_llama_cpp_bytes(r, "blk.1.ffn_gate.weight", gate, "Q5_0")
    q = _source_weight(tiny_llama, "model.layers.0.self_attn.q_proj.weight")
    _assert_llama_cpp_bytes(r, "blk.0.attn_q.weight", permute_qk(q, 4, 4), "Q5_0")   # rows in llama.cpp's order
    norm = _source_weight(tiny_llama, "model.layers.0.input_layernorm.weight")
    assert np.array_equal(np.array(_tensor(r, "blk.0.attn_norm.weight").data), norm.numpy())
    out = tmp_path / "q41.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_1", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == _plan_types(r, "Q4_1")
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert r.fields["compress.pure"].contents() is False and r.fields["general.file_type"].contents() == 3
    v = _source_weight(tiny_llama, "model.layers.0.self_attn.v_proj.weight")
    _assert_llama_cpp_bytes(r, "blk.0.attn_v.weight", v, "Q4_1")
    _assert_llama_cpp_bytes(r, "token_embd.weight", _source_weight(tiny_llama, "model.embed_tokens.weight"), "Q8_0")


def test_gptq_gguf(tiny_llama, tiny_data, tmp_path):
    """GPTQ onto the Q3_K_M mix: llama.cpp's types, GPTQ on every block linear (llama.cpp's own
    quantizer on the rest), weights gguf-py decodes as we do, and on the first block's inputs less
    than half the output error of llama.cpp's round-to-nearest with the same types."""
    from calib.data import CalibSpec, calibration_windows

    from gguf import quants as gguf_quants

    from compress import models
    from compress.formats.gguf_tensors import read_gguf_weights, unpermute_qk
    from compress.formats import kquants
    out = tmp_path / "g.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant-gptq", "--type", "Q3_K_M", "--nsamples", 4, "--seqlen", 64,
               "--data-dir", tiny_data, "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == _plan_types(r, "Q3_K_M")
    assert r.fields["compress.method"].contents() == "gptq" and r.fields["general.file_type"].contents() == 12
    notes = dict(n.split("=", 1) for n in r.fields["compress.tensor_notes"].contents())
    linears = [n for n in types if n.startswith("blk.") and "norm" not in n]
    assert len(linears) == 14 and all(notes.get(n, "").startswith("gptq") for n in linears), notes
    assert not notes.get("token_embd.weight", "").startswith("gptq")
    _assert_llama_cpp_bytes(r, "token_embd.weight", _source_weight(tiny_llama, "model.embed_tokens.weight"),
                            types["token_embd.weight"])
    ours = read_gguf_weights(out)
    base = models.load(str(tiny_llama))
    wins = calibration_windows(base.tokenizer, CalibSpec("wikitext2", 4, 64, 0), tiny_data)
    xs = {}
    mods = {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj",
            "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj"}
    hooks = [base.model.get_submodule(m).register_forward_hook(
        lambda mod, a, o, m=m: xs.setdefault(m, []).append(a[0].reshape(-1, a[0].shape[-1]))) for m in mods.values()]
    with torch.no_grad():
        for w in wins:
            base.model(w[None])
    for h in hooks:
        h.remove()
    for gname, mname in mods.items():
        w = base.model.get_submodule(mname).weight.detach()
        x = torch.cat(xs[mname]).double()
        g = ours[mname + ".weight"]
        rtn = kquants.dequantize(kquants.quantize(w, types[gname]).reshape(-1), types[gname], tuple(w.shape))
        assert not torch.equal(g, rtn), gname
        err_gptq = float(((x @ (g.double() - w.double()).t()) ** 2).sum())
        err_rtn = float(((x @ (rtn.double() - w.double()).t()) ** 2).sum())
        assert err_gptq < 0.5 * err_rtn, (gname, err_gptq, err_rtn)      # about 0.25 here
        # gguf-py's decoder (llama.cpp's, in numpy) reads the same weights from the file
        t = _tensor(r, gname)
        outside = torch.from_numpy(gguf_quants.dequantize(np.array(t.data), t.tensor_type).copy())
        if "attn_q" in gname:
            outside = unpermute_qk(outside, 4, 4)
        assert torch.equal(outside, g), gname
    ids = torch.randint(0, 300, (1, 32))
    assert torch.isfinite(_logits(out, ids)).all()


# --------------------------------------------------------------------------------------------
# gptq-int checkpoints -> GGUF
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,sym,gtype,exact", [
    ("4", "32", True, "Q4_0", True), ("4", "64", False, "Q4_1", False), ("3", "32", False, "Q4_0", True),
    ("8", "-1", True, "Q8_0", True), ("2", "96", True, "Q4_0", True)])
def test_export_gptq_int_maps_integers(tiny_llama, tmp_path, bits, group, sym, gtype, exact):
    from compress import models
    from compress.qlinear import QuantLinear
    ck = tmp_path / "ck"
    res = run(["quantize", tiny_llama, "--bits", bits, "--group-size", group, "--sym" if sym else "--asym", "-o", ck])
    assert res.exit_code == 0, res.output
    out = tmp_path / "ck.gguf"
    res = run(["export", "gguf", ck, "-o", out])
    assert res.exit_code == 0, res.output
    packed = models.load(str(ck))
    gg = models.load(str(out))
    r = _reader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_up.weight"] == gtype and types["token_embd.weight"] == "F16"
    worst = 0.0
    for name, mod in packed.model.named_modules():
        if isinstance(mod, QuantLinear):
            a = mod.dequantize()
            b = gg.model.get_submodule(name).weight.detach()
            if exact:
                assert torch.equal(a, b), name
            worst = max(worst, float(((a - b).abs() / a.abs().max()).max()))
    if not exact:     # only m = -scale*zero is rounded to fp16: a relative 2^-11 of |m|
        assert 0 < worst < 2 ** -10
    ids = torch.randint(0, 300, (1, 32))
    la, lb = _logits(ck, ids), _logits(out, ids)
    assert float((la - lb).abs().max()) < (1e-3 if exact else 2e-2)


def test_export_gptq_int_without_gguf_equivalent(tiny_llama, tmp_path):
    ck = tmp_path / "ck8"
    assert run(["quantize", tiny_llama, "--bits", "8", "--group-size", "32", "--asym", "-o", ck]).exit_code == 0
    assert_clean_error(run(["export", "gguf", ck, "-o", tmp_path / "x.gguf"]), "no gguf equivalent", "--type")
    assert not (tmp_path / "x.gguf").exists()
    res = run(["export", "gguf", ck, "--type", "Q8_0", "-o", tmp_path / "x.gguf"])
    assert res.exit_code == 0, res.output
    assert "requantized" in res.output
    # re-quantized: llama.cpp's Q8_0 of the checkpoint's dequantized weights, not of the original ones
    from compress import models
    r = _reader(tmp_path / "x.gguf")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == _plan_types(r, "Q8_0") and types["blk.0.ffn_up.weight"] == "Q8_0"
    w = models.load(str(ck)).model.get_submodule("model.layers.0.mlp.up_proj").dequantize(torch.float32)
    _assert_llama_cpp_bytes(r, "blk.0.ffn_up.weight", w, "Q8_0")
    assert not torch.equal(w, _source_weight(tiny_llama, "model.layers.0.mlp.up_proj.weight"))
    ck = tmp_path / "ck48"
    assert run(["quantize", tiny_llama, "--bits", "4", "--group-size", "48", "-o", ck]).exit_code == 0
    assert_clean_error(run(["export", "gguf", ck, "-o", tmp_path / "y.gguf"]), "spans several scale groups")



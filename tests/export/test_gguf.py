"""GGUF export, llama.cpp mixes through the CLI, importance matrices, gptq-int -> GGUF mapping.

Every GGUF written while this module runs (through the CLI, the API or a test; model files and
imatrix files) is read back with gguf's ``GGUFReader`` as soon as it is written and compared with
what our writer was handed: see ``_read_back_every_gguf``.
"""
from __future__ import annotations

import inspect
import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny
from tests.llamacpp import dry_run_types, llama_bin
from tests.test_cli import assert_clean_error, run


def _reader(path):
    from gguf import GGUFReader
    return GGUFReader(str(path))


# --------------------------------------------------------------------------------------------
# round trip: every GGUF written here is read back
# --------------------------------------------------------------------------------------------

_READ_BACK: list[str] = []           # files read back so far
_ROUND_TRIP_PROBLEMS: list[str] = []


def _field_matches(f, kv) -> bool:
    from gguf import GGUFValueType as T
    if f.types[0] != kv.vtype or (kv.sub_type is not None and f.types[-1] != kv.sub_type):
        return False
    got = f.contents()
    if kv.vtype == T.FLOAT32:
        return np.float32(got) == np.float32(kv.value)
    if kv.vtype == T.ARRAY:
        return list(got) == list(kv.value)
    return got == kv.value


def check_model_round_trip(path, kvs, tensors, hp) -> list[str]:
    """What gguf's reader finds in a model GGUF against what ``write_gguf`` was handed: the same
    tensors in the same order, with the same GGML types, (rows, cols) shapes and bytes (q/k rows
    permuted as llama.cpp's converter does), and every key with its type and value."""
    from compress.export.gguf import permute_qk
    r = _reader(path)
    got = [(t.name, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    want = [(t.name, t.type, tuple(int(x) for x in t.shape)) for t in tensors]
    if got != want:
        bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        return [f"{path}: {len(got)} tensors read, {len(want)} written; first difference at #{bad}: "
                f"read {got[bad] if bad < len(got) else None}, written {want[bad] if bad < len(want) else None}"]
    problems = []
    for t, rt in zip(tensors, r.tensors):
        data = t.data
        if re.search(r"\.attn_q\.(weight|bias)$", t.name):
            data = permute_qk(data, hp.n_head, hp.n_head)
        elif re.search(r"\.attn_k\.(weight|bias)$", t.name):
            data = permute_qk(data, hp.n_head, hp.n_head_kv)
        dtype = {"F32": torch.float32, "F16": torch.float16}.get(t.type, torch.uint8)
        if np.array(rt.data).tobytes() != data.detach().cpu().contiguous().to(dtype).numpy().tobytes():
            problems.append(f"{path}: the bytes of {t.name} ({t.type}) differ from those written")
    if r.fields["general.architecture"].contents() != "llama":
        problems.append(f"{path}: general.architecture is {r.fields['general.architecture'].contents()!r}")
    for kv in kvs:
        if kv.key != "general.architecture" and (kv.key not in r.fields or not _field_matches(r.fields[kv.key], kv)):
            problems.append(f"{path}: key {kv.key} was not read back as written")
    return problems


def check_imatrix_round_trip(path, im) -> list[str]:
    """An imatrix GGUF read back: per entry (in name order) ``<name>.in_sum2`` (1 x n) and
    ``<name>.counts`` (1 x 1), F32, holding the sums and counts written; the dataset and chunk keys."""
    r = _reader(path)
    want, vals = [], []
    for name in sorted(im.sums):
        s = im.sums[name].to(torch.float32).reshape(1, -1)
        want += [(f"{name}.in_sum2", "F32", tuple(s.shape)), (f"{name}.counts", "F32", (1, 1))]
        vals += [s.numpy(), np.array([[im.counts[name]]], dtype=np.float32)]
    got = [(t.name, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    if got != want:
        return [f"{path}: imatrix tensors read {got[:2]}..., written {want[:2]}..."]
    problems = [f"{path}: the values of {t.name} differ from those written"
                for t, v in zip(r.tensors, vals) if np.array(t.data).tobytes() != v.tobytes()]
    f = r.fields
    if (f["general.type"].contents() != "imatrix"
            or f["imatrix.datasets"].contents() != (list(im.datasets) or ["unknown"])
            or f["imatrix.chunk_count"].contents() != im.chunk_count
            or f["imatrix.chunk_size"].contents() != im.chunk_size):
        problems.append(f"{path}: imatrix keys not read back as written")
    return problems


def _record(path, check) -> None:
    try:
        problems = check()
    except Exception as e:  # noqa: BLE001 - a file the reader cannot read is a round-trip failure
        problems = [f"{path}: read back failed: {type(e).__name__}: {e}"]
    _READ_BACK.append(str(path))
    _ROUND_TRIP_PROBLEMS.extend(problems)


@pytest.fixture(scope="module", autouse=True)
def _read_back_every_gguf():
    """Wrap both GGUF writers (models: ``compress.export.gguf.write_gguf``; importance matrices:
    ``compress.imatrix.write_gguf``) so that each file they finish is read back and compared."""
    from compress import imatrix as imx
    from compress.export import gguf as gx
    write_model, write_imatrix = gx.write_gguf, imx.write_gguf
    sig = inspect.signature(write_model)

    def model(*args, **kwargs):
        out = write_model(*args, **kwargs)
        a = sig.bind(*args, **kwargs).arguments
        _record(a["path"], lambda: check_model_round_trip(a["path"], a["kvs"], a["tensors"], a["hp"]))
        return out

    def imatrix(path, im):
        out = write_imatrix(path, im)
        _record(path, lambda: check_imatrix_round_trip(path, im))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gx, "write_gguf", model)
        mp.setattr(imx, "write_gguf", imatrix)
        yield


@pytest.fixture(autouse=True)
def _round_trips_hold():
    yield
    problems, _ROUND_TRIP_PROBLEMS[:] = list(_ROUND_TRIP_PROBLEMS), []
    assert not problems, "GGUF round trip: " + "; ".join(problems)


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


def _logits(spec, ids):
    from compress import models
    m = models.load(str(spec))
    with torch.no_grad():
        return m.model(ids).logits


def _source_weight(folder, name):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))[name]


def _tensor(r, name):
    return next(t for t in r.tensors if t.name == name)


def _assert_llama_cpp_bytes(r, name, w, type_name):
    """The tensor ``name`` of reader ``r`` holds llama.cpp's quantization of ``w`` (rows in file order)."""
    from compress.formats import kquants
    t = _tensor(r, name)
    assert t.tensor_type.name == type_name, (name, t.tensor_type.name)
    assert np.array_equal(np.array(t.data).reshape(-1), kquants.quantize(w, type_name).numpy().reshape(-1)), name


def _plan_types(r, mix, **kw):
    from compress.formats.ggml_mix import select_types
    shapes = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    return {n: c.type for n, c in select_types(shapes, mix, n_layer=2, n_head=4, n_head_kv=2, **kw).items()}


@pytest.fixture(scope="module")
def f32_gguf(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    res = run(["export", "gguf", tiny_llama, "--type", "F32", "-o", out])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def imatrix_file(tiny_llama, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    res = run(["imatrix", tiny_llama, "--nsamples", 4, "--seqlen", 64, "--data-dir", tiny_data, "-o", out])
    assert res.exit_code == 0, res.output
    return out


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
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
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
# importance matrix
# --------------------------------------------------------------------------------------------

def test_imatrix_gguf_layout_matches_llama_cpp(imatrix_file, tiny_llama, tiny_data):
    from calib.data import CalibSpec, calibration_windows

    from compress import models
    r = _reader(imatrix_file)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.type"] == "imatrix" and "general.architecture" not in f
    assert f["imatrix.datasets"] == ["wikitext2"] and f["imatrix.chunk_count"] == 4 and f["imatrix.chunk_size"] == 64
    assert r.fields["imatrix.chunk_count"].types[0].name == "UINT32"
    names = [t.name for t in r.tensors]
    # llama-imatrix: entries in name order, each as <name>.in_sum2 then <name>.counts
    entries = [n.removesuffix(".in_sum2") for n in names[0::2]]
    assert len(entries) == 2 * 7 and entries == sorted(entries)
    assert names[0::2] == [e + ".in_sum2" for e in entries] and names[1::2] == [e + ".counts" for e in entries]
    t = {x.name: x for x in r.tensors}
    assert [int(s) for s in t["blk.0.attn_q.weight.in_sum2"].shape] == [96, 1]
    assert [int(s) for s in t["blk.1.ffn_down.weight.in_sum2"].shape] == [192, 1]
    assert [int(s) for s in t["blk.0.attn_q.weight.counts"].shape] == [1, 1]
    assert {x.tensor_type.name for x in r.tensors} == {"F32"}
    assert float(np.array(t["blk.0.ffn_up.weight.counts"].data).reshape(-1)[0]) == 4 * 64
    # in_sum2 = sum of x^2 over every token at the layer's input, computed here independently
    m = models.load(str(tiny_llama))
    wins = calibration_windows(m.tokenizer, CalibSpec("wikitext2", 4, 64, 0), tiny_data)
    acc = {}

    def hook(name):
        def h(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc[name] = acc.get(name, 0) + (x * x).sum(0)
        return h

    mods = {"blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj",
            "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj",
            "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj"}
    hs = [m.model.get_submodule(v).register_forward_hook(hook(k)) for k, v in mods.items()]
    with torch.no_grad():
        for w in wins:
            m.model(w[None])
    for h in hs:
        h.remove()
    for k in mods:
        got = np.array(t[k + ".in_sum2"].data).reshape(-1)
        assert np.allclose(got, acc[k].numpy(), rtol=1e-4, atol=1e-6), k
    assert np.array_equal(np.array(t["blk.0.attn_q.weight.in_sum2"].data), np.array(t["blk.0.attn_v.weight.in_sum2"].data))


def test_imatrix_round_trip_gguf_and_legacy(imatrix_file, tmp_path):
    from compress import imatrix as imx
    a = imx.read(imatrix_file)
    assert not a.legacy and len(a.sums) == 14
    dat = imx.write(tmp_path / "im.dat", a)
    b = imx.read(dat)
    assert b.legacy and b.chunk_count == 4 and b.datasets == ["wikitext2"]
    ia, ib = a.importance(), b.importance()
    assert set(ia) == set(ib)
    for k in ia:
        assert torch.allclose(ia[k], ib[k], rtol=1e-6)
    # legacy layout, byte by byte for the first entry
    raw = dat.read_bytes()
    n, ln = struct.unpack("<ii", raw[:8])
    name = raw[8:8 + ln].decode()
    ncall, nval = struct.unpack("<ii", raw[8 + ln:16 + ln])
    assert n == 14 and name == sorted(a.sums)[0] and ncall == 4 and nval == a.sums[name].numel()
    vals = np.frombuffer(raw[16 + ln:16 + ln + 4 * nval], dtype="<f4")
    assert np.allclose(vals, (a.sums[name] / a.counts[name] * 4).numpy())
    c = imx.read(imx.write(tmp_path / "again.gguf", b))
    for k in ia:
        assert torch.allclose(c.importance()[k], ia[k], rtol=1e-6)
    mods = a.by_module()
    assert set(mods) >= {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}


def test_quantize_with_imatrix_uses_it(tiny_llama, imatrix_file, tmp_path):
    from safetensors.torch import load_file

    from compress import imatrix as imx
    from compress.export.gguf import permute_qk
    from compress.formats import kquants
    out = tmp_path / "im.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_S", "--imatrix", imatrix_file, "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    assert r.fields["compress.imatrix"].contents() == imatrix_file.name
    imp = imx.read(imatrix_file).importance()["blk.1.attn_q.weight"]
    w = load_file(str(tiny_llama / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    t = next(x for x in r.tensors if x.name == "blk.1.attn_q.weight")
    want = permute_qk(kquants.quantize(w, "Q5_0", imp), 4, 4)
    assert np.array_equal(np.array(t.data), want.numpy())
    assert not np.array_equal(np.array(t.data), permute_qk(kquants.quantize(w, "Q5_0"), 4, 4).numpy())


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


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def test_bad_inputs(tiny_llama, imatrix_file, tmp_path):
    o = tmp_path / "o.gguf"
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q7_K", "-o", o]), "unknown gguf type")
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant", "-o", o]), "--type is required")
    assert_clean_error(run(["quantize", tiny_llama, "--method", "rtn", "--type", "Q4_K_M", "-o", o]),
                       "--type applies to kquant, kquant-gptq, not to rtn")
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--bits", "3", "-o", o]),
                       "--bits")
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "-o", tmp_path / "x"]),
                       ".gguf")
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--imatrix",
                            tmp_path / "missing.gguf", "-o", o]), "does not exist")
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant-gptq", "--type", "Q4_K_M", "--imatrix",
                            imatrix_file, "-o", o]), "--imatrix applies to kquant, not to kquant-gptq")
    assert_clean_error(run(["quantize", tiny_llama, "--imatrix", imatrix_file, "-o", tmp_path / "ck"]), "--imatrix")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x05\x00\x00\x00\x10\x00\x00\x00blk.0.attn")          # truncated legacy file
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--imatrix", bad, "-o", o]),
                       "corrupt imatrix")
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(7))                     # truncated GGUF
    assert_clean_error(run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--imatrix", bad, "-o", o]),
                       "corrupt imatrix")
    assert not o.exists() and not any(p.name.startswith(".o.gguf") for p in tmp_path.iterdir())



def _imatrix_offsets(path: Path) -> dict[str, int]:
    """Byte offsets of two lengths in a well-formed imatrix GGUF, from gguf's reader (not from the suite)."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    ds = r.fields["imatrix.datasets"]
    return {"datasets array length": ds.offset + 8 + len("imatrix.datasets") + 4 + 4,   # key, type, item type
            "tensor name length": r.tensors[0].field.offset}


# (length, byte within it, xor, what the message must name). Without the structure check both ended in
# gguf's reader failing with "index 0 is out of bounds for axis 0 with size 0" (reading past the end).
IMATRIX_FLIPS = [
    ("datasets array length", 5, 0xFF, ("array 'imatrix.datasets' claims",)),
    ("tensor name length", 2, 0xFF, ("name of tensor 1 of", "runs past the end of the file")),
]


@pytest.mark.parametrize("field,byte,xor,needles", IMATRIX_FLIPS, ids=[f[0] for f in IMATRIX_FLIPS])
def test_imatrix_with_a_flipped_length_byte(tiny_llama, imatrix_file, tmp_path, field, byte, xor, needles):
    data = bytearray(imatrix_file.read_bytes())
    data[_imatrix_offsets(imatrix_file)[field] + byte] ^= xor
    bad = tmp_path / "flipped-imatrix.gguf"
    bad.write_bytes(bytes(data))
    o = tmp_path / "o.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--imatrix", bad, "-o", o])
    assert_clean_error(res, f"corrupt imatrix file {bad}", *needles)
    assert "out of bounds" not in res.output
    assert not o.exists() and not any(p.name.startswith(".o.gguf") for p in tmp_path.iterdir())

def test_imatrix_of_another_model_and_model_gguf_as_imatrix(tiny_llama, f32_gguf, tmp_path):
    other = build_tiny(tmp_path / "wide", hidden=128, ffn=256)
    im = tmp_path / "wide.gguf"
    from compress import imatrix as imx
    d = imx.IMatrix(sums={"blk.0.attn_q.weight": torch.ones(128)}, counts={"blk.0.attn_q.weight": 10.0},
                    datasets=["x"], chunk_count=1, chunk_size=10)
    imx.write(im, d)
    o = tmp_path / "o.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--imatrix", im, "-o", o])
    assert_clean_error(res, "blk.0.attn_q.weight", "128 values", "96 columns")
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--imatrix", f32_gguf, "-o", o])
    assert_clean_error(res, "not an imatrix file")
    d = imx.IMatrix(sums={"enc.0.fc.weight": torch.ones(96)}, counts={"enc.0.fc.weight": 10.0}, datasets=["x"])
    imx.write(im, d)
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", "Q4_K_M", "--imatrix", im, "-o", o])
    assert_clean_error(res, "no entry for any tensor")
    assert other.is_dir() and not o.exists()


def test_rows_not_multiple_of_32(tmp_path):
    """hidden 72: llama.cpp stores such tensors F16 (no 32-block fits); gptq-int export refuses."""
    src = build_tiny(tmp_path / "odd", hidden=72, ffn=160)
    out = tmp_path / "odd.gguf"
    res = run(["quantize", src, "--method", "kquant", "--type", "Q4_K_M", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == _plan_types(r, "Q4_K_M")
    # 72 columns fit no block: F16; ffn_down's 160 columns fit 32-blocks: Q4_K -> Q5_0
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q5_0"
    v = _source_weight(src, "model.layers.0.self_attn.v_proj.weight")
    assert types["blk.0.attn_v.weight"] == "F16"
    assert np.array_equal(np.array(_tensor(r, "blk.0.attn_v.weight").data), v.to(torch.float16).numpy())
    down = _source_weight(src, "model.layers.0.mlp.down_proj.weight")
    _assert_llama_cpp_bytes(r, "blk.0.ffn_down.weight", down, "Q5_0")
    ck = tmp_path / "ck"
    assert run(["quantize", src, "--bits", "4", "--group-size", "-1", "--sym", "-o", ck]).exit_code == 0
    assert_clean_error(run(["export", "gguf", ck, "-o", tmp_path / "x.gguf"]), "not a multiple of 32")
    assert_clean_error(run(["imatrix", src, "--nsamples", 1, "--seqlen", 16, "-o", tmp_path / "i.gguf"],
                           env={"COMPRESS_DATA_DIR": str(tmp_path / "none")}), "does not exist")


def test_unsupported_architecture_for_gguf(tiny_opt, tmp_path):
    assert_clean_error(run(["export", "gguf", tiny_opt, "-o", tmp_path / "o.gguf"]), "GGUF export supports the model types", "qwen3", "opt")


# --------------------------------------------------------------------------------------------
# llama.cpp itself, when its tools are built (~/.cache/compress/llamacpp/build/bin)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_quantize():
    p = llama_bin("llama-quantize")
    if p is None:
        pytest.skip("llama.cpp's llama-quantize is not built (docs/GGUF.md says how)")
    return p


def test_llama_imatrix_file_reads_and_matches_ours(f32_gguf, tiny_llama, tmp_path):
    """llama-imatrix on our GGUF: we read its file, and its sums equal ours on the same tokens
    (its tokenizer, from our GGUF's keys, splits the text as transformers does)."""
    from compress import imatrix as imx
    from compress import models
    from tests.conftest import synthetic_text
    li = llama_bin("llama-imatrix")
    if li is None:
        pytest.skip("llama.cpp's llama-imatrix is not built")
    text = synthetic_text(3000, seed=5)
    (tmp_path / "t.txt").write_text(text)
    p = subprocess.run([str(li), "-m", str(f32_gguf), "-f", str(tmp_path / "t.txt"), "-c", "64", "--chunks", "3",
                        "-o", str(tmp_path / "lc.gguf")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    lc = imx.read(tmp_path / "lc.gguf")
    assert len(lc.sums) == 14 and lc.chunk_count == 3 and lc.chunk_size == 64
    m = models.load(str(tiny_llama))
    ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = imx.collect(m, torch.tensor(ids[:192]).view(3, 64), progress=False)
    assert set(ours.sums) == set(lc.sums)
    for k in lc.sums:
        assert lc.counts[k] == ours.counts[k] == 192
        a, b = lc.sums[k], ours.sums[k]
        assert float((a - b).abs().max() / b.abs().max()) < 1e-2, k


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M", "Q2_K"])
def test_llama_quantize_loads_our_file_and_our_imatrix(llama_quantize, f32_gguf, imatrix_file, tiny_llama, tmp_path,
                                                        mix):
    """llama-quantize reads our F32 GGUF and our imatrix, picks the types our plan picks, and writes
    tensors byte-identical to `compress quantize --method kquant` with the same imatrix."""
    from compress.formats.ggml_mix import select_types
    out = tmp_path / f"lc-{mix}.gguf"
    p = subprocess.run([str(llama_quantize), "--imatrix", str(imatrix_file), str(f32_gguf), str(out), mix],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "loaded 14 importance matrix entries" in (p.stdout + p.stderr)
    r = _reader(out)
    got = {t.name: t.tensor_type.name for t in r.tensors}
    plan = select_types([(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors], mix,
                        n_layer=2, n_head=4, n_head_kv=2, has_imatrix=True)
    assert got == {n: c.type for n, c in plan.items()}
    ours = tmp_path / "ours.gguf"
    res = run(["quantize", tiny_llama, "--method", "kquant", "--type", mix, "--imatrix", imatrix_file, "-o", ours])
    assert res.exit_code == 0, res.output
    mine = {t.name: np.array(t.data) for t in _reader(ours).tensors}
    for t in r.tensors:
        assert np.array_equal(np.array(t.data), mine[t.name]), t.name


# --------------------------------------------------------------------------------------------
# the real model (slow)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_q4_k_m(smollm2, real_data, tmp_path):
    """`compress quantize smollm2-135m --method kquant --type Q4_K_M`, then eval ppl on 2 windows.
    The file's metadata equals the original GGUF's (tokenizer included) except the file type."""
    from compress import models
    out = tmp_path / "x.gguf"
    res = run(["quantize", "smollm2-135m", "--method", "kquant", "--type", "Q4_K_M", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    counts = {}
    for t in r.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert counts == {"Q5_0": 166, "Q8_0": 15, "Q6_K": 14, "Q4_K": 16}
    src = _reader(models.source_gguf("smollm2-135m"))
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k == "general.file_type":
            continue
        assert k in r.fields, k
        assert r.fields[k].contents() == f.contents() and r.fields[k].types == f.types, k
    assert r.fields["general.file_type"].contents() == 15
    assert {t.name for t in r.tensors} == {t.name for t in src.tensors}
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", "smollm2-135m", "--max-windows", 2, "--data-dir", real_data, "--json", js])
    assert res.exit_code == 0, res.output
    rep = json.loads(js.read_text())
    assert rep["kind"] == "gguf" and rep["windows"] == 2
    assert 0 < rep["kld"] < 0.15 and rep["ppl"] < 1.2 * rep["base_ppl"]
    assert 6.0 < rep["bits_per_weight"] < 6.3


@pytest.mark.slow
def test_smollm2_llama_cpp_runs_our_gguf(smollm2, real_data, tmp_path):
    """llama.cpp's own evaluator loads and runs a GGUF we wrote (when its tools are built)."""
    lp = llama_bin("llama-perplexity")
    if lp is None:
        pytest.skip("llama.cpp's llama-perplexity is not built")
    out = tmp_path / "q8.gguf"
    assert run(["quantize", "smollm2-135m", "--method", "kquant", "--type", "Q8_0", "--pure", "-o", out]).exit_code == 0
    p = subprocess.run([str(lp), "-m", str(out), "-f", str(real_data / "wikitext-2-raw" / "test.joined.txt"),
                        "-c", "512", "--chunks", "2"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    import re
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout + p.stderr).group(1))
    assert 10 < ppl < 60


@pytest.mark.slow
def test_smollm2_types_equal_llama_quantize_dry_run(tmp_path):
    """On SmolLM2's 272 tensors, every mix (plain, --pure, with an imatrix) picks exactly the
    types `llama-quantize --dry-run` picks (when llama.cpp's tools are built)."""
    from compress import imatrix as imx
    from compress import models
    from compress.formats.ggml_mix import select_types
    lq = llama_bin("llama-quantize")
    src = models.source_gguf("smollm2-135m")
    if lq is None or src is None:
        pytest.skip("needs llama.cpp's llama-quantize and the cached SmolLM2 source GGUF")
    r = _reader(src)
    tensors = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors]
    im = tmp_path / "ones.gguf"        # any imatrix with every block linear (only its presence matters)
    names = [n for n, s in tensors if n.startswith("blk.") and len(s) == 2]
    shapes = dict(tensors)
    imx.write(im, imx.IMatrix(sums={n: torch.ones(shapes[n][1]) for n in names}, counts={n: 1.0 for n in names},
                              datasets=["ones"], chunk_count=1, chunk_size=1))
    for mix in ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
                "Q4_0", "Q4_1", "Q5_0", "Q5_1"]:
        for pure, use_im in ((False, False), (True, False), (False, True)):
            got = dry_run_types(lq, src, mix, tmp_path, pure, im if use_im else None)
            plan = select_types(tensors, mix, n_layer=30, n_head=9, n_head_kv=3, pure=pure, has_imatrix=use_im)
            assert got == {n: c.type for n, c in plan.items()}, (mix, pure, use_im)


@pytest.mark.parametrize("prefix", [True, False], ids=["llama2-style", "gemma-style"])
def test_sentencepiece_tokenizer_derived_from_tokenizer_json(prefix, tmp_path):
    """A SentencePiece BPE tokenizer.json (Llama 2 with its "▁" prefix, Gemma without, as
    transformers converts their tokenizer.model) becomes llama.cpp's ``llama`` tokenizer: scores
    from the merges' ranks, byte pieces BYTE, <unk> UNKNOWN, <s> and </s> CONTROL. transformers'
    GGUF tokenizer (which rebuilds the merges from the scores) and llama.cpp's own ``llama-tokenize``
    (when built) split text, byte fallback included, exactly as the original tokenizer does."""
    import ast

    from compress import models
    from tests.conftest import spm_tokenizer, synthetic_text
    tok = spm_tokenizer(prefix)
    out = tmp_path / "m.gguf"
    res = run(["export", "gguf", build_tiny(tmp_path / "m", "llama", tokenizer=tok), "--type", "F32", "-o", out])
    assert res.exit_code == 0, res.output
    r = _reader(out)
    field = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}
    assert field["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in field
    assert field["tokenizer.ggml.add_space_prefix"] is prefix and field["tokenizer.ggml.add_bos_token"] is False
    types, scores = field["tokenizer.ggml.token_type"], field["tokenizer.ggml.scores"]
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    made = [s for s in scores[259:] if s != 0]
    assert len(made) > 100 and made == sorted(made, reverse=True)       # pieces by id: merge order
    texts = [synthetic_text(80, seed=5), "naïve café, 123 € and  two  spaces", " a leading space", "x"]
    back = models.gguf_tokenizer(out)
    for t in texts:
        want = tok(t, add_special_tokens=False)["input_ids"]
        assert back(t, add_special_tokens=False)["input_ids"] == want, t
    lt = llama_bin("llama-tokenize")
    if lt is None:
        return
    for t in texts:
        p = subprocess.run([str(lt), "-m", str(out), "-p", t, "--ids", "--no-bos", "--log-disable"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-1000:]
        assert ast.literal_eval(p.stdout.strip().splitlines()[-1]) == tok(t, add_special_tokens=False)["input_ids"], t

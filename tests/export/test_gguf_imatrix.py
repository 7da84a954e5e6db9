"""Importance matrices, bad GGUF input, and llama.cpp's own tools reading what we write (every
file written here is read back: tests/export/gguf_helpers.py)."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny
from tests.llamacpp import llama_bin
from tests.export.gguf_helpers import _assert_llama_cpp_bytes, _plan_types, _reader, _source_weight, _tensor
from tests.test_cli import assert_clean_error, run


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



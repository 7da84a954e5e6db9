"""The CLI end to end on tiny random models, and every bad input it must refuse cleanly."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli


def run(args, env=None):
    res = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=True)
    return res


def assert_clean_error(res, *needles):
    """Non-zero exit, a one-line 'Error:' message naming the problem, no traceback."""
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    out = res.output.strip()
    assert "Traceback" not in out
    err_lines = [l for l in out.splitlines() if l.startswith("Error:")]
    assert len(err_lines) == 1, out
    for n in needles:
        assert n.lower() in err_lines[0].lower(), out


def no_leftovers(parent: Path, name: str):
    return not any(p.name.startswith(name) or p.name.startswith("." + name) for p in parent.iterdir())


@pytest.fixture(scope="module")
def q4(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q4"
    res = run(["quantize", tiny_llama, "--bits", "4", "--group-size", "64", "-o", out])
    assert res.exit_code == 0, res.output
    return out


def test_quantize_writes_gptq_layout(q4, tiny_llama):
    cfg = json.loads((q4 / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 64 and qc["sym"] is False
    assert qc["compress"]["format"] == "gptq-int" and qc["compress"]["format_version"] == 2
    from safetensors.torch import load_file
    t = load_file(str(q4 / "model.safetensors"))
    # hidden 96 = 64 + 32: two scale rows, the second for a narrower group
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (96 * 4 // 32, 96)
    assert t["model.layers.0.self_attn.q_proj.scales"].shape == (2, 96)
    assert t["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert t["model.layers.0.mlp.down_proj.g_idx"].dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in t
    assert (q4 / "tokenizer.json").is_file()


def test_loaded_checkpoint_matches_in_memory_quantization(q4, tiny_llama):
    """Reloading gives the model that was quantized: same logits, through packed modules."""
    from compress import api, models
    from compress.qlinear import QuantLinear
    mem = models.load(str(tiny_llama))
    api.quantize(mem, "rtn", progress=False, bits=4, group_size=64)
    disk = models.load(str(q4))
    assert disk.kind == "packed"
    assert sum(isinstance(m, QuantLinear) for m in disk.model.modules()) == 14
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        a = mem.model(ids).logits
        b = disk.model(ids).logits
    # the checkpoint stores the unquantized tensors (embeddings, norms) in float16
    assert torch.allclose(a, b, atol=2e-2, rtol=0)
    assert not torch.allclose(a, models.load(str(tiny_llama)).model(ids).logits, atol=1e-3)


def test_quant_linear_packed_equals_dequantized(q4):
    """The module's output through the dispatcher equals x @ dequantize(W).T."""
    from compress import models
    from compress.qlinear import QuantLinear
    from kernels import dispatch
    m = next(x for x in models.load(str(q4)).model.modules() if isinstance(x, QuantLinear))
    x = torch.randn(5, m.in_features)
    ref = x @ m.dequantize().t()
    with torch.no_grad():
        cached = m(x)
        m.cache_dequantized_on_cpu = False
        dispatch.reset_path_counts()
        direct = m(x)
    assert torch.allclose(cached, ref, atol=1e-5)
    assert torch.allclose(direct, ref, atol=1e-5)
    assert dispatch.path_counts("gptq")["torch"] == 1


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (4, 32, False), (3, 64, True), (2, 32, False)])
def test_quantize_settings_and_eval(tiny_llama, tiny_data, tmp_path, bits, group, sym):
    out = tmp_path / "q"
    res = run(["quantize", tiny_llama, "--bits", bits, "--group-size", group, "--sym" if sym else "--asym", "-o", out])
    assert res.exit_code == 0, res.output
    js = tmp_path / "r.json"
    res = run(["eval", "ppl", out, "--base", tiny_llama, "--max-windows", 3, "--data-dir", tiny_data, "--json", js])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    assert r["windows"] == 3 and r["tokens"] == 3 * 511 and r["protocol"] == "wt2-quick"
    assert math.isfinite(r["ppl"]) and r["kld"] >= 0 and 0 <= r["top1"] <= 1
    for key in ("model", "scheme", "seconds", "package_version", "text_tokens"):
        assert key in r
    if bits == 8:
        assert r["kld"] < 1e-3 and abs(r["ppl"] / r["base_ppl"] - 1) < 0.01
    if bits == 2:
        assert r["kld"] > 1e-3


def test_opt_family(tiny_opt, tiny_data, tmp_path):
    out = tmp_path / "q"
    res = run(["quantize", tiny_opt, "--bits", "8", "--group-size", "32", "-o", out])
    assert res.exit_code == 0, res.output
    res = run(["eval", "ppl", out, "--base", tiny_opt, "--max-windows", 2, "--data-dir", tiny_data])
    assert res.exit_code == 0, res.output
    assert "KLD" in res.output
    res = run(["inspect", out])
    assert res.exit_code == 0 and "fc1" in res.output and "out_proj" in res.output


def test_inspect(q4):
    res = run(["inspect", q4])
    assert res.exit_code == 0, res.output
    assert "gptq-int v2" in res.output and "rtn int4 g64 asym" in res.output
    res = run(["inspect", q4, "--json"])
    info = json.loads(res.output)
    assert len(info["layers"]) == 14
    # 4-bit values + fp16 scale and packed zero per 64 weights + g_idx
    assert 4.0 < info["bits_per_weight_quantized"] < 5.0


def test_report_and_gate(tiny_llama, q4, tiny_data, tmp_path):
    base_js, q_js = tmp_path / "base.json", tmp_path / "q.json"
    assert run(["eval", "ppl", tiny_llama, "--max-windows", 2, "--data-dir", tiny_data, "--json", base_js]).exit_code == 0
    assert run(["eval", "ppl", q4, "--max-windows", 2, "--data-dir", tiny_data, "--json", q_js]).exit_code == 0
    base, q = json.loads(base_js.read_text()), json.loads(q_js.read_text())
    increase = 100 * (q["ppl"] - base["ppl"]) / base["ppl"]
    md = tmp_path / "report.md"
    res = run(["report", base_js, q_js, "-o", md])
    assert res.exit_code == 0, res.output
    assert "fp32" in md.read_text() and f"{increase:+.2f}%" in md.read_text()
    assert json.loads(md.with_suffix(".json").read_text())["rows"][1]["ppl_increase_pct"] == pytest.approx(increase)
    # the gate: passes above the measured increase, fails below it
    assert run(["report", base_js, q_js, "-o", md, "--max-ppl-increase", abs(increase) + 1]).exit_code == 0
    if increase > 0:
        res = run(["report", base_js, q_js, "-o", md, "--max-ppl-increase", increase / 2])
        assert_clean_error(res, "regression")


def test_models_list():
    res = run(["models", "list"])
    assert res.exit_code == 0 and "smollm2-135m" in res.output


# --------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path):
    assert_clean_error(run(["quantize", tmp_path / "nope", "-o", tmp_path / "o"]), "no such file")
    assert not (tmp_path / "o").exists()


def test_unknown_model_name(tmp_path):
    assert_clean_error(run(["quantize", "gpt-17", "-o", tmp_path / "o"]), "unknown model name")
    assert_clean_error(run(["models", "fetch", "gpt-17"]), "unknown model name")


def test_corrupt_and_truncated_safetensors(tiny_llama, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_llama, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert_clean_error(run(["quantize", bad, "-o", tmp_path / "o"]), "truncated safetensors")
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_clean_error(run(["quantize", bad, "-o", tmp_path / "o"]), "corrupt safetensors")
    assert no_leftovers(tmp_path, "o")


def test_corrupt_gguf(tmp_path):
    g = tmp_path / "model.gguf"
    g.write_bytes(b"NOPE" + bytes(100))
    assert_clean_error(run(["quantize", g, "-o", tmp_path / "o"]), "corrupt gguf")
    g.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(5))
    assert_clean_error(run(["eval", "ppl", g]), "gguf")


def test_unsupported_architecture(tiny_llama, tmp_path):
    bad = tmp_path / "bert"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "bert", ["BertForMaskedLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run(["quantize", bad, "-o", tmp_path / "o"]), "unsupported architecture 'bert'")


@pytest.mark.parametrize("command", ["quantize", "prune", "qat", "imatrix"])
def test_an_unsupported_model_is_refused_before_torch_is_imported(command, tmp_path):
    """The console entry point reads the model's config.json first: the refusal comes before torch and
    transformers are imported (seconds), with the list of supported families, and nothing written."""
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "compress", command, str(bad),
                          "-o", str(tmp_path / "o")], capture_output=True, text=True)
    lines = res.stderr.splitlines()
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in lines if ln.startswith("import time:")}
    said = [ln for ln in lines if not ln.startswith("import time:")]
    assert res.returncode == 1, res.stderr
    assert len(said) == 1 and said[0].startswith("Error: unsupported architecture 'bert'; supported model types: ")
    assert "llama" in said[0] and "qwen3" in said[0]
    assert "torch" not in imported and "transformers" not in imported
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("group", ["0", "-2", "4096"])
def test_invalid_group_size(tiny_llama, tmp_path, group):
    res = run(["quantize", tiny_llama, "--group-size", group, "-o", tmp_path / "o"])
    assert_clean_error(res, "group size")
    assert no_leftovers(tmp_path, "o")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_inf_weights(tiny_llama, tmp_path, value):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "nan"
    shutil.copytree(tiny_llama, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 7] = float(value)
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    res = run(["quantize", bad, "--group-size", "32", "-o", tmp_path / "o"])
    assert_clean_error(res, "model.layers.1.mlp.up_proj", "nan or inf")
    assert no_leftovers(tmp_path, "o")


def test_nan_outside_the_linears_refused_for_gguf(tiny_llama, tmp_path):
    """A GGUF carries every tensor: a NaN in a norm is refused there (a packed checkpoint keeps
    norms as they are and only checks the linears it quantizes)."""
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "nan"
    shutil.copytree(tiny_llama, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.norm.weight"][5] = float("nan")
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    res = run(["quantize", bad, "--method", "kquant", "--type", "Q8_0", "-o", tmp_path / "o.gguf"])
    assert_clean_error(res, "model.norm.weight", "nan or inf")
    assert no_leftovers(tmp_path, "o.gguf")


@pytest.mark.parametrize("args", [["--bits", "5"], ["--method", "magic"], ["--dtype", "int4"]])
def test_unknown_option_values(tiny_llama, tmp_path, args):
    res = run(["quantize", tiny_llama, *args, "-o", tmp_path / "o"])
    assert res.exit_code == 2 and "Invalid value" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_unknown_protocol(tiny_llama):
    res = run(["eval", "ppl", tiny_llama, "--protocol", "lambada"])
    assert res.exit_code == 2 and "Invalid value" in res.output


def test_empty_text_file(tiny_llama, tmp_path):
    d = tmp_path / "data" / "wikitext-2-raw"
    d.mkdir(parents=True)
    (d / "test.joined.txt").write_text("  \n\n ")
    js = tmp_path / "r.json"
    assert_clean_error(run(["eval", "ppl", tiny_llama, "--data-dir", tmp_path / "data", "--json", js]), "empty")
    assert not js.exists()


def test_missing_data_dir(tiny_llama, tmp_path):
    assert_clean_error(run(["eval", "ppl", tiny_llama, "--data-dir", tmp_path / "none"]), "does not exist")
    res = run(["eval", "ppl", tiny_llama], env={"COMPRESS_DATA_DIR": ""})
    assert_clean_error(res, "COMPRESS_DATA_DIR")


def test_corrupt_results_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    assert_clean_error(run(["report", bad, "-o", tmp_path / "r.md"]), "not valid json")
    assert not (tmp_path / "r.md").exists()


def test_inspect_unquantized_folder(tiny_llama):
    assert_clean_error(run(["inspect", tiny_llama]), "not a quantized or pruned checkpoint")


def test_corrupt_packed_checkpoint(q4, tmp_path):
    bad = tmp_path / "badq"
    shutil.copytree(q4, bad)
    from safetensors.torch import load_file, save_file
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.scales"] = t["model.layers.0.self_attn.q_proj.scales"][:1]
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_error(run(["inspect", bad]), "scales has shape")


def test_quantize_refuses_packed_input(q4, tmp_path):
    assert_clean_error(run(["quantize", q4, "-o", tmp_path / "o"]), "already a quantized checkpoint")


def test_output_written_atomically_over_existing(tiny_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run(["quantize", tiny_llama, "--bits", "8", "-o", out, "--group-size", "32"]).exit_code == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


# --------------------------------------------------------------------------- damaged inputs, named in the user's terms

@pytest.fixture(scope="module")
def q8_gguf(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf"
    res = run(["export", "gguf", tiny_llama, "--type", "Q8_0", "-o", out])
    assert res.exit_code == 0, res.output
    return out


def _gguf_offsets(path: Path) -> dict[str, int]:
    """Byte offsets of a few fields of a well-formed GGUF, from gguf's reader (not from the suite)."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    tt = r.fields["tokenizer.ggml.token_type"]
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    name_end = emb.field.offset + 8 + len("token_embd.weight")
    return {
        "kv key length": r.fields["general.architecture"].offset,                       # u64 of the first key
        "array length": tt.offset + 8 + len("tokenizer.ggml.token_type") + 4 + 4,       # key, type, item type
        "tensor name length": emb.field.offset,
        "tensor rows": name_end + 4 + 8,                                                # n_dims, then ne[0], ne[1]
        "tensor offset": name_end + 4 + 2 * 8 + 4,                                      # after the dims and type
    }


# (field, byte within it, xor, what the one-line message must name). Before the structure check the
# first two ended in "index 0 is out of bounds for axis 0 with size 0" (gguf's reader reading past the
# end after a length that points outside the file), the array length hung the reader, the tensor rows
# gave "Error(s) in loading state_dict for Embedding" and the offset loaded shifted, wrong weights.
FLIPS = [
    ("kv key length", 2, 0xFF, ("key of key/value pair 1 of", "runs past the end of the file")),
    ("tensor name length", 2, 0xFF, ("name of tensor 1 of 20", "runs past the end of the file")),
    ("array length", 5, 0xFF, ("tokenizer.ggml.token_type", "claims")),
    ("tensor rows", 0, 0x01, ("token_embd.weight", "321 x 96")),
    ("tensor offset", 0, 0x40, ("token_embd.weight", "starts at data offset 64, not 0")),
]


@pytest.mark.parametrize("field,byte,xor,needles", FLIPS, ids=[f[0] for f in FLIPS])
def test_gguf_with_a_flipped_byte(q8_gguf, tiny_data, tmp_path, field, byte, xor, needles):
    data = bytearray(q8_gguf.read_bytes())
    data[_gguf_offsets(q8_gguf)[field] + byte] ^= xor
    bad = tmp_path / "flipped.gguf"
    bad.write_bytes(bytes(data))
    for args in (["inspect", bad], ["eval", "ppl", bad, "--max-windows", 1, "--data-dir", tiny_data],
                 ["quantize", bad, "--bits", "8", "-o", tmp_path / "o"]):
        res = run(args)
        assert_clean_error(res, "corrupt gguf file", str(bad), *needles)
        assert "out of bounds" not in res.output and "state_dict" not in res.output
    assert no_leftovers(tmp_path, "o")


def test_gguf_flips_anywhere_in_the_header_are_named(q8_gguf, tmp_path):
    """Every byte of the header, key/value and tensor-info sections flipped in turn: the check either
    accepts the file or raises one line naming the file, never a reader's internal error or a hang."""
    from compress.errors import CompressError
    from compress.formats.gguf_file import check_gguf, read_gguf_layout
    good = q8_gguf.read_bytes()
    end = read_gguf_layout(q8_gguf).data_offset
    bad = tmp_path / "f.gguf"
    refused = 0
    for i in range(0, end, 7):
        data = bytearray(good)
        data[i] ^= 0xFF
        bad.write_bytes(bytes(data))
        try:
            check_gguf(bad)
        except CompressError as e:
            refused += 1
            assert str(bad) in str(e) and "\n" not in str(e), (i, str(e))
    assert refused > 0.9 * len(range(0, end, 7))


def test_model_folder_without_tokenizer(tiny_llama, tmp_path):
    bad = tmp_path / "notok"
    shutil.copytree(tiny_llama, bad)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / f).unlink(missing_ok=True)
    res = run(["quantize", bad, "-o", tmp_path / "o"])
    assert_clean_error(res, f"no tokenizer in {bad}", "tokenizer.json", "tokenizer.model", "vocab.json + merges.txt")
    assert "NoneType" not in res.output and no_leftovers(tmp_path, "o")
    assert_clean_error(run(["eval", "ppl", bad, "--max-windows", 1]), "no tokenizer", "tokenizer.json")
    (bad / "vocab.json").write_text("{}")                 # half of a BPE pair
    assert_clean_error(run(["quantize", bad, "-o", tmp_path / "o"]), "incomplete tokenizer", "vocab.json",
                       "without merges.txt")


@pytest.mark.parametrize("family,key", [("llama", "hidden_size"), ("llama", "num_hidden_layers"),
                                        ("llama", "intermediate_size"), ("opt", "ffn_dim")])
def test_config_without_a_required_key(tiny_llama, tiny_opt, tmp_path, family, key):
    bad = tmp_path / "cfg"
    shutil.copytree(tiny_llama if family == "llama" else tiny_opt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg[key]
    (bad / "config.json").write_text(json.dumps(cfg))
    res = run(["quantize", bad, "-o", tmp_path / "o"])
    assert_clean_error(res, f"config.json in {bad} lacks '{key}'", family)
    assert "state_dict" not in res.output and no_leftovers(tmp_path, "o")
    cfg[key] = "96"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run(["quantize", bad, "-o", tmp_path / "o"]), f"'{key}' is '96', not a positive integer")

"""Every described Llama-family model type end to end on a tiny random model: quantize (RTN, GPTQ,
AWQ), load the packed checkpoint and match the dequantized model, prune, and cut into a smaller
dense model that plain transformers loads. Qwen2 has q/k/v biases; Qwen3 has per-head q/k norms
and a head_dim that is not hidden / heads."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from compress import models
from tests.conftest import build_tiny
from tests.family_table import record
from tests.test_cli import assert_clean_error, run

FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "gpt_neox", "gpt2", "gemma2", "gemma3_text", "gemma3", "mixtral",
            "qwen3_moe", "qwen2_moe")
LLAMA_LIKE = ("llama", "qwen2", "qwen3")         # structured pruning and GGUF inputs are described for these
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
GGUF_FAMILIES = (*LLAMA_LIKE, "phi3", "gemma2", "gemma3_text", "gpt2", "gpt_neox", *MOE)
# read back by this suite's own GGUF reader (transformers has no gptneox reader, does not know llama files
# with experts are Mixtral, and reads qwen2moe's header keys under "qwen2_moe")
OWN_READER = ("gpt_neox", "mixtral", "qwen2_moe")
CAL = ["--nsamples", 8, "--seqlen", 64]
X = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("fam") / request.param, request.param)


@pytest.fixture
def env(tiny_data, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))


def _refused(res, needle, out, family, capability) -> None:
    """The command was refused in one line naming ``needle``, wrote nothing at ``out``; recorded."""
    assert_clean_error(res, needle)
    assert not out.exists()
    record(family, capability, False)


def _name_map(reader, n_layers):
    """gguf-py's own tensor-name map for the architecture of the file ``reader`` reads."""
    import gguf
    arch = reader.fields["general.architecture"].contents()
    return gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)


def _logits(model):
    with torch.no_grad():
        return model(X, use_cache=False).logits


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantized_checkpoint_matches_its_dequantized_model(method, tiny, env, tmp_path):
    out = tmp_path / "q"
    res = run(["quantize", tiny, "--method", method, "--bits", 4, "--group-size", 32, "--dtype", "float32",
               *(CAL if method != "rtn" else []), "-o", out])
    assert res.exit_code == 0, res.output
    packed = models.load(str(out))
    ref = models.load(str(tiny)).model
    base = _logits(ref)
    with torch.no_grad():
        for name, m in packed.model.named_modules():
            if hasattr(m, "packed"):
                lin = ref.get_submodule(name)
                lin.weight.copy_(m.packed().dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
        if method == "awq":      # AWQ also rescaled the norms: take every float tensor from the checkpoint
            floats = {k: v for k, v in packed.model.state_dict().items() if k in ref.state_dict()}
            ref.load_state_dict(floats, strict=False)
    torch.testing.assert_close(_logits(packed.model), _logits(ref), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(packed.model), base, atol=1e-4)     # it did quantize
    record(tiny.name, method.upper() if method != "awq" else "AWQ", True)


def test_smoothquant_keeps_the_function_at_8_bits(tiny, env, tmp_path):
    """W8A8 per family: the quantized model's logits stay near the float model's."""
    out = tmp_path / "q"
    res = run(["quantize", tiny, "--method", "smoothquant", *CAL, "--dtype", "float32", "-o", out])
    assert res.exit_code == 0, res.output
    ref = _logits(models.load(str(tiny)).model)
    q = _logits(models.load(str(out)).model)
    assert 0 < float((q - ref).abs().mean() / ref.abs().mean()) < 0.05
    record(tiny.name, "SmoothQuant", True)


def test_fused_projections_are_quantized_as_stored_and_never_rescaled(env, tmp_path):
    """Phi-3: qkv_proj and gate_up_proj are quantized whole; AWQ rescales only the norm-fed groups
    (o_proj and down_proj read one slice of a fused projection's output), so at 8 bits the AWQ
    model still computes the float model's function."""
    import json

    from compress.arch import PHI3
    from compress.methods.scaling import group_can_scale
    tiny = build_tiny(tmp_path / "phi3", "phi3")
    ref = models.load(str(tiny)).model
    block = ref.model.layers[0]
    ok = [group_can_scale(block, g, block.get_submodule(g.linears[0]).in_features)[0] for g in PHI3.groups]
    assert ok == [True, False, True, False]
    res = run(["quantize", tiny, "--method", "awq", "--bits", 8, "--group-size", 32, *CAL, "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["compress"]
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= set(cfg["quantized_modules"])
    q = models.load(str(tmp_path / "q")).model
    assert not torch.equal(q.model.layers[0].input_layernorm.weight.float(), block.input_layernorm.weight)  # scaled
    torch.testing.assert_close(_logits(q), _logits(ref), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_norm_offset_keeps_the_function_under_awq_and_smoothquant(family, env, tmp_path):
    """Gemma's RMSNorm multiplies by (1 + weight): a rescale folded into it must move (1 + weight),
    not weight, or the model changes. At 8 bits, AWQ and SmoothQuant (which rescale the norms) stay
    as close to the float model as round-to-nearest (which rescales nothing); folding the scale into
    the weight alone makes their logit error 10-30 times larger on these models."""
    tiny = build_tiny(tmp_path / family, family)
    ref = models.load(str(tiny)).model
    err = {}
    for method in ("rtn", "awq", "smoothquant"):
        out = tmp_path / method
        args = ["--bits", 8, "--group-size", 32] if method != "smoothquant" else []
        res = run(["quantize", tiny, "--method", method, *args, *(CAL if method != "rtn" else []),
                   "--dtype", "float32", "-o", out])
        assert res.exit_code == 0, res.output
        q = models.load(str(out)).model
        err[method] = float((_logits(q) - _logits(ref)).abs().mean())
        if method != "rtn":
            assert not torch.equal(q.model.layers[0].pre_feedforward_layernorm.weight,
                                   ref.model.layers[0].pre_feedforward_layernorm.weight)
    assert err["awq"] < 2 * err["rtn"] and err["smoothquant"] < 4 * err["rtn"], err


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_every_expert_is_quantized_and_the_router_left_in_float(family, env, tmp_path):
    """Experts are calibrated on the tokens routed to them; one no calibration token reached is
    rounded to nearest (recorded as a fallback), never zeroed; routers stay float."""
    import json
    tiny = build_tiny(tmp_path / family, family)
    res = run(["quantize", tiny, "--method", "gptq", "--bits", 4, "--group-size", 32, *CAL, "--report",
               tmp_path / "r.json", "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["compress"]
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    names = set(meta["quantized_modules"])
    assert {f"model.layers.{i}.{moe}.experts.{e}.{lin}" for i in range(2) for e in range(4)
            for lin in (("w1", "w2", "w3") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj"))} <= names
    assert not any(n.endswith((f"{moe}.gate", "shared_expert_gate")) for n in names)
    assert (family == "qwen2_moe") == any("shared_expert.down_proj" in n for n in names)
    from compress.qlinear import QuantLinear
    q = models.load(str(tmp_path / "q")).model
    assert all(float(m.dequantize().abs().sum()) > 0 for m in q.modules() if isinstance(m, QuantLinear))


def test_an_expert_no_token_reached_falls_back_to_rtn(env, tmp_path, monkeypatch):
    import json

    from transformers.models.mixtral import modeling_mixtral
    tiny = build_tiny(tmp_path / "mixtral", "mixtral")
    real = modeling_mixtral.MixtralSparseMoeBlock.forward

    class NoExpert3(torch.nn.Module):                 # the router never picks expert 3
        def __init__(self, gate):
            super().__init__()
            self.inner = gate

        def forward(self, x):
            out = self.inner(x)
            if not isinstance(out, tuple):            # transformers 4.57: the router is a linear
                logits = out.clone()
                logits[..., 3] = -1e9
                return logits
            logits = out[0].clone()                   # transformers 5: (logits, top-k weights, top-k experts)
            logits[..., 3] = -1e9
            top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), self.inner.top_k, dim=-1)
            return logits, (top / top.sum(dim=-1, keepdim=True)).to(out[1].dtype), idx

    def never_expert_3(self, hidden_states):
        gate = self.gate
        self.gate = NoExpert3(gate)
        try:
            return real(self, hidden_states)
        finally:
            self.gate = gate
    monkeypatch.setattr(modeling_mixtral.MixtralSparseMoeBlock, "forward", never_expert_3)
    res = run(["quantize", tiny, "--method", "gptq", "--bits", 4, "--group-size", 32, *CAL, "-o", tmp_path / "q"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["compress"]
    fb = meta.get("fallbacks") or {}
    assert any("experts.3" in k and "no-calibration-input" in str(v) for k, v in fb.items()), fb
    # GPTQ on k-quant grids: the stacked tensors' notes name the expert that fell back
    res = run(["quantize", tiny, "--method", "kquant-gptq", "--type", "Q4_K_M", *CAL, "-o", tmp_path / "q.gguf"])
    assert res.exit_code == 0, res.output
    import gguf
    notes = gguf.GGUFReader(str(tmp_path / "q.gguf")).fields["compress.tensor_notes"].contents()
    for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        note = next(n for n in notes if n.startswith(f"blk.0.{t}.weight="))
        assert "expert 3: gptq rtn:no-calibration-input" in note and "expert 2" not in note, note


def test_calibration_longer_than_a_mixed_models_sliding_window_is_refused(env, tmp_path):
    tiny = build_tiny(tmp_path / "g3", "gemma3_text")          # sliding window 64, sliding and full layers
    res = run(["quantize", tiny, "--method", "gptq", "--nsamples", 4, "--seqlen", 128, "-o", tmp_path / "q"])
    assert_clean_error(res, "sliding window", "--seqlen 64")
    assert not (tmp_path / "q").exists()


def test_pruned_and_structured_models_load(tiny, env, tmp_path):
    res = run(["prune", tiny, "--method", "wanda", "--pattern", "2:4", *CAL, "-o", tmp_path / "w"])
    assert res.exit_code == 0, res.output
    w = models.load(str(tmp_path / "w"))
    last = w.arch.get_blocks(w.model)[0].get_submodule(w.arch.groups[-1].linears[-1])    # down_proj, fc2, ...
    assert float((last.weight == 0).float().mean()) == 0.5
    record(tiny.name, "2:4 pruning", True)
    if tiny.name not in LLAMA_LIKE:
        res = run(["prune", tiny, "--method", "structured", "--heads", 0.5, *CAL, "-o", tmp_path / "s"])
        return _refused(res, "structured pruning is not described", tmp_path / "s", tiny.name, "structured pruning")
    res = run(["prune", tiny, "--method", "structured", "--heads", 0.5, "--mlp", 0.25, "--layers", 1,
               "--hidden", 0.25, "--multiple-of", 8, *CAL, "--dtype", "float32", "-o", tmp_path / "s"])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s")).eval()
    assert plain.config.num_hidden_layers == 1 and plain.config.hidden_size == 72
    assert torch.equal(_logits(plain), _logits(models.load(str(tmp_path / "s")).model))
    record(tiny.name, "structured pruning", True)


def test_gguf_export_reads_back_as_the_same_model(tiny, env, tmp_path):
    """llama.cpp's names and metadata per family (q/k rows permuted for llama only, Qwen2's
    biases, Qwen3's q/k norms and key length, Phi-3's fused attn_qkv and ffn_up, Gemma's extra
    norms stored with their +1 and its soft-caps and sliding window): gguf's reader gives back
    every weight under gguf-py's own name for it, and the file loads in transformers with the
    same logits."""
    import gguf

    from compress.formats.gguf_tensors import read_gguf_weights
    out = tmp_path / "m.gguf"
    res = run(["export", "gguf", tiny, "--type", "f32", "-o", out])
    if tiny.name not in GGUF_FAMILIES:
        return _refused(res, tiny.name, out, tiny.name, "GGUF")
    assert res.exit_code == 0, res.output
    ref = models.load(str(tiny))
    fam = ref.model.config.model_type
    r = gguf.GGUFReader(str(out))
    arch = r.fields["general.architecture"].contents()
    assert arch == {"gemma3_text": "gemma3", "gpt_neox": "gptneox", "mixtral": "llama", "qwen2_moe": "qwen2moe",
                    "qwen3_moe": "qwen3moe"}.get(fam, fam)
    names = {t.name: t for t in r.tensors}
    assert ("blk.0.attn_q.bias" in names) == (fam in ("qwen2", "qwen2_moe"))
    assert ("blk.0.attn_q_norm.weight" in names) == (fam in ("qwen3", "gemma3_text", "qwen3_moe"))
    name_map = _name_map(r, ref.model.config.num_hidden_layers)
    state = {k: v for k, v in ref.model.state_dict().items() if not (ref.model.config.tie_word_embeddings
                                                                      and k == "lm_head.weight")}
    offset = 1.0 if fam.startswith("gemma") else 0.0
    stacked = {n for n, t in names.items() if len(t.shape) == 3}
    assert ("blk.0.ffn_gate_exps.weight" in stacked) == (fam in MOE)
    assert len(names) == len(state) - sum(1 for k in state if ".experts." in k) + len(stacked)
    for k, v in state.items():                                     # gguf-py's name, the same numbers
        e = re.search(r"\.experts\.(\d+)\.", k)
        merged = re.sub(r"\.experts\.\d+\.", ".experts.", k) if e else k      # as the converter stacks them
        t = names[name_map.get_name(merged, try_suffixes=(".weight", ".bias"))]
        data = torch.from_numpy(np.array(t.data))
        data = (data.reshape(-1, *v.shape)[int(e.group(1))] if e else data.reshape(v.shape))
        want = v + offset if k.endswith("norm.weight") else v
        if (arch == "llama" and re.search(r"\.(q|k)_proj\.weight$", k)) or (arch == "gptneox" and "query_key" in k):
            continue                                               # rows reordered: read_gguf_weights checks them
        assert torch.equal(data, want), k
    back = read_gguf_weights(out)          # this suite's reader (GGUF inputs): names, rows, norms, experts
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    kv = {f.name: f.contents() for f in r.fields.values() if f.name.startswith(arch + ".")}
    if fam == "gemma2":
        assert kv["gemma2.attn_logit_softcapping"] == 50.0 and kv["gemma2.final_logit_softcapping"] == 30.0
    if fam.startswith("gemma"):
        assert kv[f"{arch}.attention.sliding_window"] == 64 and kv[f"{arch}.attention.key_length"] == 32
    if fam in MOE:
        assert kv[f"{arch}.expert_count"] == 4 and kv[f"{arch}.expert_used_count"] == 2
    # the model as the suite loads it (the tiny models' byte-level BPE tokenizer has no Gemma or Phi-3
    # reader in transformers: those load the model alone)
    loaded = models.load(str(out)) if fam in (*LLAMA_LIKE, *OWN_READER, "qwen3_moe") else None
    g = loaded.model if loaded else models.gguf_model(out)
    if loaded is not None and fam not in OWN_READER:      # and as transformers' reader gives it
        torch.testing.assert_close(_logits(models.gguf_model(out, outside=True)), _logits(g), rtol=0, atol=0)
    assert type(g).__name__ == type(ref.model).__name__
    torch.testing.assert_close(_logits(g), _logits(ref.model), rtol=1e-4, atol=1e-4)
    if loaded is not None:                 # the tokenizer the file's keys give splits text as the original
        text = "The quick brown fox jumps over 13 lazy dogs."
        assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == \
            ref.tokenizer(text, add_special_tokens=False)["input_ids"]
    record(tiny.name, "GGUF", True)


@pytest.mark.parametrize("method", ["kquant", "kquant-gptq"])
def test_kquant_mix_per_family(method, tiny, env, tmp_path):
    """A Q4_K_M GGUF per family: the tensor types are llama-quantize's for that family's names
    (Phi-3's fused attn_qkv takes attn_v's rule: Q6_K in the layers use_more_bits picks; a tied
    Gemma token_embd takes the output's Q6_K), the weights transformers reads from the file are
    this suite's decoding of it, and its logits stay near the float model's."""
    import gguf

    from compress.formats import kquants
    from compress.formats.ggml_mix import fallback_type, use_more_bits
    column = "k-quants" if method == "kquant" else "GPTQ on k-quants"
    out = tmp_path / "q.gguf"
    res = run(["quantize", tiny, "--method", method, "--type", "Q4_K_M", *(CAL if method == "kquant-gptq" else []),
               "-o", out])
    if tiny.name not in GGUF_FAMILIES:
        return _refused(res, tiny.name, out, tiny.name, column)
    assert res.exit_code == 0, res.output
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    n = sum(1 for k in types if k.endswith("attn_norm.weight"))
    wv = "attn_qkv" if tiny.name in ("phi3", "gpt2", "gpt_neox") else "attn_v"
    ref = models.load(str(tiny)).model
    if tiny.name in MOE:                   # the routers stay float, as llama-quantize leaves them
        assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_down_exps.weight"] != "F32"
        if method == "kquant-gptq":        # every expert solved on its own tokens, then stacked
            notes = r.fields["compress.tensor_notes"].contents()
            assert all(n.split("=", 1)[1].startswith("gptq") and "expert" not in n for n in notes if "_exps." in n)
    cols = ref.config.hidden_size          # 96: not a multiple of 256, so llama.cpp's fallback types
    assert [types[f"blk.{i}.{wv}.weight"] for i in range(n)] == [
        fallback_type("Q6_K" if use_more_bits(i, n) else "Q4_K", cols) for i in range(n)]
    if ref.config.tie_word_embeddings:
        assert types["token_embd.weight"] == fallback_type("Q6_K", cols)
    if tiny.name == "gpt2":                 # learned positions stay float, as llama-quantize leaves them
        assert types["position_embd.weight"] == "F32"
    g = models.gguf_model(out, outside=True)          # transformers' reader where it has one
    state = g.state_dict()
    arch = r.fields["general.architecture"].contents()
    name_map = _name_map(r, n)
    for k, v in state.items():
        if ".experts." in k:
            continue                        # stacked: compared through the logits below
        t = next((t for t in r.tensors if t.name == name_map.get_name(k, try_suffixes=(".weight", ".bias"))), None)
        if t is None or t.tensor_type.name in ("F32", "F16") or "attn_q" in t.name or "attn_k" in t.name or \
                (arch == "gptneox" and "attn_qkv" in t.name):
            continue            # q/k rows are permuted for llama, q/k/v rows reordered for gptneox
        w = kquants.dequantize(torch.from_numpy(np.array(t.data)).reshape(-1).view(torch.uint8),
                               t.tensor_type.name, tuple(v.shape))
        assert torch.equal(w, v), k
    a, b = _logits(g), _logits(ref)        # (experts: a router flip moves some tokens' logits a lot)
    assert float((a - b).norm() / b.norm()) < (0.35 if tiny.name in MOE else 0.25)
    record(tiny.name, column, True)


ONNX_FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_onnx_runtime_reproduces_the_packed_model(fmt, tiny, env, tmp_path):
    """ONNX export per family (one builder, the family's layout as data): ONNX Runtime's logits
    equal the torch packed model's over a window longer than Gemma's sliding window (64), at once
    and in chunks through the KV cache, with GroupQueryAttention where the head size allows it
    (Qwen3, Gemma) and standard ops otherwise; Gemma 2's soft-capped scores included."""
    pytest.importorskip("onnxruntime")
    from compress.runtime_onnx import OnnxCausalLM
    out, onnx_dir = tmp_path / "q", tmp_path / "onnx"
    assert run(["quantize", tiny, "--method", "rtn", "--bits", 4, "--group-size", 32, "--dtype", "float32",
                "-o", out]).exit_code == 0
    res = run(["export", "onnx", out, "--format", fmt, "-o", onnx_dir])
    if tiny.name not in ONNX_FAMILIES:
        return _refused(res, tiny.name, onnx_dir, tiny.name, "ONNX")
    assert res.exit_code == 0, res.output
    ids = torch.randint(0, 300, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = models.load(str(out)).model(input_ids=ids, use_cache=False).logits
    ort = OnnxCausalLM(onnx_dir, threads=2)
    got = ort(input_ids=ids, use_cache=False).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    chunks, past = [], None             # with the KV cache, across the sliding window's edge
    for a, b in ((0, 60), (60, 61), (61, 80), (80, 96)):
        o = ort(input_ids=ids[:, a:b], use_cache=True, past_key_values=past)
        chunks.append(o.logits)
        past = o.past_key_values
    assert float((torch.cat(chunks, dim=1) - ref).abs().max() / ref.abs().max()) < 1e-5
    record(tiny.name, "ONNX", True)


def test_gpt2_conv1d_layers_are_linear_inside_and_conv1d_on_disk(env, tmp_path):
    """GPT-2's Conv1D layers (weight stored (in, out)) are nn.Linear in the loaded model; a layer
    left in float is written back as Conv1D stores it (transformers' GPT2 reads the file), the
    quantized ones in the Linear (GPTQ) layout, and the checkpoint computes what the model did."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    tiny = build_tiny(tmp_path / "gpt2", "gpt2")
    base = models.load(str(tiny))
    assert isinstance(base.model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    torch.testing.assert_close(_logits(base.model), _logits(plain), rtol=1e-5, atol=1e-5)
    out = tmp_path / "q"
    res = run(["quantize", tiny, "--method", "gptq", "--bits", 4, "--group-size", 32, "--ignore", "re:.*c_proj",
               *CAL, "--dtype", "float32", "-o", out])
    assert res.exit_code == 0, res.output
    state = load_file(str(out / "model.safetensors"))
    assert tuple(state["transformer.h.0.mlp.c_proj.weight"].shape) == (192, 96)      # (in, out): Conv1D's
    assert "transformer.h.0.mlp.c_fc.qweight" in state
    q = models.load(str(out)).model
    ref = models.load(str(tiny)).model
    with torch.no_grad():
        for name, m in q.named_modules():
            if hasattr(m, "packed"):
                ref.get_submodule(name).weight.copy_(m.packed().dequantize())
    torch.testing.assert_close(_logits(q), _logits(ref), rtol=1e-4, atol=1e-4)
    assert torch.equal(q.transformer.h[0].attn.c_proj.weight, ref.transformer.h[0].attn.c_proj.weight)


def test_gemma3_multimodal_quantizes_the_text_blocks_and_keeps_the_vision_tower(env, tmp_path):
    """A Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration): the language model's
    linears are quantized; the vision tower and its projector are written back as they were."""
    import json

    from safetensors.torch import load_file
    tiny = build_tiny(tmp_path / "g3", "gemma3")
    out = tmp_path / "q"
    res = run(["quantize", tiny, "--method", "gptq", "--bits", 4, "--group-size", 32, *CAL, "--dtype", "float32",
               "-o", out])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["compress"]
    assert meta["quantized_modules"] and all(m.startswith("model.language_model.layers.")
                                             for m in meta["quantized_modules"])
    src, got = load_file(str(tiny / "model.safetensors")), load_file(str(out / "model.safetensors"))
    vision = [k for k in src if k.startswith(("vision_tower.", "multi_modal_projector."))]    # the hub's names
    assert vision and all(torch.equal(src[k], got["model." + k]) for k in vision)             # the model's own


@pytest.mark.parametrize("family", MOE)
def test_a_mixture_of_experts_gguf_is_an_input_in_memory_and_streamed(family, env, tmp_path):
    """A MoE GGUF (Mixtral as llama.cpp stores it, Qwen-MoE) quantizes with GPTQ: its experts are
    unstacked by this suite's reader, a streamed run reads them block by block into the in-memory
    run's tensors, and the packed result stays near the GGUF model."""
    from compress.models import tensor_digests
    src = tmp_path / "m.gguf"
    assert run(["export", "gguf", build_tiny(tmp_path / family, family), "--type", "Q8_0", "-o", src]).exit_code == 0
    for name, flag in (("mem", []), ("str", ["--stream"])):
        res = run(["quantize", src, "--method", "gptq", "--bits", 4, "--group-size", 32, *CAL, *flag, "-o", tmp_path / name])
        assert res.exit_code == 0, res.output
    a, b = tensor_digests(tmp_path / "mem"), tensor_digests(tmp_path / "str")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    assert sum(".experts." in k and k.endswith(".qweight") for k in a) == 2 * 4 * 3
    q, ref = models.load(str(tmp_path / "mem")).model, models.gguf_model(src)
    a, b = _logits(q), _logits(ref)        # (w4 GPTQ of the folder itself: 0.35 for the tiny Mixtral)
    assert float((a - b).norm() / b.norm()) < 0.45


@pytest.mark.parametrize("family,norm", [("qwen3_moe", False), ("qwen2_moe", True)])
def test_gguf_export_refuses_a_routing_llama_cpp_does_not_compute(family, norm, tmp_path):
    import json
    folder = build_tiny(tmp_path / family, family)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": norm}))
    out = tmp_path / "m.gguf"
    assert_clean_error(run(["export", "gguf", folder, "-o", out]), "norm_topk_prob", "another function")
    assert not out.exists()

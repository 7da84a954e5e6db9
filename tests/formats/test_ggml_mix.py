"""llama.cpp type mixes: per-tensor GGML type selection (compress.formats.ggml_mix)."""
from __future__ import annotations

import pytest

from compress.errors import CompressError
from compress.formats import ggml_mix as K

# --------------------------------------------------------------------------------------------
# type selection, against tables written out from llama.cpp's llama_tensor_get_type rules
# (src/llama-quant.cpp, llama-cpp-python 0.3.36) for a 30-layer llama
# --------------------------------------------------------------------------------------------

N_LAYER = 30
# use_more_bits(i, 30): i < 30/8=3, i >= 7*30/8=26, or (i - 3) % 3 == 2
MORE = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_tensors(hidden: int, ffn: int, kv_dim: int, vocab: int = 1000, tied: bool = True):
    """(name, (rows, cols)) for every tensor of a 30-layer llama in GGUF naming."""
    out = [("token_embd.weight", (vocab, hidden)), ("output_norm.weight", (hidden,))]
    if not tied:
        out.append(("output.weight", (vocab, hidden)))
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_dim, hidden), "attn_v": (kv_dim, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for i in range(N_LAYER):
        out += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.ffn_norm.weight", (hidden,))]
        out += [(f"blk.{i}.{n}.weight", s) for n, s in shapes.items()]
    return out


def expected(mix: str, name: str, gqa: int, has_imatrix: bool = False) -> str:
    """The type llama.cpp picks for a tensor of a model whose rows all fit 256-blocks (no fallback)."""
    default = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
               "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
               "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1"}[mix]
    if name.endswith("_norm.weight"):
        return "F32"
    if name in ("output.weight",):
        return "Q8_0" if mix == "Q8_0" else "Q6_K"
    if name == "token_embd.weight":
        return default                                   # untied: the default type
    i = int(name.split(".")[1])
    kind = name.split(".")[2]
    table = {
        "Q2_K": {"attn_v": "Q4_K" if gqa >= 4 else "Q3_K", "ffn_down": "Q3_K", "attn_output": "Q3_K"},
        "Q3_K_M": {"attn_v": "Q5_K" if i < 2 else "Q4_K", "attn_output": "Q4_K",
                   "ffn_down": "Q5_K" if i < 1 else "Q4_K"},
        "Q3_K_L": {"attn_v": "Q5_K", "attn_output": "Q5_K", "ffn_down": "Q5_K"},
        "Q4_K_S": {"attn_v": "Q5_K" if i < 4 else default, "ffn_down": "Q5_K" if i < 3 else default},
        "Q4_K_M": {"attn_v": "Q6_K" if i in MORE else default, "ffn_down": "Q6_K" if i in MORE else default},
        "Q5_K_M": {"attn_v": "Q6_K" if i in MORE else default, "ffn_down": "Q6_K" if i in MORE else default},
    }.get(mix, {})
    if has_imatrix and mix in ("Q4_0", "Q5_0") and kind == "ffn_down" and i < 3:
        return {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[mix]
    return table.get(kind, default)


ALL_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
             "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.mark.parametrize("mix", ALL_MIXES)
@pytest.mark.parametrize("gqa", [3, 4])
def test_mix_table_untied_256_multiples(mix, gqa):
    """A 30-layer llama whose rows all fit 256-blocks (hidden 2048, ffn 5632): no fallback."""
    tensors = llama_tensors(2048, 5632, 2048 // gqa, tied=False)
    plan = K.select_types(tensors, mix, n_layer=N_LAYER, n_head=32, n_head_kv=32 // gqa)
    assert list(plan) == sorted(plan, key=K._llama_order)
    for name, shape in tensors:
        assert plan[name].type == expected(mix, name, gqa), (mix, name)
        assert not plan[name].fallback
    assert {plan[n].type for n, _ in tensors if n.endswith("_norm.weight")} == {"F32"}


@pytest.mark.parametrize("mix", ALL_MIXES)
def test_tied_embedding_is_treated_as_output(mix):
    tensors = llama_tensors(2048, 5632, 512, tied=True)
    plan = K.select_types(tensors, mix, n_layer=N_LAYER, n_head=32, n_head_kv=8)
    assert plan["token_embd.weight"].type == ("Q8_0" if mix == "Q8_0" else "Q6_K")


# SmolLM2-135M: hidden 576 (not a multiple of 256), ffn 1536, 9 heads / 3 kv heads, tied embeddings
SMOL = dict(hidden=576, ffn=1536, kv_dim=192, vocab=49152)
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@pytest.mark.parametrize("mix", ALL_MIXES)
def test_mix_table_smollm2_fallbacks(mix):
    """Every 576-column tensor falls back (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0); only ffn_down (1536 columns) keeps k-quants; the tied embedding is Q8_0."""
    tensors = llama_tensors(SMOL["hidden"], SMOL["ffn"], SMOL["kv_dim"], SMOL["vocab"], tied=True)
    plan = K.select_types(tensors, mix, n_layer=N_LAYER, n_head=9, n_head_kv=3)
    assert plan["token_embd.weight"].type == "Q8_0"
    for name, (rows, *cols) in tensors:
        if name.endswith("_norm.weight") or name == "token_embd.weight":
            continue
        want = expected(mix, name, gqa=3)
        got = plan[name]
        assert got.wanted == want, (mix, name)
        if ".ffn_down." in name:
            assert got.type == want and not got.fallback
        else:
            assert got.type == FALLBACK.get(want, want), (mix, name)
            assert got.fallback == (want in FALLBACK)


def test_smollm2_q4_k_m_counts():
    tensors = llama_tensors(**SMOL, tied=True)
    plan = K.select_types(tensors, "Q4_K_M", n_layer=N_LAYER, n_head=9, n_head_kv=3)
    counts = {}
    for c in plan.values():
        if c.quantize:
            counts[c.type] = counts.get(c.type, 0) + 1
    # q, k, o, gate, up: 150 x Q5_0; attn_v: 14 x Q8_0 (Q6_K fallback) + 16 x Q5_0;
    # ffn_down: 14 x Q6_K + 16 x Q4_K; token_embd Q8_0
    assert counts == {"Q5_0": 166, "Q8_0": 15, "Q6_K": 14, "Q4_K": 16}
    assert sum(c.fallback for c in plan.values()) == 180


@pytest.mark.parametrize("mix,pure_type", [("Q4_K_M", "Q4_K"), ("Q2_K", "Q2_K"), ("Q6_K", "Q6_K"), ("Q4_0", "Q4_0")])
def test_pure(mix, pure_type):
    tensors = llama_tensors(**SMOL, tied=True)
    plan = K.select_types(tensors, mix, n_layer=N_LAYER, n_head=9, n_head_kv=3, pure=True)
    for name, shape in tensors:
        if len(shape) < 2:
            continue
        assert plan[name].wanted == pure_type
        assert plan[name].type == K.fallback_type(pure_type, shape[-1])


@pytest.mark.parametrize("mix", ["Q4_0", "Q5_0"])
def test_imatrix_changes_first_ffn_down_of_q4_0_q5_0(mix):
    tensors = llama_tensors(2048, 5632, 512, tied=False)
    plan = K.select_types(tensors, mix, n_layer=N_LAYER, n_head=32, n_head_kv=8, has_imatrix=True)
    for name, _ in tensors:
        assert plan[name].type == expected(mix, name, 4, has_imatrix=True), name
    assert plan["blk.2.ffn_down.weight"].type != mix and plan["blk.3.ffn_down.weight"].type == mix


def test_fallback_rules():
    assert [K.fallback_type(t, 576) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0")] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q8_0", "Q4_0"]
    assert K.fallback_type("Q4_K", 1536) == "Q4_K"
    assert K.fallback_type("Q4_K", 72) == "F16" and K.fallback_type("Q8_0", 72) == "F16"


def test_use_more_bits_30():
    assert {i for i in range(30) if K.use_more_bits(i, 30)} == MORE


def test_unknown_mix():
    with pytest.raises(CompressError, match="unknown GGUF type 'Q7_K'"):
        K.get_mix("Q7_K")
    assert K.get_mix("q4_k").name == "Q4_K_M"

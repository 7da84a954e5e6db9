"""The decoder graph, built by hand from the model's modules, for the families whose blocks are
the Llama shape: Llama, Mistral, Qwen2, Qwen3 (per-head q/k norms), Phi-3 (fused ``qkv_proj`` and
``gate_up_proj``), Gemma 2 and Gemma 3 (norms multiplying by ``1 + weight``, norms after attention
and after the MLP as well as before, scaled embeddings, GELU-tanh, a query scale of its own,
soft-capped attention scores and logits, sliding-window layers with their own rotary table).
A family is a :class:`Layout` (which modules a block holds) plus what ``config.json`` says."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..compat import rope_scaling
from ..errors import CompressError
from ..qlinear import QuantLinear
from .onnx_graph import Graph, Options, add_rms_norm, emit_linear, fuse, linear_of, rms_norm, rotate_half
from .onnx_weights import (MATMULNBITS_BITS, MATMULNBITS_BLOCKS, IntWeight, pack_lowfirst, pack_matmulnbits,
                           unpack_lowfirst)


@dataclass(frozen=True)
class Layout:
    """What one family's decoder block adds to the shape its architecture description gives (the
    norm and the linears of attention and of the MLP: :func:`_block_modules`)."""

    post_attn_norm: str | None = None                   # on the attention's output, before the residual add
    post_mlp_norm: str | None = None
    qk_norms: tuple[str, str] | None = None             # per-head norms of q and k, before the rotation
    act: str = "silu"                                   # or "gelu_tanh"
    embed_scale: bool = False                           # embeddings multiplied by sqrt(hidden)


_LLAMA = Layout()
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA = dict(post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm", act="gelu_tanh",
              embed_scale=True)
LAYOUTS = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "phi3": _LLAMA,
    "qwen3": Layout(qk_norms=_QK_NORMS),
    "gemma2": Layout(**_GEMMA),
    "gemma3_text": Layout(**_GEMMA, qk_norms=_QK_NORMS),
}


def _block_modules(arch) -> tuple[str, tuple, str, str, tuple, str]:
    """(attention norm, q/k/v linears (one if fused), output linear, MLP norm, gate/up linears (one if
    fused), down linear), read off the architecture's linear groups: norm -> q/k/v, -> o, norm ->
    gate/up, -> down."""
    attn, out, mlp, down = arch.groups
    return attn.prev, attn.linears, out.linears[0], mlp.prev, mlp.linears, down.linears[0]


SUPPORTED_MODEL_TYPES = tuple(LAYOUTS)


@dataclass
class Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_pos: int
    tied: bool
    norm_offset: float                      # the norms multiply by (offset + weight)
    scaling: float                          # of the attention scores
    windows: list                           # per layer: the sliding window (keys within it), or None
    attn_softcap: float | None
    final_softcap: float | None


def _windows(cfg, n: int) -> list:
    sw = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not sw:
        return [None] * n
    if types is not None:
        out = [sw if t == "sliding_attention" else None for t in types[:n]]
    else:                       # mistral, phi3: every layer
        out = [sw] * n
    return out


def dims_of(model, arch, lay: Layout) -> Dims:
    cfg = model.config
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    want = {"silu": ("silu",), "gelu_tanh": ("gelu_pytorch_tanh",)}[lay.act]
    if act not in want:
        raise CompressError(f"ONNX export of {cfg.model_type} supports the {want[0]} MLP; got {act}")
    rope = rope_scaling(cfg) or {}
    if (rope.get("rope_type") or rope.get("type")) in ("dynamic", "longrope"):
        raise CompressError(f"ONNX export does not implement the position-dependent rope type {rope}")
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise CompressError(f"ONNX export rotates whole heads; partial_rotary_factor={cfg.partial_rotary_factor}")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qscale = getattr(cfg, "query_pre_attn_scalar", None)           # Gemma's own query scale
    n = len(arch.get_blocks(model))
    return Dims(layers=n, hidden=cfg.hidden_size, heads=heads, kv_heads=kv, head_dim=head_dim, vocab=cfg.vocab_size,
                eps=float(cfg.rms_norm_eps), max_pos=int(cfg.max_position_embeddings),
                tied=bool(getattr(cfg, "tie_word_embeddings", False)), norm_offset=float(arch.norm_offset),
                scaling=float((qscale if qscale else head_dim) ** -0.5), windows=_windows(cfg, n),
                attn_softcap=getattr(cfg, "attn_logit_softcapping", None) or None,
                final_softcap=getattr(cfg, "final_logit_softcapping", None) or None)


def _rotaries(model) -> dict:
    """The rotary modules of the full-attention ("global") and sliding-window ("local") layers:
    transformers 4.57 gives Gemma 3's local layers their own module, 5.x one module that takes the
    layer type."""
    rot = model.model.rotary_emb
    if "layer_type" not in inspect.signature(rot.forward).parameters:
        return {"global": rot, "local": getattr(model.model, "rotary_emb_local", None)}
    return {"global": lambda x, p: rot(x, p, layer_type="full_attention"),
            "local": lambda x, p: rot(x, p, layer_type="sliding_attention")}


def _rope_tables(rot, d: Dims) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_pos, head_dim/2) from a rotary module of the model (any static rope type)."""
    pos = torch.arange(d.max_pos, dtype=torch.long)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = cos[0].to(torch.float32).numpy(), sin[0].to(torch.float32).numpy()
    half = d.head_dim // 2
    if cos.shape[-1] != d.head_dim:
        raise CompressError(f"ONNX export rotates whole heads; the rotary table is {cos.shape[-1]} wide, "
                            f"the heads {d.head_dim}")
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise CompressError("ONNX export expects the half-rotation rotary layout (rotate_half)")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _norm_weight(mod, d: Dims) -> np.ndarray:
    return (mod.weight.detach().to(torch.float32) + d.norm_offset).numpy()


def _lm_head_quant(model, bits: int, block: int) -> IntWeight:
    from ..quantizer import quantize_rtn
    from ..scheme import IntScheme
    w = model.get_output_embeddings().weight.detach().to(torch.float32)
    try:
        scheme = IntScheme(bits=bits, group_size=block, sym=False)
    except CompressError as e:
        raise CompressError(f"lm_head quantization: {e}") from None
    q, scales, zeros, g_idx = quantize_rtn(w, scheme)
    return IntWeight(q=q.numpy(), zeros=zeros.numpy(), scales=scales.numpy(), g_idx=g_idx.numpy().astype(np.int64),
                     bits=bits)


def build_decoder(g: Graph, loaded, opt: Options, kv_cache: bool, lm_head_bits: int | None,
                  lm_head_block: int, lm_head_level: int) -> dict:
    from onnx import TensorProto, helper

    model = loaded.model
    arch = loaded.arch
    model_type = model.config.model_type
    lay = LAYOUTS[model_type]
    attn_norm, qkv_names, o_name, mlp_norm, gate_up_names, down_name = _block_modules(arch)
    d = dims_of(model, arch, lay)
    blocks = arch.get_blocks(model)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    half = d.head_dim // 2
    group = d.heads // d.kv_heads

    g.inputs += [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
                 helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
                 helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"])]
    g.outputs.append(helper.make_tensor_value_info("logits", f32, ["batch", "sequence", d.vocab]))
    for n in ("input_ids", "attention_mask", "position_ids", "logits"):
        g._used.add(n)
    if kv_cache:
        for i in range(d.layers):
            for kv in ("key", "value"):
                g.inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", f32, ["batch", d.kv_heads, "past_sequence", d.head_dim]))
                g.outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kv}", f32, ["batch", d.kv_heads, "total_sequence", d.head_dim]))
                g._used.update({f"past_key_values.{i}.{kv}", f"present.{i}.{kv}"})

    # ---- embeddings and lm_head weights
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = d.tied and isinstance(head, torch.nn.Linear) and head.weight.data_ptr() == embed.weight.data_ptr()
    head_info: dict = {}
    head_q = None
    if lm_head_bits is not None:
        if isinstance(head, QuantLinear):
            raise CompressError("the checkpoint's lm_head is already quantized; leave lm_head_bits unset")
        if lm_head_bits not in MATMULNBITS_BITS:
            raise CompressError(f"lm_head_bits must be one of {', '.join(map(str, MATMULNBITS_BITS))}, "
                                f"got {lm_head_bits}")
        if lm_head_block not in MATMULNBITS_BLOCKS:
            raise CompressError(f"lm_head_block_size must be one of {', '.join(map(str, MATMULNBITS_BLOCKS))}, "
                                f"got {lm_head_block}")
        head_q = pack_matmulnbits(_lm_head_quant(model, lm_head_bits, lm_head_block), "lm_head")
        head_b = g.array("lm_head.qweight", head_q.b)

    emb_w = embed.weight.detach().to(torch.float32).numpy()
    if head_q is not None and tied:
        nb = head_q.b.shape[1]
        zp = (head_q.zero_points if head_q.zero_points is not None
              else pack_lowfirst(np.full((d.vocab, nb), 1 << (head_q.bits - 1), np.int32), head_q.bits))
        zp3 = pack_lowfirst(unpack_lowfirst(zp, head_q.bits, nb)[..., None], head_q.bits)   # (V, nb, 1)
        x = g.op("GatherBlockQuantized", [head_b, "input_ids", g.array("embed.scales", head_q.scales[..., None]),
                                          g.array("embed.zero_points", zp3)],
                 domain="com.microsoft", bits=head_q.bits, block_size=head_q.block_size, gather_axis=0,
                 quantize_axis=2)
        x = g.op("Reshape", [x, g.const_i64([0, 0, nb * head_q.block_size])])
        if nb * head_q.block_size != d.hidden:
            x = g.op("Slice", [x, g.const_i64([0]), g.const_i64([d.hidden]), g.const_i64([-1])])
        emb_name = None
        head_info["embedding"] = f"GatherBlockQuantized {head_q.bits}-bit (shares lm_head.qweight)"
    else:
        emb_name = g.weight("embed_tokens.weight", emb_w, opt.compact)
        x = g.op("Gather", [emb_name, "input_ids"], axis=0)
        head_info["embedding"] = "Gather fp32" + (" (stored as fp16, lossless)"
                                                  if "embed_tokens.weight" in g.fp16_stored else "")
    if lay.embed_scale:            # Gemma: the embeddings times sqrt(hidden), rounded to float32 first
        x = g.op("Mul", [x, g.const_f32(float(np.float32(d.hidden ** 0.5)))])

    # ---- positions, masks, rotary tables (sliding-window layers may have their own)
    ids_shape = g.op("Shape", ["input_ids"])
    mask_shape = g.op("Shape", ["attention_mask"])
    total = g.op("Gather", [mask_shape, g.const_i64(1, scalar=True)], axis=0)
    tables = {}
    for kind, rot in _rotaries(model).items():
        if rot is not None and (kind == "global" or any(d.windows)):
            c, s_ = _rope_tables(rot, d)
            tables[kind] = (g.array(f"rope.{kind}.cos", c), g.array(f"rope.{kind}.sin", s_))
    # ORT's GroupQueryAttention needs head_dim % 16 == 0; otherwise attention is standard ops.
    gqa = opt.contrib and d.head_dim % 16 == 0
    if gqa:
        lens = g.op("ReduceSum", ["attention_mask", g.const_i64([1])], keepdims=0)
        seqlens_k = g.op("Cast", [g.op("Sub", [lens, g.const_i64(1, scalar=True)])], to=TensorProto.INT32)
        total_i32 = g.op("Cast", [total], to=TensorProto.INT32)
    else:
        seq = g.op("Gather", [ids_shape, g.const_i64(1, scalar=True)], axis=0)
        past = g.op("Sub", [total, seq])
        q_pos = g.op("Unsqueeze", [g.op("Range", [past, total, g.const_i64(1, scalar=True)]), g.const_i64([1])])
        k_pos = g.op("Unsqueeze", [g.op("Range", [g.const_i64(0, scalar=True), total, g.const_i64(1, scalar=True)]),
                                   g.const_i64([0])])
        causal = g.op("LessOrEqual", [k_pos, q_pos])                                                # (T, S)
        pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const_i64([1, 2, 3])])], to=TensorProto.BOOL)
        neg = g.const_f32(float(np.finfo(np.float32).min))
        biases = {None: g.op("Where", [g.op("And", [causal, pad]), g.const_f32(0.0), neg])}          # (B,1,1,T,S)
        for w in sorted({w for w in d.windows if w}):        # keys less than the window behind the query
            near = g.op("Greater", [k_pos, g.op("Sub", [q_pos, g.const_i64(w, scalar=True)])])
            biases[w] = g.op("Where", [g.op("And", [g.op("And", [causal, near]), pad]), g.const_f32(0.0), neg])
        rot_g = {kind: tuple(g.op("Unsqueeze", [g.op("Gather", [t, "position_ids"], axis=0), g.const_i64([1])])
                             for t in pair) for kind, pair in tables.items()}                         # (B,1,T,h)

    def heads_norm(y: str, mod, n_heads: int, name: str) -> str:
        """A per-head RMSNorm of ``y`` (..., n_heads * head_dim)."""
        y = g.op("Reshape", [y, g.const_i64([0, 0, n_heads, d.head_dim])])
        y = rms_norm(g, y, _norm_weight(mod, d), d.eps, name)
        return g.op("Reshape", [y, g.const_i64([0, 0, n_heads * d.head_dim])])

    def linear(blk, pre: str, name: str):
        return linear_of(f"{pre}.{name}", blk.get_submodule(name))

    residual = None
    pending = None   # output of the previous sub-block, not yet added to the residual
    for i, blk in enumerate(blocks):
        pre = f"{arch.blocks}.{i}"
        window = d.windows[i]
        cos_t, sin_t = tables["local" if window and "local" in tables else "global"]
        # ---- attention norm (+ residual add of the previous MLP)
        in_w = _norm_weight(blk.get_submodule(attn_norm), d)
        if residual is None:
            h = rms_norm(g, x, in_w, d.eps, f"{pre}.{attn_norm}")
            residual = x
        else:
            h, residual = add_rms_norm(g, pending, residual, in_w, d.eps, f"{pre}.{attn_norm}", opt.contrib)
        # ---- attention
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        if len(qkv_names) == 1:
            qkv = linear(blk, pre, qkv_names[0])
            parts = None
        else:
            parts = [linear(blk, pre, n) for n in qkv_names]
            qkv = fuse(parts, f"{pre}.self_attn.qkv_proj")
        past_k = f"past_key_values.{i}.key" if kv_cache else ""
        past_v = f"past_key_values.{i}.value" if kv_cache else ""
        pres_k = f"present.{i}.key" if kv_cache else g.fresh(f"{pre}.present_key")
        pres_v = f"present.{i}.value" if kv_cache else g.fresh(f"{pre}.present_value")
        if qkv is not None and gqa and lay.qk_norms is None:
            q = k = v = None
            packed = emit_linear(g, h, qkv, opt)
        else:
            packed = None
            if qkv is not None:
                q, k, v = g.op("Split", [emit_linear(g, h, qkv, opt), g.const_i64(sizes)], n_out=3, axis=-1)
            else:
                q, k, v = (emit_linear(g, h, lin, opt) for lin in parts)
            if lay.qk_norms is not None:
                q = heads_norm(q, blk.get_submodule(lay.qk_norms[0]), d.heads, f"{pre}.{lay.qk_norms[0]}")
                k = heads_norm(k, blk.get_submodule(lay.qk_norms[1]), d.kv_heads, f"{pre}.{lay.qk_norms[1]}")
        if gqa:
            ins = [packed, "", ""] if packed is not None else [q, k, v]
            attrs = {"local_window_size": window} if window else {}
            if d.attn_softcap:
                attrs["softcap"] = float(d.attn_softcap)
            a = g.op("GroupQueryAttention", ins + [past_k, past_v, seqlens_k, total_i32, cos_t, sin_t, "position_ids"],
                     domain="com.microsoft", outputs=[g.fresh(f"{pre}.attn"), pres_k, pres_v],
                     num_heads=d.heads, kv_num_heads=d.kv_heads, do_rotary=1, rotary_interleaved=0,
                     scale=d.scaling, **attrs)[0]
        else:
            cos_g, sin_g = rot_g["local" if window and "local" in rot_g else "global"]
            q = g.op("Transpose", [g.op("Reshape", [q, g.const_i64([0, 0, d.heads, d.head_dim])])], perm=[0, 2, 1, 3])
            k = g.op("Transpose", [g.op("Reshape", [k, g.const_i64([0, 0, d.kv_heads, d.head_dim])])],
                     perm=[0, 2, 1, 3])
            v = g.op("Transpose", [g.op("Reshape", [v, g.const_i64([0, 0, d.kv_heads, d.head_dim])])],
                     perm=[0, 2, 1, 3])
            q = rotate_half(g, q, cos_g, sin_g, half, d.head_dim)
            k = rotate_half(g, k, cos_g, sin_g, half, d.head_dim)
            if kv_cache:
                k = g.op("Concat", [past_k, k], axis=2, outputs=[pres_k])
                v = g.op("Concat", [past_v, v], axis=2, outputs=[pres_v])
            q5 = g.op("Reshape", [q, g.const_i64([0, d.kv_heads, group, -1, d.head_dim])])      # (B,KH,G,T,D)
            k5 = g.op("Transpose", [g.op("Unsqueeze", [k, g.const_i64([2])])], perm=[0, 1, 2, 4, 3])  # (B,KH,1,D,S)
            v5 = g.op("Unsqueeze", [v, g.const_i64([2])])                                       # (B,KH,1,S,D)
            s = g.op("Mul", [g.op("MatMul", [q5, k5]), g.const_f32(d.scaling)])
            if d.attn_softcap:
                cap = float(d.attn_softcap)
                s = g.op("Mul", [g.op("Tanh", [g.op("Div", [s, g.const_f32(cap)])]), g.const_f32(cap)])
            p = g.op("Softmax", [g.op("Add", [s, biases[window]])], axis=-1)
            o = g.op("Reshape", [g.op("MatMul", [p, v5]), g.const_i64([0, d.heads, -1, d.head_dim])])
            a = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const_i64([0, 0, d.heads * d.head_dim])])
        attn_out = emit_linear(g, a, linear(blk, pre, o_name), opt)
        if lay.post_attn_norm:
            attn_out = rms_norm(g, attn_out, _norm_weight(blk.get_submodule(lay.post_attn_norm), d), d.eps,
                                f"{pre}.{lay.post_attn_norm}")
        # ---- MLP norm (+ residual add)
        h, residual = add_rms_norm(g, attn_out, residual, _norm_weight(blk.get_submodule(mlp_norm), d), d.eps,
                                   f"{pre}.{mlp_norm}", opt.contrib)
        # ---- MLP
        if len(gate_up_names) == 1:
            gu = linear(blk, pre, gate_up_names[0])
            n_half = gu.n // 2
            gate_n, up_n = n_half, n_half
        else:
            gate_l, up_l = (linear(blk, pre, n) for n in gate_up_names)
            gate_n, up_n = gate_l.n, up_l.n
            gu = fuse([gate_l, up_l], f"{pre}.mlp.gate_up_proj")
        if gu is not None:
            gate, up = g.op("Split", [emit_linear(g, h, gu, opt), g.const_i64([gate_n, up_n])], n_out=2, axis=-1)
        else:
            gate, up = emit_linear(g, h, gate_l, opt), emit_linear(g, h, up_l, opt)
        if lay.act == "silu":
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        else:
            act = g.op("Mul", [g.op("Gelu", [gate], approximate="tanh"), up])
        pending = emit_linear(g, act, linear(blk, pre, down_name), opt)
        if lay.post_mlp_norm:
            pending = rms_norm(g, pending, _norm_weight(blk.get_submodule(lay.post_mlp_norm), d), d.eps,
                               f"{pre}.{lay.post_mlp_norm}")

    # ---- final norm and lm_head
    norm_w = _norm_weight(model.get_submodule(arch.final_norm), d)
    h, _ = add_rms_norm(g, pending, residual, norm_w, d.eps, arch.final_norm, opt.contrib)
    logits = g.fresh("logits_raw") if d.final_softcap else "logits"
    if head_q is not None:
        ins = [h, head_b, g.array("lm_head.scales", head_q.scales)]
        if head_q.zero_points is not None:
            ins.append(g.array("lm_head.zero_points", head_q.zero_points))
        g.op("MatMulNBits", ins, domain="com.microsoft", outputs=[logits], K=d.hidden, N=d.vocab, bits=head_q.bits,
             block_size=head_q.block_size, accuracy_level=lm_head_level)
        head_info["lm_head"] = (f"MatMulNBits {head_q.bits}-bit block {head_q.block_size} accuracy level "
                                f"{lm_head_level} (RTN asym at export)")
    elif tied and emb_name is not None:
        flat = g.op("Reshape", [h, g.const_i64([-1, d.hidden])])
        y = g.op("Gemm", [flat, emb_name], transB=1)
        logits_shape = g.op("Concat", [g.op("Slice", [ids_shape, g.const_i64([0]), g.const_i64([2])]),
                                       g.const_i64([d.vocab])], axis=0)
        g.op("Reshape", [y, logits_shape], outputs=[logits])
        head_info["lm_head"] = "Gemm transB over the tied embedding"
    else:
        lin = linear_of(arch.lm_head, head)
        y = emit_linear(g, h, lin, opt)
        g.op("Identity", [y], outputs=[logits])
        head_info["lm_head"] = "quantized (checkpoint)" if lin.quant is not None else "MatMul fp32"
    if d.final_softcap:            # Gemma 2: logits = cap * tanh(logits / cap)
        cap = float(d.final_softcap)
        g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, g.const_f32(cap)])]), g.const_f32(cap)], outputs=["logits"])

    return {"family": arch.family, "model_type": model_type, "num_layers": d.layers, "hidden_size": d.hidden,
            "num_heads": d.heads, "num_kv_heads": d.kv_heads, "head_dim": d.head_dim, "vocab_size": d.vocab,
            "max_position_embeddings": d.max_pos, "tied_embeddings": tied,
            "sliding_window_layers": [i for i, w in enumerate(d.windows) if w],
            "lm_head_accuracy_level": lm_head_level if head_q is not None else None,
            "attention": "GroupQueryAttention" if gqa else "standard ops",
            "norms": "SkipSimplifiedLayerNormalization" if opt.contrib else "standard ops", **head_info}

"""Run an exported ONNX folder (compress.export.onnx) with ONNX Runtime on CPU.

``OnnxCausalLM(folder)`` is callable like a Hugging Face causal LM for what the evaluators use:
``model(input_ids=LongTensor(1, T), use_cache=False).logits`` is a float32 torch tensor
``(1, T, V)``, so ``evals.perplexity.evaluate`` runs unchanged. ``generate`` decodes token by
token through the KV cache (or recomputes the whole sequence for a model exported without it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CompressError

MODEL_FILE = "model.onnx"
INFO_FILE = "export_info.json"


def is_onnx_dir(path) -> bool:
    """True when ``path`` is a folder written by :func:`compress.export.onnx.export_onnx`."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_FILE).is_file() and (p / INFO_FILE).is_file()


@dataclass
class OnnxOutput:
    logits: torch.Tensor                   # float32 (B, T, V)
    past_key_values: list | None = None    # OrtValues, in the graph's past-input order


class OnnxCausalLM:
    """An exported decoder run by ONNX Runtime (CPU execution provider).

    ``threads``: intra-op threads (None: ONNX Runtime's default, one per physical core).
    ``qdq_accuracy_level``: for the qdq format, the accuracy level ONNX Runtime gives the
    MatMulNBits nodes it fuses from DequantizeLinear + MatMul (its own default is 4, int8
    activations; None here takes the level recorded at export, 0 unless asked: exact fp32).
    A folder exported for the prefill target has its weights expanded to fp32 at load.
    """

    def __init__(self, out_dir, threads: int | None = None, optimization: str = "all",
                 qdq_accuracy_level: int | None = None):
        out_dir = Path(out_dir)
        if not out_dir.exists():
            raise CompressError(f"no such folder: {out_dir}")
        if not is_onnx_dir(out_dir):
            raise CompressError(f"{out_dir} is not an exported ONNX folder ({MODEL_FILE} and {INFO_FILE} expected)")
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("running ONNX models needs onnxruntime: pip install 'compress-suite[onnx]'") from None
        self.path = out_dir
        try:
            self.info = json.loads((out_dir / INFO_FILE).read_text())
        except json.JSONDecodeError as e:
            raise CompressError(f"corrupt {INFO_FILE} in {out_dir}: {e.msg}") from None
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise CompressError(f"optimization must be one of {', '.join(levels)}, got {optimization}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[optimization]
        if threads is not None:
            if threads < 1:
                raise CompressError(f"threads must be at least 1, got {threads}")
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        from .export.onnx_options import session_config
        for key, value in session_config(self.info, qdq_accuracy_level).items():
            so.add_session_config_entry(key, value)
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(out_dir / MODEL_FILE), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CompressError(f"ONNX Runtime cannot load {out_dir / MODEL_FILE}: {str(e).splitlines()[0]}") from None
        self._ort = ort
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.output_names if n.startswith("present.")]
        self.kv_cache = bool(self.past_names)
        meta = self.info.get("model", {})
        self.num_kv_heads = int(meta.get("num_kv_heads", 0))
        self.head_dim = int(meta.get("head_dim", 0))
        self.vocab_size = int(meta.get("vocab_size", 0))
        self.max_positions = int(meta.get("max_position_embeddings", 1 << 30))
        # GroupQueryAttention writes into a past buffer bound as its own present output
        self.in_place_kv = self.kv_cache and meta.get("attention") == "GroupQueryAttention"
        self._tokenizer = None

    # ---- compatibility with the evaluators
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .models import load_tokenizer
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def eval(self):
        return self

    def __repr__(self) -> str:
        return (f"OnnxCausalLM({self.path}, format={self.info.get('format')}, bits={self.info.get('bits')}, "
                f"kv_cache={self.kv_cache})")

    # ---- forward
    def _feeds(self, ids: np.ndarray, past_len: int, attention_mask: np.ndarray | None,
               position_ids: np.ndarray | None) -> dict:
        b, t = ids.shape
        if past_len + t > self.max_positions:
            raise CompressError(f"sequence of {past_len + t} tokens exceeds the model's "
                                f"{self.max_positions} positions")
        feeds = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = (np.ones((b, past_len + t), np.int64) if attention_mask is None
                                       else attention_mask.astype(np.int64))
        if "position_ids" in self.input_names:
            feeds["position_ids"] = (np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()
                                     if position_ids is None else position_ids.astype(np.int64))
        return feeds

    def _empty_past(self, batch: int) -> dict:
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), np.float32)
        return {n: empty for n in self.past_names}

    def __call__(self, input_ids=None, attention_mask=None, use_cache: bool = False, past_key_values=None,
                 position_ids=None, **kwargs) -> OnnxOutput:
        if input_ids is None:
            raise CompressError("input_ids is required")
        ids = _as_numpy(input_ids).astype(np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if past_key_values is not None and not self.kv_cache:
            raise CompressError(f"{self.path} was exported without a KV cache (--no-kv-cache)")
        if past_key_values is not None:
            past_key_values = [v if isinstance(v, self._ort.OrtValue) else _as_numpy(v).astype(np.float32)
                               for v in past_key_values]
            if len(past_key_values) != len(self.past_names):
                raise CompressError(f"expected {len(self.past_names)} past tensors, got {len(past_key_values)}")
        past_len = 0 if past_key_values is None else _seq_len(past_key_values[0])
        feeds = self._feeds(ids, past_len, None if attention_mask is None else _as_numpy(attention_mask),
                            None if position_ids is None else _as_numpy(position_ids))
        if self.kv_cache:
            if past_key_values is None:
                feeds.update(self._empty_past(ids.shape[0]))
            else:
                feeds.update(dict(zip(self.past_names, past_key_values)))
        out = self._run(feeds)
        logits = torch.from_numpy(np.ascontiguousarray(out[0].numpy()))
        present = out[1:] if (use_cache and self.kv_cache) else None
        return OnnxOutput(logits=logits, past_key_values=present)

    forward = __call__

    def _run(self, feeds: dict) -> list:
        ort = self._ort
        values = {k: (v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
                  for k, v in feeds.items()}
        names = ["logits"] + (self.present_names if self.kv_cache else [])
        return self.session.run_with_ort_values(names, values)

    def decoder(self, max_len: int) -> "InPlaceDecoder":
        """A batch-1 decoder whose KV cache is one preallocated buffer per layer of ``max_len``
        positions, updated in place (exports with GroupQueryAttention only)."""
        return InPlaceDecoder(self, max_len)

    # ---- generation
    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int = 32, greedy: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | None = None, seed: int = 0) -> torch.Tensor:
        """Decode ``max_new_tokens`` tokens after ``prompt_ids`` (LongTensor ``(T,)`` or ``(1, T)``).

        Greedy (argmax) by default; ``greedy=False`` samples with ``temperature`` / ``top_k``
        from a generator seeded with ``seed``. Stops early at ``eos_token_id`` when given.
        Returns the prompt followed by the new tokens, LongTensor ``(1, T + new)``.
        """
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise CompressError(f"prompt_ids must be one non-empty sequence, got shape {tuple(ids.shape)}")
        if max_new_tokens < 0:
            raise CompressError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        gen = torch.Generator().manual_seed(seed)
        seq = ids
        past = None
        step_ids = ids
        dec = self.decoder(ids.shape[1] + max_new_tokens) if self.in_place_kv and max_new_tokens else None
        for _ in range(max_new_tokens):
            if dec is not None:
                out = OnnxOutput(logits=torch.from_numpy(dec(step_ids.numpy())))
            elif self.kv_cache:
                out = self(input_ids=step_ids, use_cache=True, past_key_values=past)
                past = out.past_key_values
            else:
                out = self(input_ids=seq, use_cache=False)
            logits = out.logits[0, -1].float()
            nxt = _pick(logits, greedy, temperature, top_k, gen)
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            step_ids = nxt.view(1, 1)
            if eos_token_id is not None and int(nxt) == eos_token_id:
                break
        return seq


class InPlaceDecoder:
    """Token-by-token decoding of batch 1 without copying the KV cache at every step.

    Each layer's past key and value is one ``(1, kv_heads, max_len, head_dim)`` buffer bound (IO
    binding) both as the ``past_key_values.*`` input and as the ``present.*`` output: ONNX
    Runtime's GroupQueryAttention then sees the same memory on both sides and appends the new
    positions in place (it reads the valid length from the attention mask), where the default path
    allocates a longer present tensor and copies the whole cache at every token. Same logits as
    ``model(..., past_key_values=...)``. ``decoder(ids)`` takes the next ``(1, t)`` token ids
    (the prompt first) and returns float32 logits ``(1, t, vocab)``.
    """

    def __init__(self, model: OnnxCausalLM, max_len: int):
        if not model.in_place_kv:
            raise CompressError(f"{model.path}: in-place KV decoding needs a KV-cache export with "
                                "GroupQueryAttention attention")
        if max_len < 1 or max_len > model.max_positions:
            raise CompressError(f"max_len must be in [1, {model.max_positions}], got {max_len}")
        ort = model._ort
        self.model = model
        self.max_len = int(max_len)
        shape = (1, model.num_kv_heads, self.max_len, model.head_dim)
        self._kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in model.past_names]
        self._io = model.session.io_binding()
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def __call__(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(_as_numpy(ids).astype(np.int64))
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise CompressError(f"in-place KV decoding takes (1, t) token ids, got shape {ids.shape}")
        total = self.length + ids.shape[1]
        if total > self.max_len:
            raise CompressError(f"{total} tokens exceed the decoder's {self.max_len} positions")
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, value in self.model._feeds(ids, self.length, None, None).items():
            io.bind_cpu_input(name, value)
        io.bind_output("logits")
        for past, present, buf in zip(self.model.past_names, self.model.present_names, self._kv):
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)
        self.model.session.run_with_iobinding(io)
        self.length = total
        return io.get_outputs()[0].numpy()


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    if greedy:
        return logits.argmax()
    if temperature <= 0:
        raise CompressError(f"temperature must be > 0 for sampling, got {temperature}")
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[0]


def _seq_len(v) -> int:
    shape = v.shape() if callable(getattr(v, "shape", None)) else v.shape
    return int(shape[2])


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)



# --------------------------------------------------------------------------- what the CLI calls

def eval_ppl_onnx(out_dir, protocol: str = "wt2-quick", max_windows: int | None = None, base_spec: str | None = None,
                  data_dir=None, threads: int | None = None, progress: bool = True) -> dict:
    """Perplexity of an exported ONNX folder run by ONNX Runtime, with the same protocol and result keys
    as :func:`compress.api.eval_ppl` (``compress eval ppl OUT_DIR --runtime onnxruntime``).

    ``base_spec``: a torch model (name or folder) for KL divergence / top-1 agreement."""
    import time

    from . import __version__, models
    from evals.data import PROTOCOLS, data_dir as resolve_data, read_text
    from evals.perplexity import evaluate, tokenize, windows

    if protocol not in PROTOCOLS:
        raise CompressError(f"unknown protocol '{protocol}'; available: {', '.join(PROTOCOLS)}")
    if max_windows is not None and max_windows < 1:
        raise CompressError(f"--max-windows must be at least 1, got {max_windows}")
    proto = PROTOCOLS[protocol]
    model = OnnxCausalLM(out_dir, threads=threads)
    base = models.load(base_spec) if base_spec else None
    text = read_text(resolve_data(data_dir) / proto.file)
    tokens = tokenize(model.tokenizer, text)
    if base is not None and not torch.equal(tokens, tokenize(base.tokenizer, text)):
        raise CompressError(f"{out_dir} and {base_spec} tokenize the text differently; "
                            "KL divergence needs one vocabulary")
    limit = proto.max_windows if max_windows is None else (
        max_windows if proto.max_windows is None else min(max_windows, proto.max_windows))
    wins = windows(tokens, proto.seqlen, limit)
    res = evaluate(model, wins, base.model if base else None, progress, desc=f"{protocol} (onnxruntime)")
    info = model.info
    return {
        "model": str(out_dir), "path": str(model.path), "kind": "onnx", "runtime": "onnxruntime",
        "scheme": f"onnx {info.get('format')} {info.get('source_label')}", "quantized": bool(info.get("bits")),
        "onnx_format": info.get("format"), "accuracy_level": info.get("accuracy_level"), "bits": info.get("bits"),
        "protocol": protocol, "protocol_description": proto.description, "max_windows": max_windows,
        "text_tokens": int(tokens.numel()), **res.to_dict(), "base": base_spec, "threads": threads,
        "size_bytes": sum((model.path / f).stat().st_size for f in ("model.onnx", "model.onnx.data")
                          if (model.path / f).exists()),
        "package_version": __version__, "onnxruntime_version": model._ort.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def generate_text(out_dir, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                  threads: int | None = None, top_k: int | None = None, stop_at_eos: bool = True) -> dict:
    """Continue ``prompt`` with an exported ONNX folder through its KV cache
    (``compress generate OUT_DIR --runtime onnxruntime --prompt ...``); greedy when ``temperature``
    is 0. Returns the keys :func:`compress.api.generate` returns: ``text`` (prompt + continuation),
    ``new_tokens``, ``token_ids``, ``seconds``, ``tokens_per_second``, ``kernel_paths``."""
    import time

    if not prompt:
        raise CompressError("--prompt must not be empty")
    model = OnnxCausalLM(out_dir, threads=threads)
    tok = model.tokenizer
    ids = tok(prompt, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if not ids:
        raise CompressError("the prompt is empty after tokenization")
    eos = getattr(tok, "eos_token_id", None) if stop_at_eos else None
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, greedy=temperature <= 0,
                         temperature=temperature if temperature > 0 else 1.0, top_k=top_k, eos_token_id=eos, seed=seed)
    seconds = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    ops = model.info.get("layers", [])
    return {"text": prompt + tok.decode(new, skip_special_tokens=True), "new_tokens": len(new), "token_ids": new,
            "seconds": seconds, "tokens_per_second": len(new) / seconds if seconds else None,
            "kernel_paths": {"onnxruntime CPUExecutionProvider": {
                "format": model.info.get("format"), "accuracy_level": model.info.get("accuracy_level"),
                "matmuls": len(ops)}}}

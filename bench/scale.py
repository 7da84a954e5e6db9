"""Runs beyond one process and one machine's memory, measured through the CLI as a user runs it.

Suites (each writes one JSON results file):

* ``nproc``: GPTQ on the model with its calibration split between N processes
  (``compress quantize ... --nproc N``) against one process with every core and one process with
  the threads each of the N gets: wall times, their ratios, which outputs are byte-identical (the
  BLAS kernels' summation order depends on the thread count, so the bytes match one process with
  the same threads per process), and the largest process's peak resident memory;
* ``stream``: GPTQ on the model in memory and with ``--stream``: peak resident memory of each and
  whether every tensor is the same (with ``--gguf``, reading the registered model's original GGUF
  file, whose tensors a streamed run decodes one at a time);
* ``synthetic``: a random-weight Llama-architecture model of about ``--synthetic-gb`` GB (float32,
  written tensor by tensor by this script, sharded) quantized with GPTQ ``--stream`` in a child
  process whose memory is capped (``RLIMIT_DATA``, ``--cap-gb``: heap and every private writable
  mapping, which is where tensors live; read-only file mappings of the weights are page cache the
  kernel can drop, and torch's reserved address space is far larger than what it uses, so
  ``RLIMIT_AS`` would measure neither): peak resident memory beside
  the model's size; the preflight refusing the in-memory run under the same cap; and a streamed
  run killed half-way that resumes;
* ``synthetic-kquant``: the same model into a Q4_K_M GGUF with ``kquant --stream`` under the same
  cap (and the in-memory run refused by the preflight);
* ``preflight``: a run whose estimated peak memory exceeds ``--max-memory`` is refused: how long
  the refusal took, its exit code and message, and that nothing was written.

Peak resident memory comes from ``/usr/bin/time -v`` (the largest single process of the tree).

    python bench/scale.py --suite nproc --nproc 2 --out bench/results/scale-nproc-smollm2.json
    python bench/scale.py --suite stream --out bench/results/scale-stream-smollm2.json
    python bench/scale.py --suite stream --gguf --nsamples 32 --out bench/results/scale-stream-smollm2-gguf.json
    python bench/scale.py --suite synthetic --out bench/results/scale-stream-synthetic.json
    python bench/scale.py --suite synthetic-kquant --out bench/results/scale-stream-synthetic-kquant.json
    python bench/scale.py --suite preflight --out bench/results/scale-preflight-smollm2.json

Every results file records the exact command, the package version, the thread count, the CPU and
the load average (bench/runinfo.py); every number in it was measured by that run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from runinfo import finish, run_info  # noqa: E402


def timed(cmd: list[str], env: dict, cap: int | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v (its private writable memory, ``RLIMIT_DATA``, capped at
    ``cap`` bytes): exit code, wall seconds, peak RSS (MiB) and the output."""
    def limit():
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, preexec_fn=limit)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    return {"exit_code": res.returncode, "wall_seconds": round(wall, 3),
            "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "error": errors[0] if errors else _last_words(res.stderr) if res.returncode else None,
            "stdout": res.stdout.strip().splitlines()[-1:]}


def _last_words(stderr: str) -> str | None:
    """The last line a failed command printed before /usr/bin/time's report."""
    lines = stderr.replace("\r", "\n").splitlines()
    cut = next((i for i, line in enumerate(lines) if line.strip().startswith("Command being timed")), len(lines))
    body = [line for line in lines[:cut] if line.strip()]
    return body[-1].strip() if body else None


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def tensors(path: Path) -> dict:
    """Every tensor of a checkpoint folder (any sharding): dtype, shape and a digest of its bytes."""
    sys.path.insert(0, str(ROOT))
    from compress.models import tensor_digests
    return tensor_digests(path)


def gptq_cmd(model: str, nsamples: int, seqlen: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compress", "quantize", model, "--method", "gptq", "--bits", "4", "--group-size",
            "128", "--nsamples", str(nsamples), "--seqlen", str(seqlen), *extra]


def suite_nproc(args, env) -> dict:
    cores = os.cpu_count() or 1
    per = max(1, cores // args.nproc)
    # (label, processes, OMP_NUM_THREADS to set or None, threads each process runs)
    runs = [("1 process, every core", 1, None, cores), (f"1 process, {per} thread(s)", 1, per, per),
            (f"{args.nproc} processes, {per} thread(s) each", args.nproc, None, per)]
    rows, outs = [], []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for label, n, threads, each in runs:
            out = Path(tmp) / f"r{len(rows)}"
            e = dict(env, OMP_NUM_THREADS=str(threads)) if threads else env
            r = timed([*gptq_cmd(args.model, args.nsamples, args.seqlen), "--nproc", str(n), "-o", str(out)], e)
            if r["exit_code"]:
                raise SystemExit(f"{label}: {r['error']}")
            outs.append(files(out))
            rows.append({"run": label, "processes": n, "threads_per_process": each, **r})
            print(json.dumps(rows[-1]), flush=True)
    same = [a.keys() == b.keys() and all(a[k] == b[k] for k in a) for a, b in ((outs[1], outs[2]), (outs[0], outs[2]))]
    return {"method": "gptq w4 g128", "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "rows": rows, "identical_to_one_process_same_threads": same[0],
            "identical_to_one_process_every_core": same[1],
            "wall_ratio_every_core_over_n": round(rows[0]["wall_seconds"] / rows[2]["wall_seconds"], 3),
            "wall_ratio_same_threads_over_n": round(rows[1]["wall_seconds"] / rows[2]["wall_seconds"], 3)}


def suite_stream(args, env) -> dict:
    rows, outs = [], {}
    model = args.model
    if args.gguf:               # the registered model's original GGUF file (fetched with the model)
        sys.path.insert(0, str(ROOT))
        from compress import models
        models.fetch(args.model)
        model = str(models.source_gguf(args.model))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for label, extra in (("in memory", []), ("--stream", ["--stream"])):
            out = Path(tmp) / label.strip("-").replace(" ", "-")
            r = timed([*gptq_cmd(model, args.nsamples, args.seqlen), *extra, "-o", str(out)], env)
            if r["exit_code"]:
                raise SystemExit(f"{label}: {r['error']}")
            outs[label] = tensors(out)
            rows.append({"run": label, **r})
            print(json.dumps(rows[-1]), flush=True)
    a, b = outs.values()
    return {"method": "gptq w4 g128", "model": args.model, "input": "gguf" if args.gguf else "safetensors",
            "nsamples": args.nsamples, "seqlen": args.seqlen, "rows": rows, "identical_tensors": a.keys() == b.keys() and all(a[k] == b[k] for k in a),
            "peak_rss_ratio_memory_over_stream": round(rows[0]["peak_rss_mib"] / rows[1]["peak_rss_mib"], 3)}


def write_synthetic(folder: Path, gb: float, like: Path) -> dict:
    """A random-weight Llama-architecture model of about ``gb`` GB in float32, written tensor by
    tensor into ~1 GB shards (never whole in memory), with the tokenizer of the model at ``like``."""
    import shutil as sh

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    folder.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            sh.copy(f, folder / f.name)
    h, inter, vocab = 2048, 5632, 49152
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, round((gb * 1e9 / 4 - 2 * vocab * h - h) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    def tensors_of(i):
        if i == -1:
            return {"model.embed_tokens.weight": rand(vocab, h)}
        if i == layers:
            return {"model.norm.weight": torch.ones(h), "lm_head.weight": rand(vocab, h)}
        p = f"model.layers.{i}."
        t = {p + f"self_attn.{n}_proj.weight": rand(h, h) for n in "qkvo"}
        t.update({p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                  p + "mlp.down_proj.weight": rand(h, inter), p + "input_layernorm.weight": torch.ones(h),
                  p + "post_attention_layernorm.weight": torch.ones(h)})
        return t

    shards, cur, size, weight_map = [], {}, 0, {}
    for i in range(-1, layers + 1):
        t = tensors_of(i)
        cur.update(t)
        size += sum(v.numel() * 4 for v in t.values())
        if size >= 1 << 30 or i == layers:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(cur, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in cur})
            shards.append(name)
            cur, size = {}, 0
    total = sum((folder / n).stat().st_size for n in shards)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))
    return {"layers": layers, "hidden": h, "intermediate": inter, "vocab": vocab, "bytes": total,
            "parameters": total // 4, "shards": len(shards)}


def suite_synthetic(args, env) -> dict:
    import signal
    sys.path.insert(0, str(ROOT))
    from compress import models
    cap = int(args.cap_gb * (1 << 30))
    out_rows = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        model = Path(tmp) / "synthetic-llama"
        t0 = time.perf_counter()
        info = write_synthetic(model, args.synthetic_gb, models.fetch(args.model))
        info["write_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(info), flush=True)
        base = gptq_cmd(str(model), args.nsamples, args.seqlen, "--max-memory", f"{args.cap_gb}GiB")
        # the in-memory run is refused by the preflight, quickly, with nothing written
        r = timed([*base, "-o", str(Path(tmp) / "mem")], env, cap)
        out_rows["in_memory_preflight"] = {**r, "left_behind": (Path(tmp) / "mem").exists()}
        print(json.dumps(out_rows["in_memory_preflight"]), flush=True)
        # streamed, under the cap
        ref = Path(tmp) / "stream"
        r = timed([*base, "--stream", "-o", str(ref)], env, cap)
        out_rows["stream"] = r
        print(json.dumps(r), flush=True)
        if r["exit_code"]:
            raise SystemExit(f"streamed run failed: {r['error']}")
        ref_tensors = tensors(ref)
        out_bytes = sum((ref / f).stat().st_size for f in os.listdir(ref) if f.endswith(".safetensors"))
        shutil.rmtree(ref)
        # killed half-way, then the same command again
        out, work = Path(tmp) / "resumed", Path(tmp) / ".resumed.work"
        proc = subprocess.Popen([*base, "--stream", "-o", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=lambda: resource.setrlimit(
                                    resource.RLIMIT_DATA, (cap, cap)))
        blocks, half = 0, info["layers"] // 2
        while proc.poll() is None and blocks < half:
            try:
                blocks = json.loads((work / "progress.json").read_text())["steps"]["0"]["blocks"]
            except (OSError, ValueError, KeyError):
                blocks = 0
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = timed([*base, "--stream", "-o", str(out)], env, cap)
        same = r["exit_code"] == 0 and tensors(out) == ref_tensors
        out_rows["resume"] = {"blocks_done_when_killed": blocks, **r, "identical_tensors_to_uninterrupted": same}
        print(json.dumps(out_rows["resume"]), flush=True)
    return {"model": info, "cap": f"RLIMIT_DATA {args.cap_gb} GiB on the child process", "nsamples": args.nsamples,
            "seqlen": args.seqlen, "method": "gptq w4 g128", **out_rows,
            "output_bytes": out_bytes,
            "peak_rss_over_model_size": round(out_rows["stream"]["peak_rss_mib"] * (1 << 20) / info["bytes"], 3)}


def suite_synthetic_kquant(args, env) -> dict:
    """The synthetic model into a Q4_K_M GGUF with ``kquant --stream`` under the same cap."""
    sys.path.insert(0, str(ROOT))
    from compress import models
    cap = int(args.cap_gb * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        model = Path(tmp) / "synthetic-llama"
        info = write_synthetic(model, args.synthetic_gb, models.fetch(args.model))
        print(json.dumps(info), flush=True)
        base = [sys.executable, "-m", "compress", "quantize", str(model), "--method", "kquant", "--type", "q4_k_m",
                "--max-memory", f"{args.cap_gb}GiB"]
        pre = timed([*base, "-o", str(Path(tmp) / "mem.gguf")], env, cap)
        pre["left_behind"] = (Path(tmp) / "mem.gguf").exists()
        print(json.dumps(pre), flush=True)
        out = Path(tmp) / "stream.gguf"
        r = timed([*base, "--stream", "-o", str(out)], env, cap)
        print(json.dumps(r), flush=True)
        size = out.stat().st_size if out.exists() else None
    return {"model": info, "cap": f"RLIMIT_DATA {args.cap_gb} GiB on the child process", "type": "Q4_K_M",
            "in_memory_preflight": pre, "stream": r, "output_bytes": size,
            "peak_rss_over_model_size": round(r["peak_rss_mib"] * (1 << 20) / info["bytes"], 3) if r["peak_rss_mib"] else None}


def suite_preflight(args, env) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "compress", "quantize", args.model, "--method", "gptq", "--nsamples",
               str(args.nsamples), "--seqlen", str(args.seqlen), "--max-memory", args.max_memory, "-o", str(out)]
        r = timed(cmd, env)
        left = sorted(p.name for p in Path(tmp).iterdir())
    return {"model": args.model, "max_memory": args.max_memory, "nsamples": args.nsamples, "seqlen": args.seqlen,
            **r, "refused": r["exit_code"] != 0 and bool(r["error"]), "left_behind": left,
            "under_two_seconds": r["wall_seconds"] < 2.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["nproc", "stream", "synthetic", "synthetic-kquant", "preflight"], required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--synthetic-gb", type=float, default=6.0)
    ap.add_argument("--cap-gb", type=float, default=3.0)
    ap.add_argument("--gguf", action="store_true", help="stream: read the model from its original GGUF file.")
    ap.add_argument("--tmp", default=None, help="Folder for the outputs (default: the system's temporary folder).")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    info = run_info("bench/scale.py")
    result = {"nproc": suite_nproc, "stream": suite_stream, "synthetic": suite_synthetic,
              "synthetic-kquant": suite_synthetic_kquant, "preflight": suite_preflight}[args.suite](args, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run": finish(info), "suite": args.suite, **result}, indent=1) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()

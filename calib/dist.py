"""Several processes under ``torch.distributed``: the process group, how calibration windows are
split, statistics summed in one fixed order, and results sent from the process that computed them.

Launched by ``torchrun`` (``WORLD_SIZE`` and the rendezvous variables in the environment), every
process joins one group: gloo on the CPU, NCCL on CUDA. Without it everything here is the one
process case and costs nothing.

**Byte-identical results for any number of processes.** Floating-point sums depend on their
order, so the order is fixed by the windows alone, never by the number of processes:

* the windows form *batches* of :data:`BATCH` consecutive windows (the block runs on a batch at a
  time, in every process the same batches), and the batches form :data:`SHARDS` contiguous
  *shards* (fewer when there are fewer batches);
* each process takes a contiguous run of whole shards;
* statistics are accumulated per shard (a fresh accumulator, the shard's batches in order), then
  the shards are merged in shard order (:func:`merge_in_order`): rank 0 folds its own shards,
  then receives every other rank's shards in rank order and folds them, and sends the total to
  everyone.

One process folds the same shards in the same order, so its statistics, and everything computed
from them, are the same bytes. A rank holds its own shards' statistics until rank 0 asks for
them: memory for statistics grows with ``SHARDS / world size``, not with the number of windows.
"""
from __future__ import annotations

import json
import os

import torch

BATCH = 4       # windows per forward pass of a block
SHARDS = 8      # shards the batches are grouped into (fewer when there are fewer batches)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> int:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on CUDA); the rank."""
    if launched() and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group("nccl")
        else:
            torch.distributed.init_process_group("gloo")
    return world()[0]


def launch(nproc: int, cmd: list[str]) -> int:
    """Run ``cmd`` in ``nproc`` processes on this machine as torchrun would (rank, world size and a
    free rendezvous port in the environment, one thread each share of the cores) and wait for them.

    When one fails the others get a moment to end, then are stopped (they would wait for it forever
    in a collective). Rank 0 writes to this terminal; when it failed by itself its exit code is
    returned, otherwise the first failed rank's output is shown and its exit code returned."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs, logs = [], []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "OMP_NUM_THREADS": threads}
        log = None if rank == 0 else tempfile.TemporaryFile()
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
        if failed:
            # The others often fail on the same error a moment later: let them end on their own for a
            # short while (one that waits in a collective never will), so that rank 0's own error,
            # already on this terminal, is not shown a second time from another rank's log.
            deadline = time.monotonic() + 3.0
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            codes = [p.returncode for p in procs]
            r = 0 if codes[0] and codes[0] > 0 else failed[0]
            if r != 0:
                logs[r].seek(0)
                sys.stderr.write(logs[r].read().decode(errors="replace"))
            return codes[r]
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            if log is not None:
                log.close()


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where tensors must be for the group's backend."""
    if world()[1] > 1 and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- the window plan
class Plan:
    """Which windows this process holds and how they form batches and shards (see the module doc).

    ``shards``: this rank's shards, each a list of batches, each a list of *local* window indices
    (positions in :attr:`windows`); ``windows``: the global indices of this rank's windows.
    """

    def __init__(self, nwindows: int, rank: int = 0, size: int = 1, batch: int = BATCH, shards: int = SHARDS):
        if nwindows < 1:
            raise ValueError("no calibration windows")
        nb = -(-nwindows // batch)
        ns = min(shards, nb)
        if size > ns:
            raise ValueError(f"{size} processes for {nwindows} calibration windows: each process needs at least one "
                             f"shard of {batch * (-(-nb // ns))} windows; use at most {ns} processes or more windows")
        self.nwindows, self.rank, self.size = nwindows, rank, size
        bounds = [s * nb // ns for s in range(ns + 1)]                    # batch index bounds of each shard
        mine = range(rank * ns // size, (rank + 1) * ns // size)          # this rank's shard indices
        self.shard_ids = list(mine)
        self.shard_owner = [next(r for r in range(size) if s < (r + 1) * ns // size) for s in range(ns)]
        first = bounds[mine.start] * batch
        last = min(nwindows, bounds[mine.stop] * batch)
        self.windows = list(range(first, last))
        self.shards = []
        for s in mine:
            self.shards.append([[w - first for w in range(b * batch, min(nwindows, (b + 1) * batch))]
                                for b in range(bounds[s], bounds[s + 1])])

    @classmethod
    def current(cls, nwindows: int) -> "Plan":
        rank, size = world()
        return cls(nwindows, rank, size)

    def batches(self):
        for shard in self.shards:
            yield from shard


# --------------------------------------------------------------------------- collectives
def _send_state(acc, dst: int) -> None:
    dev = _comm_device()
    torch.distributed.send(torch.tensor([acc.nsamples], dtype=torch.int64, device=dev), dst)
    for t in acc.state().values():
        torch.distributed.send(t.detach().to(dev).contiguous(), dst)


def _recv_state(like, src: int):
    """An accumulator of ``like``'s kind and width holding the state ``src`` sent."""
    dev = _comm_device()
    n = torch.zeros(1, dtype=torch.int64, device=dev)
    torch.distributed.recv(n, src)
    acc = type(like)(like.in_features, dtype=like.dtype, device=like.device or "cpu")
    tensors = {}
    for k, t in acc.state().items():
        buf = torch.empty(t.shape, dtype=t.dtype, device=dev)
        torch.distributed.recv(buf, src)
        tensors[k] = buf.to(acc.device or "cpu")
    acc.load_state(tensors, int(n.item()))
    return acc


def _broadcast_state(acc, src: int = 0):
    dev = _comm_device()
    n = torch.tensor([acc.nsamples], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(n, src)
    tensors = {}
    for k, t in acc.state().items():
        buf = t.detach().to(dev).contiguous()
        torch.distributed.broadcast(buf, src)
        tensors[k] = buf.to(acc.device or "cpu")
    acc.load_state(tensors, int(n.item()))
    return acc


def merge_in_order(plan: Plan, shard_stats: list[dict]) -> dict:
    """Merge per-shard statistics (``shard_stats[j]``: ``{key: accumulator}`` of this rank's shard j)
    in global shard order; every rank gets the same total, the same bytes as one process folding
    all shards."""
    keys = list(shard_stats[0])
    total = {}

    def fold(stats):
        for k in keys:
            total[k] = stats[k] if k not in total else total[k].merge(stats[k])

    if plan.size == 1:
        for st in shard_stats:
            fold(st)
        return total
    if plan.rank == 0:
        for st in shard_stats:
            fold(st)
        for s, owner in enumerate(plan.shard_owner):
            if owner != 0:
                fold({k: _recv_state(shard_stats[0][k], owner) for k in keys})
    else:
        for st in shard_stats:
            for k in keys:
                _send_state(st[k], 0)
        total = {k: shard_stats[0][k] for k in keys}
    return {k: _broadcast_state(total[k]) for k in keys}


def broadcast_tensors(tensors: dict | None, meta: dict | None, src: int) -> tuple[dict, dict]:
    """Send ``tensors`` (``{name: tensor}``) and ``meta`` (JSON-able) from rank ``src`` to every rank;
    the other ranks pass None and get them back (on the CPU). Names, shapes and dtypes travel as
    JSON, so nothing is pickled."""
    dev = _comm_device()
    rank = world()[0]
    if rank == src:
        head = json.dumps({"meta": meta, "tensors": [[k, list(t.shape), str(t.dtype).removeprefix("torch.")]
                                                      for k, t in tensors.items()]}).encode()
        size = torch.tensor([len(head)], dtype=torch.int64, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=dev)
    torch.distributed.broadcast(size, src)
    buf = (torch.frombuffer(bytearray(head), dtype=torch.uint8).to(dev) if rank == src
           else torch.empty(int(size.item()), dtype=torch.uint8, device=dev))
    torch.distributed.broadcast(buf, src)
    desc = json.loads(bytes(buf.cpu().tolist()).decode())
    out = {}
    for name, shape, dtype in desc["tensors"]:
        t = (tensors[name].detach().to(dev).contiguous() if rank == src
             else torch.empty(shape, dtype=getattr(torch, dtype), device=dev))
        torch.distributed.broadcast(t, src)
        out[name] = tensors[name] if rank == src else t.cpu()
    return out, desc["meta"]


def owner_of(j: int) -> int:
    """The rank that solves the ``j``-th of a list of independent jobs (round robin)."""
    return j % world()[1]

"""Several processes writing one model: the planned output shards are divided among them.

Two ways in: `merger apply --workers K` starts K local processes itself, and a launcher that sets
WORLD_SIZE/RANK (`accelerate launch`, `torchrun`) runs one `merger apply` per rank, which meet through
torch.distributed (gloo). Either way every process writes whole shards into one staging directory and
the first process alone writes the index and renames the directory into place, so the output is
byte-identical to a single-process run.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import timedelta
from pathlib import Path

from merger.errors import MergerError
from merger.plan import Plan, Shard
from merger.stream import default_threads, write_shards

TIMEOUT_ENV = "MERGER_DIST_TIMEOUT"  # seconds a rank waits for the others (to start, or to finish their shards)


def assign(shards: list[Shard], world: int) -> list[list[int]]:
    """Shard indices per process: largest first to the least loaded (ties to the lower rank)."""
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(shards)), key=lambda i: (-shards[i].nbytes, i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += shards[i].nbytes
    return [sorted(p) for p in parts]


def _write_part(plan: Plan, directory: Path, shards: list[int], threads: int, index: int = 0) -> tuple[int, int, int]:
    """One --workers process's shards; on CUDA on GPU index % count, so K workers spread over the GPUs.
    Returns (bytes read, this process's peak resident memory, its peak GPU memory)."""
    from merger.output import peak_rss  # output imports this module

    gpu = 0
    if plan.device == "cuda":
        import torch

        torch.cuda.set_device(index % torch.cuda.device_count())
    read = write_shards(plan, directory, shards=shards, threads=threads)
    if plan.device == "cuda":
        gpu = torch.cuda.max_memory_allocated()
    return read, peak_rss(), gpu


def write_with_workers(plan: Plan, directory: Path, workers: int) -> tuple[int, int, int]:
    """Write all shards with `workers` local processes; returns (bytes read, the largest worker's peak
    resident memory, the largest peak GPU memory). A process that dies (killed, out of memory) fails
    the merge instead of leaving the others waiting for its shards."""
    parts = [p for p in assign(plan.shards, workers) if p]
    ctx = multiprocessing.get_context("spawn")  # fork would copy our threads (and torch's CUDA state)
    threads = max(1, default_threads() // len(parts))  # the cores, shared among the processes
    with ProcessPoolExecutor(len(parts), mp_context=ctx) as pool:
        jobs = [pool.submit(_write_part, plan, directory, p, threads, i) for i, p in enumerate(parts)]
        try:
            done = [j.result() for j in jobs]
            return sum(r[0] for r in done), max(r[1] for r in done), max(r[2] for r in done)
        except BrokenProcessPool:
            raise MergerError("a --workers process died while writing its shards (killed, or out of memory?)") from None


class GroupError(MergerError):
    """Another process of a distributed launch is gone (it crashed, or never came)."""


class Group:
    """The processes of a distributed launch (WORLD_SIZE > 1), over gloo. A rank that dies makes the
    others' next exchange fail at once (its connections close); one that never joins, or hangs, is
    waited for MERGER_DIST_TIMEOUT seconds (default 1800). Launchers such as torchrun stop the other
    ranks themselves when one exits with an error."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = int(os.environ.get("RANK", "0"))
        if not dist.is_initialized():
            raw = os.environ.get(TIMEOUT_ENV, "1800")
            try:
                seconds = float(raw)
            except ValueError:
                seconds = -1.0
            if not seconds > 0:
                raise MergerError(f"{TIMEOUT_ENV}: '{raw}' is not a positive number of seconds")
            self._call("meet the other ranks", dist.init_process_group, "gloo", timeout=timedelta(seconds=seconds))
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # gloo: connection closed, timeout; its first sentence says which
            text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())  # gloo's "[source.cc:553] " prefix
            cause = re.split(r"(?<=\.)\s", text, maxsplit=1)[0] if text else type(e).__name__
            raise GroupError(
                f"rank {self.rank}: could not {what}: another process of the distributed merge stopped "
                f"or did not answer (see its log; {TIMEOUT_ENV} sets the wait): {cause}"
            ) from None

    def share(self, value: object) -> object:
        """Rank 0's value, on every rank."""
        box = [value]
        self._call("receive rank 0's staging directory", self.dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, value: object) -> list[object]:
        out: list[object] = [None] * self.world
        self._call("collect every rank's result", self.dist.all_gather_object, out, value)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a group that lost a rank may not tear down cleanly
            self.dist.destroy_process_group()


def launched_group() -> Group | None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return Group()

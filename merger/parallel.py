"""Several processes writing one model: the planned output shards are divided among them.

Two ways in: `merger apply --workers K` starts K local processes itself, and a launcher that sets
WORLD_SIZE/RANK (`accelerate launch`, `torchrun`) runs one `merger apply` per rank, which meet through
torch.distributed (gloo). Either way every process writes whole shards into one staging directory and
the first process alone writes the index and renames the directory into place, so the output is
byte-identical to a single-process run.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from merger.plan import Plan, Shard
from merger.stream import default_threads, write_shards


def assign(shards: list[Shard], world: int) -> list[list[int]]:
    """Shard indices per process: largest first to the least loaded (ties to the lower rank)."""
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(shards)), key=lambda i: (-shards[i].nbytes, i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += shards[i].nbytes
    return [sorted(p) for p in parts]


def _write_part(plan: Plan, directory: Path, shards: list[int], threads: int) -> int:
    return write_shards(plan, directory, shards=shards, threads=threads)


def write_with_workers(plan: Plan, directory: Path, workers: int) -> int:
    """Write all shards with `workers` local processes; returns bytes read."""
    parts = [p for p in assign(plan.shards, workers) if p]
    ctx = multiprocessing.get_context("spawn")  # fork would copy our threads (and torch's CUDA state)
    threads = max(1, default_threads() // len(parts))  # the cores, shared among the processes
    with ctx.Pool(len(parts)) as pool:
        return sum(pool.starmap(_write_part, [(plan, directory, p, threads) for p in parts]))


class Group:
    """The processes of a distributed launch (WORLD_SIZE > 1), over gloo."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def share(self, value: object) -> object:
        """Rank 0's value, on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: object) -> list[object]:
        out: list[object] = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        self.dist.destroy_process_group()


def launched_group() -> Group | None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return Group()

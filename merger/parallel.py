"""Several processes writing one model: the planned output shards are divided among them.

Two ways in: `merger apply --workers K` starts K local processes itself, and a launcher that sets
WORLD_SIZE/RANK (`accelerate launch`, `torchrun`) runs one `merger apply` per rank, which meet through
torch.distributed (gloo). Either way every process writes whole shards into the one partial output
(merger.staging) and records each as it finishes; the first process alone writes the index and puts the
output in place, so the output is byte-identical to a single-process run, and an interrupted one
resumes as any does.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import threading
import time
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

from tqdm import tqdm

from merger import budget, system
from merger.errors import MergerError, describe
from merger.plan import Plan, Shard
from merger.stream import write_shards

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


def _write_part(
    plan: Plan, directory: Path, shards: list[int], threads: int, index: int, finished, durable: bool, workers: int = 1
):
    """One of `workers` processes' shards; on CUDA on GPU index % count, so they spread over the GPUs,
    and share the GPU and pinned-memory budgets (budget.local_processes). Returns (bytes read, this
    process's peak resident memory, its peak GPU memory)."""
    if workers > 1:
        os.environ[budget.WORKERS_ENV] = str(workers)  # this process's own environment
    gpu = 0
    if plan.device == "cuda":
        import torch

        torch.cuda.set_device(index % torch.cuda.device_count())
    read = write_shards(plan, directory, shards=shards, threads=threads, finished=finished, durable=durable)
    if plan.device == "cuda":
        gpu = torch.cuda.max_memory_allocated()
    return read, system.peak_rss(), gpu


def _worker(conn, parent: int, *args) -> None:
    """A --workers process: write its shards, send back ("ok", result) or ("error", exception). It ends
    with its parent, and leaves Ctrl-C to it (the parent ends its workers)."""
    system.die_with_parent(at_once=True, parent=parent)
    # tqdm's default lock holds a named semaphore: a worker ended mid-merge (an interrupt, a failure) would
    # leave it to the resource tracker, which warns of it on the terminal. A worker draws no bar of its own.
    tqdm.set_lock(threading.RLock())
    try:
        result: tuple = ("ok", _write_part(*args))
    except BaseException as e:  # the parent raises it
        result = ("error", e)
    try:
        conn.send(result)
    except (BrokenPipeError, ConnectionError):  # the parent is gone: nobody to tell
        os._exit(1)
    except Exception:  # an exception that does not pickle
        conn.send(("error", MergerError(describe(result[1]))))


class ProcessDied(MergerError):
    """A process that writes shards (a --workers process, or a rank of a launch) is gone."""


def write_with_workers(
    plan: Plan, directory: Path, workers: int, shards: list[int], finished=None, durable: bool = False
) -> tuple[int, int, int]:
    """Write the given shards with up to `workers` local processes; returns (bytes read, the largest
    worker's peak resident memory, the largest peak GPU memory). A process that dies (killed, out of
    memory) fails the merge at once; a failure, or an interrupt, ends every other process."""
    mine = [plan.shards[i] for i in shards]
    parts = [[shards[i] for i in p] for p in assign(mine, budget.worker_processes(workers, len(mine))) if p]
    ctx = multiprocessing.get_context("spawn")  # fork would copy our threads (and torch's CUDA state)
    threads = max(1, system.default_threads() // max(1, len(parts)))  # the cores, shared among the processes
    procs, results, answered = {}, [], []
    try:
        # Started with SIGINT ignored, which they keep: Ctrl-C reaches the whole process group, and only
        # the parent should act on it (it ends the workers), not every worker with a traceback of its own.
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for i, part in enumerate(parts):
                recv, send = ctx.Pipe(duplex=False)
                args = (send, os.getpid(), plan, directory, part, threads, i, finished, durable, len(parts))
                proc = procs[recv] = ctx.Process(target=_worker, args=args, name=f"merger-worker-{i}", daemon=True)
                proc.start()
                send.close()
        finally:
            signal.signal(signal.SIGINT, sigint)
        waiting = set(procs)
        while waiting:
            for conn in wait(list(waiting)):
                try:
                    status, value = conn.recv()
                except EOFError:  # it exited without a word: killed
                    raise ProcessDied(
                        "a --workers process died while writing its shards (killed, or out of memory?)"
                    ) from None
                if status == "error":
                    raise value
                results.append(value)
                answered.append(procs[conn])
                waiting.discard(conn)
    finally:
        _end(procs.values(), answered)
    return sum(r[0] for r in results), max((r[1] for r in results), default=0), max((r[2] for r in results), default=0)


EXIT_WAIT = 10.0  # seconds a worker that sent its result may take to exit before it is stopped


def _end(procs, answered=()) -> None:
    """Reap the worker processes: those that sent their result are left to exit on their own first (one
    stopped while exiting leaves its semaphores to the resource tracker, which then warns of them), and the
    rest (after a failure or an interrupt) are stopped at once."""
    procs = [proc for proc in procs if proc.pid is not None]  # one that failed to start has nothing to reap
    for proc in procs:
        if proc not in answered and proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + EXIT_WAIT
    for proc in answered:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


class GroupError(ProcessDied):
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
    """The distributed launch this process is a rank of (WORLD_SIZE > 1), else None. A rank ends when
    its launcher does."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    system.die_with_parent(at_once=False)
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return Group()

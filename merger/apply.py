"""`merger apply`: a plan made into a finished output directory.

In order: the destination is checked, its partial output taken hold of (an interrupted run's finished
shards are kept), Hub inputs fetched, every input hashed for the lock beside the merge, the missing
shards written (in this process, by --workers processes, or by the ranks of a launch), then the index,
config, tokenizer, card and lock, and the whole swapped into place (merger.staging).
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from merger import parallel, system
from merger.errors import Interrupted, MergerError, OutputError, describe
from merger.fetch import JustInTime, fetch_inputs
from merger.lock import Lock, LockedInput, inputs_of, listed
from merger.output import write_metadata
from merger.plan import Plan
from merger.sources import Confined
from merger.staging import Finished, Partial, check_destination
from merger.stream import write_shards


def apply(
    plan: Plan,
    dest: Path,
    *,
    force: bool = False,
    progress: bool = False,
    workers: int = 1,
    low_disk: bool = False,
    lock: Lock | None = None,
    lock_name: str = "lock",
    card: str | None = None,
    provenance: Plan | None = None,
    durable: bool = True,
) -> dict | None:
    """Run the whole merge into `dest`. Returns a summary for --json (None on ranks other than 0 of a
    distributed launch, which only write their shards). `card`: markdown added to the model card.

    Hub inputs are downloaded first: all their files, or with `low_disk` all but the weights, which are
    then fetched shard by shard as the merge maps them and deleted after. With `lock`, every input must
    match it: Hub inputs before anything is downloaded, local ones before anything is written.
    `provenance`: the plan whose inputs the lock records, if not `plan` (greedy soup: every ingredient
    its search read). `durable`: flush the output to disk before it counts as done (a temporary
    candidate of greedy soup needs none of that, nor a lock)."""
    start = time.perf_counter()
    dest = dest.expanduser().resolve()
    check_destination(dest, plan, force)
    group = parallel.launched_group()
    if low_disk and workers > 1:
        raise MergerError("--low-disk fetches and deletes Hub shards in one process; leave out --workers")
    if low_disk and group is not None:
        raise MergerError("--low-disk fetches and deletes Hub shards in one process, not in a distributed launch")
    verified = None
    if lock is not None:  # every input matches the lock before anything is written
        lock.verify(listed(provenance or plan), lock_name)  # Hub inputs, before anything is downloaded
        fetch_inputs(plan, weights=not low_disk)
        verified = inputs_of(provenance or plan, hub_weights=not low_disk)
        lock.verify(verified, lock_name)
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    job = Job(plan, dest, verified, provenance, low_disk, durable)
    if group is not None:
        bytes_read = _as_rank(job, force, progress, group, card)
        if bytes_read is None:
            return None
        peaks = (system.peak_rss(), 0)
    else:
        bytes_read, peaks = _in_this_process(job, force, progress, workers, card)
    summary = {
        "output": str(dest),
        "method": plan.spec.method.name,
        "device": plan.device,
        "tensors": len(plan.tensors),
        "shards": len(plan.shards),
        "processes": group.world if group else workers,
        "bytes_read": bytes_read,
        "bytes_written": plan.bytes_written,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": max(system.peak_rss(), peaks[0]),  # per process: the largest, workers included
    }
    if plan.device == "cuda":
        import torch

        summary["peak_gpu_bytes"] = max(torch.cuda.max_memory_allocated(), peaks[1])
    return summary


class Job:
    """What every way of writing the shards shares: the plan, where it goes, and what the lock needs
    (`verified`: the inputs as hashed to check a lock, if one was checked)."""

    def __init__(self, plan, dest, verified, provenance, low_disk, durable):
        self.plan, self.dest, self.verified = plan, dest, verified
        self.provenance, self.low_disk, self.durable = provenance or plan, low_disk, durable
        self.stop = threading.Event()

    @contextlib.contextmanager
    def beside(self) -> Iterator[ThreadPoolExecutor]:
        """A thread to hash the inputs on beside the merge, told to stop if the merge fails or is
        interrupted: nobody then waits for the hashing of a 70B model that no longer matters."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="merger-hash")
        try:
            yield pool
        except BaseException:
            self.stop.set()
            raise
        finally:
            pool.shutdown()

    def hash_inputs(self, pool: ThreadPoolExecutor, shards: list[int]) -> Future | None:
        """Fetch the Hub files `shards` need (all of them, or with --low-disk all but the weights), then
        start hashing every input for the lock beside the merge (unless a lock's check did already).
        None where no lock is written (a temporary candidate)."""
        fetch_inputs(self.plan, weights=not self.low_disk, shards=shards)
        if not self.durable:
            return None
        if self.verified is not None:
            done: Future = Future()
            done.set_result(self.verified)
            return done
        return pool.submit(inputs_of, self.provenance, hub_weights=not self.low_disk, stop=self.stop)

    def finish(self, partial: Partial, hashing: Future | None, card: str | None) -> int:
        """Once the shards are written: record the inputs (any kept shard whose inputs turn out to have
        changed is written again), then the index, config, tokenizer, card and lock. Returns the bytes
        read to write shards again."""
        inputs: list[LockedInput] | None = hashing.result() if hashing else None
        again = partial.check_inputs(inputs) if inputs is not None else []
        read = 0
        if again:
            read = write_shards(self.plan, partial.model, shards=again, finished=partial.finished, durable=self.durable)
        write_metadata(self.plan, partial.model, self.dest.name, inputs, card)
        return read


def _in_this_process(job: Job, force: bool, progress: bool, workers: int, card: str | None):
    """The shards written here (or by --workers processes), then committed. Returns (bytes read, the
    workers' largest peak RSS and GPU memory)."""
    plan = job.plan
    partial = Partial(job.dest, plan, durable=job.durable)
    peaks = (0, 0)
    try:
        with _kept_for_resume(partial), job.beside() as pool:
            hashing = job.hash_inputs(pool, partial.todo)
            if workers > 1:
                read, *peaks = parallel.write_with_workers(
                    plan, partial.model, workers, partial.todo, partial.finished, job.durable
                )
            else:
                files = JustInTime(plan, partial.todo) if job.low_disk else Confined(plan.models)
                read = write_shards(
                    plan,
                    partial.model,
                    progress=progress,
                    shards=partial.todo,
                    files=files,
                    finished=partial.finished,
                    durable=job.durable,
                )
            read += job.finish(partial, hashing, card)
            partial.commit(force)
    finally:
        partial.close()
    return read, tuple(peaks)


def _as_rank(job: Job, force: bool, progress: bool, group: parallel.Group, card: str | None) -> int | None:
    """This rank's share of the shards still to write; rank 0 then finishes the directory. Every rank
    reports before anyone commits, so one failing rank fails the whole merge (every rank exits with an
    error) and nothing lands at the destination; a rank that dies outright fails the others' exchange.
    Rank 0 holds the partial output: what finished is kept for the next launch to resume."""
    plan = job.plan
    partial = Partial(job.dest, plan, durable=job.durable) if group.rank == 0 else None
    try:
        with _kept_for_resume(partial), job.beside() as pool:
            where, todo = group.share((str(partial.path), partial.todo) if partial else None)
            finished = Finished(Path(where), job.durable)
            parts = parallel.assign([plan.shards[i] for i in todo], group.world)
            mine = [todo[i] for i in parts[group.rank]]
            result: tuple[int, str | None] = (0, None)
            try:
                hashing = job.hash_inputs(pool, mine) if group.rank == 0 else fetch_inputs(plan, shards=mine)
                read = write_shards(
                    plan, Path(where) / "model", progress=progress and group.rank == 0, shards=mine, finished=finished,
                    durable=job.durable,
                )  # fmt: skip
                result = (read, None)
            except Exception as e:  # reported through the gather below
                result = (0, f"rank {group.rank}: {describe(e)}")
            results = group.gather(result)
            errors = [err for _, err in results if err]
            if errors:  # rank 0 says everything; the others what failed there, if anything
                elsewhere = f"rank {group.rank}: the merge failed on another rank (rank 0's log says why)"
                raise MergerError("\n".join(errors) if group.rank == 0 else result[1] or elsewhere)
            if partial is None:
                return None
            read = sum(n for n, _ in results) + job.finish(partial, hashing, card)
            partial.commit(force)
            return read
    finally:
        if partial is not None:
            partial.close()
        group.close()


class _kept_for_resume:
    """Around writing a partial output: an interruption or an I/O error (a full disk) keeps what is done
    for the same command to resume, and says so; any other failure removes it (the same inputs would
    fail the same way). A worker or rank that died keeps it too."""

    def __init__(self, partial: Partial | None):
        self.partial = partial

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        partial = self.partial
        if partial is None or error is None:
            return False
        kept = len(_finished(partial))
        interrupted = isinstance(error, KeyboardInterrupt) or system.INTERRUPTED.is_set()
        resumable = kept > 0 and (interrupted or isinstance(error, OSError | parallel.ProcessDied))
        if resumable:
            after = (
                f"{kept} of {len(partial.plan.shards)} shards are done and kept in {partial.path}: run the same "
                "command again to resume (or delete it)"
            )
        else:
            partial.discard()  # nothing done yet, or a failure that would come again
            after = "nothing was written to the output"
        if interrupted:
            raise Interrupted(f"interrupted; {after}") from None
        if isinstance(error, OSError):
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                what = f"output {partial.dest}: no space left on the device"
            else:  # an error without a file name came from writing the output
                what = describe(error) if error.filename else f"output {partial.dest}: {describe(error)}"
            raise OutputError(f"{what}; {after}") from None
        if resumable:
            raise parallel.ProcessDied(f"{error}; {after}") from None
        return False


def _finished(partial: Partial) -> list[Path]:
    return list((partial.path / "done").glob("*.json")) if (partial.path / "done").is_dir() else []

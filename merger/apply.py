"""`merger apply`: a plan made into a finished output directory.

In order: the destination is checked, its partial output taken hold of (an interrupted run's finished
shards are kept), Hub inputs fetched, every input hashed for the lock beside the merge, the missing
shards written (in this process, by --workers processes, or by the ranks of a launch), then the index,
config, tokenizer, card and lock, and the whole swapped into place (merger.staging).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from merger import budget, parallel, system
from merger.errors import (
    DiskFull,
    Interrupted,
    MergeError,
    MergerError,
    OutputError,
    RecipeError,
    describe,
    problems_of,
)
from merger.fetch import JustInTime, fetch_inputs, room
from merger.lock import Lock, LockedInput, checked_inputs, inputs_of, listed
from merger.output import write_metadata
from merger.plan import Plan
from merger.sources import Confined, FileSource
from merger.staging import Finished, Partial, check_destination, join, recover
from merger.stream import model_pass, write_shards


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
    recover(dest)
    check_destination(dest, plan, force)
    group = parallel.launched_group()
    if low_disk and workers > 1:
        raise MergerError("--low-disk fetches and deletes Hub shards in one process; leave out --workers")
    if low_disk and group is not None:
        raise MergerError("--low-disk fetches and deletes Hub shards in one process, not in a distributed launch")
    if low_disk and plan.model_wide:
        raise MergerError(
            f"--low-disk fetches Hub shards as the merge reads them, but {plan.spec.method.name} reads every input "
            "before merging (trim_scope: model): leave out --low-disk"
        )
    verified = None
    if lock is not None:  # every input matches the lock before anything is written
        lock.verify(listed(provenance or plan), lock_name)  # Hub inputs, before anything is downloaded
        fetch_inputs(plan, weights=not low_disk)
        verified = checked_inputs(lock, provenance or plan, lock_name, hub_weights=not low_disk)
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    job = Job(plan, dest, verified, provenance, low_disk, durable)
    if group is not None:
        bytes_read = _as_rank(job, force, progress, group, card)
        if bytes_read is None:
            return None
        peaks, resumed = (system.peak_rss(), 0), None
    else:
        bytes_read, peaks, resumed = _in_this_process(job, force, progress, workers, card)
    summary = {
        "output": str(dest),
        "method": plan.spec.method.name,
        "device": plan.device,
        "tensors": len(plan.tensors),
        "shards": len(plan.shards),
        "processes": group.world if group else budget.worker_processes(workers, len(plan.shards) - resumed),
        "bytes_read": bytes_read,
        "bytes_written": plan.bytes_written,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": max(system.peak_rss(), peaks[0]),  # per process: the largest, workers included
        "shards_resumed": resumed,  # kept from an interrupted run (None: not known to this rank)
    }
    if plan.device == "cuda":
        import torch

        summary["peak_gpu_bytes"] = max(torch.cuda.max_memory_allocated(), peaks[1])
    return summary


class Job:
    """What every way of writing the shards shares: the plan, where it goes, and what the lock needs
    (`verified`: the inputs as hashed to check a lock, if one was checked)."""

    def __init__(
        self,
        plan: Plan,
        dest: Path,
        verified: list[LockedInput] | None,
        provenance: Plan | None,
        low_disk: bool,
        durable: bool,
    ):
        self.plan, self.dest, self.verified = plan, dest, verified
        self.provenance, self.low_disk, self.durable = provenance or plan, low_disk, durable
        self.stop = threading.Event()  # the merge failed: hashing beside it stops
        self.background = system.Background()  # hashing beside the merge takes idle cores only

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

    def hash_inputs(self, pool: ThreadPoolExecutor, partial: Partial | None, shards: list[int]) -> Future | None:
        """Fetch the Hub files `shards` need (all of them, or with --low-disk all but the weights), then
        start hashing every input for the lock beside the merge (unless a lock's check did already); the
        hashes are recorded in `partial` as soon as they are known. None where no lock is written (a
        temporary candidate)."""
        fetch_inputs(self.plan, weights=not self.low_disk, shards=shards)
        if not self.durable:
            return None
        if self.verified is not None:
            hashing: Future = Future()
            hashing.set_result(self.verified)
        else:
            hashing = pool.submit(
                inputs_of, self.provenance, hub_weights=not self.low_disk, stop=self.stop, priority=self.background
            )
        if partial is not None:
            hashing.add_done_callback(functools.partial(_record_early, partial))
        return hashing

    def read_model(self, shards: list[int]) -> None:
        """The method's pass over the whole model before merging (TIES with trim_scope: model), where the
        recipe asks for one and shards remain: every input fetched first. Each rank and the parent of
        --workers find the same, from the same inputs; workers get it with the plan."""
        if shards and self.plan.model_wide and not self.plan.model_state:
            fetch_inputs(self.plan)
            self.plan.model_state = model_pass(self.plan)

    def files(self, shards: list[int], partial: Partial) -> FileSource:
        """Where the engine reads the inputs of `shards`: each model's folder, or with --low-disk Hub shards
        fetched as they are needed (and the ones this merge fetched, dropped after their last use)."""
        return JustInTime(self.plan, shards, partial.fetched) if self.low_disk else Confined(self.plan.models)

    def finish(self, partial: Partial, hashing: Future | None, card: str | None, progress: bool) -> int:
        """Once the shards are written: check the inputs' hashes against the ones an earlier run recorded
        (its shards are written again if they differ), then the index, config, tokenizer, card and lock.
        Returns the bytes read to write shards again."""
        if hashing is not None:
            self.background.now_wanted()  # the merge is done and waits for it: full priority
        inputs: list[LockedInput] | None = hashing.result() if hashing else None
        for model in self.plan.models:
            model.check_unchanged()
        again = partial.check_inputs(inputs) if inputs is not None else []
        read = 0
        if again:
            self.read_model(again)
            read = write_shards(
                self.plan, partial.model, progress=progress, shards=again, files=self.files(again, partial),
                finished=partial.finished, durable=self.durable,
            )  # fmt: skip
        write_metadata(self.plan, partial.model, self.dest.name, inputs, card)
        return read


def _record_early(partial: Partial, hashing: Future) -> None:
    """The inputs' hashes into the partial output as soon as they are known, for a run that resumes it.
    Best effort: finish records them again, and a full disk fails there, with a message."""
    if hashing.exception() is None:
        with contextlib.suppress(OSError):
            partial.record_inputs(hashing.result())


def _partial(job: Job, force: bool) -> Partial:
    """The output's partial folder, set up. A disk too full for even that (0 bytes free) is refused as a disk too
    small for the output is, with what the output needs (fetch.room), not with the error of the first record."""
    try:
        return Partial(job.dest, job.plan, force=force, durable=job.durable)
    except DiskFull:
        if problems := room(job.plan, job.dest, None, job.low_disk):
            raise OutputError(*problems) from None
        raise


def _in_this_process(job: Job, force: bool, progress: bool, workers: int, card: str | None):
    """The shards written here (or by --workers processes), then committed. Returns (bytes read, the
    workers' largest peak RSS and GPU memory, how many shards an interrupted run had finished)."""
    plan = job.plan
    partial = _partial(job, force)
    peaks = (0, 0)
    try:
        with _kept_for_resume(partial), job.beside() as pool:
            todo = partial.todo
            if problems := room(plan, job.dest, todo, job.low_disk):  # before anything is fetched or written
                raise OutputError(*problems)
            resumed = len(plan.shards) - len(todo)
            hashing = job.hash_inputs(pool, partial, todo)
            job.read_model(todo)
            if workers > 1:
                read, *peaks = parallel.write_with_workers(
                    plan, partial.model, workers, todo, partial.finished, job.durable
                )
            else:
                read = write_shards(
                    plan, partial.model, progress=progress, shards=todo, files=job.files(todo, partial),
                    finished=partial.finished, durable=job.durable,
                )  # fmt: skip
            read += job.finish(partial, hashing, card, progress)
            partial.commit(force)
    finally:
        partial.close()
    return read, tuple(peaks), resumed


def _as_rank(job: Job, force: bool, progress: bool, group: parallel.Group, card: str | None) -> int | None:
    """This rank's share of the shards still to write; rank 0 then finishes the directory. Every rank
    reports before anyone commits, so one failing rank fails the whole merge (every rank exits with an
    error) and nothing lands at the destination; a rank that dies outright fails the others' exchange.
    Rank 0 holds the partial output (every rank shares its lock while it writes there): what finished
    is kept for the next launch to resume, unless a rank's failure would come again."""
    plan = job.plan
    partial = _partial(job, force) if group.rank == 0 else None
    joined = None
    try:
        with _kept_for_resume(partial), job.beside() as pool:
            if partial is not None:
                partial.share()
            mine = (str(partial.path), partial.todo, room(plan, job.dest, partial.todo)) if partial else None
            where, todo, short = group.share(mine)
            if short:  # every rank says it, before anything is written
                raise OutputError(*short)
            if partial is None:
                joined = join(Path(where))
            parts = parallel.assign([plan.shards[i] for i in todo], group.world)
            mine = [todo[i] for i in parts[group.rank]]
            result, hashing = _rank_writes(
                job, partial, pool, Path(where), mine, progress and group.rank == 0, group.rank
            )
            results = group.gather(result)
            errors = [err for _, err, _ in results if err]
            if errors:  # rank 0 says everything; the others what failed there, if anything
                elsewhere = f"rank {group.rank}: the merge failed on another rank (rank 0's log says why)"
                failure = MergeError if any(recurs for *_, recurs in results) else MergerError
                raise failure(*([p for err in errors for p in err] if group.rank == 0 else result[1] or [elsewhere]))
            if partial is None:
                return None
            read = sum(n for n, *_ in results) + job.finish(partial, hashing, card, progress)
            partial.commit(force)
            return read
    finally:
        if partial is not None:
            partial.close()
        if joined is not None:
            os.close(joined)
        group.close()


def _rank_writes(job: Job, partial: Partial | None, pool, where: Path, mine: list[int], progress: bool, rank: int):
    """This rank's shards: ((bytes read, the error's lines or None, whether it would come again), the
    hashing of the inputs, which rank 0 runs beside its shards)."""
    hashing = None
    try:
        if partial is not None:
            hashing = job.hash_inputs(pool, partial, mine)
        else:
            fetch_inputs(job.plan, shards=mine)
        job.read_model(mine)
        finished = Finished(where, job.durable)
        read = write_shards(
            job.plan, where / "model", progress=progress, shards=mine, finished=finished, durable=job.durable
        )
        return (read, None, False), hashing
    except Exception as e:  # every rank hears of it through the gather
        return (0, [f"rank {rank}: {p}" for p in problems_of(e)], getattr(e, "recurs", False)), hashing


@contextlib.contextmanager
def _kept_for_resume(partial: Partial | None) -> Iterator[None]:
    """Around writing a partial output: a failure keeps what is done for the same command to resume, and
    says so (an interrupt, a full disk, the network, a worker or rank that died), unless it is one that
    would come again (MergerError.recurs: a tensor that cannot be merged), which removes it."""
    try:
        yield
    except BaseException as error:
        if partial is None:
            raise
        interrupted = isinstance(error, KeyboardInterrupt) or system.INTERRUPTED.is_set()
        if partial.committed:  # interrupted as it cleared up after putting the output in place
            raise Interrupted(f"interrupted; the merge was complete and is in place at {partial.dest}") from None
        kept = len(_finished(partial))
        if kept and not getattr(error, "recurs", False):
            after = (
                f"{kept} of {len(partial.plan.shards)} shards are done and kept in {partial.path}: run the same "
                "command again to resume (or delete it)"
            )
        else:
            partial.discard()
            after = "nothing was written to the output"
        if interrupted:
            raise Interrupted(f"interrupted; {after}") from None
        if isinstance(error, OSError):
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                what = f"output {partial.dest}: no space left on the device"
            else:  # an error without a file name came from writing the output
                what = describe(error) if error.filename else f"output {partial.dest}: {describe(error)}"
            raise OutputError(f"{what}; {after}") from None
        if isinstance(error, MergerError) and kept and not error.recurs:
            if isinstance(error, RecipeError):
                raise error from None
            raise type(error)(*error.problems[:-1], f"{error.problems[-1]}; {after}") from None
        raise


def _finished(partial: Partial) -> list[Path]:
    return list((partial.path / "done").glob("*.json")) if (partial.path / "done").is_dir() else []

"""How much the engine holds at once: its chunk, piece and queue sizes, and the GPU and pinned-memory
budgets that decide whether CUDA merges a tensor whole or in pieces. The plan (its estimates, and what
each tensor needs: Plan.gpu_bytes and the rest) and the engine (merger.stream) both read them here."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

from pydantic import ByteSize, TypeAdapter, ValidationError

from merger import system
from merger.errors import MergerError

CHUNK = 1 << 18  # elements per CPU chunk: 1 MiB of float32 per operand
PIECE = 16 * CHUNK  # output elements merged and handed to the writer at a time on the CPU (8 MiB of
# bfloat16): the output buffers stay small and warm whatever the largest tensor (a 70B model's
# embedding is 2 GiB)
WRITE_AHEAD = 128 << 20  # bytes of merged pieces that may wait for the writer on the CPU (write_depth)
GPU_PIECE = 1 << 25  # the most entries per piece of a tensor too large to stage whole on the GPU (128 MiB
# of float32 per operand): a 70B model's embedding (1G entries) would need ~70 GB of GPU memory at once
# (TIES of three bf16 models: Plan.gpu_bytes)
GPU_BLOCK = 512  # torch's CUDA caching allocator hands out GPU memory in multiples of 512 bytes

GATHER_SHARE = 20  # a threshold's band pass keeps at most 1/GATHER_SHARE of a tensor's entries per population
GATHER_FLOOR = 1 << 20  # ... or this many where that is more (12 MiB of values and indices)


def gathered_most(numel: int) -> int:
    """The most values a threshold's band pass keeps per population (merger.kernels._gather); a band holding
    more (many ties, as bfloat16 task vectors have) is narrowed by counting instead."""
    return max(numel // GATHER_SHARE, GATHER_FLOOR)


GPU_MEMORY_ENV = "MERGER_GPU_MEMORY"  # bytes of each GPU merger may use, instead of the share below
PINNED_MEMORY_ENV = "MERGER_PINNED_MEMORY"  # bytes of host memory merger may pin, instead of a quarter
WORKERS_ENV = "MERGER_LOCAL_PROCESSES"  # set by parallel in each --workers process: how many there are


def gpu_budget() -> int:
    """GPU bytes one tensor's merge may take (CudaStages): half the device's memory, or 3/4 of what is
    free if that is less (another process, or a model being evaluated, holds the rest), or what
    MERGER_GPU_MEMORY says; divided among the merger processes that share the GPU (gpu_sharers).
    Memory that torch's caching allocator holds unused counts as free."""
    import torch

    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    share = _size_from_env(GPU_MEMORY_ENV)
    if share is None:
        share = min(total // 2, free * 3 // 4)
    return share // gpu_sharers(torch.cuda.device_count())


def pinned_budget() -> int:
    """Host bytes CudaStages may pin for staging whole tensors (two slots of a tensor's inputs and of
    its output, sized once for the largest: Plan.staging_sizes): a quarter of the memory available
    (the cgroup's limit included: system.mem_available), since pinned pages can be neither swapped nor
    reclaimed, or what MERGER_PINNED_MEMORY says; divided among the merger processes on this host."""
    share = _size_from_env(PINNED_MEMORY_ENV)
    if share is None:
        available = system.mem_available()
        share = available // 4 if available is not None else 1 << 62
    return share // local_processes()


def pinned_block(nbytes: int) -> int:
    """Host bytes torch pins for a request of `nbytes`: its caching host allocator rounds every block up
    to a power of two (a 1.09 GB embedding pins 2 GiB) and keeps a freed block for a later request of
    the same power, never giving it back while the process runs."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def local_processes() -> int:
    """The processes of this merge on this host: K --workers (MERGER_LOCAL_PROCESSES, set in each), or
    the ranks a launcher started here (LOCAL_WORLD_SIZE: torchrun, accelerate launch), else 1."""
    for name in (WORKERS_ENV, "LOCAL_WORLD_SIZE"):
        raw = os.environ.get(name, "")
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return 1


def worker_processes(workers: int, shards: int) -> int:
    """The processes `--workers` starts for `shards` shards to write: one per shard at most, and one
    (this process) when there is none."""
    return max(1, min(workers, shards))


@contextlib.contextmanager
def shared_by(processes: int) -> Iterator[None]:
    """The budgets as each of `processes` --workers processes sees them (merger.parallel sets the same
    variable in each for its lifetime): for estimates made in this process; its environment as it was after."""
    before = os.environ.get(WORKERS_ENV)
    if processes > 1:
        os.environ[WORKERS_ENV] = str(processes)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(WORKERS_ENV, None)
        else:
            os.environ[WORKERS_ENV] = before


def gpu_sharers(gpus: int) -> int:
    """The processes of this merge that share one GPU: --workers and launched ranks take GPU i modulo
    the number of GPUs, so K processes on G GPUs put ceil(K/G) on the busiest. Ranks that each see only
    their own GPU (CUDA_VISIBLE_DEVICES per rank) are counted as sharing it: a smaller budget, no more."""
    return math.ceil(local_processes() / max(gpus, 1))


def _size_from_env(name: str) -> int | None:
    """A size such as 20GB or 512MB from the environment variable `name`, None if unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        size = int(TypeAdapter(ByteSize).validate_python(raw))
    except ValidationError:
        size = 0
    if size <= 0:
        raise MergerError(f"{name}: '{raw}' is not a size such as 20GB or 512MB")
    return size

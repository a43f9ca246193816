"""How much the engine holds at once: its chunk, piece and queue sizes, and the GPU and pinned-memory
budgets that decide whether CUDA merges a tensor whole or in pieces. The plan (its estimates, and what
each tensor needs: Plan.gpu_bytes and the rest) and the engine (merger.stream) both read them here."""

from __future__ import annotations

from merger import system

CHUNK = 1 << 18  # elements per CPU chunk: 1 MiB of float32 per operand
PIECE = 16 * CHUNK  # output elements merged and handed to the writer at a time on the CPU (8 MiB of
# bfloat16): the output buffers stay small and warm whatever the largest tensor (a 70B model's
# embedding is 2 GiB)
WRITE_AHEAD = 128 << 20  # bytes of merged pieces that may wait for the writer on the CPU (write_depth)
GPU_PIECE = 1 << 25  # the most entries per piece of a tensor too large to stage whole on the GPU (128 MiB
# of float32 per operand): a 70B model's embedding (1G entries) would need ~40 GB of GPU memory at once


def gpu_budget() -> int:
    """GPU bytes one tensor's merge may take (CudaStages): half the device's memory, or 3/4 of what is
    free if that is less (another process, or a model being evaluated, holds the rest). Memory that
    torch's caching allocator holds unused counts as free."""
    import torch

    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return min(total // 2, free * 3 // 4)


def pinned_budget() -> int:
    """Host bytes CudaStages may pin for staging whole tensors (two slots of a tensor's inputs and of
    its output, kept for the largest): a quarter of the memory available, since pinned pages can be
    neither swapped nor reclaimed."""
    available = system.mem_available()
    return available // 4 if available is not None else 1 << 62

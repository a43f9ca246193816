"""Where `device: auto` merges: on the GPU only where that would be faster than on the CPU.

A merge reads every input once and writes the output once. On the CPU the method's arithmetic runs
beside that on every core; through the GPU the inputs are first copied into pinned memory and the
arithmetic is nearly free. So the GPU pays only where the CPU's arithmetic, not the reading and
writing, sets the pace: TIES on a few cores, float64, methods without a fused kernel. A cheap method
on a many-core machine waits on the disk either way, and CUDA's start-up makes the GPU slower there.
The figures are rough on purpose: the choice only needs to be right where the two differ by a lot.
"""

from __future__ import annotations

from dataclasses import dataclass

READ_RATE = 6e9  # bytes/s read from the page cache or an NVMe disk (the benchmark's I/O limit)
WRITE_RATE = 2e9  # bytes/s written and flushed to disk
STAGE_RATE = 5e9  # bytes/s one stager thread copies from the page cache into pinned memory
CUDA_START = 3.0  # seconds: importing torch and starting CUDA, which a fused CPU merge does not pay
EAGER = 4  # torch's chunked path (float64, mixed dtypes, plugins) against the fused kernels, per entry


@dataclass(frozen=True)
class Estimate:
    """What a merge costs on each path, from the plan alone."""

    entries: int  # merged entries times the models merged, through the fused kernels
    eager_entries: int  # the same through torch's chunked path
    cpu_ns: float  # the method's CPU cost per such entry on one core through a fused kernel (Method.cpu_ns)
    bytes_read: int
    bytes_written: int
    cores: int

    @property
    def io_s(self) -> float:
        return self.bytes_read / READ_RATE + self.bytes_written / WRITE_RATE

    @property
    def merge_s(self) -> float:
        """The CPU's arithmetic, spread over its cores."""
        return (self.entries + EAGER * self.eager_entries) * self.cpu_ns * 1e-9 / self.cores

    @property
    def cpu_s(self) -> float:
        return max(self.io_s, self.merge_s)

    @property
    def gpu_s(self) -> float:
        return max(self.io_s, self.bytes_read / STAGE_RATE) + CUDA_START


def choose(requested: str, cuda: bool, estimate: Estimate, method: str) -> tuple[str, str]:
    """(device, why) for a merge asked to run on `requested` ("auto", "cpu" or "cuda"), `cuda`: whether
    torch sees a CUDA device."""
    if requested != "auto":
        return requested, "asked for"
    if not cuda:
        return "cpu", "auto: torch sees no CUDA device"
    e = estimate
    figures = (
        f"about {e.cpu_s:.1f} s on the CPU ({e.cores} cores: {method} {e.merge_s:.1f} s, reading and writing "
        f"{e.io_s:.1f} s) against {e.gpu_s:.1f} s through the GPU"
    )
    if e.gpu_s < e.cpu_s:
        return "cuda", f"auto: the merge is bound by the CPU's arithmetic; {figures}"
    return "cpu", f"auto: the GPU would not be faster; {figures}"

"""The I/O limit of one merge, streamed as a merge streams: a merge that computes nothing.

    python benchmarks/io_stream.py OUT_FILE MODEL_DIR [MODEL_DIR ...]

Reads the models' safetensors files side by side (the models share one layout, as a merge's inputs do)
and writes one model's worth of bytes to OUT_FILE as it goes, 64 MiB of output after each 64 MiB of every
model: mapped, one load per 64-byte line, the pages dropped once read (as merger's reader does), and
written from one reused 1 MiB buffer through merger's own ShardWriter (into the page cache, its writeback
started as each window fills; past the cache where MERGER_DROP_BEHIND=1); then `fdatasync`, then deletes
it. Prints {"read": s, "write": s, "sync": s} as JSON.

bench_merge.py runs it in each round just before each merger run, so that the limit and the merge see the
VM in the same state: on a VM whose freed memory goes back to its host, writing into page cache costs
~0.15 s a GB within a second of a file's deletion and ~1.5 s a GB a few seconds later, so a limit
measured once, minutes away from the runs, says little about any one of them.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

from merger.plan import OutTensor
from merger.stream import ShardWriter, direct_stage

STEP = 64 << 20  # bytes of each model read, and of output written, per step
BLOCK = 1 << 20  # bytes handed to ShardWriter.write at a time (it makes write(2) calls of files.BUFFERED_CALL)


class _Model:
    """One model's safetensors files, mapped, read as one stream of bytes."""

    def __init__(self, directory: Path):
        self.maps = []
        for f in sorted(directory.glob("*.safetensors")):
            with open(f, "rb") as fh:
                self.maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        self.size = sum(m.size() for m in self.maps)

    def read(self, start: int, stop: int) -> None:
        """Load every 64-byte line of bytes [start, stop) of the stream, then drop their pages."""
        offset = 0
        for m in self.maps:
            lo, hi = max(start, offset), min(stop, offset + m.size())
            if lo < hi:
                first = (lo - offset) & ~(mmap.PAGESIZE - 1)
                words = np.frombuffer(m, np.uint64, count=(hi - offset - first) // 8, offset=first)
                words[::8].max()
                del words
                m.madvise(mmap.MADV_DONTNEED, first, hi - offset - first)
            offset += m.size()


def main() -> None:
    out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    models = [_Model(d) for d in dirs]
    size = models[0].size
    drop_behind = os.environ.get("MERGER_DROP_BEHIND") == "1"
    whole = OutTensor("bytes", (size,), "U8", True, size)
    block = np.zeros(BLOCK, np.uint8)
    spent = {"read": 0.0, "write": 0.0, "sync": 0.0}
    writer = ShardWriter(
        out, [whole], drop_behind=drop_behind, durable=True, stage=direct_stage() if drop_behind else None
    )
    for start in range(0, size, STEP):
        stop = min(size, start + STEP)
        t = time.perf_counter()
        for model in models:
            model.read(start, stop)
        t2 = time.perf_counter()
        for s in range(start, stop, BLOCK):
            writer.write(whole, block[: min(BLOCK, stop - s)])
        spent["read"] += t2 - t
        spent["write"] += time.perf_counter() - t2
    t = time.perf_counter()
    writer.close()
    fd = os.open(out, os.O_RDONLY)
    os.fdatasync(fd)  # any descriptor of the file will do
    os.close(fd)
    spent["sync"] = time.perf_counter() - t
    out.unlink()
    print(json.dumps(spent))


if __name__ == "__main__":
    main()

"""The streaming engine: for each output tensor, read it from every input, merge, cast, write.

Stages overlap: while tensor j is merged, the kernel reads tensor j+1 ahead (MADV_WILLNEED; on CUDA
j+2, since j+1 is being staged) and a writer thread streams tensor j-1's bytes into its shard.
Tensors travel as numpy views of the memory-mapped inputs (sources.MappedReader) and numpy output
buffers.

On the CPU, a method with a fused kernel (merger.kernels: every built-in method, for bfloat16,
float16 and float32 checkpoints merged in float32) runs straight on those views and never imports
torch, which saves about two seconds of start-up. Other merges (float64 compute, mixed input dtypes,
plugin methods) go through the method's torch function in chunks of CHUNK elements through reused
float buffers, so temporaries stay in cache and no fresh pages are touched per tensor. On CUDA whole
tensors go through pinned staging buffers, and a tensor too large for that (CudaStages.whole) is
merged on the GPU in pieces of GPU_PIECE entries, so GPU memory stays bounded whatever the model.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import importlib
import itertools
import mmap
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from tqdm import tqdm

from merger import budget, system
from merger.assemble import Key, Source
from merger.errors import MergeError, ModelError, NaNTaskVector, OutOfMemory, counted
from merger.files import BUFFERED_CALL, DirectFile, fsync_file, start_writeback
from merger.methods.base import MergeRange
from merger.plan import FLAGS, OUTPUT, OutTensor, Plan, Shard, shard_header
from merger.sources import DTYPES, Confined, FileSource, MappedReader, TensorInfo, to_torch
from merger.vocab import lays_out

if TYPE_CHECKING:
    import torch

WRITEBACK = 64 << 20  # bytes of output between two page-cache hand-backs (ShardWriter._hand_back)
COPY_PIECE = 8 << 20  # bytes a copy moves per read and write, where copy_file_range cannot (ShardWriter.copy)
DIRECT_STAGE = 8 << 20  # bytes of a direct write (files.DirectFile)


def drop_behind(output_bytes: int) -> bool:
    """Whether the writers should hand the output's pages back to the kernel as they go (see
    ShardWriter): when the output is larger than half the memory available, so it could not stay
    cached anyway and would evict everything else. A smaller output stays cached for what usually
    comes next (loading or evaluating the model). MERGER_DROP_BEHIND=1 or 0 decides instead."""
    forced = os.environ.get("MERGER_DROP_BEHIND", "")
    if forced in ("0", "1"):
        return forced == "1"
    available = system.mem_available()
    return available is not None and output_bytes > available // 2


def direct_stage(nbytes: int = DIRECT_STAGE) -> memoryview:
    """A staging buffer for files.DirectFile (nbytes: a multiple of files.ALIGN): page-aligned, private
    to this process."""
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header comes from the plan up front, then
    each tensor's bytes are streamed in plan order, so no whole-shard byte string is ever built.

    With `drop_behind`, the output does not stay in the page cache. Given a staging buffer (`stage`),
    it is written past the cache (files.DirectFile, O_DIRECT): the CPU only copies it into the buffer,
    and each 8 MiB write waits for the disk while the merge goes on into the free slots. Where the file
    system refuses O_DIRECT, or without a buffer, written bytes leave the page cache as they reach the
    disk: every WRITEBACK bytes the writer starts writeback of the newest window and drops the window
    before it, if clean by then. The kernel reuses those pages for the next windows, so the output
    occupies a few windows of page cache instead of its whole size and does not evict other files'
    cache. Pages still dirty are left alone, so a slow disk never blocks that writer. Into the page cache
    it writes at most files.BUFFERED_CALL bytes a call.

    With `durable`, writeback of each window starts as it fills (merger.files.start_writeback), so that
    little is left to wait for when the shard is made durable (fsync, by write_shards' syncer thread)."""

    def __init__(
        self,
        path: Path,
        tensors: Iterable[OutTensor],
        drop_behind: bool = False,
        durable: bool = False,
        stage: memoryview | None = None,
    ):
        self.path = path
        direct = DirectFile.open(path, stage) if drop_behind and stage is not None else None
        self._f: BinaryIO | DirectFile = direct or open(path, "wb")
        self._drop_behind = drop_behind and hasattr(os, "posix_fadvise")
        self._durable = durable
        self._todo = list(tensors)
        try:
            self._f.write(shard_header(self._todo))
        except BaseException:
            self.abort()
            raise
        self._next = 0  # the tensor being written
        self._done = 0  # its bytes written so far
        self._piece: memoryview | None = None  # copy's buffer, where it reads and writes
        self._advised = self._dropped = 0  # file offsets: writeback started below, cache dropped below

    def write(self, t: OutTensor, data: np.ndarray) -> None:
        """Append tensor t's bytes, all of them or the next piece (a tensor may come in consecutive
        pieces): a numpy array in sources.DTYPES' form for t.dtype."""
        self._expect(t)
        if data.dtype != DTYPES[t.dtype][2] or self._done + data.nbytes > t.nbytes:
            raise RuntimeError(f"tensor '{t.name}': got {data.dtype} {list(data.shape)}, planned {t.dtype}")
        if data.nbytes:
            raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
            step = len(raw) if isinstance(self._f, DirectFile) else BUFFERED_CALL  # DirectFile stages its own
            for s in range(0, len(raw), step):
                self._f.write(raw[s : s + step])
            self._written()
        self._advance(t, data.nbytes)

    def copy(self, t: OutTensor, src: BinaryIO, start: int, file: Path) -> None:
        """Append all of tensor t's bytes from `src` (`file` opened) at `start` (an input's, stored as t is):
        copied file to file by the kernel (copy_file_range: no pass through this process's memory, no page
        faults), or read and written where the file systems or O_DIRECT refuse that; a WRITEBACK window at a
        time, as writes go (see the class)."""
        self._expect(t)
        if self._done:
            raise RuntimeError(f"tensor '{t.name}': copied after {self._done} of its bytes were written")
        kernel_copy = hasattr(os, "copy_file_range") and not isinstance(self._f, DirectFile)
        for s in range(0, t.nbytes, WRITEBACK):
            n = min(WRITEBACK, t.nbytes - s)
            done = self._copy_range(src, start + s, n) if kernel_copy else 0
            kernel_copy = done == n  # else refused, or the source ended: read and write from here on
            self._copy_through(src, start + s + done, n - done, file)
            self._written()
        self._advance(t, t.nbytes)

    def _copy_through(self, src: BinaryIO, start: int, n: int, file: Path) -> None:
        """n bytes of `src` from `start` read into one reused buffer and written to the output."""
        if n and self._piece is None:
            self._piece = memoryview(bytearray(COPY_PIECE))  # one buffer, its pages touched once
        step = COPY_PIECE if isinstance(self._f, DirectFile) else BUFFERED_CALL  # DirectFile stages its own
        for s in range(0, n, COPY_PIECE):
            want = min(COPY_PIECE, n - s)
            k = os.preadv(src.fileno(), [self._piece[:want]], start + s)
            if k < want:
                raise ModelError(f"{file}: the file shrank while merger was reading it (another process "
                                 "truncated or rewrote it)")  # fmt: skip
            for w in range(0, k, step):
                self._f.write(self._piece[w : min(k, w + step)])

    def _copy_range(self, src: BinaryIO, start: int, n: int) -> int:
        """Bytes of `src` from `start` copied by copy_file_range to the end of the output, up to n (fewer
        where the source ends early or the file systems refuse: the caller reads and writes the rest)."""
        self._f.flush()
        at = self._f.tell()
        done = 0
        try:
            while done < n:
                k = os.copy_file_range(src.fileno(), self._f.fileno(), n - done, start + done, at + done)
                if not k:
                    break
                done += k
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM):
                raise
        self._f.seek(at + done)
        return done

    def _expect(self, t: OutTensor) -> None:
        expected = self._todo[self._next]
        if t.name != expected.name:
            raise RuntimeError(f"shard {self.path.name}: got '{t.name}', expected '{expected.name}'")

    def _written(self) -> None:
        """After bytes reach the file: keep the page cache small, or start their writeback (see the class)."""
        if isinstance(self._f, DirectFile) and self._f.direct:
            pass  # nothing of it in the page cache
        elif self._drop_behind:
            self._hand_back()
        elif self._durable:
            self._write_back()

    def _advance(self, t: OutTensor, n: int) -> None:
        self._done += n
        if self._done == t.nbytes:
            self._next += 1
            self._done = 0

    def _hand_back(self) -> None:
        end = self._f.tell()
        if end - self._advised < WRITEBACK:
            return
        fd = self._f.fileno()
        # DONTNEED starts writeback of dirty pages without waiting for it and drops the clean ones
        os.posix_fadvise(fd, self._advised, end - self._advised, os.POSIX_FADV_DONTNEED)
        if self._advised - self._dropped >= WRITEBACK:  # its writeback has had a window's time
            os.posix_fadvise(fd, self._dropped, self._advised - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = self._advised
        self._advised = end

    def _write_back(self) -> None:
        """Start writeback of each WRITEBACK window as it fills (keeping its pages cached), so that the
        fsync at close finds most of the shard on disk already."""
        end = self._f.tell()
        if end - self._advised >= WRITEBACK:
            self._f.flush()
            start_writeback(self._f.fileno(), self._advised, end - self._advised)
            self._advised = end

    def close(self) -> None:
        if self._next != len(self._todo):
            self.abort()
            raise RuntimeError(f"shard {self.path.name}: {len(self._todo) - self._next} tensors never written")
        self._f.close()

    def abort(self) -> None:
        if isinstance(self._f, DirectFile):
            self._f.abort()  # not close(): that writes the last block
        else:
            self._f.close()


@contextlib.contextmanager
def cpu_engine_settings(device: str, needs_torch: bool = True) -> Iterator[None]:
    """One torch intra-op thread for CPU merging: chunk-sized ops gain little from it, and OpenMP workers
    that spin-wait collapse (10x slower, measured) when anything else wants the cores, such as our own
    writer thread. The cores are used by the engine's chunk threads instead."""
    _keep_freed_memory()
    if not needs_torch:  # a merge of fused kernels alone: torch stays unimported
        yield
        return
    import torch

    previous = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during the merge loop: it makes few cycles, but its thousands of
    small allocations trigger collections that walk every object numba and numpy created (5-7% of a
    linear merge's CPU time, measured with perf). Refcounting still frees everything as it goes."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _keep_freed_memory() -> None:
    """Let glibc reuse freed blocks instead of returning them to the kernel and faulting fresh zeroed
    pages on the next allocation (about 20x slower than reusing touched memory)."""
    lib = system.libc()
    with contextlib.suppress(AttributeError):  # not glibc: only slower
        if lib is not None:
            lib.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
            lib.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum)


class Buffers:
    """Reusable byte buffers, grown on demand and never shrunk: numpy, or torch pinned host memory
    (`pin`) for staging CUDA copies. A pinned buffer is a power of two, what torch's pinned allocator
    pins for it anyway (budget.pinned_block), and at first at least `least(key)` bytes: one that grew
    would leave its outgrown block pinned, kept by torch for a request of that size."""

    def __init__(self, pin: bool = False, least: Callable[[object], int] | None = None):
        self._bufs: dict[object, object] = {}
        self._pin = pin
        self._least = least or (lambda key: 0)

    def get(self, key: object, nbytes: int, dtype, shape: tuple[int, ...]):
        """A (numpy dtype) array, or with `pin` a (torch dtype) tensor, of `shape` over the buffer `key`."""
        buf = self._bufs.get(key)
        if buf is None or len(buf) < nbytes:
            size = max(nbytes, 16)
            if self._pin:
                size = budget.pinned_block(max(size, self._least(key) if buf is None else 0))
            buf = self._bufs[key] = _pinned(size) if self._pin else np.empty(size, dtype=np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


class PinFailed(OutOfMemory):
    """Pinned host memory could not be had (_pinned); _out_of_gpu_memory names the tensor."""


def _pinned(nbytes: int) -> torch.Tensor:
    import torch

    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as e:  # cudaHostAlloc refused
        raise PinFailed(
            f"could not pin {nbytes} bytes of host memory for the GPU's copies ({_first_line(e)})"
        ) from None


# The engine's two kinds of copy between pinned host memory and the GPU. Both are queued on the current
# stream and return at once; the engine orders them with events (CudaStages). tests/fakecuda.py
# replaces them (and _pinned) with copies that run late, on a thread per stream.


def copy_to_device(pinned: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A new GPU tensor, allocated on the current stream, that the copy of `pinned` fills. `pinned` may
    be rewritten once an event recorded after this call has fired."""
    return pinned.to(device, non_blocking=True)


def copy_to_host(pinned: torch.Tensor, gpu: torch.Tensor) -> None:
    """Queue the copy of `gpu` into `pinned`: readable once an event recorded after this call has fired."""
    pinned.copy_(gpu, non_blocking=True)


def _in_turn(pool: ThreadPoolExecutor, runners: int, fn: Callable[[int, int], object], bounds: list) -> list:
    """fn(start, end) over `bounds` on `runners` threads, this one and runners - 1 of the pool's, each taking
    the next range as it finishes one; results in order. One hand-off per thread, not one per range (a
    ThreadPoolExecutor.map over a piece's 16 chunks took 0.24 ms of hand-offs on the 2-core VM, and a
    TinyLlama pass has about 4,300 chunks), and the calling thread merges instead of waiting. A failure
    stops the others at their next range; every runner is done before this returns or raises, and none
    is waited for that had not started when this thread found no range left (a pool thread busy
    elsewhere, or slow to wake for a tensor of two chunks)."""
    results: list = [None] * len(bounds)
    taken = itertools.count()  # its next() is atomic: each range goes to one runner
    failed = threading.Event()

    def runner() -> None:
        while not failed.is_set() and (i := next(taken)) < len(bounds):
            try:
                results[i] = fn(*bounds[i])
            except BaseException:
                failed.set()
                raise

    helpers = [pool.submit(runner) for _ in range(runners - 1)]
    try:
        runner()
    finally:
        # one not started yet is cancelled: every range is taken (or a runner failed), none is left for it
        started = [h for h in helpers if not h.cancel()]
        wait(started)
    for h in started:
        h.result()  # a helper's failure
    return results


class Merger:
    """Merges one planned tensor at a time into a caller-provided output array."""

    def __init__(self, plan: Plan, reader: MappedReader, threads: int | None = None):
        self.plan = plan
        self.reader = reader
        self.cuda = plan.device == "cuda"
        self.work = threading.local()  # eager CPU float chunk buffers: .bufs, by slot, per thread
        self.bytes_read = 0
        self.live: dict[str, tuple[dict, dict]] = {}  # tensor name -> its input views and dtypes, until released
        self.widening = Buffers()  # float32 copies of ingredients stored in different dtypes (Plan.widened)
        self.threads = 1 if self.cuda else max(1, threads or system.default_threads())
        # the chunk threads: this one and threads - 1 more (_in_turn)
        self.pool = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix="merger-chunk") if self.threads > 1 else None
        )
        method = plan.spec.method
        merged = [t for t in plan.tensors if t.merged and plan.verbatim(t) is None]  # the rest are copies
        fusable = not self.cuda and plan.compute_dtype == "float32" and method.fused is not None and bool(merged)
        self.kernels = _kernels() if fusable else None
        # torch is imported only if some tensor needs it (CUDA, a merge no kernel covers, a vocabulary's rows
        # to stand in or pad: merger.vocab), and then before the merge loop, which pauses the cyclic garbage
        # collector: an import inside it leaves a cycle (its traceback's frames) holding the callers' arrays
        self.needs_torch = self.cuda or any(not self._fusable(t) or lays_out(plan.vocabulary, t.name) for t in merged)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _fusable(self, t: OutTensor) -> bool:
        """Whether t merges through the method's fused kernel: the plan's rule (Plan.fusable), where
        the kernels loaded."""
        return self.kernels is not None and self.plan.fusable(t)

    def inputs_of(self, t: OutTensor) -> tuple[dict[Key, np.ndarray], dict[Key, str]]:
        """Each distinct input tensor (t.distinct) as stored (a zero-copy view) and its dtype code, by
        source key: read once even if listed twice."""
        views: dict[Key, np.ndarray] = {}
        codes: dict[Key, str] = {}
        for s in t.distinct:
            info = s.info
            views[s.key] = self.reader.view(info)
            codes[s.key] = info.dtype
            self.bytes_read += info.nbytes
        views = laid_out(self.plan, t, views, codes)
        self.live[t.name] = (views, codes)
        return views, codes

    def opened(self, source: Source) -> BinaryIO:
        """A verbatim source's file, opened as for mapping (checked unchanged)."""
        self.bytes_read += source.info.nbytes
        return self.reader.files.open(source.info.file)

    def check_finite(self, t: OutTensor, start: int, out: np.ndarray) -> None:
        """Merged values that are not finite (`out`: t's flat entries from `start`) stop the merge at an entry
        where every input is finite (not_finite_error). Where an input holds inf or NaN itself, the output
        may too (a mask buffer of -inf, say), its NaNs made canonical (canonical_nan)."""
        bad = sum(self._run(lambda s, e: count_nonfinite(out[s:e], t.dtype), out.size))
        if not bad:
            return
        views, codes = self.live[t.name]
        unexplained = nonfinite(out, t.dtype)
        for key, v in views.items():
            unexplained &= ~nonfinite(v.reshape(-1)[start : start + out.size], codes[key])
        count = int(np.count_nonzero(unexplained))
        if count:
            raise not_finite_error(self.plan, t, count, (start, out.size), first_nonfinite(t, views, codes))
        canonical_nan(out, t.dtype)

    def start(self, t: OutTensor, gpu: PieceCopies | None = None, piece: int = 0) -> MergeRange:
        """Begin merging t on the CPU, or on the GPU `piece` entries at a time through `gpu`'s copies
        (CudaStages.pieces). What needs the whole tensor (the inputs' agreement, TIES thresholds)
        happens here; the returned merge_range(start, end, out) fills the flat output entries
        [start, end) into `out`, a host array."""
        views, codes = self.inputs_of(t)
        if not t.merged:
            return self._agreed_copy(t, views)
        source = self.plan.verbatim(t)
        if source is not None:  # as write_shards copies it (merge_tensors' consumers get the same bytes)
            return _copying(views[source.key])
        with self._naming(t):
            if gpu is not None:
                return self._eager(t, views, codes, gpu, piece)
            if self._fusable(t):
                xs, base = self._roles(t, self._widened(t, {k: v.reshape(-1) for k, v in views.items()}))
                return self.plan.spec.method.fused(
                    xs, base, t.models, t.params, self._run, context=self.plan.context(t)
                )
            return self._eager(t, views, codes)

    def _widened(self, t: OutTensor, flat: dict[Key, np.ndarray]) -> dict[Key, np.ndarray]:
        """flat, with the ingredients Plan.widened names copied to float32 (the fused kernels read every
        ingredient in one dtype), on the chunk threads, into buffers reused tensor after tensor."""
        for i, s in enumerate(self.plan.widened(t)):
            wide = self.widening.get(i, 4 * t.numel, np.float32, (t.numel,))
            x = flat[s.key]
            self._run(lambda a, e, x=x, wide=wide: self.kernels.copy_as(x, a, wide[a:e]), t.numel)
            flat[s.key] = wide
        return flat

    @contextlib.contextmanager
    def _naming(self, t: OutTensor) -> Iterator[None]:
        """A method's complaint about one model's values, as a MergeError naming the tensor and model."""
        try:
            yield
        except NaNTaskVector as e:
            model = t.sources[e.model].model
            why = e.why or (
                "NaN (a NaN or an infinity in that model or in the base); "
                f"{self.plan.spec.method.name} cannot rank NaN magnitudes"
            )
            entries, verb = counted(e.count)
            raise MergeError(
                f"tensor '{t.name}': {entries} of the task vector of '{model.ref}' {verb} {why}. "
                "Is one of those checkpoints diverged?"
            ) from None

    def merge_into(self, t: OutTensor, out: np.ndarray) -> None:
        """Merge all of t into `out` on the CPU."""
        self.start(t)(0, out.size, out.reshape(-1))

    def _agreed_copy(self, t: OutTensor, views: dict[Key, np.ndarray]) -> MergeRange:
        """Integer and bool tensors (position ids, masks) are not merged: every source must agree with
        the first, which is copied."""
        first = t.sources[0]
        ref = views[first.key]
        for s in t.sources[1:]:
            if s.key != first.key and not np.array_equal(views[s.key], ref):
                raise MergeError(
                    f"tensor '{t.name}' ({t.dtype}) differs between '{s.model.ref}' and '{first.model.ref}'; "
                    "non-float tensors are copied, not merged, so every input must hold the same values"
                )
        return _copying(ref)

    @staticmethod
    def _roles(t: OutTensor, views: dict[Key, object]) -> tuple[list, object | None]:
        """(t's sources, its base or None) out of `views`, by source key."""
        xs = [views[s.key] for s in t.sources]
        return xs, views[t.base.key] if t.base is not None else None

    def _run(self, fn: Callable[[int, int], object], n: int, size: int | None = None) -> list:
        """fn(start, end) over ranges of `size` (default CHUNK) covering [0, n), on the chunk threads;
        results in order."""
        size = size or budget.CHUNK
        bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
        if self.pool is None or len(bounds) < 2:
            return [fn(s, e) for s, e in bounds]
        return _in_turn(self.pool, min(self.threads, len(bounds)), fn, bounds)

    def gpu_merge(self, t: OutTensor, on_gpu: dict[Key, torch.Tensor]) -> torch.Tensor:
        """The method on GPU tensors as stored (by source key); the result in t's dtype, on the current
        stream."""
        import torch

        cdt = getattr(torch, self.plan.compute_dtype)
        xs, base = self._roles(t, {k: g.to(cdt) for k, g in on_gpu.items()})
        with self._naming(t):
            merged = self.plan.spec.method.fn(xs, base, t.models, t.params, context=self.plan.context(t))
        return merged.to(getattr(torch, DTYPES[t.dtype][0]))

    def _chunk(self, slot: object, n: int) -> torch.Tensor:
        # Each thread fills its own buffers, which go when the thread does (prepare may run on
        # short-lived threads).
        import torch

        bufs = getattr(self.work, "bufs", None)
        if bufs is None:
            bufs = self.work.bufs = {}
        buf = bufs.get(slot)
        if buf is None:
            buf = bufs[slot] = torch.empty(budget.CHUNK, dtype=getattr(torch, self.plan.compute_dtype))
        return buf[:n]

    def _eager(
        self,
        t: OutTensor,
        views: dict[Key, np.ndarray],
        codes: dict[Key, str],
        gpu: PieceCopies | None = None,
        piece: int = 0,
    ) -> MergeRange:
        """The method's torch function over chunks of the flattened tensors: on the CPU, CHUNK entries
        at a time through reused float buffers on the chunk threads; on the GPU, `piece` entries at a
        time, one after the other, uploaded and copied back through `gpu`'s pinned buffers."""
        import torch

        method = self.plan.spec.method
        models, params, context = t.models, t.params, self.plan.context(t)
        flat = {k: to_torch(v.reshape(-1), codes[k]) for k, v in views.items()}
        xs, base = self._roles(t, flat)
        numel = t.numel
        size = budget.CHUNK if gpu is None else piece
        compute = getattr(torch, self.plan.compute_dtype)

        def load(slot: object, src: torch.Tensor, s: int, e: int) -> torch.Tensor:
            if gpu is None:
                return self._chunk(slot, e - s).copy_(src[s:e])  # stored dtype -> compute dtype, in cache
            # uploaded as stored (half the bytes of float32 for 16-bit inputs), into a fresh GPU tensor
            # that the chunk's in-place operations may modify
            return gpu.load(slot, src[s:e]).to(compute)

        state = None
        if method.prepare is not None:

            def task_vectors() -> Iterator[list[torch.Tensor]]:  # every model's next chunk, the base read once
                for s in range(0, numel, size):
                    e = min(s + size, numel)
                    b = load("b", base, s, e)
                    yield [load(i, x, s, e).sub_(b) for i, x in enumerate(xs)]

            def inputs() -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]:  # the same chunks, as stored
                for s in range(0, numel, size):
                    e = min(s + size, numel)
                    yield (
                        [load(i, x, s, e) for i, x in enumerate(xs)],
                        load("b", base, s, e) if base is not None else None,
                    )

            state = method.prepare(task_vectors, numel, models, params, context=context, inputs=inputs)

        def merge_range(start: int, end: int, out_array: np.ndarray) -> None:
            out = to_torch(out_array, t.dtype)

            def merge_chunk(s: int, e: int) -> None:  # torch ops release the GIL: chunks run on every core
                a, b = start + s, start + e
                chunk_xs = [load(i, x, a, b) for i, x in enumerate(xs)]
                chunk_base = load("b", base, a, b) if base is not None else None
                extra = (state, a) if method.prepare is not None else ()
                merged = method.fn(chunk_xs, chunk_base, models, params, *extra, context=context)
                if gpu is None:
                    out[s:e].copy_(merged)
                else:  # cast on the GPU: fewer bytes come back
                    gpu.store(out[s:e], merged.to(out.dtype))

            self._run(merge_chunk, end - start, size)
            if gpu is not None:
                gpu.finish()

        return merge_range

    def release(self, t: OutTensor) -> None:
        self.live.pop(t.name, None)
        for s in t.readers:
            self.reader.release(s.info)

    def prefetch(self, t: OutTensor) -> None:
        for s in t.readers:
            self.reader.prefetch(s.info)


class CudaStages:
    """write_shards on CUDA, three tensors in flight: a stager thread copies tensor j+1 from the page
    cache into pinned memory and uploads it on the copy stream, while tensor j is merged on the current
    (compute) stream and its result is copied back into pinned memory on the back stream, which the
    writer thread reads once that copy's event has fired (and meanwhile writes tensor j-1). Pinned
    buffers come in two slots (j % 2).

    Only events order the streams and the host: the compute stream waits for the event after a tensor's
    uploads, the back stream for one recorded after its merge, the writer for the one after the copy
    back, and the stager for a slot's last uploads before it refills the slot. A GPU tensor used on
    another stream than the one it was allocated on is marked with record_stream, so that the caching
    allocator does not hand its memory out again while that stream may still read it. tests/fakecuda.py
    and tests/test_streams.py hold every one of these to account on the CPU.

    A tensor that would need more than budget.gpu_budget() merged whole (Plan.gpu_bytes), or more pinned
    memory than budget.pinned_budget() to stage (Plan.pinned_bytes), is not staged: it goes through the
    GPU in pieces of up to GPU_PIECE entries instead (pieces(), PieceCopies), as the CPU path goes
    through its chunks, TIES thresholds included."""

    def __init__(self, merger: Merger):
        import torch

        self.torch = torch
        self.merger = merger
        # this thread's GPU (a rank's, under --workers or accelerate): other threads start on GPU 0
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.budget = budget.gpu_budget()
        self.pinned_budget = budget.pinned_budget()
        self.copy_stream = torch.cuda.Stream()  # uploads
        self.back_stream = torch.cuda.Stream()  # copies back: never queued behind the next merge
        sizes = merger.plan.staging_sizes(self.whole)  # each buffer sized once, for the largest tensor
        self.pinned_in = Buffers(pin=True, least=lambda key: sizes.get(key[1], 0))  # by (slot, role)
        self.pinned_out = Buffers(pin=True, least=lambda key: sizes.get(OUTPUT, 0) if isinstance(key, int) else 0)
        self.uploaded: list = [None, None]  # per slot: the event that follows its last uploads
        # MERGER_INLINE_STAGING=1 stages on the merging thread, without the overlap: for torch's CUDA
        # sanitizer (make gpu), which sees only the thread that enabled it
        inline = os.environ.get("MERGER_INLINE_STAGING") == "1"
        self.stager = None if inline else ThreadPoolExecutor(1, thread_name_prefix="merger-stager")
        self.piece_copies = PieceCopies(self)

    def close(self) -> None:
        if self.stager is not None:
            self.stager.shutdown()

    def stage(self, t: OutTensor, slot: int) -> Future:
        """Tensor t's upload (upload), on the stager thread, or done now with MERGER_INLINE_STAGING=1:
        its error is raised at .result() either way, in t's own turn."""
        if self.stager is not None:
            return self.stager.submit(self.upload, t, slot)
        staged: Future = Future()
        try:
            staged.set_result(self.upload(t, slot))
        except Exception as e:
            staged.set_exception(e)
        return staged

    def whole(self, t: OutTensor) -> bool:
        """Whether t is merged as one tensor, else in pieces (merges_whole)."""
        return self.merger.plan.merges_whole(t, self.budget, self.pinned_budget)

    def piece(self, t: OutTensor) -> int:
        """Entries per piece of a tensor merged in pieces."""
        return self.merger.plan.gpu_piece(t, self.budget)

    def pieces(self, t: OutTensor) -> MergeRange:
        """merge_range for t through the GPU, piece(t) entries at a time (see Merger.start)."""
        return self.merger.start(t, self.piece_copies, self.piece(t))

    def upload(self, t: OutTensor, slot: int) -> tuple:
        """Tensor t's inputs on the GPU (as stored), after pinned slot `slot`: (views, on_gpu, event)."""
        torch = self.torch
        if not self.whole(t) or self.merger.plan.verbatim(t):  # merged in pieces in its turn (reading its
            return {}, None, None  # inputs then), or copied file to file
        views, codes = self.merger.inputs_of(t)
        if not t.merged:
            return views, None, None
        if self.uploaded[slot] is not None:
            self.uploaded[slot].synchronize()  # the DMAs out of this slot's pinned buffers are done
        on_gpu = {}
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            for role, (key, v) in enumerate(views.items()):  # role: the input's place in t.distinct
                src = to_torch(v, codes[key])
                pinned = self.pinned_in.get((slot, role), v.nbytes, src.dtype, tuple(src.shape))
                pinned.copy_(src)  # page cache -> pinned memory, on this thread
                on_gpu[key] = copy_to_device(pinned, self.device)
            done = _event(torch)  # after the copies: what the compute stream and the slot wait for
            done.record(self.copy_stream)
        self.uploaded[slot] = done
        return views, on_gpu, done

    def merge(
        self, t: OutTensor, staged: tuple, slot: int, host: Callable[[], np.ndarray]
    ) -> tuple[np.ndarray, object]:
        """Tensor t's bytes, in pinned slot `slot`, and the event to wait for before reading them (None:
        ready now). Non-merged tensors are copied on the CPU into host(), a host buffer."""
        views, on_gpu, uploaded = staged
        if on_gpu is None:
            out = host()
            self.merger._agreed_copy(t, views)(0, t.numel, out.reshape(-1))
            return out, None
        torch = self.torch
        stream = torch.cuda.current_stream()
        stream.wait_event(uploaded)
        for g in on_gpu.values():
            g.record_stream(stream)  # allocated on the copy stream, freed after this stream's use
        merged = self.merger.gpu_merge(t, on_gpu).reshape(t.shape)
        out = self.pinned_out.get(slot, t.nbytes, merged.dtype, t.shape)
        flags = self.pinned_out.get(("flags", slot), FLAGS, torch.int64, (4,))
        ready = self.copy_back([(out, merged), (flags, _finiteness(torch, merged, list(on_gpu.values())))])
        host = out.reshape(-1).view(torch.uint8).numpy().view(DTYPES[t.dtype][2]).reshape(t.shape)
        return host, _Landed(ready, flags, t, host, self.merger.plan)

    def copy_back(self, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> object:
        """Queue on the back stream, after the work queued so far on the current stream, the copies of
        GPU tensors into pinned buffers ((pinned, gpu) pairs, same shape and dtype); returns the event
        that follows them."""
        torch = self.torch
        merged = torch.cuda.Event()
        merged.record(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.back_stream):
            self.back_stream.wait_event(merged)
            for pinned, gpu in copies:
                gpu.record_stream(self.back_stream)  # allocated on the compute stream
                copy_to_host(pinned, gpu)
            landed = _event(torch)
            landed.record(self.back_stream)
        return landed


def _finiteness(torch, merged, inputs: list) -> object:
    """On the GPU, as Merger.check_finite counts on the CPU: (entries of `merged` that are inf or NaN, those of
    them where every input is finite, 1 + the role of the first input holding inf or NaN or 0, its count)."""
    bad = ~torch.isfinite(merged.reshape(-1))
    counts = [bad.sum()]
    role = found = torch.zeros((), dtype=torch.int64, device=merged.device)
    for i in reversed(range(len(inputs))):  # the first input's count last, to win
        finite = torch.isfinite(inputs[i].reshape(-1))
        bad &= finite
        n = finite.logical_not_().sum()
        role, found = torch.where(n > 0, i + 1, role), torch.where(n > 0, n, found)
    return torch.stack([*counts, bad.sum(), role, found])


class _Landed:
    """What the writer waits for before writing a tensor merged whole on the GPU: the copy back (an
    event), then the tensor's finiteness flags (_finiteness), as Merger.check_finite does on the CPU, NaNs in
    `host` (the landed bytes) made canonical as there."""

    def __init__(self, event, flags, t: OutTensor, host: np.ndarray, plan: Plan):
        self.event, self.flags, self.t, self.host, self.plan = event, flags, t, host, plan

    def synchronize(self) -> None:
        self.event.synchronize()
        bad, unexplained, role, found = (int(x) for x in self.flags)
        if unexplained:
            spreading = (self.t.distinct[role - 1], found) if role else None
            raise not_finite_error(self.plan, self.t, unexplained, (0, self.t.numel), spreading)
        if bad:
            canonical_nan(self.host, self.t.dtype)


class PieceCopies:
    """The copies of tensors merged on the GPU in pieces (Merger._eager): each piece of an input goes
    from the page cache into a pinned buffer and up on the copy stream, and each merged piece comes back
    on the back stream into a pinned buffer, then into the caller's host array. Every role (a model's
    input, the base, the result) has two buffers that take turns, so that one piece is staged while the
    copy of the piece before is still queued; a buffer is refilled only once the event after its last
    copy has fired, and only once the GPU is done with the piece before last (which bounds how far the
    host runs ahead, and so the uploads' GPU memory). Within one merge_range call pieces overlap so (the
    trim's passes, merge_tensors' whole tensor); write_shards asks for one piece per call, each landed
    before the host checks it (Merger.check_finite), so there a piece's copy back does not yet overlap
    the next piece's upload."""

    def __init__(self, stages: CudaStages):
        self.stages = stages
        self.pinned = Buffers(pin=True)  # by (role, turn % 2)
        self.turns: dict[object, int] = {}  # by role: pieces through its buffers so far
        self.uploaded: dict[tuple, object] = {}  # by input buffer: the event after its last upload
        # by input buffer: an event on the compute stream after the work that used its last piece, so
        # that the host, which never waits for the GPU within a tensor otherwise, runs at most two pieces
        # ahead of it per role: each piece ahead holds its upload's GPU memory
        self.used: dict[tuple, object] = {}
        self.landing: dict[tuple, tuple] = {}  # by result buffer: (event, pinned, host) not yet read
        self.lock = threading.Lock()  # a plugin's prepare may iterate on threads of its own

    def load(self, role: object, src: torch.Tensor) -> torch.Tensor:
        """`src` (a piece of an input, on the host as stored) on the GPU, usable on the current stream."""
        torch, stages = self.stages.torch, self.stages
        stream = torch.cuda.current_stream(stages.device)  # where this thread's ops on it run
        with self.lock:
            key = self._turn(role)
            other = (role, 1 - key[1])  # the piece before, whose work is queued on `stream` by now
            if other in self.uploaded:
                self.used[other] = _event(torch)
                self.used[other].record(stream)
            if key in self.used:
                self.used.pop(key).synchronize()  # the GPU is done with the piece before last
            if key in self.uploaded:
                self.uploaded[key].synchronize()  # the buffer's last upload has run: it may be rewritten
            pinned = self.pinned.get(key, src.nbytes, src.dtype, tuple(src.shape))
            pinned.copy_(src)  # page cache -> pinned memory, on this thread
            with torch.cuda.device(stages.device), torch.cuda.stream(stages.copy_stream):
                gpu = copy_to_device(pinned, stages.device)
                done = self.uploaded[key] = _event(torch)
                done.record(stages.copy_stream)
        stream.wait_event(done)
        gpu.record_stream(stream)  # allocated on the copy stream, freed after this stream's use
        return gpu

    def store(self, host: torch.Tensor, merged: torch.Tensor) -> None:
        """Queue the copy of a merged piece (on the GPU, in host's dtype and shape) back into `host`; it
        is there once finish() returns."""
        with self.lock:
            key = self._turn("result")
        self._land(key)  # the piece before last, out of this buffer first
        pinned = self.pinned.get(key, host.nbytes, host.dtype, tuple(host.shape))
        self.landing[key] = (self.stages.copy_back([(pinned, merged)]), pinned, host)

    def finish(self) -> None:
        """Every piece stored so far, in its host array."""
        for key in list(self.landing):
            self._land(key)

    def _land(self, key: tuple) -> None:
        if key in self.landing:
            landed, pinned, host = self.landing.pop(key)
            landed.synchronize()
            host.copy_(pinned)

    def _turn(self, role: object) -> tuple:
        turn = self.turns.get(role, 0)
        self.turns[role] = turn + 1
        return role, turn % 2


def _event(torch):
    """A CUDA event the host may wait on: it sleeps rather than spins while waiting (the stager's and the
    writer's cores copy between the page cache and pinned memory)."""
    return torch.cuda.Event(blocking=True)


@contextlib.contextmanager
def _out_of_gpu_memory(t: OutTensor, cuda: bool) -> Iterator[None]:
    """CUDA running out of memory, or pinned host memory that cannot be had, as one line naming the
    tensor and what to change (merger's own use is bounded by the budgets, so something else holds the
    memory, or the budgets are more than this machine gives)."""
    try:
        yield
    except PinFailed as e:
        raise OutOfMemory(
            f"tensor '{t.name}' {list(t.shape)}: {e}; use fewer --workers, set {budget.PINNED_MEMORY_ENV} "
            "lower (e.g. 2GB: larger tensors then go through the GPU in pieces), or merge with --device cpu"
        ) from None
    except RuntimeError as e:
        if not cuda or type(e).__name__ != "OutOfMemoryError":
            raise
        raise OutOfMemory(
            f"tensor '{t.name}' {list(t.shape)}: the GPU ran out of memory ({_first_line(e)}); free GPU memory "
            f"(other processes?), use fewer --workers, set {budget.GPU_MEMORY_ENV} lower (e.g. 8GB: large "
            "tensors then go through the GPU in smaller pieces), or merge with --device cpu"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# Where each float format keeps its exponent: all ones there is inf or NaN (float8 e4m3 has no inf, and
# NaN only with the mantissa all ones too).
NONFINITE_BITS = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F8_E4M3": (np.uint8, 0x7F),
    "F8_E5M2": (np.uint8, 0x7C),
}


# One NaN per float format, the positive quiet one, for every NaN merger writes: arithmetic leaves NaN
# payloads that differ between the CPU kernels, torch on the CPU and CUDA (which makes 0x7FFFFFFF), and
# the output's bytes should not depend on the device. (mantissa bits, canonical NaN); float8 e4m3 has one
# NaN per sign, all exponent and mantissa bits set.
NAN_BITS = {
    "F64": (0x000FFFFFFFFFFFFF, 0x7FF8000000000000),
    "F32": (0x007FFFFF, 0x7FC00000),
    "F16": (0x03FF, 0x7E00),
    "BF16": (0x007F, 0x7FC0),
    "F8_E4M3": (0x07, 0x7F),
    "F8_E5M2": (0x03, 0x7E),
}


def canonical_nan(a: np.ndarray, code: str) -> None:
    """Rewrite every NaN of `a` (a float tensor in sources.DTYPES' form for `code`) in place as the
    format's canonical NaN (NAN_BITS)."""
    uint, exponent = NONFINITE_BITS[code]
    mantissa, canonical = NAN_BITS[code]
    bits = a.reshape(-1).view(uint)
    nan = ((bits & uint(exponent)) == uint(exponent)) & ((bits & uint(mantissa)) != 0)
    if code == "F8_E4M3":  # its exponent mask covers the mantissa: all ones is its only NaN
        nan = (bits & uint(0x7F)) == uint(0x7F)
    bits[nan] = uint(canonical)


def nonfinite(a: np.ndarray, code: str) -> np.ndarray:
    """Which entries of `a` (a float tensor in sources.DTYPES' form for `code`) are inf or NaN: flat bools."""
    uint, mask = NONFINITE_BITS[code]
    return (a.reshape(-1).view(uint) & uint(mask)) == uint(mask)


def count_nonfinite(a: np.ndarray, code: str) -> int:
    """How many entries of `a` (a float tensor in sources.DTYPES' form for `code`) are inf or NaN."""
    kernels = _kernels()
    if kernels is not None:
        uint, mask = NONFINITE_BITS[code]
        return int(kernels.count_masked(a.reshape(-1).view(uint), uint(mask)))
    return int(np.count_nonzero(nonfinite(a, code)))


LARGEST = {"F64": 1.797e308, "F32": 3.4e38, "F16": 65504.0, "BF16": 3.39e38, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}


def laid_out(plan: Plan, t: OutTensor, views: dict[Key, np.ndarray], codes: dict[Key, str]) -> dict[Key, np.ndarray]:
    """t's inputs (views as stored, by source key, and their dtype codes) as the merge takes them: a
    vocabulary tensor's laid out in the output's vocabulary (merger.vocab: new arrays), others as they are."""
    if not t.merged or not lays_out(plan.vocabulary, t.name):
        return views
    laid = plan.vocabulary.lay_out({s.model.path: (views[s.key], codes[s.key]) for s in t.distinct})
    return {s.key: laid[s.model.path] for s in t.distinct}


def _copying(view: np.ndarray) -> MergeRange:
    """merge_range of a tensor copied as it is stored."""
    flat = view.reshape(-1)
    return lambda start, end, out: np.copyto(out, flat[start:end])


def first_nonfinite(t: OutTensor, views: dict[Key, np.ndarray], codes: dict[Key, str]) -> tuple[Source, int] | None:
    """The first of t's inputs (in t.distinct's order) that holds inf or NaN, and how many entries; None if none."""
    for s in t.distinct:
        found = count_nonfinite(views[s.key], codes[s.key])
        if found:
            return s, found
    return None


def not_finite_error(
    plan: Plan, t: OutTensor, count: int, piece: tuple[int, int], spreading: tuple[Source, int] | None
) -> MergeError:
    """The merge gave inf or NaN at `count` entries of `piece` (start, size) where every input is finite. An input
    holding inf or NaN elsewhere in the tensor (`spreading`: first_nonfinite's) spread it there through what the
    method takes over the whole tensor (a norm, a dot product, a sum); else the values overflowed."""
    if spreading is not None:
        source, found = spreading
        entries, verb = counted(found)
        return MergeError(
            f"tensor '{t.name}': {entries} of '{source.model.ref}' {verb} inf or NaN, and {plan.spec.method.name} "
            f"spreads {'it' if found == 1 else 'them'} over the tensor through what it takes of all its entries (a "
            "norm, a dot product or a sum): the merge gives inf or NaN where every input is finite. Is that "
            "checkpoint diverged?"
        )
    start, size = piece
    where = f" (of its entries {start} to {start + size - 1})" if size < t.numel else ""
    return overflow_error(t, count, plan.compute_dtype, where)


def overflow_error(t: OutTensor, count: int, compute: str, where: str = "") -> MergeError:
    """The merge gave inf or NaN where every input is finite: what takes values past the range, and what
    helps (`where`: which of t's entries were checked, if not all). A wider output dtype helps only past
    float16's (or float8's) range; inputs near float32's own overflow a float32 computation (x - base), which
    float64 (compute_dtype) does not."""
    dtype, largest = DTYPES[t.dtype][0], LARGEST[t.dtype]
    what = f"the weights or scales take them past {dtype}'s range (about {largest:.3g})"
    if largest < LARGEST["BF16"]:
        why = f"{what}; lower them, or write a wider dtype (dtype: float32)"
    elif compute == "float32":
        why = f"{what}, or the inputs lie near float32's; lower the weights, or compute in float64 (compute_dtype: float64)"
    else:
        why = f"{what}; lower them"
    values, verb = counted(count, "value", "values")
    return MergeError(
        f"tensor '{t.name}': the merge gives {values}{where} that {verb} inf or NaN in {dtype} although every "
        f"input is finite there: {why}"
    )


@functools.cache
def _kernels():
    """merger.kernels, imported on first use (numba's import costs about 0.3 s), or None without numba."""
    try:
        kernels = importlib.import_module("merger.kernels")
    except Exception as e:  # numba missing, broken, or unable to cache: the torch path still works
        warnings.warn(f"merger's fused kernels are unavailable ({e}); merging through torch instead", stacklevel=2)
        return None
    return kernels


def model_pass(plan: Plan) -> dict:
    """What the method's model_prepare finds over every merged tensor before any is merged (TIES with
    trim_scope: model), as Plan.model_state; empty where the recipe asks for no such pass. Reads the
    inputs on the CPU, CHUNK entries at a time in the compute dtype, each tensor's pages dropped after
    each of its passes: memory stays at a few chunks whatever the model's size."""
    if not plan.model_wide:
        return {}
    import torch

    compute = getattr(torch, plan.compute_dtype)
    merged = [t for t in plan.tensors if t.merged]
    reader = MappedReader(Confined(plan.models))

    def task_vectors(t: OutTensor) -> Iterator[list[torch.Tensor]]:
        codes = {s.key: s.info.dtype for s in t.distinct}
        views = laid_out(plan, t, {s.key: reader.view(s.info) for s in t.distinct}, codes)
        flat = {key: to_torch(v.reshape(-1), codes[key]) for key, v in views.items()}
        try:
            for a in range(0, t.numel, budget.CHUNK):
                b = min(a + budget.CHUNK, t.numel)
                base = flat[t.base.key][a:b].to(compute)
                # copies: where the stored dtype is the compute dtype, to() would give the mapped input itself
                yield [flat[s.key][a:b].to(compute, copy=True).sub_(base) for s in t.sources]
        finally:
            for s in t.distinct:
                reader.release(s.info)

    def tensors():
        return ((t.name, t.numel, t.models, functools.partial(task_vectors, t)) for t in merged)

    try:
        return plan.spec.method.model_prepare(tensors, plan.spec.params)
    except NaNTaskVector as e:
        ref = plan.inputs[e.model].ref if e.model < len(plan.inputs) else f"model {e.model}"
        entries, verb = counted(e.count)
        raise MergeError(
            f"'{ref}': {entries} of its task vector {verb} NaN (NaN in that model or in the base); TIES "
            "with trim_scope: model cannot rank NaN magnitudes. Is one of those checkpoints diverged?"
        ) from None
    finally:
        reader.close()


def write_shards(
    plan: Plan,
    directory: Path,
    *,
    progress: bool = False,
    shards: Iterable[int] | None = None,
    files: FileSource | None = None,
    threads: int | None = None,
    finished: Callable[[Shard, Path], None] | None = None,
    durable: bool = False,
) -> int:
    """Write the planned shards (all, or the given indices) into `directory`. Returns bytes read.
    `files`: where input files come from (default: each model's folder; sources.FileSource); `threads`:
    CPU chunk threads (default: the cores this process may use); `finished(shard, path)` is called on
    a syncer thread as each shard is complete (with `durable`, once it is on disk)."""
    chosen = [plan.shards[i] for i in shards] if shards is not None else plan.shards
    todo = [(shard, t) for shard in chosen for t in shard.tensors]
    reader = MappedReader(files or Confined(plan.models))
    merger = Merger(plan, reader, threads)
    stages = CudaStages(merger) if merger.cuda and todo else None
    bar = progress_bar(sum(plan.stored_bytes(t) for _, t in todo), progress)
    try:
        with (
            _gc_paused(),
            cpu_engine_settings(plan.device, merger.needs_torch),
            _Writer(plan, directory, chosen, finished, durable) as out,
        ):
            # The kernel reads tensor j + ahead from disk while j merges; on CUDA the stager meanwhile
            # copies j+1 out of the page cache, so the read-ahead runs one tensor further.
            ahead = 2 if stages else 1
            staged = stages.stage(todo[0][1], 0) if stages else None
            for _, t in todo[1:ahead]:
                merger.prefetch(t)
            for j, (shard, t) in enumerate(todo):
                with _out_of_gpu_memory(t, stages is not None):
                    current = staged.result() if stages else None
                    if j + ahead < len(todo):
                        merger.prefetch(todo[j + ahead][1])
                    if stages and j + 1 < len(todo):
                        staged = stages.stage(todo[j + 1][1], (j + 1) % 2)  # staged while j merges
                    source = plan.verbatim(t)
                    if source is not None:  # an input's bytes as they are: file to file
                        out.copy(shard, t, source, merger.opened)
                    elif stages and stages.whole(t):  # a pinned output slot each
                        slot = out.free_slot()
                        host = functools.partial(out.buffers.get, slot, t.nbytes, DTYPES[t.dtype][2], t.shape)
                        out.queue(slot, shard, t, *stages.merge(t, current, slot, host))
                    else:  # in pieces through the slots: on the CPU, or on the GPU a tensor too large whole
                        _in_pieces(merger, stages, out, shard, t)
                merger.release(t)
                system.raise_if_interrupted()
                bar.update(merger.bytes_read - bar.n)
                bar.set_postfix_str(f"{j + 1}/{len(todo)} tensors", refresh=False)
            out.drain()
    finally:
        bar.close()
        if stages:
            stages.close()
        merger.close()
        reader.close()
    return merger.bytes_read


LOG_EVERY = 60.0  # seconds between two progress lines off a terminal (CircleCI stops a job silent for 10 minutes)


class _Lines:
    """tqdm's stream off a terminal (a CI log, a file): each refresh a line of its own, where a terminal's
    carriage returns would pile up on one line or show as ^M."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if line := text.strip("\r\n "):
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, progress: bool) -> tqdm:
    """The merge's progress on stderr (bytes read): a bar on a terminal; elsewhere a line every LOG_EVERY
    seconds, and none for a merge shorter than that."""
    kwargs = dict(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", disable=not progress)
    if progress and not sys.stderr.isatty():
        return tqdm(**kwargs, file=_Lines(sys.stderr), mininterval=LOG_EVERY, delay=LOG_EVERY, ncols=100)
    return tqdm(**kwargs, file=sys.stderr, dynamic_ncols=True)


def _in_pieces(merger: Merger, stages: CudaStages | None, out: _Writer, shard: Shard, t: OutTensor) -> None:
    """Merge t a piece at a time into the writer's slots, each piece checked for values that are not
    finite (Merger.check_finite)."""
    merge_range = stages.pieces(t) if stages else merger.start(t)
    piece = stages.piece(t) if stages else budget.PIECE
    _, itemsize, dtype = DTYPES[t.dtype]
    n = t.numel
    for s in range(0, max(n, 1), piece):
        e = min(s + piece, n)
        slot = out.free_slot()
        data = out.buffers.get(slot, (e - s) * itemsize, dtype, (e - s,))
        merge_range(s, e, data)
        if t.merged:
            merger.check_finite(t, s, data)
        out.queue(slot, shard, t, data, last=e == n)


class _Writer:
    """The writer thread of write_shards: it drains the output slots in order into one ShardWriter per
    shard, and closes each shard (then reports it finished) after its last tensor. The merge fills the
    next free slot meanwhile (Plan.write_depth of them)."""

    def __init__(self, plan: Plan, directory: Path, shards: list[Shard], finished, durable: bool):
        self.directory = directory
        self.finished = finished
        self.durable = durable
        self.synced: list[Future] = []  # durable: each finished shard's fsync, then `finished`
        self.drop = drop_behind(plan.bytes_written)  # the whole output: other ranks write the rest
        self.stage = direct_stage() if self.drop else None  # the shards' direct writes, one shard after another
        self.buffers = Buffers()  # output buffers, by slot
        self.pending: list[Future | None] = [None] * plan.write_depth
        self.slots = itertools.cycle(range(len(self.pending)))
        self.remaining = {s.filename: len(s.tensors) for s in shards}
        self.writers: dict[str, ShardWriter] = {}

    def __enter__(self) -> _Writer:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="merger-writer")
        # A shard is made durable off the writer thread: the disk catches up while the next one is merged.
        self.syncer = ThreadPoolExecutor(1, thread_name_prefix="merger-sync")
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()  # waits for the writes queued
        self.syncer.shutdown()
        for w in self.writers.values():  # shards a failure left unfinished
            w.abort()

    def free_slot(self) -> int:
        """The next output slot, once the writer is done with its buffer (re-raises a write error)."""
        slot = next(self.slots)
        if self.pending[slot] is not None:
            self.pending[slot].result()
        return slot

    def queue(self, slot: int, shard: Shard, t: OutTensor, data: np.ndarray, ready=None, last: bool = True) -> None:
        """Write `data` (the next bytes of t) once `ready` (a GPU copy's event and its checks) allows."""
        self.pending[slot] = self.pool.submit(self._write, shard, t, data, ready, last)

    def copy(self, shard: Shard, t: OutTensor, source: Source, opened: Callable[[Source], BinaryIO]) -> None:
        """Write all of t's bytes from `source` (ShardWriter.copy), opened by `opened` once a slot is free, in
        turn with the slots' writes; the file is closed after."""
        slot = self.free_slot()
        src = opened(source)
        try:
            self.pending[slot] = self.pool.submit(self._copy, shard, t, src, source.info)
        except BaseException:
            src.close()
            raise

    def drain(self) -> None:
        """Wait for every write, and every finished shard to be on disk (re-raises their errors)."""
        for f in self.pending:
            if f is not None:
                f.result()
        for f in self.synced:
            f.result()

    def _write(self, shard: Shard, t: OutTensor, data: np.ndarray, ready, last: bool) -> None:  # writer thread
        if ready is not None:
            ready.synchronize()  # the GPU's copy into `data` has landed (and its checks are known)
        self._shard(shard).write(t, data)
        if last:
            self._tensor_written(shard)

    def _copy(self, shard: Shard, t: OutTensor, src: BinaryIO, info: TensorInfo) -> None:  # writer thread
        with src:
            self._shard(shard).copy(t, src, info.start, info.file)
        self._tensor_written(shard)

    def _shard(self, shard: Shard) -> ShardWriter:
        w = self.writers.get(shard.filename)
        if w is None:
            path = self.directory / shard.filename
            w = self.writers[shard.filename] = ShardWriter(
                path, shard.tensors, drop_behind=self.drop, durable=self.durable, stage=self.stage
            )
        return w

    def _tensor_written(self, shard: Shard) -> None:
        """After a tensor's last bytes: close its shard after the shard's last tensor, made durable off this
        thread (then reported finished)."""
        self.remaining[shard.filename] -= 1
        if self.remaining[shard.filename] == 0:
            w = self.writers.pop(shard.filename)
            w.close()
            self.synced.append(self.syncer.submit(self._done, shard, w.path))

    def _done(self, shard: Shard, path: Path) -> None:  # syncer thread
        if self.durable:
            fsync_file(path)
        if self.finished is not None:
            self.finished(shard, path)


def merge_tensors(plan: Plan, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) in plan order without writing files, for in-process consumers
    (an evaluator that loads the candidate straight into a model). Each tensor is a fresh CPU tensor."""
    wanted = set(names) if names is not None else None
    reader = MappedReader(Confined(plan.models))
    merger = Merger(plan, reader)
    stages = CudaStages(merger) if merger.cuda else None
    try:
        for t in plan.tensors:
            if wanted is not None and t.name not in wanted:
                continue
            out = np.empty(t.shape, dtype=DTYPES[t.dtype][2])
            # not across the yield: the consumer keeps its threads
            gpu = None if plan.verbatim(t) else stages  # a copy is the CPU's, as write_shards' is
            with cpu_engine_settings(plan.device, merger.needs_torch), _out_of_gpu_memory(t, gpu is not None):
                if gpu and gpu.whole(t):
                    data, ready = gpu.merge(t, gpu.upload(t, 0), 0, lambda out=out: out)
                    if ready is not None:
                        ready.synchronize()
                        np.copyto(out, data)  # out of the pinned slot, which the next tensor reuses
                elif gpu:
                    gpu.pieces(t)(0, t.numel, out.reshape(-1))
                else:
                    merger.merge_into(t, out)
            merger.release(t)
            yield t.name, to_torch(out, t.dtype)
    finally:
        if stages:
            stages.close()
        merger.close()
        reader.close()

"""A fake torch.cuda under which the engine's CUDA path (merger.stream.CudaStages) runs unchanged on the
CPU, and which records every stream bug it can see: install() replaces torch.cuda's streams, events
and device context, and the engine's seams (merger.stream._pinned, copy_to_device, copy_to_host).

Semantics:
- Streams. Each torch.cuda.Stream(), and the default stream that every thread shares, runs the work
  queued on it (the seams' copies, event records, waits) in order on its own thread, each item after
  a random delay of up to `delay` seconds drawn from a generator seeded with (seed, the stream's
  number), so that a failure reproduces. torch.cuda.stream(s) makes s current on the calling thread.
- Events. record(stream) queues a marker; synchronize() blocks the calling thread until the marker
  has run; stream.wait_event(e) queues a wait, so later work on that stream runs after e's marker.
  Waiting for an event never recorded is a violation (CUDA would go straight on).
- Compute. A torch op on a GPU tensor runs on the calling thread, when called, once the work queued
  on the current stream so far has run: an op on a stream that waits for an event blocks the host
  until the event has fired. Every op on a GPU tensor, a view included, is a use on the current
  stream. Values read back (int(), .item(), .cpu(), .tolist()) are synchronous copies.
- Memory. GPU tensors are CPU tensors of class Tracked; pinned buffers too, told apart by their
  Memory. A copy's target holds poison (0xFF bytes: NaN in every float format) until the copy runs:
  the GPU tensors copy_to_device returns, the pinned buffers copy_to_host fills, and fresh pinned
  memory. Tensors made by factories (torch.zeros(..., device=x.device)) are plain CPU tensors the fake
  does not track.
- Order. Each stream and each host thread keeps a vector clock (stream -> stamp); an event carries its
  stream's. A violation is recorded (FakeCuda.violations) for: a GPU tensor read on a stream that has
  not waited for an event recorded after its last write on another stream; a GPU tensor used on a
  stream other than the one it was allocated on without record_stream to that stream first; a pinned
  buffer written by torch on a host thread that has not synchronised an event after every copy queued
  out of or into it; a pinned buffer read (by torch, or as the bytes handed to ShardWriter.write) on a
  host thread that has not synchronised an event after the copy into it; an upload from, or a copy
  back into, memory that is not pinned; a torch op between pinned and GPU tensors (a copy outside the
  seams). The clocks catch an unordered access whether or not this run's timing made it harmful; the
  poison shows the harm when it does.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch._C import DisableTorchFunctionSubclass

import merger.stream

TIMEOUT = 30.0  # seconds a thread waits for a stream before the test fails as hung

# Ops that touch no values: no stream order to respect.
METADATA = {
    "__get__", "__len__", "__repr__", "__format__", "__hash__", "size", "dim", "numel", "nelement", "stride",
    "element_size", "is_contiguous", "data_ptr", "untyped_storage", "storage_offset", "is_floating_point",
    "is_complex", "ndimension", "is_pinned",
}  # fmt: skip
# Ops that bring values back to the host.
READS_BACK = {"item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__", "equal"}
IN_PLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__iand__", "__ior__", "__ixor__"}


@dataclass(eq=False)
class Memory:
    """One allocation: on the GPU (`stream` set), or pinned host memory."""

    stream: FakeStream | None  # GPU: the stream it was allocated on
    written: tuple | None = None  # GPU: (stream, stamp) of its last write
    recorded: set = field(default_factory=set)  # GPU: the streams named by record_stream
    reads: dict = field(default_factory=dict)  # pinned: stream -> stamp of the last copy queued out of it
    writes: dict = field(default_factory=dict)  # pinned: stream -> stamp of the last copy queued into it


class Tracked(torch.Tensor):
    """A GPU tensor or a pinned buffer under the fake; its Memory is `_mem`."""

    fake: FakeCuda | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return cls.fake.dispatch(func, args, kwargs or {})


def _mem(t: object) -> Memory | None:
    return getattr(t, "_mem", None) if isinstance(t, Tracked) else None


def _plain(t: torch.Tensor) -> torch.Tensor:
    with DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


def _wrap(t: torch.Tensor, mem: Memory) -> Tracked:
    with DisableTorchFunctionSubclass():
        tracked = t.as_subclass(Tracked)
    tracked._mem = mem
    return tracked


def _storage(t: torch.Tensor) -> int:
    with DisableTorchFunctionSubclass():
        return t.untyped_storage().data_ptr()


def _poison(t: torch.Tensor) -> None:
    with DisableTorchFunctionSubclass():
        t.view(-1).view(torch.uint8).fill_(0xFF)  # view: a copy would leave t unpoisoned


def _tensors(x) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or results (nested lists, tuples and dicts)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _tensors(item)


def _map(fn, x):
    """x with fn applied to each tensor in it (lists and tuples, as _tensors finds them)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, list):
        return [_map(fn, item) for item in x]
    if isinstance(x, tuple):
        items = [_map(fn, item) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # namedtuple, else tuple or structseq
    return x


def _join(clock: dict, other: dict) -> None:
    for stream, stamp in other.items():
        if clock.get(stream, 0) < stamp:
            clock[stream] = stamp


class FakeStream:
    """A stream: its queued work runs in order on its own thread, each item after a random delay."""

    def __init__(self, fake: FakeCuda, number: int):
        self.fake = fake
        self.name = f"stream {number}" if number else "the default stream"
        self.clock: dict = {}  # what this stream's next work is ordered after
        self.count = 0  # this stream's own stamps
        self.queued = self.ran = 0
        self.done = threading.Condition()
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.rng = random.Random(f"{fake.seed}:{number}")
        self.thread = threading.Thread(target=self._run, name=f"fake-cuda {self.name}", daemon=True)
        self.thread.start()

    def __repr__(self) -> str:
        return self.name

    def tick(self) -> int:
        """A new stamp on this stream (under the fake's lock)."""
        self.count += 1
        self.clock[self] = self.count
        return self.count

    def enqueue(self, item) -> None:
        with self.done:
            self.queued += 1
        self.work.put(item)

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            time.sleep(self.rng.uniform(0, self.fake.delay))
            try:
                item()
            except Exception as e:  # a copy that failed: the test fails on it, the stream goes on
                self.fake.violate(f"{self}: {e!r}")
            with self.done:
                self.ran += 1
                self.done.notify_all()

    def drain(self) -> None:
        """Block until the work queued so far has run."""
        with self.done:
            target = self.queued
            if not self.done.wait_for(lambda: self.ran >= target, TIMEOUT):
                self.fake.violate(f"{self}: its queued work did not run within {TIMEOUT} s")
                raise RuntimeError(f"{self} hung")

    # the torch.cuda.Stream methods the engine calls
    def wait_event(self, event: FakeEvent) -> None:
        self.fake.wait_event(self, event)

    def synchronize(self) -> None:
        self.fake.sync_stream(self)

    def query(self) -> bool:
        with self.done:
            return self.ran >= self.queued


class FakeEvent:
    """A torch.cuda.Event: a marker queued on a stream by record()."""

    def __init__(self, fake: FakeCuda):
        self.fake = fake
        self.marker: threading.Event | None = None
        self.clock: dict = {}

    def record(self, stream: FakeStream | None = None) -> None:
        self.fake.record(self, stream or self.fake.current())

    def synchronize(self) -> None:
        self.fake.sync_event(self)

    def query(self) -> bool:
        return self.marker is not None and self.marker.is_set()

    def wait(self, stream: FakeStream | None = None) -> None:
        self.fake.wait_event(stream or self.fake.current(), self)


class FakeCuda:
    """The fake's state: its streams, the host threads' clocks, the pinned buffers, what went wrong."""

    def __init__(self, seed: int = 0, delay: float = 0.0005):
        self.seed, self.delay = seed, delay
        self.lock = threading.RLock()
        self.local = threading.local()  # per host thread: .stream (current), .clock
        self.streams: list[FakeStream] = []
        self.default = self.new_stream()
        self.violations: dict[str, None] = {}  # in order, each once
        self.waits: list[str] = []  # the threads that synchronised an event, by name, in order
        self.copies: list[tuple[str, FakeStream]] = []  # ("up" or "back", stream), as queued
        self.pinned_ranges: list[tuple[int, int, Memory, torch.Tensor]] = []

    # --- torch.cuda's API ---
    def new_stream(self, *args, **kwargs) -> FakeStream:
        with self.lock:
            self.streams.append(FakeStream(self, len(self.streams)))
            return self.streams[-1]

    def current(self) -> FakeStream:
        return getattr(self.local, "stream", None) or self.default

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None) -> Iterator[None]:
        before = getattr(self.local, "stream", None)
        self.local.stream = stream or before
        try:
            yield
        finally:
            self.local.stream = before

    def record(self, event: FakeEvent, stream: FakeStream) -> None:
        marker = threading.Event()
        with self.lock:
            stream.tick()
            event.marker, event.clock = marker, dict(stream.clock)
            stream.enqueue(marker.set)

    def wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        with self.lock:
            if event.marker is None:
                self.violate(f"{stream} waits for an event never recorded")
                return
            _join(stream.clock, event.clock)
            stream.enqueue(lambda marker=event.marker: self._await(marker, stream))

    def _await(self, marker: threading.Event, stream: FakeStream) -> None:
        if not marker.wait(TIMEOUT):
            self.violate(f"{stream} waited {TIMEOUT} s for an event")

    def sync_event(self, event: FakeEvent) -> None:
        if event.marker is None:
            self.violate("synchronize() on an event never recorded")
            return
        if not event.marker.wait(TIMEOUT):
            self.violate(f"an event did not fire within {TIMEOUT} s")
            raise RuntimeError("event hung")
        with self.lock:
            _join(self.host_clock(), event.clock)
            self.waits.append(threading.current_thread().name.split("_")[0])

    def sync_stream(self, stream: FakeStream) -> None:
        with self.lock:
            clock = dict(stream.clock)
        stream.drain()
        with self.lock:
            _join(self.host_clock(), clock)

    def synchronize(self) -> None:
        for stream in list(self.streams):
            self.sync_stream(stream)

    def host_clock(self) -> dict:
        if not hasattr(self.local, "clock"):
            self.local.clock = {}
        return self.local.clock

    # --- merger.stream's seams ---
    def pinned(self, nbytes: int) -> Tracked:
        raw = torch.full((nbytes,), 0xFF, dtype=torch.uint8)
        mem = Memory(stream=None)
        with self.lock:  # the buffer is kept, so its addresses are never reused under another Memory
            self.pinned_ranges.append((raw.data_ptr(), raw.data_ptr() + nbytes, mem, raw))
        return _wrap(raw, mem)

    def copy_to_device(self, pinned: torch.Tensor, device: object) -> Tracked:
        stream, src = self.current(), _mem(pinned)
        if src is None or src.stream is not None:
            self.violate("copy_to_device from memory that is not pinned (a synchronous copy)")
        host = _plain(pinned)
        with DisableTorchFunctionSubclass():
            target = torch.empty(host.shape, dtype=host.dtype)
        _poison(target)
        with self.lock:
            stamp = stream.tick()
            if src is not None:
                src.reads[stream] = stamp
            self.copies.append(("up", stream))
            stream.enqueue(lambda: target.copy_(host))
        return _wrap(target, Memory(stream=stream, written=(stream, stamp)))

    def copy_to_host(self, pinned: torch.Tensor, gpu: torch.Tensor) -> None:
        stream, dst, src = self.current(), _mem(pinned), _mem(gpu)
        if dst is None or dst.stream is not None:
            self.violate("copy_to_host into memory that is not pinned (a synchronous copy)")
        if src is None or src.stream is None:
            self.violate("copy_to_host from a tensor not on the GPU")
        else:
            self.use(src, stream, "copy_to_host")
        host, device = _plain(pinned), _plain(gpu)
        with self.lock:
            _poison(host)  # in flight: undefined until the copy has run
            stamp = stream.tick()
            if dst is not None:
                dst.writes[stream] = stamp
            self.copies.append(("back", stream))
            stream.enqueue(lambda: host.copy_(device))

    # --- checks ---
    def violate(self, message: str) -> None:
        with self.lock:
            self.violations[f"{message} [{threading.current_thread().name}]"] = None

    def use(self, mem: Memory, stream: FakeStream, what: str) -> None:
        """GPU memory used on `stream`: allocated there or recorded for it, its last write ordered before."""
        with self.lock:
            if mem.stream is not stream and stream not in mem.recorded:
                self.violate(f"{what} on {stream}: a tensor allocated on {mem.stream}, without record_stream")
            if mem.written is not None:
                writer, stamp = mem.written
                if writer is not stream and stream.clock.get(writer, 0) < stamp:
                    self.violate(f"{what} on {stream}: reads a tensor written on {writer} without waiting for it")

    def host_write(self, mem: Memory, what: str) -> None:
        with self.lock:
            clock = self.host_clock()
            for queued in (mem.reads, mem.writes):
                for stream, stamp in queued.items():
                    if clock.get(stream, 0) < stamp:
                        self.violate(f"{what}: a pinned buffer written while a copy on {stream} may be queued")

    def host_read(self, mem: Memory, what: str) -> None:
        with self.lock:
            clock = self.host_clock()
            for stream, stamp in mem.writes.items():
                if clock.get(stream, 0) < stamp:
                    self.violate(f"{what}: a pinned buffer read before the copy into it on {stream} is known done")

    def host_read_array(self, a: np.ndarray, what: str) -> None:
        """The host reads `a`'s bytes: check the pinned buffers it lies in."""
        start = a.__array_interface__["data"][0]
        end = start + a.nbytes
        for lo, hi, mem, _ in list(self.pinned_ranges):
            if lo < end and start < hi:
                self.host_read(mem, what)

    def assert_clean(self) -> None:
        assert not self.violations, "stream violations:\n" + "\n".join(self.violations)

    # --- torch ops on Tracked tensors ---
    def dispatch(self, func, args: tuple, kwargs: dict):
        name = getattr(func, "__name__", "")
        tracked = [t for t in _tensors((args, kwargs)) if _mem(t) is not None]
        gpus = [t for t in tracked if t._mem.stream is not None]
        if gpus and len(gpus) < len(tracked):
            self.violate(f"{name}: between pinned memory and the GPU, outside copy_to_device/copy_to_host")
        if gpus:
            return self._on_gpu(func, name, args, kwargs, tracked)
        return self._on_host(func, name, args, kwargs, tracked)

    def record_stream(self, t: torch.Tensor, stream: FakeStream) -> None:
        mem = _mem(t)
        if mem is None or mem.stream is None:
            self.violate("record_stream on a tensor not on the GPU")
            return
        with self.lock:
            mem.recorded.add(stream)

    def _on_gpu(self, func, name: str, args: tuple, kwargs: dict, tracked: list):
        if name == "numpy":
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        if name in METADATA:
            return self._results(self._call(func, args, kwargs), args, tracked, None)
        stream = self.current()
        stream.drain()  # the op runs after the stream's queued work
        for t in tracked:
            self.use(t._mem, stream, name)
        ret = self._call(func, args, kwargs)
        if name in READS_BACK:
            with self.lock:
                _join(self.host_clock(), stream.clock)
            return _plain(ret).clone() if name == "cpu" else ret  # a host tensor, untracked
        with self.lock:
            stamp = stream.tick()
        for target in self._targets(name, args, kwargs):
            target._mem.written = (stream, stamp)
        return self._results(ret, args, tracked, (stream, stamp))

    def _on_host(self, func, name: str, args: tuple, kwargs: dict, tracked: list):
        for target in self._targets(name, args, kwargs):
            self.host_write(target._mem, name)
        ret = self._call(func, args, kwargs)
        if name in METADATA or name == "numpy":
            return self._results(ret, args, tracked, None)
        out = [_storage(t) for t in _tensors(ret)]
        for t in tracked:  # a value read, unless the result is a view of t
            if name in READS_BACK or _storage(t) not in out:
                self.host_read(t._mem, name)
        return self._results(ret, args, tracked, None)

    @staticmethod
    def _targets(name: str, args: tuple, kwargs: dict) -> list:
        """The Tracked tensors an op writes in place."""
        in_place = (name.endswith("_") and not name.startswith("__")) or name in IN_PLACE
        targets = [args[0]] if in_place and args else []
        targets += _tensors(kwargs.get("out"))
        return [t for t in targets if _mem(t) is not None]

    @staticmethod
    def _call(func, args: tuple, kwargs: dict):
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @staticmethod
    def _results(ret, args: tuple, tracked: list, written: tuple | None):
        """Results as Tracked: views keep their memory; new GPU tensors (`written`: made on the GPU by
        (stream, stamp)) are allocated on that stream; results over plain inputs stay plain."""
        mems = {_storage(t): t._mem for t in tracked}
        plain = {_storage(t) for t in _tensors(args) if _mem(t) is None}

        def wrap(r):
            if not isinstance(r, torch.Tensor) or _mem(r) is not None:
                return r
            ptr = _storage(r)
            if ptr in mems:
                return _wrap(r, mems[ptr])
            if written is None or ptr in plain:
                return r
            return _wrap(r, Memory(stream=written[0], written=written))

        return _map(wrap, ret)


@contextlib.contextmanager
def installed(monkeypatch, seed: int = 0, delay: float = 0.0005) -> Iterator[FakeCuda]:
    """The fake in place of torch.cuda and the engine's seams, for a test's duration."""
    fake = FakeCuda(seed, delay)
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "Stream", fake.new_stream)
    monkeypatch.setattr(cuda, "Event", lambda *args, **kwargs: FakeEvent(fake))
    monkeypatch.setattr(cuda, "stream", fake.stream)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: fake.current())
    monkeypatch.setattr(cuda, "default_stream", lambda device=None: fake.default)
    monkeypatch.setattr(cuda, "device", lambda device=None: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: fake.synchronize())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: fake.record_stream(t, stream))
    monkeypatch.setattr(merger.stream, "_pinned", fake.pinned)
    monkeypatch.setattr(merger.stream, "copy_to_device", fake.copy_to_device)
    monkeypatch.setattr(merger.stream, "copy_to_host", fake.copy_to_host)
    write = merger.stream.ShardWriter.write

    def checked_write(writer, t, data):  # the writer thread reads the bytes here
        fake.host_read_array(data, f"ShardWriter.write('{t.name}')")
        return write(writer, t, data)

    monkeypatch.setattr(merger.stream.ShardWriter, "write", checked_write)
    monkeypatch.setattr(Tracked, "fake", fake)
    try:
        yield fake
    finally:
        for stream in fake.streams:
            stream.work.put(None)


def write_on_cpu_and_gpu(plan, root, monkeypatch, pieces: bool, seed: int) -> None:
    """`plan`'s shards written twice: into root/cpu through torch on the CPU (as the GPU computes, no fused
    kernel), and into root/gpu on the fake's streams, each tensor whole or, with `pieces`, in pieces of 100
    entries; the fake found nothing wrong. The plan is left on "cuda"."""
    import merger.budget
    import merger.plan

    with monkeypatch.context() as patch:
        patch.setattr(merger.stream.Merger, "_fusable", lambda self, t: False)
        (root / "cpu").mkdir()
        merger.stream.write_shards(plan, root / "cpu")
    with installed(monkeypatch, seed=seed) as fake:
        monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1 if pieces else 1 << 40)
        monkeypatch.setattr(merger.budget, "pinned_budget", lambda: 1 << 40)
        monkeypatch.setattr(merger.plan.Plan, "gpu_piece", lambda self, t, gpu: 100)
        plan.device = "cuda"
        (root / "gpu").mkdir()
        merger.stream.write_shards(plan, root / "gpu")
        fake.assert_clean()

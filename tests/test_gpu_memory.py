"""GPU and pinned memory, measured on the CPU: what the CUDA path holds while it merges a tensor, whole
(Merger.gpu_merge) or in pieces (CudaStages.pieces), against the plan's estimates (Plan.gpu_bytes,
Plan.pinned_bytes, Plan.peak_pinned_memory) for every built-in method; the budgets that decide between
whole and pieces, shared among the processes on a device; and allocation failures as one line."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_checkpoint
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import merger.budget
import merger.parallel
import merger.plan
import merger.stream
from merger import system
from merger.budget import (
    GPU_MEMORY_ENV,
    PINNED_MEMORY_ENV,
    WORKERS_ENV,
    gpu_budget,
    local_processes,
    pinned_budget,
)
from merger.cli import cli
from merger.errors import MergerError
from merger.methods import greedy
from merger.plan import build_plan
from merger.recipe import parse_recipe
from merger.sources import DTYPES, Confined, MappedReader, to_torch
from merger.stream import CudaStages, Merger

BLOCK = 512  # torch's CUDA caching allocator hands out multiples of 512 bytes
PINNED = merger.stream._pinned  # merger's own, which the fixtures replace


class DeviceMemory:
    """The peak bytes of GPU tensors alive while code runs on the CPU as if on a GPU, counted as torch's
    CUDA caching allocator counts them: each storage rounded up to 512 bytes, from the op that makes it
    until it is freed (a finalizer on the storage: torch keeps one Python object per live storage).

    A storage is on the GPU when the op that makes it has a GPU operand (`resident` ones, made before,
    or any counted), no tensor operand at all (the methods' factories), or is a copy to a device
    (`.to(device)`: an upload); not when it is made from host tensors alone, nor by `.cpu()` (a copy
    to the host, which on the CPU would otherwise be no copy at all).

    Threads started meanwhile run under the same count. While they run the calling thread waits (the
    engine's threads are a pool it maps over), and their peaks are added as if they all came at once,
    since on a GPU they may."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        self.lock = threading.Lock()
        self.caller = threading.get_ident()
        self.gpu = {t.untyped_storage().data_ptr() for t in resident}
        self.live: dict[int, tuple[int, int]] = {}  # storage address -> (bytes, allocating thread)
        self.held: collections.Counter = collections.Counter()  # by thread
        self.thread_peaks: dict[int, int] = {}  # threads other than the caller, since the caller last ran
        self.peak = 0
        self.to_host = threading.local()

    def made(self, func, sources: set[int], outputs: list, kwargs: dict) -> None:
        """Count the storages an op made, if on the GPU (`sources`: its operands' storages, before it ran)."""
        if getattr(self.to_host, "active", False):
            return
        upload = func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None
        with self.lock:
            if not (upload or not sources or any(p in self.gpu or p in self.live for p in sources)):
                return
            for t in outputs:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                address, size = storage.data_ptr(), storage.nbytes()
                if size and address not in sources and address not in self.live and address not in self.gpu:
                    size = -(-size // BLOCK) * BLOCK
                    self.live[address] = (size, threading.get_ident())
                    weakref.finalize(storage, self.freed, address)
                    self._change(threading.get_ident(), size)

    def freed(self, address: int) -> None:
        with self.lock:
            size, thread = self.live.pop(address)
            self._change(thread, -size)

    def _change(self, thread: int, size: int) -> None:
        self.held[thread] += size
        if thread == self.caller:  # the threads are done: their peaks are counted already
            self.thread_peaks.clear()
            now = sum(self.held.values())
        else:
            self.thread_peaks[thread] = max(self.thread_peaks.get(thread, 0), self.held[thread])
            now = self.held[self.caller] + sum(self.thread_peaks.values())
        self.peak = max(self.peak, now)

    @contextlib.contextmanager
    def counting(self) -> Iterator[DeviceMemory]:
        run, cpu = threading.Thread.run, torch.Tensor.cpu

        def counted_run(thread):
            with _Counted(self):
                run(thread)

        def copy_to_host(t, *args, **kwargs):
            self.to_host.active = True
            try:
                return t.clone()
            finally:
                self.to_host.active = False

        threading.Thread.run, torch.Tensor.cpu = counted_run, copy_to_host
        try:
            with _Counted(self):
                yield self
        finally:
            threading.Thread.run, torch.Tensor.cpu = run, cpu


class _Counted(TorchDispatchMode):
    def __init__(self, memory: DeviceMemory):
        super().__init__()
        self.memory = memory

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sources = {t.untyped_storage().data_ptr() for t in operands}  # before: an op may reallocate one
        out = func(*args, **kwargs)
        self.memory.made(func, sources, pytree.tree_leaves(out), kwargs)
        return out


def test_device_memory_counts_what_code_holds_at_its_peak():
    """The counter itself: factories, uploads and ops on GPU tensors count (rounded up to 512 bytes),
    views and in-place ops do not, host tensors and copies back to the host do not, freed storages stop
    counting, and threads' peaks add up."""
    host = torch.ones(1000)  # 4000 bytes: 4096 on the GPU
    resident = torch.ones(10)
    memory = DeviceMemory([resident])
    with memory.counting():
        up = host.to("cpu", copy=True)  # 4096
        view = up[10:20].view(2, 5)
        view.mul_(2)
        twice = up * 2  # 4096
        del up, view
        back = twice.cpu()  # host
        host_only = back + host  # host
        assert memory.peak == 8192 and sum(memory.held.values()) == 4096
        del twice
        small = resident + 1  # 512
        barrier = threading.Barrier(2)

        def hold():
            big = torch.zeros(2048)  # 8192 each, at once
            barrier.wait()
            del big

        threads = [threading.Thread(target=hold) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert host_only.shape == (1000,) and small.shape == (10,)
    assert memory.peak == 512 + 2 * 8192 and sum(memory.held.values()) == 512


class PinnedHost:
    """torch's caching host allocator, modelled independently of merger.budget: each request pins a
    block of the next power of two bytes, a freed block waits for a request of its size, and nothing is
    given back. `held`: bytes pinned."""

    def __init__(self):
        self.held = 0
        self.free: collections.Counter = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, nbytes: int) -> torch.Tensor:
        block = 1
        while block < nbytes:
            block *= 2
        with self.lock:
            if self.free[block]:
                self.free[block] -= 1
            else:
                self.held += block
        with _disable_current_modes():  # host memory, which DeviceMemory does not count
            t = torch.empty(nbytes, dtype=torch.uint8)
        weakref.finalize(t.untyped_storage(), self._freed, block)
        return t

    def _freed(self, block: int) -> None:
        with self.lock:
            self.free[block] += 1


def test_pinned_block_is_what_torch_pins():
    assert [merger.budget.pinned_block(n) for n in (0, 1, 16, 17, 4096, 4097)] == [0, 1, 16, 32, 4096, 8192]
    assert merger.budget.pinned_block(1_090_000_000) == 1 << 31  # a 1.09 GB embedding pins 2 GiB
    model = PinnedHost()
    kept = model(1_000)
    model(3_000)  # freed at once: its 4096 bytes stay pinned, and serve the next request of that size
    model(2_100)
    assert model.held == 1024 + 4096 and kept.numel() == 1_000


@pytest.fixture
def cuda_on_cpu(monkeypatch) -> PinnedHost:
    """CudaStages on the CPU, synchronously: torch.cuda's streams and events as no-ops, uploads as copies
    to the (CPU) device, which DeviceMemory counts, and pinned memory from a PinnedHost (returned)."""

    class Event:
        def __init__(self, blocking: bool = False):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    class Stream:
        def wait_event(self, event):
            pass

    class OnCpu(CudaStages):
        def __init__(self, m):
            super().__init__(m)
            self.device = torch.device("cpu")

    pinned = PinnedHost()
    for name, value in {
        "Stream": Stream,
        "Event": Event,
        "current_stream": lambda device=None: Stream(),
        "stream": lambda s: contextlib.nullcontext(),
        "device": lambda d: contextlib.nullcontext(),
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "reset_peak_memory_stats": lambda *a: None,
        "max_memory_allocated": lambda *a: 0,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(merger.stream, "_pinned", pinned)
    monkeypatch.setattr(merger.stream, "copy_to_device", lambda p, device: p.to(device, copy=True))
    monkeypatch.setattr(merger.stream, "copy_to_host", lambda p, g: p.copy_(g))
    monkeypatch.setattr(merger.stream, "CudaStages", OnCpu)
    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1 << 40)
    monkeypatch.setattr(merger.budget, "pinned_budget", lambda: 1 << 40)
    return pinned


def write_models(root: Path, n: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> Path:
    """A base and n fine-tunes of it; fine-tune 0 equals the base in tensor 'same' (a task vector of
    zeros: every entry tied at the TIES threshold)."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    write_checkpoint(root / "base", base, n_shards=1)
    for i in range(n):
        ft = {k: v if (k, i) == ("same", 0) else (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype)
              for k, v in base.items()}  # fmt: skip
        write_checkpoint(root / f"ft{i}", ft, n_shards=1)
    return root


METHODS = {  # the recipe's lines before its models ({base}: the base model's directory)
    "linear": "merge_method: linear\n",
    "linear-sum": "merge_method: linear\nparameters: {{normalize: false}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\n",
    "task_arithmetic-mean": "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{normalize: true}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\n",
    "ties-count": "merge_method: ties\nbase_model: {base}\nparameters: {{consensus_method: count}}\n",
    "ties-sum": "merge_method: ties\nbase_model: {base}\nparameters: {{normalize: false}}\n",
    "greedy_soup": "merge_method: linear\n",  # its uniform soup; the method swapped in (see plan_for)
}


def recipe_text(root: Path, method: str, n: int, extra: str = "") -> str:
    models = ", ".join(
        f"{{model: {root / f'ft{i}'}, parameters: {{weight: {0.5 + i / 4}"
        + (f", density: {0.3 + i / 10}" if method.startswith("ties") else "")
        + "}}"
        for i in range(n)
    )
    return METHODS[method].format(base=root / "base") + f"models: [{models}]\n" + extra


def plan_for(root: Path, method: str, n: int, extra: str = "") -> merger.plan.Plan:
    plan = build_plan(parse_recipe(recipe_text(root, method, n, extra)), device="cpu")
    if method == "greedy_soup":  # the soup greedy_soup writes, of whichever models it kept
        plan.spec = dataclasses.replace(plan.spec, method=greedy.METHOD)
    plan.device = "cuda"
    return plan


def held_whole(plan: merger.plan.Plan, t) -> int:
    """GPU bytes at the peak of merging t whole: what gpu_merge holds, beside what CudaStages holds meanwhile
    (t's inputs as uploaded, the next tensor's, staged meanwhile, and the previous tensor's, which the
    allocator may not hand to the copy stream again before the compute stream is past it: of the same
    size here; and the previous tensor's result on its way back, again t's size)."""
    reader = MappedReader(Confined(plan.models))
    views, codes = Merger(plan, reader).inputs_of(t)
    on_gpu = {p: to_torch(v, codes[p]).clone() for p, v in views.items()}
    memory = DeviceMemory(on_gpu.values())
    with memory.counting():
        Merger(plan, reader).gpu_merge(t, on_gpu)
    reader.close()
    uploads = sum(-(-g.nbytes // BLOCK) * BLOCK for g in on_gpu.values())
    return memory.peak + 3 * uploads + -(-t.nbytes // BLOCK) * BLOCK


def held_in_pieces(plan: merger.plan.Plan, t, piece: int, monkeypatch) -> int:
    """GPU bytes at the peak of merging t through CudaStages in pieces of `piece` entries (beside them,
    the previous piece's result on its way back)."""
    monkeypatch.setattr(merger.budget, "GPU_PIECE", piece)
    reader = MappedReader(Confined(plan.models))
    stages = merger.stream.CudaStages(Merger(plan, reader))
    assert stages.piece(t) == piece
    out = np.empty(t.numel, DTYPES[t.dtype][2])
    memory = DeviceMemory()
    with memory.counting():
        merge_range = stages.pieces(t)
        for s in range(0, t.numel, piece):
            merge_range(s, min(s + piece, t.numel), out[s : s + piece])
    stages.close()
    reader.close()
    return memory.peak + -(-piece * DTYPES[t.dtype][1] // BLOCK) * BLOCK


def assert_bounds(estimate: int, held: int, what: str) -> None:
    assert held <= estimate <= 1.5 * held, f"{what}: estimated {estimate} bytes, held {held}"


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def models(request, tmp_path_factory) -> Path:
    """Three fine-tunes and their base: 'w' of 128K entries, 'small' of 4K, 'same' of 32K (see write_models)."""
    root = tmp_path_factory.mktemp(f"models-{str(request.param).removeprefix('torch.')}")
    return write_models(root, 3, {"w": (256, 512), "small": (64, 64), "same": (128, 256)}, request.param)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gpu_estimate_bounds_what_each_method_holds(models, method, n, cuda_on_cpu, monkeypatch):
    """Every method, with 1-3 models, in bf16 and float32: Plan.gpu_bytes is at least what merging a
    tensor holds on the GPU at its peak, whole and in pieces (the last one shorter), and at most half as
    much again; TIES's trim, which runs first in both, included."""
    if method == "greedy_soup" and n == 1:
        pytest.skip("a soup of one model")
    plan = plan_for(models, method, n)
    tensors = {t.name: t for t in plan.tensors}
    for name in ("w", "small", "same"):
        t = tensors[name]
        assert_bounds(plan.gpu_bytes(t), held_whole(plan, t), f"{name} whole")
    w = tensors["w"]
    piece = 50_000  # two pieces and one of 31072 entries
    assert_bounds(plan.gpu_bytes(w, piece), held_in_pieces(plan, w, piece, monkeypatch), "w in pieces")


OTHERS = {  # the other built-in methods (interpolation's and subspace's have tests of their own):
    # the recipe's lines before its models, each model's parameters, how many models
    "passthrough": ("merge_method: passthrough\n", "", 1),
    "dare_linear": ("merge_method: dare_linear\nbase_model: {base}\n", "weight: 0.7, density: 0.4", 3),
    "dare_ties": ("merge_method: dare_ties\nbase_model: {base}\n", "weight: 0.7, density: 0.4", 3),
    "breadcrumbs": ("merge_method: breadcrumbs\nbase_model: {base}\n", "density: 0.8, gamma: 0.05", 3),
    "breadcrumbs_ties": ("merge_method: breadcrumbs_ties\nbase_model: {base}\n", "density: 0.8, gamma: 0.05", 2),
    "della": ("merge_method: della\nbase_model: {base}\n", "density: 0.4, epsilon: 0.1", 3),
    "della_linear": ("merge_method: della_linear\nbase_model: {base}\n", "density: 0.4, epsilon: 0.1", 2),
    "sce": ("merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\n", "weight: 0.7", 3),
    "model_stock": ("merge_method: model_stock\nbase_model: {base}\n", "", 3),
    "model_stock-rows": ("merge_method: model_stock\nbase_model: {base}\nparameters: {{filter_wise: true}}\n", "", 3),
    "arcee_fusion": ("merge_method: arcee_fusion\nbase_model: {base}\n", "", 1),
    "ram": ("merge_method: ram\nbase_model: {base}\n", "", 3),
    "ramplus_tl": ("merge_method: ramplus_tl\nbase_model: {base}\n", "", 2),
}


@pytest.mark.parametrize("method", sorted(OTHERS))
def test_gpu_estimate_bounds_what_the_other_methods_hold(models, method, cuda_on_cpu, monkeypatch):
    """The methods beside the first four: Plan.gpu_bytes is at least what merging holds on the GPU at its peak,
    whole (w; 'small', where the sizes that do not grow with the tensor weigh most; 'same', a task vector of
    zeros for arcee_fusion's single model) and in pieces of two sizes (DELLA's magnitudes and keep masks, and
    the per-row statistics, stay whole), and whole at most half as much again. In pieces some estimates are
    looser (passthrough's counts a product its scale of 1 does not make)."""
    header, params, n = OTHERS[method]
    entries = ", ".join(
        f"{{model: {models / f'ft{i}'}" + (f", parameters: {{{params}}}}}" if params else "}") for i in range(n)
    )
    plan = build_plan(parse_recipe(header.format(base=models / "base") + f"models: [{entries}]\n"), device="cpu")
    plan.device = "cuda"
    tensors = {t.name: t for t in plan.tensors}
    for name in ("w", "small", "same"):
        estimate, held = plan.gpu_bytes(tensors[name]), held_whole(plan, tensors[name])
        assert held <= estimate, f"{name} whole: estimated {estimate} bytes, held {held}"
    assert_bounds(plan.gpu_bytes(tensors["w"]), held_whole(plan, tensors["w"]), "w whole")
    for piece in (50_000, 8192):
        estimate, held = plan.gpu_bytes(tensors["w"], piece), held_in_pieces(plan, tensors["w"], piece, monkeypatch)
        assert held <= estimate, f"w in pieces of {piece}: estimated {estimate} bytes, held {held}"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_gpu_estimate_bounds_what_float64_merges_hold(models, method, cuda_on_cpu, monkeypatch):
    """compute_dtype float64: twice the bytes per buffer, the same masks (and TIES's radix digits in
    four passes)."""
    plan = plan_for(models, method, 3, "compute_dtype: float64\n")
    w = next(t for t in plan.tensors if t.name == "w")
    assert_bounds(plan.gpu_bytes(w), held_whole(plan, w), "whole")
    assert_bounds(plan.gpu_bytes(w, 50_000), held_in_pieces(plan, w, 50_000, monkeypatch), "in pieces")


def test_gpu_estimate_is_the_methods_own(models):
    """The plan takes each method's figures (Method.gpu): a plugin method that holds more buffers is
    estimated that much more, whole and in pieces, each buffer rounded up to a block."""
    from merger.methods.base import GpuFootprint

    plan = plan_for(models, "linear", 2)
    w = next(t for t in plan.tensors if t.name == "w")
    before = plan.gpu_bytes(w), plan.gpu_bytes(w, 1000)
    plugin = dataclasses.replace(plan.spec.method, gpu=GpuFootprint(words=10, per_model=1))
    plan.spec = dataclasses.replace(plan.spec, method=plugin)
    more = 8 + 2  # buffers: eight more words than linear's two, one per model (two); 4 bytes an entry in float32
    assert plan.gpu_bytes(w) == before[0] + more * (4 * w.numel + BLOCK)
    assert plan.gpu_bytes(w, 1000) == before[1] + more * (4 * 1000 + BLOCK)


SHAPES = {"a": (8, 8), "b": (64, 64), "c": (32, 32), "d": (96, 96), "e": (300, 100)}  # sizes up and down


def test_pinned_memory_is_what_the_plan_says(tmp_path, cuda_on_cpu):
    """CudaStages pins what Plan.peak_pinned_memory says, torch's power-of-two blocks included: each
    staging buffer sized once for the largest tensor staged whole, where one grown tensor by tensor
    would leave every outgrown block pinned (a, b, c, d, e: 128 B, 8 KB, 2 KB, 18 KB, 60 KB in bf16)."""
    from merger.stream import write_shards

    plan = plan_for(write_models(tmp_path, 2, SHAPES, torch.bfloat16), "ties", 2)
    largest = next(t for t in plan.tensors if t.name == "e")
    (tmp_path / "out").mkdir()
    write_shards(plan, tmp_path / "out")
    assert cuda_on_cpu.held == plan.peak_pinned_memory == plan.pinned_bytes(largest)
    blocks = 3 * 65536 + 65536 + merger.plan.FLAGS  # three inputs and the output of e (60000 bytes each), the flags
    assert plan.pinned_bytes(largest) == 2 * blocks


def test_pinned_estimate_bounds_the_pieces_buffers(tmp_path, cuda_on_cpu, monkeypatch):
    """A tensor over the GPU budget goes through pinned piece buffers (two per input and for the result),
    the last piece shorter: the plan's estimate bounds what is pinned, within half as much again."""
    from merger.stream import write_shards

    plan = plan_for(write_models(tmp_path, 2, SHAPES, torch.bfloat16), "ties", 2)
    tensors = {t.name: t for t in plan.tensors}
    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: plan.gpu_bytes(tensors["d"]))
    monkeypatch.setattr(merger.budget, "GPU_PIECE", 7000)  # e: four pieces and one of 2000 entries
    assert plan.gpu_pieced == ["e"]
    (tmp_path / "out").mkdir()
    write_shards(plan, tmp_path / "out")
    assert cuda_on_cpu.held <= plan.peak_pinned_memory <= 1.5 * cuda_on_cpu.held
    assert plan.peak_pinned_memory > plan.pinned_bytes(tensors["d"])


def test_pinned_budget_holds_every_tensor_staged_whole(tmp_path, cuda_on_cpu, monkeypatch):
    """A tensor is staged whole only if the staging buffers of it and of every tensor needing no more
    fit the pinned budget together: each alone may fit where the buffers' largest blocks, taken from
    different tensors, do not (here p is float32 in model 1, q in model 2, the rest bfloat16)."""
    from merger.stream import write_shards

    root = write_models(tmp_path, 2, {"a": (8, 8), "p": (150, 150), "q": (150, 150)}, torch.bfloat16)
    for i, wide in enumerate("pq"):
        tensors = _load(root / f"ft{i}")
        write_checkpoint(root / f"ft{i}", tensors | {wide: tensors[wide].float()}, n_shards=1)
    plan = plan_for(root, "ties", 2)
    p, q = (t for t in plan.tensors if t.name in "pq")
    budget = plan.pinned_bytes(p)
    assert plan.pinned_bytes(q) == budget  # either alone fits
    monkeypatch.setattr(merger.budget, "pinned_budget", lambda: budget)
    assert plan.gpu_pieced == ["p", "q"]
    (tmp_path / "out").mkdir()
    write_shards(plan, tmp_path / "out")
    assert cuda_on_cpu.held <= plan.peak_pinned_memory
    assert 2 * (sum(plan.staging_sizes(lambda t: t.name == "a").values()) + 16) <= budget
    monkeypatch.setattr(merger.budget, "pinned_budget", lambda: budget + 2 * (131072 - 65536))  # a float32 block more
    assert plan.gpu_pieced == []


def _load(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


@pytest.fixture
def no_sharing(monkeypatch):
    """None of the variables that share or set the budgets (empty is unset; and restored afterwards,
    which monkeypatch does not do for a variable it deleted that was never set)."""
    for name in (WORKERS_ENV, "LOCAL_WORLD_SIZE", GPU_MEMORY_ENV, PINNED_MEMORY_ENV):
        monkeypatch.setenv(name, "")


def test_budgets_are_shared_among_the_processes_on_a_device(monkeypatch, no_sharing):
    """K processes of one merge on G GPUs (--workers, or a launcher's ranks: LOCAL_WORLD_SIZE) take a
    ceil(K/G)-th of a GPU's budget each and a K-th of the host's pinned one, which is a quarter of the
    memory available, cgroup limit included; MERGER_GPU_MEMORY and MERGER_PINNED_MEMORY set what is
    shared instead."""
    gb = 1 << 30
    for name, value in {
        "current_device": lambda: 0,
        "memory_reserved": lambda d: 0,
        "memory_allocated": lambda d: 0,
        "mem_get_info": lambda d: (80 * gb, 80 * gb),
        "device_count": lambda: 2,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(system, "proc_kib", lambda path, field: 64 * gb)
    monkeypatch.setattr(system, "cgroup_room", lambda: None)
    assert (gpu_budget(), pinned_budget()) == (40 * gb, 16 * gb)
    monkeypatch.setattr(system, "cgroup_room", lambda: 8 * gb)  # a container's limit
    assert pinned_budget() == 2 * gb
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on two GPUs: two on each
    assert (gpu_budget(), pinned_budget()) == (20 * gb, gb // 2)
    monkeypatch.setenv(WORKERS_ENV, "3")  # three --workers: two on GPU 0
    assert (gpu_budget(), pinned_budget()) == (20 * gb, 2 * gb // 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpu_budget() == 40 * gb // 3
    monkeypatch.setenv(GPU_MEMORY_ENV, "12GB")
    monkeypatch.setenv(PINNED_MEMORY_ENV, "3GiB")
    assert (gpu_budget(), pinned_budget()) == (4_000_000_000, gb)
    monkeypatch.setenv(GPU_MEMORY_ENV, "lots")
    with pytest.raises(MergerError, match="^MERGER_GPU_MEMORY: 'lots' is not a size such as 20GB or 512MB$"):
        gpu_budget()


def test_workers_tell_the_budgets_how_many_they_are(tmp_path, monkeypatch, no_sharing):
    """Each --workers process knows how many there are (merger.parallel), so that its budgets are its share."""
    seen = []
    monkeypatch.setattr(merger.parallel, "write_shards", lambda *a, **k: seen.append(local_processes()) or 0)
    plan = plan_for(write_models(tmp_path, 1, {"a": (8, 8)}, torch.float32), "linear", 1)
    plan.device = "cpu"
    assert local_processes() == 1
    merger.parallel._write_part(plan, tmp_path, [0], 1, 2, None, False, 3)
    assert seen == [3]


def test_the_room_under_cgroup_memory_limits(tmp_path, monkeypatch):
    """cgroup v2 and v1: the tightest limit of the process's cgroup and those above it, less what each
    holds beyond its inactive page cache; none where no limit is set, or no cgroup is known."""
    root, membership = tmp_path / "cgroup", tmp_path / "membership"
    gb = 1 << 30

    def group(path: str, files: dict[str, object]) -> None:
        (root / path).mkdir(parents=True, exist_ok=True)
        for name, value in files.items():
            (root / path / name).write_text(f"{value}\n")

    def room():
        return system.cgroup_room(str(root), str(membership))

    assert room() is None  # no /proc/self/cgroup
    membership.write_text("0::/user.slice/session.scope\n")
    assert room() is None  # nothing there
    group("user.slice/session.scope", {"memory.max": "max", "memory.current": 5 * gb})
    assert room() is None  # no limit
    group(
        "user.slice", {"memory.max": 8 * gb, "memory.current": 6 * gb, "memory.stat": f"anon 1\ninactive_file {gb}\n"}
    )
    assert room() == 3 * gb  # the parent's limit binds; its inactive page cache can be had
    group("user.slice/session.scope", {"memory.max": 4 * gb, "memory.current": 3 * gb})
    assert room() == gb  # the tighter
    group("user.slice", {"memory.max": 4 * gb, "memory.current": 5 * gb})
    assert room() == 0
    membership.write_text("12:memory:/slurm/job_7\n3:cpu,cpuacct:/\n")  # cgroup v1
    group("memory", {"memory.limit_in_bytes": 9223372036854771712, "memory.usage_in_bytes": 50 * gb})
    assert room() is None  # v1's "no limit"
    stat = f"inactive_file 1\ntotal_inactive_file {gb // 4}\n"
    group(
        "memory/slurm/job_7",
        {"memory.limit_in_bytes": 2 * gb, "memory.usage_in_bytes": 3 * gb // 2, "memory.stat": stat},
    )
    assert room() == 3 * gb // 4
    monkeypatch.setattr(system, "proc_kib", lambda path, field: 10 * gb)
    monkeypatch.setattr(system, "cgroup_room", lambda: 2 * gb)
    assert system.mem_available() == 2 * gb
    monkeypatch.setattr(system, "cgroup_room", lambda: None)
    assert system.mem_available() == 10 * gb


def test_plan_shows_the_gpu_and_pinned_estimates(tmp_path, cuda_on_cpu, monkeypatch):
    """`merger plan` on CUDA: the GPU and pinned estimates, in text and JSON; on the CPU neither."""
    from merger.errors import sized as _size

    monkeypatch.setattr(merger.plan, "cuda_available", lambda: True)
    root = write_models(tmp_path, 2, SHAPES, torch.bfloat16)
    (tmp_path / "r.yaml").write_text(recipe_text(root, "ties", 2))
    plan = plan_for(root, "ties", 2)
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--device", "cuda", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["peak_gpu_memory_estimate"] == plan.peak_gpu_memory > 0
    assert info["peak_pinned_memory_estimate"] == plan.peak_pinned_memory > 0
    text = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--device", "cuda"]).output
    assert (
        f"  peak memory:  ~{_size(info['peak_memory_estimate'])} beyond the process itself (estimate), "
        f"~{_size(plan.peak_pinned_memory)} of it pinned; GPU ~{_size(plan.peak_gpu_memory)}\n"
    ) in text
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--device", "cpu", "--json"])
    assert json.loads(result.stdout)["peak_pinned_memory_estimate"] == 0


def test_plan_with_workers_shows_what_each_process_would_hold(tmp_path, cuda_on_cpu, monkeypatch, no_sharing):
    """`merger plan --workers K`: the estimates of each of the processes `apply --workers K` starts (one per
    shard at most), whose budgets are shares (budget.local_processes; pinned memory here, just enough for
    one process to stage every tensor whole, so that a half share sends some through the GPU in pieces),
    and their sum."""
    from merger.errors import sized as _size

    monkeypatch.setattr(merger.plan, "cuda_available", lambda: True)
    root = write_models(tmp_path, 2, SHAPES, torch.bfloat16)
    whole = plan_for(root, "ties", 2).peak_pinned_memory  # every tensor staged whole
    monkeypatch.setattr(merger.budget, "pinned_budget", lambda: whole // merger.budget.local_processes())
    (tmp_path / "r.yaml").write_text(recipe_text(root, "ties", 2))
    args = ["plan", str(tmp_path / "r.yaml"), "--device", "cuda", "--shard-size", "20KB"]

    def planned(*more):
        result = CliRunner().invoke(cli, [*args, *more])
        assert result.exit_code == 0, result.output
        assert os.environ[WORKERS_ENV] == ""  # set for its estimates alone
        return result.stdout

    alone = json.loads(planned("--json"))
    shards = len(alone["shards"])
    assert alone["processes"] == 1 and shards >= 3
    assert alone["peak_memory_estimate_all_processes"] == alone["peak_memory_estimate"]
    shared = json.loads(planned("--json", "--workers", "2"))
    monkeypatch.setenv(WORKERS_ENV, "2")  # a plan as each of two processes makes it
    each = plan_for(root, "ties", 2)
    pieced, pinned, peak = each.gpu_pieced, each.peak_pinned_memory, each.peak_memory
    monkeypatch.setenv(WORKERS_ENV, "")
    assert shared["processes"] == 2
    assert shared["gpu_tensors_in_pieces"] == pieced != alone["gpu_tensors_in_pieces"] == []
    assert shared["peak_pinned_memory_estimate"] == pinned
    assert shared["peak_memory_estimate"] == peak != alone["peak_memory_estimate"]
    assert shared["peak_memory_estimate_all_processes"] == 2 * peak
    many = json.loads(planned("--json", "--workers", str(10**20)))  # never more processes than shards
    assert many["processes"] == shards
    monkeypatch.delenv(WORKERS_ENV)
    assert CliRunner().invoke(cli, [*args, "--workers", "2"]).exit_code == 0
    assert WORKERS_ENV not in os.environ  # unset before, unset after
    monkeypatch.setenv(WORKERS_ENV, "")
    text = planned("--workers", "2")
    assert f"  peak memory:  ~{_size(peak)} beyond each of 2 processes (--workers), ~{_size(2 * peak)} in all" in text


def apply_on_cuda(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(merger.plan, "cuda_available", lambda: True)
    root = write_models(tmp_path, 2, SHAPES, torch.bfloat16)
    (tmp_path / "r.yaml").write_text(recipe_text(root, "ties", 2))
    args = ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--device", "cuda", "-q"]
    return CliRunner().invoke(cli, args), plan_for(root, "ties", 2)


def test_running_out_of_gpu_memory_is_one_line_with_what_to_change(tmp_path, cuda_on_cpu, monkeypatch):
    def out_of_memory(self, t, on_gpu):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has a total capacity")

    monkeypatch.setattr(Merger, "gpu_merge", out_of_memory)
    result, _ = apply_on_cuda(tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: tensor 'a' [8, 8]: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); "
        "free GPU memory (other processes?), use fewer --workers, set MERGER_GPU_MEMORY lower (e.g. 8GB: large "
        "tensors then go through the GPU in smaller pieces), or merge with --device cpu\n"
    )


def test_pinned_memory_refused_is_one_line_with_what_to_change(tmp_path, cuda_on_cpu, monkeypatch):
    """torch.empty(pin_memory=True) failing (cudaHostAlloc: the host's memory, or its locked-memory
    limit) in merger's own allocation (stream._pinned), not a traceback."""
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(merger.stream, "_pinned", PINNED)
    result, plan = apply_on_cuda(tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    first = 0  # the first input's staging buffer (its role), sized for the largest tensor (e)
    assert plan.staging_sizes(lambda t: True)[first] == 65536
    assert result.stderr == (
        "error: tensor 'a' [8, 8]: could not pin 65536 bytes of host memory for the GPU's copies (CUDA error: out "
        "of memory); use fewer --workers, set MERGER_PINNED_MEMORY lower (e.g. 2GB: larger tensors then go "
        "through the GPU in pieces), or merge with --device cpu\n"
    )


def test_methods_that_gather_whole_matrices_count_them_in_pieces_too(models):
    """iso_c's SVD holds whole float64 matrices however small the GPU pieces: in pieces the estimate keeps
    them (GpuFootprint.held_whole), where a method that works piece by piece needs less than whole."""
    fts = ", ".join(f"{{model: {models / f'ft{i}'}}}" for i in range(2))
    spec = parse_recipe(f"merge_method: iso_c\nbase_model: {models / 'base'}\nmodels: [{fts}]\n")
    plan = build_plan(spec, device="cpu")
    plan.device = "cuda"
    t = next(t for t in plan.tensors if t.name == "w")
    words = plan.spec.method.gpu.held_whole
    assert words >= 10  # the summed task vectors, their SVD and the result, in float64
    assert plan.gpu_bytes(t, piece=1 << 16) >= words * 4 * t.numel
    ties = plan_for(models, "ties", 2)
    w = next(t for t in ties.tensors if t.name == "w")
    assert ties.gpu_bytes(w, piece=1 << 14) < ties.gpu_bytes(w) / 2  # a piece of an eighth of w


def test_della_counts_its_whole_tensor_keep_masks_in_pieces(models):
    """DELLA's prepare leaves fn one keep mask a model for the whole tensor (a byte an entry), however
    small the pieces: the pieces' estimate holds them (GpuFootprint.held_whole_masks_per_model)."""
    fts = ", ".join(f"{{model: {models / f'ft{i}'}, parameters: {{density: 0.5}}}}" for i in range(3))
    plan = build_plan(
        parse_recipe(f"merge_method: della\nbase_model: {models / 'base'}\nmodels: [{fts}]\n"), device="cpu"
    )
    plan.device = "cuda"
    t = next(t for t in plan.tensors if t.name == "w")
    method = plan.spec.method
    assert method.gpu.held_whole_masks_per_model == 1
    pieces = plan.gpu_bytes(t, piece=1 << 14)
    forgetful = dataclasses.replace(method, gpu=dataclasses.replace(method.gpu, held_whole_masks_per_model=0))
    plan.spec = dataclasses.replace(plan.spec, method=forgetful)
    assert pieces - plan.gpu_bytes(t, piece=1 << 14) == 3 * t.numel  # three models' masks of the whole tensor

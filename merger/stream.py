"""The streaming engine: for each output tensor, read it from every input, merge, cast, write."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from merger.errors import MergeError
from merger.plan import OutTensor, Plan, Shard
from merger.sources import DTYPES, FileSource, LocalModel, TensorReader


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header comes from the plan up front, then
    each tensor's bytes are streamed in plan order, so no whole-shard byte string is ever built."""

    def __init__(self, path: Path, tensors: Iterable[OutTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self._todo = list(tensors)
        header: dict = {}
        offset = 0
        for t in self._todo:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, t: OutTensor, tensor: torch.Tensor) -> None:
        expected = self._todo[self._next]
        if t.name != expected.name:
            raise RuntimeError(f"shard {self.path.name}: got '{t.name}', expected '{expected.name}'")
        if tensor.dtype != DTYPES[t.dtype][0] or tuple(tensor.shape) != t.shape:
            raise RuntimeError(f"tensor '{t.name}': got {tensor.dtype} {list(tensor.shape)}, planned {t.dtype}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._todo):
            raise RuntimeError(f"shard {self.path.name}: {len(self._todo) - self._next} tensors never written")
        self._f.close()

    def abort(self) -> None:
        self._f.close()


class Fetcher:
    """Reads a tensor from each model into one reusable byte buffer per model, then converts it to
    the compute dtype on the compute device. Reusing the buffers avoids touching fresh pages for every
    tensor, which on a cold machine costs more than the copy itself."""

    def __init__(self, device: str, compute_dtype: torch.dtype, files: FileSource | None = None):
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.reader = TensorReader(files)
        self._bufs: dict[Path, torch.Tensor] = {}
        self.bytes_read = 0

    def raw(self, model: LocalModel, name: str) -> torch.Tensor:
        """The tensor as stored, on the CPU, valid until the next read from this model."""
        info = model.tensors[name]
        buf = self._bufs.get(model.path)
        if buf is None or buf.numel() < info.nbytes:
            pin = self.device.type == "cuda"
            buf = self._bufs[model.path] = torch.empty(max(info.nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        self.bytes_read += info.nbytes
        return self.reader.read(info, buf)

    def compute(self, model: LocalModel, name: str) -> torch.Tensor:
        return self.raw(model, name).to(self.device).to(self.compute_dtype)

    def close(self) -> None:
        self.reader.close()
        self._bufs.clear()


def merge_tensor(plan: Plan, t: OutTensor, fetch: Fetcher) -> torch.Tensor:
    """The output tensor `t`, on the CPU in its output dtype."""
    spec = plan.spec
    if not t.merged:
        return _agreed_copy(plan, t, fetch)
    # Each distinct model is read once, even if it is listed twice or is also the base.
    cache: dict[Path, torch.Tensor] = {}
    for m in plan.readers_of(t):
        if m.path not in cache:
            cache[m.path] = fetch.compute(m, t.name)
    xs = [cache[m.path] for m in plan.inputs]
    base = cache[plan.base.path] if spec.method.needs_base and plan.base else None
    out = spec.method.fn(xs, base, [g.params for g in spec.ingredients], spec.params)
    return out.to(DTYPES[t.dtype][0]).cpu()


def _agreed_copy(plan: Plan, t: OutTensor, fetch: Fetcher) -> torch.Tensor:
    """Integer and bool tensors (position ids, masks) are not merged: every input must agree."""
    ref = fetch.raw(plan.reference, t.name)
    for m in plan.models:
        if m.path != plan.reference.path and not torch.equal(fetch.raw(m, t.name), ref):
            raise MergeError(
                f"tensor '{t.name}' ({t.dtype}) differs between '{m.ref}' and '{plan.reference.ref}'; "
                "non-float tensors are copied, not merged, so every input must hold the same values"
            )
    return ref.clone()


def write_shard(plan: Plan, shard: Shard, path: Path, fetch: Fetcher, on_tensor: Callable[[], None]) -> None:
    writer = ShardWriter(path, shard.tensors)
    try:
        for t in shard.tensors:
            writer.write(t, merge_tensor(plan, t, fetch))
            on_tensor()
        writer.close()
    except BaseException:
        writer.abort()
        raise


def write_shards(
    plan: Plan,
    directory: Path,
    *,
    progress: bool = False,
    shards: Iterable[int] | None = None,
    files: FileSource | None = None,
) -> int:
    """Write the planned shards (all, or the given indices) into `directory`. Returns bytes read.
    `files` provides input files fetched on demand (see sources.FileSource)."""
    chosen = [plan.shards[i] for i in shards] if shards is not None else plan.shards
    total = sum(len(s.tensors) for s in chosen)
    fetch = Fetcher(plan.device, plan.compute_dtype, files)
    bar = tqdm(
        total=plan.bytes_read if shards is None else None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    done = 0
    last = 0

    def tick() -> None:
        nonlocal done, last
        done += 1
        bar.update(fetch.bytes_read - last)
        last = fetch.bytes_read
        bar.set_postfix_str(f"{done}/{total} tensors", refresh=False)

    try:
        for shard in chosen:
            write_shard(plan, shard, directory / shard.filename, fetch, tick)
    finally:
        bar.close()
        fetch.close()
    return fetch.bytes_read

"""The streaming engine: chunked CPU merging equals whole-tensor merging, radix selection is exact,
and the writer produces files safetensors reads back."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import fakecuda
import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import merger.budget
import merger.files
import merger.plan
import merger.stream
from merger.cli import cli
from merger.methods.task_vectors import kth_largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("chunk", "n"), [(1, 120), (5, 1000), (64, 1000), (10_000, 1000)])
def test_kth_largest_matches_sort(dtype, chunk, n):
    """Two vectors side by side (different data, different k), chunks of one entry (every tie split
    across chunks) on fewer entries: a chunk is a torch call."""
    g = torch.Generator().manual_seed(0)
    # quantised values: many exact ties, zeros, and a spread of exponents; the second without ties
    x = (torch.randn(n, generator=g, dtype=dtype) * 8).round() / 4
    x = x * torch.where(torch.rand(n, generator=g) < 0.1, 1e-30, 1.0).to(dtype)
    vectors = [x.abs(), torch.randn(n, generator=g, dtype=dtype).abs()]
    for k in sorted({1, 2, 17, n // 2, n - 1, n}):
        ks = [k, max(1, n - k)]
        found = kth_largest(lambda: ([v[i : i + chunk] for v in vectors] for i in range(0, n, chunk)), ks)
        for mags, k, (thr, ties, cutoff) in zip(vectors, ks, found):
            ordered = torch.sort(mags, descending=True).values
            assert thr == ordered[k - 1].item()
            assert ties == k - int((mags > thr).sum())
            assert 1 <= ties <= int((mags == thr).sum())
            assert cutoff == int((mags == thr).nonzero()[ties - 1]) + 1  # just past the last tie kept


def test_kth_largest_all_equal():
    mags = torch.full((300,), 0.5)
    assert kth_largest(lambda: iter([[mags]]), [120]) == [(0.5, 120, 120)]
    zeros = torch.zeros(10)
    assert kth_largest(lambda: iter([[zeros[:4]], [zeros[4:]]]), [3]) == [(0.0, 3, 3)]


# Operations that make a GPU wait for the host: a value read back, or an output whose size depends on
# the data. On the CPU the reads back do not reach torch's dispatcher, so they are counted where Python
# calls them.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique2", "equal"}
READS_BACK = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


class _CountSyncs(TorchDispatchMode):
    """Counts the operations that would synchronise a GPU with the host, on every thread."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        for name in READS_BACK:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(real))

    def _counting(self, real):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return real(tensor, *args, **kwargs)

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(getattr(i, "dtype", None) == torch.bool for i in args[1] if i is not None)
        self.count += name in SYNCING_OPS or bool_index
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_trim_selection_does_not_synchronise_per_chunk(dtype, monkeypatch):
    """ties_prepare over 1 chunk and over 40: the same (small) number of operations that would make a
    GPU wait for the host, so the merge of a tensor in pieces never stalls the GPU per piece."""
    from merger.methods.task_vectors import TiesModelParams, TiesParams, ties_prepare

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4000, generator=g, dtype=dtype) for _ in range(3)]
    models = [TiesModelParams(density=d) for d in (0.2, 0.5, 1.0)]

    def syncs(size: int):
        chunks = lambda: ([x[s : s + size].clone() for x in xs] for s in range(0, 4000, size))  # noqa: E731
        with monkeypatch.context() as patch, _CountSyncs(patch) as counted:
            state = ties_prepare(chunks, 4000, models, TiesParams())
        return counted.count, state

    (whole, state), (pieces, same) = syncs(4000), syncs(100)
    assert state == same and state.thresholds[2] is None
    assert pieces == whole <= 4


def ties_reference(base, xs, weights, densities):
    """TIES in float64: stable sort for the trim (lowest index wins ties), sign by weighted sum."""
    ds = []
    for x, w, d in zip(xs, weights, densities):
        tv = (x - base).reshape(-1)
        k = max(1, math.floor(round(d * 100) * tv.numel() / 100))
        idx = torch.sort(tv.abs(), descending=True, stable=True).indices[:k]
        t = torch.zeros_like(tv)
        t[idx] = tv[idx]
        ds.append(w * t)
    d = torch.stack(ds)
    agree = (d.sign() == d.sum(0).sign()) & (d != 0)
    wts = torch.tensor(weights, dtype=torch.float64).abs().reshape(-1, 1)
    merged = (d * agree).sum(0) / (wts * agree).sum(0).clamp(min=1e-300)
    return (base.reshape(-1) + merged).reshape(base.shape)


def tied_ties_case(tmp_path):
    """A bfloat16 base and three fine-tunes on a coarse grid (many entries tie at each trim threshold),
    written to tmp_path, and the TIES recipe over them: (recipe text, base, fine-tunes, weights,
    densities)."""
    g = torch.Generator().manual_seed(3)
    base = {
        "w": (torch.randn(30, 40, generator=g) * 4).round().bfloat16(),
        "v": torch.randn(50, generator=g).bfloat16(),
    }
    fts = [
        {k: (v.float() + (torch.randn(v.shape, generator=g) * 2).round()).bfloat16() for k, v in base.items()}
        for _ in range(3)
    ]
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft, n_shards=1 + i)
    weights, densities = [1.0, 0.5, -0.25], [0.3, 0.55, 0.9]
    models = ", ".join(
        f"{{model: {tmp_path / f'ft{i}'}, parameters: {{weight: {w}, density: {d}}}}}"
        for i, (w, d) in enumerate(zip(weights, densities))
    )
    text = f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels: [{models}]\nout_dtype: float32\n"
    return text, base, fts, weights, densities


@pytest.mark.parametrize("chunk", [7, 100, 1 << 18])
def test_chunked_ties_equals_reference_with_ties_across_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(merger.budget, "CHUNK", chunk)
    text, base, fts, weights, densities = tied_ties_case(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    out = load_output(tmp_path / "out")
    for name, b in base.items():
        want = ties_reference(b.double(), [ft[name].double() for ft in fts], weights, densities)
        torch.testing.assert_close(out[name].double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_chunked_elementwise_methods_equal_whole_tensor(tmp_path, monkeypatch, method, family):
    paths, _ = family
    recipe = (
        f"merge_method: {method}\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['ft1']}, parameters: {{weight: 0.3}}}}, {{model: {paths['ft2']}}}]\n"
    )
    (tmp_path / "r.yaml").write_text(recipe)
    for chunk, out in ((3, "small"), (1 << 18, "whole")):
        monkeypatch.setattr(merger.budget, "CHUNK", chunk)
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q"])
        assert result.exit_code == 0, result.output
    small, whole = load_output(tmp_path / "small"), load_output(tmp_path / "whole")
    for name in whole:
        assert torch.equal(small[name], whole[name]), name


@pytest.mark.parametrize("compute", ["float32", "float64"])  # the fused kernels, the torch path
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_output_written_in_pieces_is_byte_identical(tmp_path, monkeypatch, method, compute):
    """On the CPU tensors are merged and written in pieces of PIECE entries, cut where no chunk or row
    ends (the int64 buffer is copied in pieces too); the files are the same bytes as whole-tensor
    writing, across shards. Task vectors on a coarse grid: TIES thresholds have ties, whose cutoff
    falls inside a piece."""
    g = torch.Generator().manual_seed(7)
    base = {
        "w": (torch.randn(30, 40, generator=g) * 4).round().bfloat16(),
        "v": torch.randn(50, generator=g).bfloat16(),
    }
    base["position_ids"] = torch.arange(40)
    write_checkpoint(tmp_path / "base", base)
    for i in range(2):
        ft = {k: (v.float() + (torch.randn(v.shape, generator=g) * 2).round()).bfloat16() for k, v in base.items()}
        write_checkpoint(tmp_path / f"ft{i}", {**ft, "position_ids": base["position_ids"]}, n_shards=1 + i)
    density = (", density: 0.4", ", density: 0.7") if method == "ties" else ("", "")
    (tmp_path / "r.yaml").write_text(
        f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\ncompute_dtype: {compute}\n"
        f"models: [{{model: {tmp_path / 'ft0'}, parameters: {{weight: 0.3{density[0]}}}}}, "
        f"{{model: {tmp_path / 'ft1'}, parameters: {{weight: 0.9{density[1]}}}}}]\n"
        "output: {shard_size: 2KB}\n"
    )
    for piece, out in ((merger.budget.PIECE, "whole"), (77, "pieces")):
        monkeypatch.setattr(merger.budget, "CHUNK", 10)
        monkeypatch.setattr(merger.budget, "PIECE", piece)
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q"])
        assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert (tmp_path / "pieces" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_chunk_ranges_run_in_turn_on_every_thread_in_order_and_stop_at_a_failure():
    """Merger._run's runners (this thread and the pool's) take ranges one after another: every range runs
    once, on more than one thread, its result in its place; a runner the pool has not started by the time
    the ranges are all taken is not waited for; after a failure the others start no new range, and none is
    still running when the failure reaches the caller."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)
    bounds = [(s, s + 10) for s in range(0, 400, 10)]
    ran, running, failing = [], [0], []
    lock = threading.Lock()

    def fn(s, e):
        with lock:
            ran.append((s, threading.get_ident()))
            running[0] += 1
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        if s == 100:
            with lock:
                failing.append(len(ran))  # the ranges started so far
            raise ValueError("range 100")
        return (s, e)

    assert merger.stream._in_turn(pool, 3, lambda s, e: fn(s + 1, e), bounds) == [(s + 1, e) for s, e in bounds]
    assert sorted(s for s, _ in ran) == [s + 1 for s, _ in bounds]
    assert len({thread for _, thread in ran}) == 3
    busy = threading.Event()
    pool.submit(busy.wait)  # one of the pool's two threads is busy: its runner never starts
    pool.submit(busy.wait)  # ... nor the other's
    timer = threading.Timer(5, busy.set)
    timer.start()
    started = time.monotonic()
    assert merger.stream._in_turn(pool, 3, lambda s, e: (s, e), bounds) == bounds
    assert time.monotonic() - started < 2  # this thread ran every range and waited for no runner
    busy.set()
    timer.cancel()
    ran.clear()
    with pytest.raises(ValueError, match="range 100"):
        merger.stream._in_turn(pool, 3, fn, bounds)
    assert running[0] == 0
    started = len(ran)
    assert started - failing[0] <= 2  # one more per other runner at most: one that took its range as it failed
    time.sleep(0.05)
    assert len(ran) == started < len(bounds)
    pool.shutdown()


def test_write_depth_is_write_ahead_bytes_of_pieces(family):
    """CPU output pieces queued for the writer: WRITE_AHEAD bytes of them in the output dtype (at least
    two); two on CUDA, where a whole tensor's buffer is pinned."""
    from merger.budget import PIECE, WRITE_AHEAD
    from merger.plan import build_plan
    from merger.recipe import parse_recipe

    paths, _ = family
    models = f"models: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
    as_f32 = build_plan(parse_recipe(f"merge_method: linear\n{models}"))  # the int64 buffer is copied, not counted
    as_bf16 = build_plan(parse_recipe(f"merge_method: linear\n{models}dtype: bfloat16\n"))
    assert as_f32.write_depth == WRITE_AHEAD // (PIECE * 4)
    assert as_bf16.write_depth == WRITE_AHEAD // (PIECE * 2) == 16
    assert dataclasses.replace(as_bf16, device="cuda").write_depth == 2


def test_merge_runs_write_depth_pieces_ahead_of_a_stalled_writer(tmp_path, monkeypatch, family):
    """While the writer is stuck on the first piece, the merge fills the other output slots (write_depth
    in all) and then waits for it: it neither stops at two nor runs on without bound."""
    paths, models = family
    monkeypatch.setattr(merger.budget, "PIECE", 5)
    monkeypatch.setattr(merger.budget, "WRITE_AHEAD", 5 * 4 * 6)  # six slots of five float32 entries
    merged = []
    start = merger.stream.Merger.start

    def counting_start(self, t, *args):
        merge_range = start(self, t, *args)

        def counted(s, e, out):
            merge_range(s, e, out)
            merged.append((t.name, s))

        return counted

    write = merger.stream.ShardWriter.write
    seen = []

    def stalling_write(self, t, data):
        if not seen:  # the first piece: hold the writer until the merge has filled every slot
            deadline = time.monotonic() + 10
            while len(merged) < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # time for a seventh merge, which must wait for this write
            seen.append(len(merged))
        write(self, t, data)

    monkeypatch.setattr(merger.stream.Merger, "start", counting_start)
    monkeypatch.setattr(merger.stream.ShardWriter, "write", stalling_write)
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
    )
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert seen == [6]
    out = load_output(tmp_path / "out")
    for name, a in models["ft1"].items():  # every piece still lands where it belongs
        expected = (a + models["ft2"][name]) / 2 if a.is_floating_point() else a
        assert torch.allclose(out[name], expected, rtol=1e-6, atol=1e-6), name


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="needs Linux THP")
def test_input_mappings_ask_for_huge_pages(family):
    """MappedReader maps each input file with MADV_HUGEPAGE (smaps VmFlags 'hg'), so a first read from
    disk caches it in 2 MiB folios where the kernel can, which later mappings take cheaply."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.sources import Confined, MappedReader

    paths, _ = family
    plan = build_plan(parse_recipe(f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}]\n"))
    info = plan.inputs[0].tensors["embed.weight"]
    reader = MappedReader(Confined(plan.models))
    try:
        address = reader.view(info).ctypes.data
        flags = None
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                    low, high = (int(x, 16) for x in head.split("-"))
                    inside = low <= address < high
                elif inside and head == "VmFlags:":
                    flags = line.split()[1:]
        assert flags is not None and "hg" in flags, flags
    finally:
        reader.close()


def test_scalar_and_empty_tensors(tmp_path):
    t = {"scale": torch.tensor(2.0), "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    write_checkpoint(tmp_path / "a", t)
    write_checkpoint(tmp_path / "b", {"scale": torch.tensor(4.0), "empty": torch.zeros(0, 4), "flag": t["flag"]})
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {tmp_path / 'a'}}}, {{model: {tmp_path / 'b'}}}]\n"
    )
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    out = load_output(tmp_path / "out")
    assert out["scale"].shape == () and out["scale"].item() == 3.0
    assert out["empty"].shape == (0, 4)
    assert out["flag"].dtype == torch.bool and out["flag"].tolist() == [True, False]


def test_merge_tensors_in_memory_equals_written_output(tmp_path, family):
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import merge_tensors

    paths, _ = family
    spec = parse_recipe(
        f"merge_method: ties\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['ft1']}, parameters: {{density: 0.4}}}}, {{model: {paths['ft3']}}}]\n"
    )
    plan = build_plan(spec)
    in_memory = dict(merge_tensors(plan))
    (tmp_path / "r.yaml").write_text(spec.source.text)
    CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
    written = load_output(tmp_path / "out")
    assert in_memory.keys() == written.keys()
    for k in written:
        assert torch.equal(in_memory[k], written[k])


def test_writer_header_is_valid_safetensors(tmp_path):
    from safetensors import safe_open

    from merger.plan import OutTensor
    from merger.stream import ShardWriter

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2, 3], dtype=torch.int16)}
    planned = [
        OutTensor(k, tuple(v.shape), {"a": "F32", "b": "I16"}[k], True, v.numel() * v.element_size())
        for k, v in tensors.items()
    ]
    w = ShardWriter(tmp_path / "x.safetensors", planned)
    for t in planned:
        w.write(t, tensors[t.name].numpy())
    w.close()
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0 and json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


def _planned_floats(seed: int, sizes) -> tuple[dict[str, torch.Tensor], list]:
    from merger.plan import OutTensor

    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    return tensors, [OutTensor(k, tuple(v.shape), "F32", True, v.numel() * 4) for k, v in tensors.items()]


def _write_in_pieces(w, tensors, planned, piece: int = 300) -> None:
    for t in planned:
        data = tensors[t.name].numpy()
        for s in range(0, max(len(data), 1), piece):  # in pieces, as the engine writes (an empty one once)
            w.write(t, data[s : s + piece])


def _stage(blocks: int = 2) -> memoryview:
    from merger.files import ALIGN

    return merger.stream.direct_stage(blocks * ALIGN)


def test_writer_hands_written_windows_back_to_the_page_cache(tmp_path, monkeypatch):
    """Every WRITEBACK bytes the writer starts writeback of the new window (fadvise DONTNEED) and
    drops the window before it: the started ranges tile the file from 0, each dropped range was
    started a whole window earlier, and the bytes written are unchanged."""
    from merger.stream import ShardWriter

    calls = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_DONTNEED and length > 0
        calls.append((offset, offset + length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(merger.stream, "WRITEBACK", 1000)
    tensors, planned = _planned_floats(3, (700, 1, 2500, 333, 4000))
    w = ShardWriter(tmp_path / "x.safetensors", planned, drop_behind=True)
    _write_in_pieces(w, tensors, planned)
    w.close()
    started, dropped = [], []
    for c in calls:  # each hand-back starts the newest window, then may drop older ones
        if started and c[1] <= started[-1][1]:
            assert c[1] == started[-1][0]  # a drop ends where the window started just before it begins:
            dropped.append(c)  # what it drops was started at an earlier hand-back, a window of writing ago
        else:
            started.append(c)
    assert [a for a, _ in started] == [0] + [b for _, b in started[:-1]]  # contiguous from 0
    assert all(b - a >= 1000 for a, b in started)
    assert [a for a, _ in dropped] == [0] + [b for _, b in dropped[:-1]]
    assert len(dropped) >= 3
    out = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(out[k], v) for k, v in tensors.items())


def test_writer_writes_the_page_cache_in_small_calls(tmp_path, monkeypatch):
    """Into the page cache, the writer's write(2) calls carry at most files.BUFFERED_CALL bytes, however large
    the pieces it is given (large ones fill large folios, which cost a VM that hands free memory to its host
    faults there); the bytes are the pieces'. The raw file under the writer's own buffering records the calls."""
    import io

    from merger.stream import ShardWriter

    sizes = []

    class Recording(io.FileIO):
        def write(self, data):
            n = super().write(data)
            sizes.append(n)
            return n

    def recording_open(path, mode, buffering=-1):
        assert mode == "wb"
        return io.BufferedWriter(Recording(path, "w"), buffering if buffering > 0 else io.DEFAULT_BUFFER_SIZE)

    monkeypatch.setattr(merger.stream, "open", recording_open, raising=False)
    monkeypatch.setattr(merger.stream, "BUFFERED_CALL", 2 * io.DEFAULT_BUFFER_SIZE)
    tensors, planned = _planned_floats(4, (7000, 1, 25000, 333, 40000))
    w = ShardWriter(tmp_path / "x.safetensors", planned, durable=True)
    _write_in_pieces(w, tensors, planned, piece=16000)  # 64,000 bytes a piece
    w.close()
    assert io.DEFAULT_BUFFER_SIZE < max(sizes) <= 2 * io.DEFAULT_BUFFER_SIZE
    out = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(out[k], v) for k, v in tensors.items())


@pytest.fixture
def direct_dir(tmp_path):
    """tmp_path, where its file system takes O_DIRECT (the direct writer's tests need it)."""
    from merger.files import DirectFile

    f = DirectFile.open(tmp_path / "probe", _stage(1))
    if f is None:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    f.abort()
    (tmp_path / "probe").unlink()
    return tmp_path


@pytest.mark.parametrize("sizes", [(700, 1, 2500, 333, 4000), (2022,), (0, 5)])
def test_direct_writer_writes_the_buffered_writers_bytes_past_the_page_cache(direct_dir, monkeypatch, sizes):
    """With drop_behind and a staging buffer the shard is opened with O_DIRECT and written in whole
    ALIGN blocks from the buffer at their own offsets (the last one padded, then cut to size): the same
    bytes as the buffered writer's, whether the size is a multiple of the block (2022 floats and a
    104-byte header: two blocks) or not, and no page-cache hand-backs."""
    from merger.files import ALIGN
    from merger.stream import ShardWriter

    opened, writes = [], []
    real_open, real_pwrite = os.open, os.pwrite

    def spy_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        opened.append((str(path), flags, fd))
        return fd

    def spy_pwrite(fd, data, offset):
        writes.append((fd, len(data), offset))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "pwrite", spy_pwrite)
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: pytest.fail("a direct write needs no hand-back"))
    tensors, planned = _planned_floats(4, sizes)
    w = ShardWriter(direct_dir / "direct.safetensors", planned, drop_behind=True, stage=_stage())
    _write_in_pieces(w, tensors, planned)
    w.close()
    monkeypatch.undo()
    ((_, flags, fd),) = [o for o in opened if o[0].endswith("direct.safetensors")]
    assert flags & os.O_DIRECT
    blocks = [(n, at) for f, n, at in writes if f == fd]
    assert blocks and all(n % ALIGN == 0 for n, _ in blocks) and all(n == 2 * ALIGN for n, _ in blocks[:-1])
    assert [at for _, at in blocks] == [i * 2 * ALIGN for i in range(len(blocks))]
    direct = (direct_dir / "direct.safetensors").read_bytes()
    assert (len(direct) % ALIGN == 0) == (sizes == (2022,))
    b = ShardWriter(direct_dir / "buffered.safetensors", planned)
    _write_in_pieces(b, tensors, planned, piece=1000)
    b.close()
    assert direct == (direct_dir / "buffered.safetensors").read_bytes()
    out = load_file(direct_dir / "direct.safetensors")
    assert all(torch.equal(out[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("refused", ["open", "first write", "last block"])
def test_direct_writer_falls_back_to_the_page_cache_where_o_direct_is_refused(direct_dir, monkeypatch, refused):
    """A file system that refuses O_DIRECT at open (tmpfs before Linux 6.6) gets the buffered writer
    with its hand-backs; one that refuses a direct write (stricter alignment), the first or only the
    padded last block, gets that write again without O_DIRECT and the rest through the page cache,
    handed back as it goes. The bytes are the same either way."""
    import errno
    import fcntl

    from merger.stream import ShardWriter

    real_open, real_pwrite = os.open, os.pwrite
    tensors, planned = _planned_floats(5, (3000, 17, 2100))  # 20,580 bytes: two whole stages and a tail
    expected = direct_dir / "expected.safetensors"
    b = ShardWriter(expected, planned)
    _write_in_pieces(b, tensors, planned)
    b.close()

    def refuse_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    tried = []

    def refuse_pwrite(fd, data, offset):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        tried.append(direct)
        assert direct or len(data) <= 1000  # through the page cache: at most BUFFERED_CALL a call
        if direct and (refused == "first write" or len(tried) == 3):  # the third: close()'s padded block
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    advised = []
    monkeypatch.setattr(
        os, "open" if refused == "open" else "pwrite", refuse_open if refused == "open" else refuse_pwrite
    )
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(a))
    monkeypatch.setattr(merger.stream, "WRITEBACK", 1000)
    monkeypatch.setattr(merger.files, "BUFFERED_CALL", 1000)
    w = ShardWriter(direct_dir / "out.safetensors", planned, drop_behind=True, stage=_stage())
    _write_in_pieces(w, tensors, planned)
    w.close()
    monkeypatch.undo()
    assert (direct_dir / "out.safetensors").read_bytes() == expected.read_bytes()
    if refused == "first write":
        assert tried[:2] == [True, False] and not any(tried[2:]) and advised
    elif refused == "last block":
        assert tried[:4] == [True, True, True, False] and not any(tried[3:]) and len(tried) > 4  # in small calls
    else:
        assert advised  # dropped behind as before


def test_direct_writer_finishes_short_writes_and_reports_a_full_disk(direct_dir, monkeypatch):
    """A direct write that stores part of a block is continued from where it stopped; one that stores
    nothing is a full disk, an OSError (ENOSPC) and not a loop, after which the file is closed. abort()
    leaves the last block unwritten."""
    import errno

    from merger.files import ALIGN, DirectFile

    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: real_pwrite(fd, data[: min(len(data), ALIGN)], at))
    f = DirectFile.open(direct_dir / "short.bin", _stage(4))
    payload = bytes(range(256)) * 100  # 25,600 bytes: six whole blocks and a part
    f.write(payload)
    f.close()
    assert (direct_dir / "short.bin").read_bytes() == payload

    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: 0)
    f = DirectFile.open(direct_dir / "full.bin", _stage(1))
    with pytest.raises(OSError) as err:
        f.write(payload)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        f.close()  # closed by the failure: no write reaches the file after it
    monkeypatch.undo()

    f = DirectFile.open(direct_dir / "aborted.bin", _stage(1))
    f.write(payload[: ALIGN + 10])
    f.abort()
    assert (direct_dir / "aborted.bin").read_bytes() == payload[:ALIGN]


def test_output_drops_behind_only_when_it_cannot_stay_cached(tmp_path, monkeypatch, family):
    """The writers keep the output out of the page cache (O_DIRECT, files.DirectFile) when it is over
    half the available memory (or when MERGER_DROP_BEHIND=1 says so); a smaller output stays in the page
    cache for the evaluation or load that follows. The bytes are the same."""
    import merger.files
    import merger.system

    monkeypatch.setattr(merger.system, "mem_available", lambda: 1000)
    monkeypatch.delenv("MERGER_DROP_BEHIND", raising=False)
    assert merger.stream.drop_behind(501) and not merger.stream.drop_behind(500)
    monkeypatch.setenv("MERGER_DROP_BEHIND", "0")
    assert not merger.stream.drop_behind(10**15)
    monkeypatch.setenv("MERGER_DROP_BEHIND", "1")
    assert merger.stream.drop_behind(1)

    direct = []
    real = merger.files.DirectFile.open.__func__
    monkeypatch.setattr(merger.files.DirectFile, "open", classmethod(lambda cls, *a: _kept(direct, real(cls, *a))))
    paths, _ = family
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
    )
    for flag, out in (("1", "dropped"), ("0", "cached")):
        monkeypatch.setenv("MERGER_DROP_BEHIND", flag)
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q"])
        assert result.exit_code == 0, result.output
        shards = list((tmp_path / out).glob("*.safetensors"))
        assert len(direct) == (len(shards) if flag == "1" else 0) and all(d is not None for d in direct)
        direct.clear()
    for f in (tmp_path / "cached").glob("*.safetensors"):
        assert (tmp_path / "dropped" / f.name).read_bytes() == f.read_bytes()


def _kept(found: list, value):
    found.append(value)
    return value


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """torch.cuda's streams, events and pinned memory stood in by tests/fakecuda.py (streams on threads,
    copies late, their targets poisoned until they run), and a GPU budget that stages every tensor
    whole (a test may set merger.budget.gpu_budget lower). Returns the fake (its .waits: the names of
    the threads that waited on an event, in order); the test fails on any stream violation it saw."""
    with fakecuda.installed(monkeypatch) as fake:
        monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1 << 40)
        monkeypatch.setattr(merger.budget, "pinned_budget", lambda: 1 << 40)
        yield fake
        fake.assert_clean()


def cpu_and_stand_in_gpu(tmp_path, text: str):
    """The recipe written by the CPU engine into tmp_path/cpu and through CudaStages into tmp_path/gpu;
    returns the plan (its device then cuda)."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import write_shards

    plan = build_plan(parse_recipe(text), device="cpu")
    for d in ("cpu", "gpu"):
        (tmp_path / d).mkdir()
    write_shards(plan, tmp_path / "cpu")
    plan.device = "cuda"  # everything else as planned
    write_shards(plan, tmp_path / "gpu")
    return plan


def test_cuda_pipeline_plumbing_on_a_stand_in_device(tmp_path, stand_in_cuda, family):
    """CudaStages' slots, read-ahead, agreed copies and writer hand-off, with torch.cuda stood in
    (tests/test_gpu.py runs the real thing): the output is the CPU engine's, and every result waits
    for its event before it is written."""
    from merger.stream import merge_tensors

    paths, _ = family
    text = (
        f"merge_method: task_arithmetic\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['ft1']}, parameters: {{weight: 0.7}}}}, {{model: {paths['ft2']}}}]\n"
        "out_dtype: bfloat16\n"
    )
    plan = cpu_and_stand_in_gpu(tmp_path, text)
    merged = [t for t in plan.tensors if t.merged]
    # the writer waited on each merged tensor's copy back; the stager, before refilling a used slot
    waits = stand_in_cuda.waits
    assert waits.count("merger-writer") == len(merged) and waits.count("merger-stager") > 0
    for shard in plan.shards:
        gpu, cpu = load_file(tmp_path / "gpu" / shard.filename), load_file(tmp_path / "cpu" / shard.filename)
        assert list(gpu) == list(cpu) == [t.name for t in shard.tensors]
        for name in cpu:
            assert gpu[name].dtype == cpu[name].dtype
            torch.testing.assert_close(gpu[name].double(), cpu[name].double(), rtol=2**-7, atol=1e-6)
    # merge_tensors (greedy soup's in-memory candidates) goes through the same stages, one tensor at a time
    written = {k: v for shard in plan.shards for k, v in load_file(tmp_path / "gpu" / shard.filename).items()}
    in_memory = dict(merge_tensors(plan))
    assert in_memory.keys() == written.keys()
    for name, tensor in in_memory.items():
        assert torch.equal(tensor, written[name]), name


@pytest.mark.parametrize("budget", ["gpu", "pinned"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_tensors_over_the_gpu_budget_merge_in_pieces(tmp_path, stand_in_cuda, family, monkeypatch, method, budget):
    """A tensor that would need more GPU memory whole than gpu_budget(), or more pinned host memory to
    stage than pinned_budget(), is not staged: it goes through the GPU GPU_PIECE entries at a time
    (TIES' thresholds over all its pieces) to the CPU engine's bits, smaller tensors are still staged
    whole, and the plan's GPU estimate follows the same rule."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import CudaStages, merge_tensors

    paths, _ = family
    extra = ", density: 0.3" if method == "ties" else ""
    text = (
        f"merge_method: {method}\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['ft1']}, parameters: {{weight: 0.7{extra}}}}}, "
        f"{{model: {paths['ft2']}, parameters: {{weight: 0.4{extra}}}}}]\nout_dtype: float32\n"
    )
    probe = build_plan(parse_recipe(text), device="cpu")
    sizes = {t.name: t for t in probe.tensors}
    layer, embed = sizes["layers.0.w"], sizes["embed.weight"]  # 64 and 96 entries
    if budget == "gpu":  # the embedding is over it, the layers are not
        monkeypatch.setattr(merger.budget, "gpu_budget", lambda: probe.gpu_bytes(layer))
    else:
        monkeypatch.setattr(merger.budget, "pinned_budget", lambda: probe.pinned_bytes(layer))
    monkeypatch.setattr(merger.budget, "GPU_PIECE", 10)  # ten pieces, the last of 6 entries
    pieced = []
    real = CudaStages.pieces
    monkeypatch.setattr(CudaStages, "pieces", lambda self, t: pieced.append(t.name) or real(self, t))

    plan = cpu_and_stand_in_gpu(tmp_path, text)
    assert pieced == ["embed.weight"]
    waits = stand_in_cuda.waits
    assert waits.count("merger-writer") == len([t for t in plan.tensors if t.merged]) - 1  # the staged ones
    cpu, gpu = (
        {k: v for sh in plan.shards for k, v in load_file(tmp_path / d / sh.filename).items()} for d in ("cpu", "gpu")
    )
    assert cpu.keys() == gpu.keys()
    for name in cpu:  # TIES: the same float32 operations, whole or in pieces; torch's add(alpha=w) may fuse
        if method == "ties":  # a multiply-add that merger's task-arithmetic kernel does not
            assert torch.equal(gpu[name], cpu[name]), name
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(dict(merge_tensors(plan))["embed.weight"], gpu["embed.weight"])
    assert pieced == ["embed.weight"] * 2
    assert plan.peak_gpu_memory == max(plan.gpu_bytes(layer), plan.gpu_bytes(embed, 10))


def test_gpu_pieces_keep_the_lowest_indices_among_ties_across_pieces(tmp_path, stand_in_cuda, monkeypatch):
    """TIES through the GPU in 7-entry pieces on tie-heavy data: each model keeps exactly its top
    entries, the lowest flat indices winning ties across pieces, as the reference formula does."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import write_shards

    text, base, fts, weights, densities = tied_ties_case(tmp_path)
    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1)  # every merged tensor in pieces
    monkeypatch.setattr(merger.plan.Plan, "gpu_piece", lambda self, t, gpu: 7)
    plan = build_plan(parse_recipe(text), device="cpu")
    plan.device = "cuda"
    assert sorted(plan.gpu_pieced) == ["v", "w"]
    (tmp_path / "gpu").mkdir()
    write_shards(plan, tmp_path / "gpu")
    out = {k: v for sh in plan.shards for k, v in load_file(tmp_path / "gpu" / sh.filename).items()}
    for name, b in base.items():
        want = ties_reference(b.double(), [ft[name].double() for ft in fts], weights, densities)
        torch.testing.assert_close(out[name].double(), want, rtol=1e-6, atol=1e-6)


def test_running_out_of_gpu_memory_is_an_error_naming_the_tensor(tmp_path, stand_in_cuda, family, monkeypatch):
    """Another process holding the GPU's memory: a MergeError naming the tensor, not a traceback."""
    from merger.errors import MergeError
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import CudaStages, write_shards

    def oom(self, t, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(CudaStages, "merge", oom)
    paths, _ = family
    text = f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
    plan = build_plan(parse_recipe(text), device="cpu")
    plan.device = "cuda"
    with pytest.raises(MergeError) as e:
        write_shards(plan, tmp_path)
    first = plan.shards[0].tensors[0]
    assert str(e.value) == (
        f"tensor '{first.name}' {list(first.shape)}: the GPU ran out of memory (CUDA out of memory. Tried to "
        "allocate 2.00 GiB); free GPU memory (other processes?), use fewer --workers, set MERGER_GPU_MEMORY lower "
        "(e.g. 8GB: large tensors then go through the GPU in smaller pieces), or merge with --device cpu"
    )


def test_gpu_budget_follows_free_memory_and_pieces_fit_in_it(monkeypatch, family):
    """Half the GPU, or 3/4 of what is free if less (torch's unused cache counts as free); a piece is
    GPU_PIECE entries unless fewer fit the budget, and never under 64K entries or over the tensor."""
    from merger.budget import GPU_PIECE, gpu_budget
    from merger.plan import build_plan
    from merger.recipe import parse_recipe

    gb = 1 << 30
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 6 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 * gb)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (70 * gb, 80 * gb))
    assert gpu_budget() == 40 * gb  # half of 80 GB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (20 * gb, 80 * gb))  # another process holds 56 GB
    assert gpu_budget() == 18 * gb  # 3/4 of 20 GB free + 4 GB cached

    paths, _ = family
    plan = build_plan(
        parse_recipe(f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n")
    )
    t = plan.tensors[0]
    big = t.__class__(t.name, (1 << 30,), t.dtype, True, 4 << 30)  # a 1G-entry float32 tensor, planned like t
    assert plan.gpu_piece(big, 40 * gb) == GPU_PIECE
    assert plan.gpu_piece(big, plan.gpu_bytes(big, 5_000_000)) == 5_000_000  # what fits
    assert plan.gpu_piece(big, plan.gpu_bytes(big, 5_000_000) - 1) == 4_999_999
    assert plan.gpu_piece(big, 1000) == 1 << 16
    assert plan.gpu_piece(t, 1000) == t.numel


@pytest.mark.parametrize("gpu_budget", [1 << 40, 1])  # every tensor staged whole, then every one in pieces
def test_overflow_from_finite_inputs_is_caught_on_the_gpu_paths_too(tmp_path, stand_in_cuda, monkeypatch, gpu_budget):
    """Merged whole on the GPU the finiteness of the output and inputs travels back with the copy and
    the writer checks it; in pieces it is checked on the host as on the CPU: the same error either way."""
    from merger.errors import MergeError
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import write_shards

    big = {"w": torch.full((8,), 60000.0), "ok": torch.ones(4)}
    for name in ("a", "b"):
        write_checkpoint(tmp_path / name, big)
    text = f"merge_method: linear\nmodels: [{{model: {tmp_path / 'a'}}}, {{model: {tmp_path / 'b'}}}]\n"
    plan = build_plan(parse_recipe(text + "parameters: {normalize: false}\ndtype: float16\n"), device="cpu")
    plan.device = "cuda"
    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: gpu_budget)
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="tensor 'w': the merge gives 8 values that are inf or NaN in float16"):
        write_shards(plan, tmp_path / "out")


@pytest.mark.parametrize("compute", ["float32", "float64"])  # the fused kernel, and torch's path
@pytest.mark.parametrize("out", ["bfloat16", "float16", "float32"])
def test_every_nan_written_is_the_formats_canonical_nan(tmp_path, compute, out):
    """NaN in an input (here with odd payloads and signs) merges to NaN, written as the output format's
    positive quiet NaN whatever the path, so the output's bytes cannot depend on the device."""
    from conftest import write_checkpoint

    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(64, 8, generator=g).to(torch.bfloat16)}
    b = {"w": torch.randn(64, 8, generator=g).to(torch.bfloat16)}
    bits = a["w"].view(torch.int16).reshape(-1)
    bits[[0, 9, 100, 511]] = torch.tensor([0x7FC1, -0x3F, 0x7F81, 0x7FFF], dtype=torch.int16)  # -0x3F: 0xFFC1
    write_checkpoint(tmp_path / "a", a, n_shards=1)
    write_checkpoint(tmp_path / "b", b, n_shards=1)
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {tmp_path / 'a'}}}, {{model: {tmp_path / 'b'}}}]\n"
        f"out_dtype: {out}\ncompute_dtype: {compute}\n"
    )
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    merged = load_output(tmp_path / "o")["w"].reshape(-1)
    nan = torch.isnan(merged)
    assert nan.nonzero().reshape(-1).tolist() == [0, 9, 100, 511]
    canonical = {
        "bfloat16": (torch.int16, 0x7FC0),
        "float16": (torch.int16, 0x7E00),
        "float32": (torch.int32, 0x7FC00000),
    }
    view, expected = canonical[out]
    assert set(merged[nan].view(view).tolist()) == {expected}
    assert torch.isfinite(merged[~nan]).all()

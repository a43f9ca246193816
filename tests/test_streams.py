"""The CUDA engine's streams on the CPU: CudaStages runs unchanged over tests/fakecuda.py, whose streams
run their copies late on threads of their own, whose copy targets hold poison until filled, and which
records every access that the engine's events and record_stream calls leave unordered. Each test runs
a few seeds of the streams' delays. tests/test_gpu.py runs the real thing where there is a GPU."""

from __future__ import annotations

import math
import threading

import fakecuda
import pytest
import torch
from conftest import RECIPES, write_checkpoint
from safetensors.torch import load_file

import merger.budget
import merger.plan
import merger.stream
from merger.methods import all_methods
from merger.plan import build_plan
from merger.recipe import parse_recipe
from merger.stream import CudaStages, Merger, merge_tensors, write_shards

SEEDS = (0, 1, 2)
# (fake's seed, method): the first three methods under every seed, each other one under one of them
METHOD_SEEDS = [
    (seed, m)
    for i, m in enumerate(sorted(RECIPES))
    for seed in (SEEDS if m in ("linear", "task_arithmetic", "ties") else [SEEDS[i % len(SEEDS)]])
]
PIECE = 200  # entries per GPU piece when a test merges in pieces: t0 (960 entries) in 5


@pytest.fixture(params=SEEDS)
def fake(request, monkeypatch):
    """The fake torch.cuda, seeded; every tensor staged whole unless a test lowers the budgets. The test
    fails on any violation the fake recorded."""
    with fakecuda.installed(monkeypatch, seed=request.param) as fake:
        monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1 << 40)
        monkeypatch.setattr(merger.budget, "pinned_budget", lambda: 1 << 40)
        yield fake
        fake.assert_clean()


@pytest.fixture
def checkpoints(tmp_path):
    """A bfloat16 base and two fine-tunes: nine tensors of several sizes (so that pinned slots are
    reused, and regrown) and an int buffer; the base in two shards, the fine-tunes in three."""
    g = torch.Generator().manual_seed(5)
    shapes = [(40, 24), (16,), (24, 24), (7, 13), (24, 24), (100,), (3, 5, 8), (24, 24), (1,)]
    base = {f"t{i}": torch.randn(s, generator=g).bfloat16() for i, s in enumerate(shapes)}
    base["ids"] = torch.arange(9)
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for m in ("ft1", "ft2"):
        ft = {k: (v.float() + 0.3 * torch.randn(v.shape, generator=g)).bfloat16() if v.is_floating_point() else v
              for k, v in base.items()}  # fmt: skip
        paths[m] = write_checkpoint(tmp_path / m, ft, n_shards=3)
    return paths


def planned(paths, method: str, out_dtype: str = "bfloat16"):
    text = RECIPES[method].format(**{k: str(v) for k, v in paths.items()}) + f"out_dtype: {out_dtype}\n"
    return build_plan(parse_recipe(text), device="cpu")


def cpu_reference(tmp_path, plan, monkeypatch, chunk: int | None = None) -> dict[str, bytes]:
    """The plan written by the CPU engine through torch (not the fused kernels: the same float32
    operations as on the GPU, `chunk` entries at a time), as shard name -> bytes."""
    with monkeypatch.context() as patch:
        patch.setattr(Merger, "_fusable", lambda self, t: False)
        if chunk:
            patch.setattr(merger.budget, "CHUNK", chunk)
        return written(tmp_path / "cpu", plan, "cpu")


def written(directory, plan, device: str) -> dict[str, bytes]:
    directory.mkdir()
    plan.device = device
    write_shards(plan, directory)
    return {s.filename: (directory / s.filename).read_bytes() for s in plan.shards}


def assert_merge_tensors_equal_written(plan, directory) -> None:
    """merge_tensors (the soup's in-memory candidates) on the same stages gives the tensors written."""
    files = {k: v for s in plan.shards for k, v in load_file(directory / s.filename).items()}
    in_memory = dict(merge_tensors(plan))
    assert in_memory.keys() == files.keys()
    for name, tensor in in_memory.items():
        assert torch.equal(tensor, files[name]), name


def test_every_method_has_a_recipe_for_the_gpu_tests():
    """conftest.RECIPES, which these tests and tests/test_gpu.py run, covers every method but greedy soup
    (it needs an evaluator; its soups are merged by the methods here)."""
    assert set(all_methods()) - set(RECIPES) == {"greedy_soup"}


@pytest.mark.parametrize(("fake", "method"), METHOD_SEEDS, indirect=["fake"])
def test_tensors_merged_whole_on_the_streams_are_the_cpus_bytes(tmp_path, fake, checkpoints, monkeypatch, method):
    """Each tensor uploaded on the copy stream, merged on the compute stream and copied back on a stream
    of its own, with every copy late and in flight under poison: the CPU's bytes, and no unordered
    access."""
    plan = planned(checkpoints, method)
    cpu = cpu_reference(tmp_path, plan, monkeypatch)
    assert written(tmp_path / "gpu", plan, "cuda") == cpu
    assert_merge_tensors_equal_written(plan, tmp_path / "gpu")
    up = {stream for kind, stream in fake.copies if kind == "up"}
    back = {stream for kind, stream in fake.copies if kind == "back"}
    assert up and back and back.isdisjoint(up | {fake.default})  # the default stream computes
    merged = [t for t in plan.tensors if t.merged]
    assert fake.waits.count("merger-writer") == len(merged)  # each copy back, before its bytes are written
    fake.assert_clean()


@pytest.mark.parametrize(("fake", "method"), METHOD_SEEDS, indirect=["fake"])
def test_tensors_merged_in_pieces_on_the_streams_are_the_cpus_bytes(tmp_path, fake, checkpoints, monkeypatch, method):
    """Every merged tensor through the GPU in pieces of PIECE entries (TIES' thresholds over all of them),
    staged through double-buffered pinned buffers: the CPU's bytes in chunks of as many, and no unordered
    access; merge_tensors merges each tensor in one call, many pieces in flight."""
    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1)
    monkeypatch.setattr(merger.plan.Plan, "gpu_piece", lambda self, t, gpu: PIECE)
    plan = planned(checkpoints, method, out_dtype="float32")
    cpu = cpu_reference(tmp_path, plan, monkeypatch, chunk=PIECE)
    assert written(tmp_path / "gpu", plan, "cuda") == cpu
    assert sorted(plan.gpu_pieced) == sorted(t.name for t in plan.tensors if t.merged)
    assert_merge_tensors_equal_written(plan, tmp_path / "gpu")
    assert {kind for kind, _ in fake.copies} == {"up", "back"}
    fake.assert_clean()


def test_a_piece_uploads_each_input_once(tmp_path, fake, checkpoints, monkeypatch):
    """Task arithmetic in pieces uploads each model's piece and the base's once per piece; a tensor
    merged whole, each input once."""
    monkeypatch.setattr(merger.plan.Plan, "gpu_piece", lambda self, t, gpu: PIECE)
    plan = planned(checkpoints, "task_arithmetic")
    plan.device = "cuda"
    whole = dict(merge_tensors(plan, ["t0"]))
    assert [kind for kind, _ in fake.copies] == ["up"] * 3 + ["back"] * 2  # the result, its finiteness flags
    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1)
    fake.copies.clear()
    pieced = dict(merge_tensors(plan, ["t0"]))
    pieces = math.ceil(40 * 24 / PIECE)
    assert [kind for kind, _ in fake.copies].count("up") == pieces * 3
    assert [kind for kind, _ in fake.copies].count("back") == pieces
    assert torch.equal(pieced["t0"], whole["t0"])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_read_ahead_leads_the_stager(tmp_path, fake, checkpoints, monkeypatch, device):
    """When tensor j's merge begins, the read-ahead (MADV_WILLNEED) of every tensor up to j+2 has been
    requested on CUDA, where the stager copies j+1 out of the page cache meanwhile, and up to j+1 on
    the CPU; none further."""
    log = []
    for owner, name, kind in (
        (Merger, "prefetch", "prefetch"),
        (Merger, "start", "merge"),
        (CudaStages, "merge", "merge"),
    ):
        monkeypatch.setattr(owner, name, logged(log, kind, getattr(owner, name)))
    plan = planned(checkpoints, "ties")
    written(tmp_path / "out", plan, device)
    names = [t.name for s in plan.shards for t in s.tensors]
    ahead = 2 if device == "cuda" else 1
    for j, name in enumerate(names):
        before = log[: log.index(("merge", name))]
        assert {n for kind, n in before if kind == "prefetch"} == set(names[1 : j + ahead + 1]), name


def logged(log: list, kind: str, method):
    """`method`(self, t, ...), appending (kind, t.name) to `log` first."""

    def call(self, t, *args):
        log.append((kind, t.name))
        return method(self, t, *args)

    return call


def test_the_fake_sees_unordered_accesses(monkeypatch):
    """The harness itself: a copy target holds poison until its copy runs; a missing wait_event, a
    missing record_stream, a pinned buffer rewritten while its upload is queued and one read before its
    copy back is known to have landed are each recorded."""
    with fakecuda.installed(monkeypatch, delay=0) as fake:
        copy, compute = torch.cuda.Stream(), torch.cuda.current_stream()
        pinned = merger.stream._pinned(16).view(torch.float32)
        pinned.copy_(torch.arange(4.0))
        gpu, uploaded, gate = upload_held(copy, pinned)
        assert torch.isnan(fakecuda._plain(gpu)).all()
        early = gpu * 2  # on the default stream, which did not wait
        assert torch.isnan(fakecuda._plain(early)).all()
        assert_violation(fake, "a tensor allocated on stream 1, without record_stream")
        assert_violation(fake, "reads a tensor written on stream 1 without waiting for it")
        gate.set()
        compute.wait_event(uploaded)
        gpu.record_stream(compute)
        assert torch.equal(fakecuda._plain(gpu * 2), torch.arange(4.0) * 2)
        fake.assert_clean()

        _, _, gate = upload_held(copy, pinned)
        pinned.copy_(torch.zeros(4))
        assert_violation(fake, "a pinned buffer written while a copy on stream 1 may be queued")
        gate.set()
        merger.stream.copy_to_host(pinned, gpu)
        pinned.sum()
        assert_violation(fake, "a pinned buffer read before the copy into it on the default stream is known done")


def upload_held(stream, pinned):
    """copy_to_device of `pinned` on `stream`, held until the returned gate is set: (GPU tensor, the
    event after the copy, gate)."""
    gate = threading.Event()
    stream.enqueue(gate.wait)
    with torch.cuda.stream(stream):
        gpu = merger.stream.copy_to_device(pinned, "cuda")
        uploaded = torch.cuda.Event()
        uploaded.record(stream)
    return gpu, uploaded, gate


def assert_violation(fake, text: str) -> None:
    found = [v for v in fake.violations if text in v]
    assert found, f"no violation '{text}' among {list(fake.violations)}"
    for v in found:
        del fake.violations[v]


def test_inline_staging_uploads_on_the_merging_thread(tmp_path, fake, checkpoints, monkeypatch):
    """MERGER_INLINE_STAGING=1 (for torch's CUDA sanitizer, which watches one thread): no stager thread,
    the same bytes, and still no unordered access."""
    monkeypatch.setenv("MERGER_INLINE_STAGING", "1")
    plan = planned(checkpoints, "ties")
    cpu = cpu_reference(tmp_path, plan, monkeypatch)
    assert written(tmp_path / "gpu", plan, "cuda") == cpu
    assert "merger-stager" not in fake.waits and "MainThread" in fake.waits  # refilling a slot waits here


@pytest.mark.parametrize("pieces", [False, True])
def test_nans_merged_on_the_gpu_are_written_as_the_cpus(tmp_path, fake, checkpoints, monkeypatch, pieces):
    """An input holding NaNs with odd payloads: whole or in pieces, the GPU path writes the CPU engine's
    bytes, every NaN the format's canonical one."""
    nan_bits = torch.tensor([0x7FC1, -0x3F, 0x7F81], dtype=torch.int16)  # -0x3F: 0xFFC1
    tensors = load_file(checkpoints["ft1"] / "model-00001-of-00003.safetensors")
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() >= 3)
    everything = {k: v for f in sorted(checkpoints["ft1"].glob("*.safetensors")) for k, v in load_file(f).items()}
    everything[name].view(torch.int16).reshape(-1)[:3] = nan_bits
    write_checkpoint(checkpoints["ft1"], everything, n_shards=3)
    if pieces:
        monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1)
        monkeypatch.setattr(merger.plan.Plan, "gpu_piece", lambda self, t, gpu: PIECE)
    plan = planned(checkpoints, "linear")
    cpu = cpu_reference(tmp_path, plan, monkeypatch, chunk=PIECE if pieces else None)
    assert written(tmp_path / "gpu", plan, "cuda") == cpu
    merged = {k: v for s in plan.shards for k, v in load_file(tmp_path / "gpu" / s.filename).items()}[name]
    assert merged.reshape(-1)[:3].view(torch.int16).tolist() == [0x7FC0] * 3

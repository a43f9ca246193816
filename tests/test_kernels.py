"""The fused CPU kernels (merger.kernels): the same bits as the eager torch path, for every stored
dtype, tie pattern and chunking, and an exact threshold whatever the sample says."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint
from numba import njit

import merger
import merger.stream
from merger import budget, kernels
from merger.cli import cli
from merger.errors import NaNTaskVector
from merger.methods.task_vectors import TiesModelParams, TiesParams, keep_count, ties, ties_fused

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
VIEWS = {torch.bfloat16: np.int16, torch.float16: np.uint16}


def as_array(t: torch.Tensor) -> np.ndarray:
    """The numpy view the kernels read (as sources.MappedReader makes them)."""
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(VIEWS[t.dtype])


def runner(size: int, threads: int = 1):
    """A Runner like the engine's: ranges of `size`, on `threads` threads, results in order."""
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def run(fn, n, part=None):
        part = part or size
        bounds = [(s, min(s + part, n)) for s in range(0, n, part)]
        return list(pool.map(lambda b: fn(*b), bounds)) if pool else [fn(s, e) for s, e in bounds]

    return run


def in_pieces(merge_range, out: np.ndarray, piece: int | None = None) -> None:
    """Fill `out` through a fused method's merge_range, whole or in consecutive pieces (as the engine
    writes its output)."""
    piece = piece or max(out.size, 1)
    for s in range(0, out.size, piece):
        merge_range(s, min(s + piece, out.size), out[s : s + piece])


def fused(xs, base, models, params, run, out_dtype=None, piece=None):
    out = torch.empty(base.numel(), dtype=out_dtype or base.dtype)
    arrays = [as_array(x.reshape(-1)) for x in xs]
    in_pieces(ties_fused(arrays, as_array(base.reshape(-1)), models, params, run), as_array(out), piece)
    return out


def eager(xs, base, models, params, out_dtype=None):
    return ties([x.float() for x in xs], base.float(), models, params).reshape(-1).to(out_dtype or base.dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def oracle_top_k(mags: torch.Tensor, k: int) -> tuple[float, int, int]:
    """By sorting: the k-th largest, how many entries equal to it are among the k largest (lowest
    index first), and the index just past the last of those."""
    thr = torch.sort(mags, descending=True).values[k - 1].item()
    ties = k - int((mags > thr).sum())
    return thr, ties, int((mags == thr).nonzero()[ties - 1]) + 1


def case(n, dtype, models=3, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    xs = [(base.float() + scale * torch.randn(n, generator=g)).to(dtype) for _ in range(models)]
    return base, xs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 1000, 70_001, 600_000])
def test_fused_ties_is_bit_identical_to_eager(dtype, n):
    base, xs = case(n, dtype)
    models = [
        TiesModelParams(density=0.3, weight=1.0),
        TiesModelParams(density=0.75, weight=-0.5),
        TiesModelParams(density=1.0, weight=2.0),
    ]
    params = TiesParams(**{"lambda": 0.8})
    want = eager(xs, base, models, params)
    assert same_bits(fused(xs, base, models, params, runner(1 << 17, 2)), want)
    assert same_bits(fused(xs, base, models, params, runner(1 << 17, 2), piece=7_777), want)  # output in pieces


def test_fused_ties_keeps_none_at_density_zero():
    """density 0 keeps nothing (mergekit's magnitude): no ranking pass, a trim above every magnitude, inf
    included; NaN is not ranked, so it is dropped as the rest is."""
    base, xs = case(70_001, torch.bfloat16, models=2)
    xs[0][5], xs[0][6] = float("inf"), float("nan")
    models = [TiesModelParams(density=0.0, weight=1.0), TiesModelParams(density=0.4, weight=0.5)]
    assert kernels.top_k_abs_deltas([as_array(x) for x in xs], as_array(base), [0, 28_000], runner(1 << 17))[0] == (
        math.inf,
        0,
        0,
    )
    want = eager(xs, base, models, TiesParams())
    assert same_bits(fused(xs, base, models, TiesParams(), runner(1 << 17, 2)), want)
    alone = eager(xs[1:], base, models[1:], TiesParams())
    assert same_bits(want, alone)  # the model with nothing kept takes no part


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_ties_options_and_output_dtypes(consensus, normalize, out_dtype):
    base, xs = case(80_000, torch.bfloat16, models=4, seed=1)
    models = [TiesModelParams(density=d, weight=w) for d, w in [(0.2, 1.0), (0.5, 0.3), (0.9, 1.5), (0.05, -1.0)]]
    params = TiesParams(normalize=normalize, consensus_method=consensus, **{"lambda": 1.3})
    got = fused(xs, base, models, params, runner(4096), out_dtype)
    assert same_bits(got, eager(xs, base, models, params, out_dtype))


@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 18])
def test_ties_at_the_threshold_keep_the_lowest_indices_across_chunks(chunk):
    """Task vectors on a coarse grid: thousands of entries equal each threshold, and the cutoff falls
    inside a chunk (and inside a merge block)."""
    g = torch.Generator().manual_seed(2)
    n = 150_001
    base = (torch.randn(n, generator=g) * 4).round().bfloat16()
    xs = [(base.float() + (torch.randn(n, generator=g) * 2).round()).bfloat16() for _ in range(3)]
    densities = [0.3, 0.55, 0.9]
    mags = [(x.float() - base.float()).abs() for x in xs]
    ks = [keep_count(n, d) for d in densities]
    arrays = [as_array(x) for x in xs]
    got = kernels.top_k_abs_deltas(arrays, as_array(base), ks, runner(chunk, 2))
    for m, k, (thr, ties_kept, cutoff) in zip(mags, ks, got):
        assert (thr, ties_kept, cutoff) == oracle_top_k(m, k)
        assert 0 < ties_kept < int((m == thr).sum())  # a real partial tie: the cutoff matters
    models = [TiesModelParams(density=d) for d in densities]
    want = eager(xs, base, models, TiesParams())
    assert same_bits(fused(xs, base, models, TiesParams(), runner(chunk)), want)
    assert same_bits(fused(xs, base, models, TiesParams(), runner(chunk), piece=chunk * 3 + 5), want)


def test_the_sample_pass_splits_over_up_to_sixteen_threads_and_adds_up():
    """Large tensors' samples are split in up to 16 parts (a many-core machine's threads), none under
    SAMPLE_PART entries, and their histograms add up to the one-part histogram."""
    n = 9 * kernels.SAMPLE_PART + 5
    base, xs = case(n, torch.bfloat16, models=2, seed=4)
    arrays, b = tuple(as_array(x) for x in xs), as_array(base)
    sizes = []
    real = runner(1)

    def recording(fn, n, part=None):
        sizes.append(part)
        return real(fn, n, part)

    split = kernels._sample(arrays, b, recording)
    assert sizes == [kernels.SAMPLE_PART]  # 9 parts and a few entries
    whole = kernels._sample(arrays, b, lambda fn, n, part=None: [fn(0, n)])
    assert np.array_equal(split, whole) and split.sum() > 0
    big = 40 * kernels.SAMPLE_PART
    kernels._sample((np.zeros(big, np.int16),), np.zeros(big, np.int16), recording)
    assert sizes[-1] == big // 16


@pytest.mark.parametrize("side", ["above", "below"])
def test_a_band_that_misses_is_widened_and_the_answer_stays_exact(monkeypatch, side):
    base, xs = case(200_000, torch.bfloat16, models=2, seed=4)
    ks = [keep_count(200_000, 0.4), keep_count(200_000, 0.7)]
    real_band = kernels._band
    calls = []

    def unlucky(hist, p, widen):  # the first band of each model lies wholly on one side of the threshold
        calls.append(widen)
        lo, hi = real_band(hist, p, widen)
        if widen > 1:
            return lo, hi
        return (hi * 1.5, hi * 2) if side == "above" else (lo / 3, lo / 2)

    monkeypatch.setattr(kernels, "_band", unlucky)
    got = kernels.top_k_abs_deltas([as_array(x) for x in xs], as_array(base), ks, runner(1 << 16))
    assert calls.count(1) == 2 and calls.count(4) == 2  # each model needed a second pass
    for x, k, r in zip(xs, ks, got):
        assert r == oracle_top_k((x.float() - base.float()).abs(), k)


def count_every_band(monkeypatch) -> list:
    """Make every band too large to gather, so that every threshold is narrowed by counting; the calls to
    kernels._count_select are recorded in the list returned."""
    calls = []
    real = kernels._count_select

    def spy(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(budget, "GATHER_FLOOR", 0)
    monkeypatch.setattr(budget, "GATHER_SHARE", 1 << 62)
    monkeypatch.setattr(kernels, "_count_select", spy)
    return calls


@pytest.mark.parametrize("n", [1000, 200_001])  # gathered whole, and through a sampled band
@pytest.mark.parametrize("values", ["continuous", "coarse"])
def test_a_band_too_large_to_gather_is_counted_to_the_same_answer(monkeypatch, n, values):
    """Thresholds found by radix histograms and a tie count instead of a gather: the sort's answer for every
    rank, including the largest, the smallest, and cutoffs inside a range of the runner."""
    calls = count_every_band(monkeypatch)
    g = torch.Generator().manual_seed(n)
    if values == "continuous":
        base, xs = case(n, torch.float32, models=3, seed=n)
    else:
        base = (torch.randn(n, generator=g) * 4).round().bfloat16()
        xs = [(base.float() + (torch.randn(n, generator=g) * 2).round()).bfloat16() for _ in range(3)]
    mags = [(x.float() - base.float()).abs() for x in xs]
    for ks in ([1, n // 2, n - 1], [keep_count(n, 0.3), 7, 2]):
        got = kernels.top_k_abs_deltas([as_array(x) for x in xs], as_array(base), ks, runner(4099, 2))
        assert got == [oracle_top_k(m, k) for m, k in zip(mags, ks)]
    assert sorted(set(calls)) == [0, 1, 2]
    xs[2][[5, n - 3]] = float("nan")
    with pytest.raises(NaNTaskVector) as e:
        kernels.top_k_abs_deltas([as_array(x) for x in xs], as_array(base), [1, 2, 3], runner(4099, 2))
    assert (e.value.model, e.value.count) == (2, 2)


def test_a_band_of_ties_is_counted_in_little_memory():
    """Task vectors of three values, two thirds of them tied at the threshold: the band holds most of the
    tensor. Gathering it would hold 12 bytes an entry; counting holds at most budget.gathered_most(n) and
    the parts in flight, and gives the sort's answer."""
    import tracemalloc

    n = 6_000_000
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-100, 100, (n,), generator=g).float() / 2
    xs = [base + torch.randint(-1, 2, (n,), generator=g).float() / 2 for _ in range(2)]
    ks = [n // 2, n // 3]
    want = [oracle_top_k((x - base).abs(), k) for x, k in zip(xs, ks)]
    arrays, b = [as_array(x) for x in xs], as_array(base)
    kernels.top_k_abs_deltas(arrays, b, ks, runner(budget.CHUNK, 2))  # numba's compiling is not the pass's memory
    tracemalloc.start()
    try:
        got = kernels.top_k_abs_deltas(arrays, b, ks, runner(budget.CHUNK, 2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == want
    tied = sum(int(((x - base).abs() == w[0]).sum()) for x, w in zip(xs, want))  # what a gather would hold
    assert tied > n and peak < 12 * len(xs) * (budget.gathered_most(n) + 4 * budget.CHUNK) < 12 * tied, peak


def test_density_one_keeps_everything_and_needs_no_pass():
    base, xs = case(100_000, torch.bfloat16, models=2)
    assert kernels.top_k_abs_deltas([as_array(x) for x in xs], as_array(base), [100_000] * 2, None) == [
        None,
        None,
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_linear_matches_the_oracle(dtype, normalize):
    from merger.methods.linear import LinearModelParams, LinearParams, linear_fused

    _, xs = case(100_003, dtype, models=3, seed=8, scale=1.0)
    weights = [0.5, 1.25, -0.25]
    want = sum(w * x.double() for w, x in zip(weights, xs))
    if normalize:
        want = want / sum(weights)
    models, params = [LinearModelParams(weight=w) for w in weights], LinearParams(normalize=normalize)
    f32 = torch.empty(100_003)  # the float32 result: within a few ulps of the float64 oracle
    in_pieces(linear_fused([as_array(x) for x in xs], None, models, params, runner(4096)), as_array(f32))
    torch.testing.assert_close(f32.double(), want, rtol=4e-7, atol=4e-7)
    out = torch.empty(100_003, dtype=dtype)  # stored in the input dtype: exactly torch's rounding of it
    in_pieces(linear_fused([as_array(x) for x in xs], None, models, params, runner(4096, 2)), as_array(out), 30_001)
    assert same_bits(out, f32.to(dtype))


@pytest.mark.parametrize("normalize", [True, False])
def test_fused_task_arithmetic_matches_the_oracle(normalize):
    from merger.methods.task_vectors import TaskArithmeticParams, TaskModelParams, task_arithmetic_fused

    base, xs = case(100_003, torch.bfloat16, models=3, seed=9, scale=0.05)
    weights, lam = [1.0, -0.5, 0.75], 0.7
    want = base.double() + lam / (sum(weights) if normalize else 1) * sum(
        w * (x.double() - base.double()) for w, x in zip(weights, xs)
    )
    out = torch.empty(100_003)
    merge_range = task_arithmetic_fused(
        [as_array(x) for x in xs],
        as_array(base),
        [TaskModelParams(weight=w) for w in weights],
        TaskArithmeticParams(normalize=normalize, **{"lambda": lam}),
        runner(4096, 2),
    )
    in_pieces(merge_range, as_array(out), 30_001)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("values", ["random", "few", "one", "spread"])
def test_kth_largest_radix_select_matches_sort(values):
    rng = np.random.default_rng(5)
    v = {
        "random": lambda: np.abs(rng.standard_normal(50_000)),
        "few": lambda: rng.integers(0, 7, 50_000) * 0.125,
        "one": lambda: np.full(1000, 0.3),
        "spread": lambda: np.abs(rng.standard_normal(20_000)) * 10.0 ** rng.integers(-30, 30, 20_000),
    }[values]().astype(np.float32)
    ordered = np.sort(v)[::-1]
    for rank in (1, 2, v.size // 3, v.size - 1, v.size):
        assert kernels._kth_largest(v, rank) == ordered[rank - 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [7, 64, 1000, 4099])
def test_band_pass_counts_and_gathers_what_numpy_does(dtype, n):
    """The vector compares (eight entries per LLVM vector, 64 per bit mask) and the scalar tail agree
    with numpy: the count above the band, the band's values and indices in order. NaN is gathered with
    the band (so that it is counted off the hot loop), inf is above."""
    base, xs = case(n, dtype, models=2, seed=12)
    xs[0][n // 2] = float("nan")
    xs[1][n - 1] = float("inf")
    xs[1][0] = base[0]  # a zero delta: in the band when lo is 0
    mags = [(x.float() - base.float()).abs().numpy() for x in xs]
    lo = np.array([0.0, np.quantile(mags[1][:-1], 0.4)], np.float32)
    hi = np.array([np.quantile(mags[0][~np.isnan(mags[0])], 0.7), np.quantile(mags[1][:-1], 0.6)], np.float32)
    vals, idx = np.empty((2, n), np.float32), np.empty((2, n), np.int64)
    above, got = kernels._band_pass(tuple(as_array(x) for x in xs), as_array(base), lo, hi, vals, idx, 10)
    for j, a in enumerate(mags):
        band = np.flatnonzero((a >= lo[j]) & (a <= hi[j]) | np.isnan(a))
        assert above[j] == np.count_nonzero(a > hi[j])
        assert np.array_equal(idx[j, : got[j]], band + 10)
        assert np.array_equal(vals[j, : got[j]], a[band], equal_nan=True)
    assert np.isnan(vals[0, : got[0]]).sum() == 1 and not np.isnan(vals[1, : got[1]]).any()


def test_engine_uses_the_kernels_and_writes_what_the_eager_path_writes(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(6)
    shapes = {"embed": (300, 256), "w": (256, 256), "norm": (256,), "v": (70_001,)}
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    for i in range(3):
        ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        write_checkpoint(tmp_path / f"ft{i}", ft, n_shards=1 + i)
    write_checkpoint(tmp_path / "base", base)
    models = ", ".join(
        f"{{model: {tmp_path / f'ft{i}'}, parameters: {{weight: {w}, density: {d}}}}}"
        for i, (w, d) in enumerate([(1.0, 0.3), (0.5, 0.6), (-0.25, 1.0)])
    )
    (tmp_path / "r.yaml").write_text(f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels: [{models}]\n")
    used = []
    real = kernels.ties_merge
    monkeypatch.setattr(kernels, "ties_merge", lambda *a, **k: used.append(1) or real(*a, **k))
    for out in ("fused", "eager"):
        if out == "eager":
            monkeypatch.setattr(merger.stream, "_kernels", lambda: None)
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q"])
        assert result.exit_code == 0, result.output
    assert len(used) == len(shapes)  # every tensor went through the kernel in the first run, none in the second
    fast, slow = load_output(tmp_path / "fused"), load_output(tmp_path / "eager")
    for name in shapes:
        assert same_bits(fast[name], slow[name]), name


def test_ingredients_of_different_dtypes_are_read_as_float32_copies(tmp_path, monkeypatch):
    """A float32 fine-tune beside a bfloat16 one: each 16-bit ingredient is copied to float32 (exact) and the
    fused kernel merges; the oracle's bytes, and what the torch path writes."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(64, 64, generator=g)
    a = (base + 0.1 * torch.randn(64, 64, generator=g)).bfloat16()
    b = base + 0.1 * torch.randn(64, 64, generator=g)
    for name, w in (("base", base), ("a", a), ("b", b)):
        write_checkpoint(tmp_path / name, {"w": w})
    (tmp_path / "r.yaml").write_text(
        f"merge_method: ties\nbase_model: {tmp_path / 'base'}\n"
        f"models: [{{model: {tmp_path / 'a'}, parameters: {{density: 0.5}}}}, {{model: {tmp_path / 'b'}}}]\n"
        "dtype: float32\n"
    )
    copies, merges = [], []
    real_copy, real_merge = kernels.copy_as, kernels.ties_merge
    monkeypatch.setattr(kernels, "copy_as", lambda x, *a: copies.append(x.dtype) or real_copy(x, *a))
    monkeypatch.setattr(kernels, "ties_merge", lambda *a, **k: merges.append(1) or real_merge(*a, **k))
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert copies == [np.int16] and merges == [1]  # the bfloat16 fine-tune alone was copied; the kernel merged
    want = ties([a.float(), b], base, [TiesModelParams(density=0.5), TiesModelParams()], TiesParams())
    assert torch.equal(load_output(tmp_path / "out")["w"], want)
    # `merger plan` sends nothing through torch, and counts the copy's memory
    plan = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["torch_path_tensors"] == {}
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text() + "compute_dtype: float64\n")
    f64 = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--json"])
    assert json.loads(f64.output)["torch_path_tensors"] == {"compute_dtype: float64": 1}
    said = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out2")])
    assert "  torch path:   1 tensor(s), compute_dtype: float64: not the fused kernels, several times slower\n" in (
        said.output
    )


# method: (models and parameters, method-wide parameters), A, B and C stored as bf16, f16 and f32 over a f32 BASE
# (slerp, nearswap and arcee_fusion read one fine-tune over the base, which the kernels read in any dtype:
# test_hostile_values.test_fused_kernels_read_a_base_stored_in_another_dtype)
MIXED_RECIPES = {
    "linear": ("[{model: A, parameters: {weight: 0.3}}, {model: C, parameters: {weight: 0.7}}]", ""),
    "ties": ("[{model: A, parameters: {density: 0.5}}, {model: B, parameters: {density: 0.3}}, {model: C}]", ""),
    "dare_ties": ("[{model: A, parameters: {density: 0.5}}, {model: C, parameters: {density: 0.7}}]", ""),
    "della": ("[{model: A, parameters: {density: 0.5, epsilon: 0.1}}, {model: B}, {model: C}]", ""),
    "breadcrumbs": ("[{model: A, parameters: {density: 0.9, gamma: 0.01}}, {model: C}]", ""),
    "sce": ("[{model: A}, {model: B}, {model: C}]", "select_topk: 0.5"),
    "model_stock": ("[{model: A}, {model: B}, {model: C}]", "filter_wise: true"),
    "karcher": ("[{model: A}, {model: C}, {model: BASE}]", ""),
    "nuslerp": ("[{model: A, parameters: {weight: 0.3}}, {model: C, parameters: {weight: 0.7}}]", ""),
}


@pytest.mark.parametrize("method", sorted(MIXED_RECIPES))
def test_the_fused_kernels_on_ingredients_of_three_dtypes_write_the_torch_paths_bytes(tmp_path, monkeypatch, method):
    """Fine-tunes stored in bfloat16, float16 and float32 over a float32 base, on tensors of one chunk and of
    several (the copies run on the chunk threads): the fused merge writes the torch path's bytes."""
    g = torch.Generator().manual_seed(11)
    shapes = {"w": (64, 64), "big": (600, 512)}  # the second past budget.CHUNK
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    stored = {"A": torch.bfloat16, "B": torch.float16, "C": torch.float32}
    for name, dtype in stored.items():
        write_checkpoint(
            tmp_path / name, {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        )
    write_checkpoint(tmp_path / "BASE", base)
    models, wide = MIXED_RECIPES[method]
    for name in ("BASE", *stored):
        models = models.replace(f"model: {name}}}", f"model: {tmp_path / name}}}").replace(
            f"model: {name},", f"model: {tmp_path / name},"
        )
    (tmp_path / "r.yaml").write_text(
        f"merge_method: {method}\nbase_model: {tmp_path / 'BASE'}\nmodels: {models}\n"
        f"parameters: {{{wide}}}\ndtype: bfloat16\nrandom_seed: 5\n"
    )
    copies = []
    real_copy = kernels.copy_as
    monkeypatch.setattr(kernels, "copy_as", lambda x, *a: copies.append(x.dtype) or real_copy(x, *a))
    for out in ("fused", "eager"):
        if out == "eager":
            monkeypatch.setattr(merger.stream, "_kernels", lambda: None)
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q"])
        assert result.exit_code == 0, result.output
    assert copies, "nothing was copied to float32"
    fast, slow = load_output(tmp_path / "fused"), load_output(tmp_path / "eager")
    for name in shapes:
        assert same_bits(fast[name], slow[name]), name


def test_the_plan_counts_the_float32_copies_as_held_for_the_run(tmp_path):
    """Plan.widening_memory: a buffer per copy a tensor needs, each as large as the largest tensor that fills it
    (the engine reuses them tensor after tensor); none where the ingredients share a dtype, or on CUDA."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe

    shapes = {"e": (300, 64), "w": (64, 64), "n": (64,)}
    stored = {"BASE": torch.float32, "A": torch.bfloat16, "B": torch.float16, "C": torch.float32, "D": torch.float32}
    for name, dtype in stored.items():
        write_checkpoint(tmp_path / name, {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()})

    def plan(*names: str, device: str = "cpu"):
        models = ", ".join(f"{{model: {tmp_path / n}}}" for n in names)
        text = f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'BASE'}\nmodels: [{models}]\n"
        return build_plan(parse_recipe(text), device=device)

    assert plan("A", "B", "C").widening_memory == 2 * 4 * 300 * 64  # A's and B's copies of e, the largest
    assert plan("A", "C").widening_memory == 4 * 300 * 64
    two = plan("A", "B", "C")
    assert [s.model.ref for s in two.widened(next(t for t in two.tensors if t.name == "w"))] == [
        str(tmp_path / "A"),
        str(tmp_path / "B"),
    ]
    assert plan("A", "A").widening_memory == plan("C", "BASE").widening_memory == 0
    # peak memory counts the copy: 4 bytes an entry of e beside the inputs, whose pages A's bfloat16 halves
    assert plan("A", "C").peak_memory - plan("D", "C").peak_memory == (4 - 2) * 300 * 64


def test_without_the_kernels_the_merge_falls_back_to_torch(tmp_path, monkeypatch, family):
    import sys

    paths, _ = family
    (tmp_path / "r.yaml").write_text(
        f"merge_method: ties\nbase_model: {paths['base']}\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
    )
    monkeypatch.setitem(sys.modules, "merger.kernels", None)  # as if numba could not be imported
    merger.stream._kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="fused kernels are unavailable"):
            result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
        assert result.exit_code == 0, result.output
        assert "model.safetensors.index.json" in {p.name for p in (tmp_path / "out").iterdir()}
    finally:
        merger.stream._kernels.cache_clear()


@pytest.mark.parametrize("n", [1000, 200_000])  # gathered whole, and through a sampled band
def test_nan_in_a_task_vector_is_refused_by_both_paths_and_inf_is_ranked(n):
    """A NaN magnitude has no rank, so a trim cannot place it: both paths name the model and count
    its NaN entries (a NaN in the base spoils every model's). Infinities rank above everything, the
    same way on both paths."""

    base, xs = case(n, torch.bfloat16, models=3, seed=13)
    models = [TiesModelParams(density=0.3), TiesModelParams(density=0.5), TiesModelParams(density=1.0)]
    xs[0][[3, n - 1]] = float("inf")
    xs[1][[7, n // 2]] = float("-inf")
    xs[2][5] = float("nan")  # density 1 keeps everything: nothing to rank, the NaN is merged as is
    xs[0][50], xs[1][50] = float("inf"), float("-inf")  # an entry whose vote is NaN: nothing agrees with it
    for consensus in ("sum", "count"):
        params = TiesParams(consensus_method=consensus)
        assert same_bits(fused(xs, base, models, params, runner(1 << 14, 2)), eager(xs, base, models, params))
    few = [TiesModelParams(density=1 / n), *models[1:]]  # one entry kept of model 0's three infinities
    assert same_bits(fused(xs, base, few, TiesParams(), runner(1 << 14, 2)), eager(xs, base, few, TiesParams()))

    xs[1][[10, 11, n - 2]] = float("nan")
    for merge in (
        lambda: fused(xs, base, models, TiesParams(), runner(1 << 14, 2)),
        lambda: eager(xs, base, models, TiesParams()),
    ):
        with pytest.raises(NaNTaskVector) as got:
            merge()
        assert (got.value.model, got.value.count) == (1, 3)
    base[20] = float("nan")
    with pytest.raises(NaNTaskVector) as got:
        fused(xs, base, models, TiesParams(), runner(1 << 14, 2))
    assert (got.value.model, got.value.count) == (0, 1)


@njit
def _borrowed_sum(xs, out):  # pragma: no cover - compiled
    xs, out = kernels.borrow((xs, out))
    for j in range(len(xs)):
        x = xs[j]  # a view that holds no reference
        for i in range(x.size):
            out[i] += x[i]


def test_borrowed_arguments_read_and_write_the_callers_arrays_and_keep_their_references():
    xs, out = (np.arange(10.0), np.ones(10)), np.zeros(10)
    counts = [sys.getrefcount(a) for a in (*xs, out)]
    for _ in range(100):
        _borrowed_sum(xs, out)
    np.testing.assert_array_equal(out, 100 * (np.arange(10.0) + 1))
    assert [sys.getrefcount(a) for a in (*xs, out)] == counts  # no reference taken, none dropped


def _scratch_counter(kept: bool):
    @njit
    def counts_of(n):  # pragma: no cover - compiled
        """Counts into a borrowed view of its own array while allocating arrays of the same size, which
        would take that array's memory once it was freed."""
        own = np.zeros(64, np.int64)
        counts = kernels.borrow(own)
        for i in range(n):
            junk = np.full(64, 7, np.int64)
            counts[i % 64] += junk[0] - 6
        total = counts.sum()
        if kept:  # a constant: compiled without the branch
            kernels.keep_alive(own)
        return total

    return counts_of


def test_keep_holds_a_kernels_own_array_for_its_borrowed_view():
    assert _scratch_counter(True)(1000) == 1000
    # Without keep_alive(), numba frees the array after its last use (the borrow): the loop's allocations reuse its
    # memory and the counts come out wrong. This pins why every kernel that borrows its own arrays keeps them.
    assert _scratch_counter(False)(1000) != 1000


KERNEL_MODULES = [
    "kernels.py",
    "methods/interpolation_kernels.py",
    "methods/selection_kernels.py",
    "methods/sparse_kernels.py",
]


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_every_kernel_keeps_the_arrays_it_borrows_past_their_last_use(module):
    """A kernel's own array `x_own` lent as `x_own, x = lend(...)` must be named in one keep_alive() after every loop,
    and `x` not used after it (numba may free `x_own` right after its keep_alive)."""
    tree = ast.parse((Path(merger.__file__).parent / module).read_text())
    checked = 0
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        owned = {
            n.id
            for st in fn.body
            if isinstance(st, ast.Assign)
            for n in ast.walk(st.targets[0])
            if isinstance(n, ast.Name)
        }
        owned = {name for name in owned if name.endswith("_own")}
        if not owned:
            continue
        keeps = [
            i for i, st in enumerate(fn.body) if isinstance(st, ast.Expr) and ast.unparse(st).startswith("keep_alive(")
        ]
        assert len(keeps) == 1, f"{fn.name}: {len(keeps)} keep_alive() calls at its top level"
        kept = {n.id for n in ast.walk(fn.body[keeps[0]]) if isinstance(n, ast.Name)} - {"keep_alive"}
        assert kept == owned, f"{fn.name}: keeps {sorted(kept)}, owns {sorted(owned)}"
        after = fn.body[keeps[0] + 1 :]
        used = {n.id for st in after for n in ast.walk(st) if isinstance(n, ast.Name)}
        assert not used & {name[: -len("_own")] for name in owned}, f"{fn.name} uses a borrowed view after keep_alive()"
        assert not any(isinstance(n, (ast.For, ast.While)) for st in after for n in ast.walk(st)), fn.name
        checked += 1
    assert checked  # each module's hot kernels borrow their scratch arrays


def test_cached_kernels_are_keyed_to_every_merger_source(tmp_path):
    """numba keys a cached kernel to its own file alone, though kernels inline helpers from other modules:
    merger's cache keys each one to a digest of all its sources too, which a change to any file moves."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = kernels.sources_digest(tmp_path)
    kernels.sources_digest.cache_clear()
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert kernels.sources_digest(tmp_path) != first
    kernels.sources_digest.cache_clear()
    stamp = kernels._MendingCache(kernels.count_masked.py_func)._cache_file._source_stamp
    assert stamp[1] == kernels.sources_digest() == kernels.sources_digest(Path(kernels.__file__).parent)


def test_a_bounds_checked_run_never_loads_unchecked_cached_kernels(tmp_path):
    """numba's cache key leaves NUMBA_BOUNDSCHECK out: merger's holds it, so the check that CI runs (.ci/run)
    checks even where a warm cache holds the same kernels compiled without it."""
    (tmp_path / "oob.py").write_text(
        "import numpy as np\n"
        "from merger.kernels import kernel\n"
        "@kernel\n"
        "def past(a, i):\n"
        "    return a[i]\n"
        "try:\n"
        "    past(np.zeros(4), 6)\n"
        "    print('unchecked')\n"
        "except IndexError:\n"
        "    print('checked')\n"
    )
    seen = []
    for check in ("0", "1", "0"):
        env = dict(os.environ, MERGER_CACHE_DIR=str(tmp_path / "cache"), NUMBA_BOUNDSCHECK=check,
                   PYTHONPATH=str(Path(kernels.__file__).parents[1]))  # fmt: skip
        run = subprocess.run([sys.executable, "oob.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
        seen.append(run.stdout.strip() or run.stderr)
    assert seen == ["unchecked", "checked", "unchecked"]
    assert list((tmp_path / "cache" / "numba").rglob("oob.past-*.nbi"))  # cached indeed


def test_wide_vectors_only_on_the_measured_cpus_with_avx512():
    host = "+sse2,+avx2,+avx512f,-amx-tile"
    assert kernels.wide_vector_features("emeraldrapids", host) == host + ",-prefer-256-bit"
    assert kernels.wide_vector_features("sapphirerapids", host) == host + ",-prefer-256-bit"
    assert kernels.wide_vector_features("emeraldrapids", "+sse2,+avx2,-avx512f") is None  # AVX-512 turned off
    assert kernels.wide_vector_features("skylake-avx512", host) is None  # its 512-bit ops lower the clock
    assert kernels.wide_vector_features("znver3", "+sse2,+avx2") is None


def test_numba_cpu_settings_of_the_user_are_kept():
    """NUMBA_CPU_FEATURES (or NUMBA_CPU_NAME), where set, is what the kernels compile for; else the host's
    features, widened where wide_vector_features says so: the features of the codegen numba compiles (and keys
    its cache) with, once merger.kernels is imported."""
    probe = (
        "import merger.kernels\n"
        "from numba.core.registry import cpu_target\n"
        "print(cpu_target.target_context.codegen().magic_tuple()[2])\n"
    )
    seen = []
    for extra in ({"NUMBA_CPU_FEATURES": "+sse2"}, {"NUMBA_CPU_NAME": "generic"}, {}):
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")}
        run = subprocess.run([sys.executable, "-c", probe], env=env | extra, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        seen.append(run.stdout.removesuffix("\n"))  # the features, possibly ''
    from llvmlite import binding
    from numba.core.codegen import get_host_cpu_features

    host = get_host_cpu_features()
    assert seen == ["+sse2", "", kernels.wide_vector_features(binding.get_host_cpu_name(), host) or host]

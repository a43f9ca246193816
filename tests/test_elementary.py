"""merger.methods.elementary's float64 exp and log: within 1 ulp of Python's math.exp and math.log over the
ranges Arcee Fusion feeds them (and their edges), and the same bits from the torch functions (CPU and CUDA)
and from their numba twins in selection_kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import njit

from merger.methods import selection_kernels as sk
from merger.methods.elementary import TABLE_BOUND, exp_, exp_diff, exp_table, log_


@njit
def _exp_all(v):
    out = np.empty_like(v)
    for i in range(v.size):
        out[i] = sk._exp(v[i])
    return out


@njit
def _log_all(v):
    out = np.empty_like(v)
    for i in range(v.size):
        out[i] = sk._log(v[i])
    return out


def exp_arguments() -> np.ndarray:
    """x - max(x) of rows: [-inf, 0], most of them small, down to where exp is subnormal or 0."""
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, -5e-324, -1e-300, -1e-16, -0.5 * math.log(2), -math.log(2), -1.0, -708.39, -708.4]
    edges += [-709.0, -744.0, -745.13, -745.2, -746.0, -1000.0, -3.4e38, -math.inf]
    return np.concatenate(
        [
            -rng.exponential(4.0, 100_000),
            -rng.uniform(0, 750, 100_000),
            -rng.uniform(0, 1e-6, 10_000),
            -np.arange(0, 746, 0.5 * math.log(2)),  # the ends of the reduction's intervals
            edges,
        ]
    )


def log_arguments() -> np.ndarray:
    """p / q with p, q in [1e-8, 1 + 1e-8], near 1 above all, and normal numbers far beyond."""
    rng = np.random.default_rng(1)
    p, q = (np.exp(rng.uniform(math.log(1e-8), 0.0, 100_000)) + 1e-8 for _ in range(2))
    edges = [1.0, np.nextafter(1.0, 2), np.nextafter(1.0, 0), 2.0, 0.5, math.sqrt(2), np.nextafter(math.sqrt(2), 2)]
    edges += [math.sqrt(0.5), 1e-8 / (1 + 1e-8), 1e8, 2.2250738585072014e-308, 1.7976931348623157e308]
    return np.concatenate([p / q, 1 + rng.uniform(-1e-4, 1e-4, 20_000), np.exp(rng.uniform(-700, 700, 20_000)), edges])


def ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units of the last place of want (of the least subnormal where want is 0)."""
    return np.abs(got - want) / np.spacing(np.abs(want))


def test_exp_is_within_one_ulp_of_math_exp():
    v = exp_arguments()
    got = exp_(torch.from_numpy(v.copy())).numpy()
    want = np.array([math.exp(a) for a in v])
    assert ulps(got, want).max() <= 1
    assert (got[v == 0] == 1).all() and (got[v <= -746] == 0).all()


def test_log_is_within_one_ulp_of_math_log():
    x = log_arguments()
    got = log_(torch.from_numpy(x.copy())).numpy()
    want = np.array([math.log(a) for a in x])
    assert ulps(got, want).max() <= 1
    assert (got[x == 1] == 0).all()


def test_exp_diff_is_within_three_ulp_of_math_exp():
    """exp(v - peak) for float32 v and peak: from the bfloat16 table (bf16 values within TABLE_BOUND, peaks
    too) within 3 ulp, and from exp_ (1 ulp) everywhere else: float32 values, beyond the bound, -inf."""
    rng = np.random.default_rng(2)
    n = 50_000
    bf16 = torch.from_numpy(rng.uniform(-TABLE_BOUND, TABLE_BOUND, (2, n)).astype(np.float32)).bfloat16().float()
    wide = torch.from_numpy(rng.uniform(-3 * TABLE_BOUND, 3 * TABLE_BOUND, (2, n)).astype(np.float32))
    edges = torch.tensor(
        [[TABLE_BOUND, -TABLE_BOUND, 0.0, -0.0, -math.inf, 1.0], [TABLE_BOUND] * 3 + [-TABLE_BOUND] * 3]
    )
    v, peak = torch.cat([bf16, wide, wide.bfloat16().float(), edges], dim=1)
    peak = torch.maximum(peak, v)  # a row's maximum is at least its entries
    got = exp_diff(v, peak).numpy()
    want = np.array([math.exp(a - p) for a, p in zip(v.double().tolist(), peak.double().tolist(), strict=True)])
    assert ulps(got, want).max() <= 3
    bits = v.view(torch.int32)
    direct = ((bits & 0xFFFF) != 0) | (v.abs() > TABLE_BOUND) | (peak.abs() > TABLE_BOUND)
    assert ulps(got[direct.numpy()], want[direct.numpy()]).max() <= 1 and 0 < direct.sum() < v.numel()
    assert exp_diff(v[:1], peak[:1]).dtype == torch.float64


def test_the_kernels_exp_table_is_elementarys():
    """The fused path's table (numba, without torch) has the torch path's bits, for every bfloat16 value."""
    want = exp_table().numpy()
    assert np.array_equal(sk.exp_table().view(np.int64), want.view(np.int64))
    values = (np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    assert np.array_equal(want > 0, np.abs(values) <= TABLE_BOUND)  # 0 outside the bound (and for NaN)


def test_nan_stays_nan_in_exp():
    v = torch.tensor([math.nan, -1.0], dtype=torch.float64)
    assert exp_(v.clone()).isnan().tolist() == [True, False]
    assert np.isnan(_exp_all(v.numpy())).tolist() == [True, False]


@pytest.mark.parametrize("which", ["exp", "log"])
def test_the_numba_twins_give_the_torch_bits(which):
    args = exp_arguments() if which == "exp" else log_arguments()
    torch_fn, numba_fn = (exp_, _exp_all) if which == "exp" else (log_, _log_all)
    want = torch_fn(torch.from_numpy(args.copy())).numpy()
    assert np.array_equal(numba_fn(args).view(np.int64), want.view(np.int64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["exp", "log"])
def test_cuda_gives_the_cpu_bits(which):
    args = torch.from_numpy(exp_arguments() if which == "exp" else log_arguments())
    fn = exp_ if which == "exp" else log_
    want = fn(args.clone())
    got = fn(args.cuda()).cpu()
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))

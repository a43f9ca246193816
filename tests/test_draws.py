"""merger.methods.draws: counter-based uniforms that depend on (seed, stream, flat index) alone."""

from __future__ import annotations

import math

import pytest
import torch

from merger.methods import draws


def splitmix64(seed: int, stream: int, j: int) -> int:
    """The reference, in Python integers: splitmix64's output function of the Weyl sequence's (j + 1)-th
    element from the stream's key."""
    z = (draws.stream_key(seed, stream) + (j + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_the_tensor_version_is_splitmix64_on_unsigned_64_bit_integers():
    for seed, stream, start in [(0, 0, 0), (2**63 - 1, 7, 10**12), (12345, 2, 2**40 - 3)]:
        got = draws.bits(seed, stream, start, 50).tolist()
        want = [splitmix64(seed, stream, start + j) for j in range(50)]
        assert [g % 2**64 for g in got] == want
    u = draws.uniform(3, 1, 5, 20).tolist()
    assert u == [(splitmix64(3, 1, 5 + j) >> 11) / 2**53 for j in range(20)]
    u32 = draws.uniform(3, 1, 5, 20, dtype=torch.float32).tolist()
    assert u32 == [(splitmix64(3, 1, 5 + j) >> 40) / 2**24 for j in range(20)]


@pytest.mark.parametrize("size", [1, 7, 1000, 4093])
def test_a_range_drawn_in_odd_sized_chunks_equals_the_range_drawn_whole(size):
    n, start = 20_011, 123_456_789
    whole = draws.uniform(42, 3, start, n)
    parts = torch.cat([draws.uniform(42, 3, start + s, min(size, n - s)) for s in range(0, n, size)])
    assert torch.equal(whole, parts)
    assert torch.equal(whole[500:600], draws.uniform(42, 3, start + 500, 100))


def test_a_million_draws_look_uniform():
    n = 1_000_000
    u = draws.uniform(7, 0, 0, n)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 0.002
    # Kolmogorov-Smirnov: sup |F_n - F| beyond 1.95 / sqrt(n) has probability 0.001 under uniformity
    s = u.sort().values
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - s, s - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n)
    # consecutive draws uncorrelated; a kept fraction of about p
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 5 / math.sqrt(n)
    assert abs((u < 0.3).double().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)


def test_seeds_and_streams_give_different_independent_draws():
    n = 100_000
    a = draws.uniform(1, 0, 0, n)
    for other in (draws.uniform(2, 0, 0, n), draws.uniform(1, 1, 0, n), draws.uniform(1, 0, 1, n)):
        assert not torch.equal(a, other)
        assert (a == other).sum() < 5
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 5 / math.sqrt(n)
    assert torch.equal(a, draws.uniform(1, 0, 0, n))  # and the same again


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws():
    for dtype in (torch.float64, torch.float32):
        cpu = draws.uniform(99, 2, 10**9, 1_000_003, dtype=dtype)
        assert torch.equal(draws.uniform(99, 2, 10**9, 1_000_003, "cuda", dtype).cpu(), cpu)


def test_the_fused_kernels_draws_are_the_tensor_versions():
    """sparse_kernels' splitmix64 (uint64 in numba) gives draws.bits' values, and DARE's integer keep
    threshold the float64 uniform's comparison with the density."""
    import numpy as np

    from merger.methods import sparse_kernels
    from merger.methods.sparse import _draw_threshold

    for seed, stream, start in [(0, 0, 0), (2**63 - 1, 7, 10**12), (12345, 2, 2**40 - 3)]:
        key = draws.stream_key(seed, stream)
        got = [int(sparse_kernels._mix(np.uint64((key + (start + j + 1) * draws.GAMMA) % 2**64))) for j in range(50)]
        assert got == [b % 2**64 for b in draws.bits(seed, stream, start, 50).tolist()]
    z = [b % 2**64 for b in draws.bits(5, 1, 0, 100_000).tolist()]
    u = draws.uniform(5, 1, 0, 100_000)
    for density in (0.3, 0.5, 1e-9, 1 - 2**-53, 0.7000000000000001):
        keep = [v < _draw_threshold(density) for v in z]
        assert keep == (u < density).tolist()

"""Fused CPU kernels (numba) for merger.methods.interpolation: slerp, nuslerp, multislerp, karcher, nearswap.

The same bytes as the torch path (Sphere.prepare and Sphere.fn, nearswap): the Gram matrix's dot
products are summed as the same rounded integers (exact, so the order does not matter), the
coefficients come from the same float64 functions, and each entry is combined with the same float32
operations in the same order (no FMA, no fast-math: see merger.kernels). Two passes over a tensor:
the Gram matrix's integer sums (at scales guessed from the tensor's first entries, and each vector's largest
magnitude, which checks them: fixed_point.gram_by_guess), then the combination.

The vectors come from the inputs in one of three ways (`mode`): PLAIN, the models' tensors; BASE_FIRST,
the base and then the models' (slerp, karcher with a base); TASK, each model's minus the base, the base
added back at the end (nuslerp and multislerp with a base). The base is its own argument (its dtype may
differ from the models'); without one it is an empty array that nothing reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit

from merger.kernels import BLOCK, U, _bits_of_f32, borrow, copy_as, keep_alive, kernel, lend, load, rounded, store
from merger.methods import fixed_point
from merger.methods.base import MergeRange, TensorContext
from merger.methods.fixed_point import LOW, SPLIT, from_sums, gram_by_guess, pair_scale

PLAIN, BASE_FIRST, TASK = 0, 1, 2
GRAM_BLOCK = 1024  # entries per inner loop of the Gram pass (its float32 vectors stay in L1); at most 2**11, so
# that a block's sum of integers below 2**51 stays below 2**62 (fixed_point)
PART = 1 << 20  # the fewest entries per thread's share of the passes over the whole tensor
ABS = np.uint32(0x7FFFFFFF)


@kernel
def _vectors(xs, b, mode, st, m, vs):  # pragma: no cover - compiled
    """vs[j, :m] = vector j's entries [st, st + m) in float32 (as the torch path's chunks hold them)."""
    first = 0
    if mode == BASE_FIRST:
        for i in range(m):
            vs[0, i] = load(b, U(st + i))
        first = 1
    for j in range(len(xs)):
        x = xs[j]
        row = vs[first + j]
        if mode == TASK:
            for i in range(m):
                row[i] = load(x, U(st + i)) - load(b, U(st + i))
        else:
            for i in range(m):
                row[i] = load(x, U(st + i))


@njit(inline="always")
def _track(vs, m, top):  # pragma: no cover - compiled
    """top[j, i] = the largest bit pattern of |vs[j, i]| so far, i < m: a float32's magnitude orders like its
    bits, and NaN's lie above inf's. Kept per lane (the loop vectorizer leaves a running maximum alone)."""
    for j in range(vs.shape[0]):
        row = vs[j]
        t = top[j]
        for i in range(m):
            v = _bits_of_f32(row[i]) & ABS
            t[i] = v if v > t[i] else t[i]


@njit(inline="always")
def _tops(top):  # pragma: no cover - compiled
    """Each vector's largest bit pattern over its lanes."""
    out = np.zeros(top.shape[0], np.uint32)
    for j in range(top.shape[0]):
        for i in range(top.shape[1]):
            out[j] = max(out[j], top[j, i])
    return out


@kernel
def _peak_bits(xs, b, mode, k, start, stop):  # pragma: no cover - compiled
    """Per vector, the largest bit pattern of |v| over entries [start, stop)."""
    xs, b, mode, k, start, stop = borrow((xs, b, mode, k, start, stop))
    top_own, top = lend(np.zeros((k, BLOCK), np.uint32))
    vs_own, vs = lend(np.empty((k, BLOCK), np.float32))
    for st in range(start, stop, BLOCK):
        m = min(BLOCK, stop - st)
        _vectors(xs, b, mode, st, m, vs)
        _track(vs, m, top)
    keep_alive((top_own, vs_own))
    return _tops(top_own)


@njit(inline="always")
def _pair_sum(vi, vj, m, scale):  # pragma: no cover - compiled
    """The sum over e < m of round(float64(vi[e]) * float64(vj[e]) * scale), fixed_point's integers (exact
    in int64: at most 2**11 of them, each at most 2**51 in magnitude). Each is taken as an integer per entry:
    numba's integer adds promise LLVM no signed overflow (nsw), so a sum of the float patterns themselves
    (merger.kernels.ROUND's), past 2**63 by the second, would rest on wrapping that LLVM may assume away."""
    s = np.int64(0)
    for i in range(m):
        s += rounded(np.float64(vi[i]) * np.float64(vj[i]) * scale)
    return s


@njit(inline="always")
def _sums_of_two(va, vb, m, s0, s1, s2):  # pragma: no cover - compiled
    """_pair_sum of the three pairs of two vectors, (va, va), (va, vb) and (vb, vb), in one loop."""
    t0 = t1 = t2 = np.int64(0)
    for i in range(m):
        a = np.float64(va[i])
        c = np.float64(vb[i])
        t0 += rounded(a * a * s0)
        t1 += rounded(a * c * s1)
        t2 += rounded(c * c * s2)
    return t0, t1, t2


@njit(inline="always")
def _add_split(acc, p, seg, t):  # pragma: no cover - compiled
    """acc[:, p, seg] += pair p's sum t, as its high and low parts."""
    acc[0, p, seg] += t >> SPLIT
    acc[1, p, seg] += t & LOW


@kernel
def _gram_rows(xs, b, mode, scale, pi, pj, length, start, stop, acc):  # pragma: no cover - compiled
    """Add the integer sums of the segments of `length` consecutive entries over [start, stop) to
    acc[part, pair, segment], high and low parts (segment 0 alone where acc has one column: a share of the
    whole tensor); scale[p]: pair p's power of two. Returns each vector's largest bit pattern of |v| there
    (_peak_bits)."""
    xs, b, mode, scale, pi, pj, length, start, stop, acc = borrow(
        (xs, b, mode, scale, pi, pj, length, start, stop, acc)
    )
    k = len(xs) + (mode == BASE_FIRST)
    vs_own, vs = lend(np.empty((k, GRAM_BLOCK), np.float32))
    top_own, top = lend(np.zeros((k, GRAM_BLOCK), np.uint32))
    st = start
    while st < stop:
        end = min(stop, (st // length + 1) * length)  # the end of this segment's entries here
        seg = st // length if acc.shape[2] > 1 else 0
        for s in range(st, end, GRAM_BLOCK):
            m = min(GRAM_BLOCK, end - s)
            _vectors(xs, b, mode, s, m, vs)
            _track(vs, m, top)
            if k == 2:  # pairs (0, 0), (0, 1), (1, 1): each entry loaded once (a quarter less time than three)
                sums = _sums_of_two(vs[0], vs[1], m, scale[0], scale[1], scale[2])
                for p in range(3):
                    _add_split(acc, p, seg, sums[p])
            else:
                for p in range(pi.size):
                    _add_split(acc, p, seg, _pair_sum(vs[pi[p]], vs[pj[p]], m, scale[p]))
        st = end
    keep_alive((vs_own, top_own))
    return _tops(top_own)


@kernel
def _gram_columns(xs, b, mode, scale, pi, pj, count, c0, c1, acc):  # pragma: no cover - compiled
    """Add the integer sums of the strided vectors (entry i in vector i % count) c0 <= c < c1 to
    acc[part, pair, c], high and low parts. Returns each vector's largest bit pattern of |v| there (_peak_bits)."""
    xs, b, mode, scale, pi, pj, count, c0, c1, acc = borrow((xs, b, mode, scale, pi, pj, count, c0, c1, acc))
    k = len(xs) + (mode == BASE_FIRST)
    vs_own, vs = lend(np.empty((k, BLOCK), np.float32))
    top_own, top = lend(np.zeros((k, BLOCK), np.uint32))
    for r in range(xs[0].size // count):
        for c in range(c0, c1, BLOCK):
            m = min(BLOCK, c1 - c)
            _vectors(xs, b, mode, r * count + c, m, vs)
            _track(vs, m, top)
            for p in range(pi.size):
                vi, vj, s = vs[pi[p]], vs[pj[p]], scale[p]
                high, low = acc[0, p], acc[1, p]
                for i in range(m):
                    t = rounded(np.float64(vi[i]) * np.float64(vj[i]) * s)
                    high[U(c + i)] += t >> SPLIT
                    low[U(c + i)] += t & LOW
    keep_alive((vs_own, top_own))
    return _tops(top_own)


@kernel
def _coefficients(coefs, length, strided, st, m, cs):  # pragma: no cover - compiled
    """cs[j, i] = vector j's coefficient at flat entry st + i: its segment's row of coefs (count, k)."""
    count = coefs.shape[0]
    seg = st % count if strided else st // length
    pos = 0 if strided else st % length
    for i in range(m):
        for j in range(coefs.shape[1]):
            cs[j, i] = coefs[seg, j]
        if strided:
            seg = seg + 1 if seg + 1 < count else 0
        else:
            pos += 1
            if pos == length:
                pos = 0
                seg += 1


@kernel
def _combine(xs, b, mode, coefs, length, strided, start, out):  # pragma: no cover - compiled
    """out[i] = sum_j c_j * v_j at flat entry start + i, the terms added in order (then the base, in
    TASK mode), in float32, as interpolation.combine adds them."""
    xs, b, mode, coefs, length, strided, start, out = borrow((xs, b, mode, coefs, length, strided, start, out))
    n = out.size
    k = coefs.shape[1]
    vs_own, vs = lend(np.empty((k, BLOCK), np.float32))
    cs_own, cs = lend(np.empty((k, BLOCK), np.float32))
    acc_own, acc = lend(np.empty(BLOCK, np.float32))
    whole = coefs.shape[0] == 1
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        _vectors(xs, b, mode, start + st, m, vs)
        if not whole:
            _coefficients(coefs, length, strided, start + st, m, cs)
        for j in range(k):
            row = vs[j]
            if whole:
                c = coefs[0, j]
                if j == 0:
                    for i in range(m):
                        acc[i] = row[i] * c
                else:
                    for i in range(m):
                        acc[i] += row[i] * c
            else:
                cj = cs[j]
                if j == 0:
                    for i in range(m):
                        acc[i] = row[i] * cj[i]
                else:
                    for i in range(m):
                        acc[i] += row[i] * cj[i]
        if mode == TASK:
            for i in range(m):
                acc[i] += load(b, U(start + st + i))
        for i in range(m):
            store(out, U(st + i), acc[i])
    keep_alive((vs_own, cs_own, acc_own))


@kernel
def _nearswap(x, b, t, start, out):  # pragma: no cover - compiled
    """interpolation.nearswap's float32 operations: w = clamp(t * (1 / max(|b - x|, 1e-6)), 0, 1),
    x * w + (1 - w) * b; NaN propagates through the clamps as torch's does."""
    lo = np.float32(1e-6)
    zero = np.float32(0)
    one = np.float32(1)
    for i in range(out.size):
        xv = load(x, U(start + i))
        bv = load(b, U(start + i))
        d = abs(bv - xv)
        d = lo if d < lo else d
        w = one / d * t
        w = zero if w < zero else w
        w = one if w > one else w
        store(out, U(i), xv * w + (-w + one) * bv)


# ---------------------------------------------------------------------------------------------------
# Whole tensors: the passes, on the engine's threads.


def mode_of(vectors: str, with_base: bool) -> int:
    """How a Sphere's vectors come from the inputs (Sphere.vectors: pair, task or all)."""
    if not with_base:
        return PLAIN
    return TASK if vectors == "task" else BASE_FIRST


def _magnitudes(tops) -> list[float]:
    """Bit patterns of magnitudes (k,) as floats, NaN's as NaN."""
    return [math.nan if t > 0x7F800000 else float(np.uint32(t).view(np.float32)) for t in tops]


def _largest(tops: list, k: int) -> list[float]:
    """The parts' largest bit patterns (each (k,)) as each vector's largest magnitude."""
    return _magnitudes(np.max(np.stack(tops), axis=0) if tops else np.zeros(k, np.uint32))


def peaks(xs: tuple, b: np.ndarray, mode: int, k: int, run) -> list[float]:
    """Each vector's largest magnitude over the whole tensor (NaN where it holds any)."""
    n = xs[0].size
    return _largest(run(lambda s, e: _peak_bits(xs, b, mode, k, s, e), n, max(PART, -(-n // 16))), k)


def sample_peaks(xs: tuple, b: np.ndarray, mode: int, k: int) -> list[float]:
    """Each vector's largest magnitude over the tensor's first fixed_point.SAMPLE entries."""
    return _magnitudes(_peak_bits(xs, b, mode, k, 0, min(xs[0].size, fixed_point.SAMPLE)))


def gram_sums(
    xs: tuple, b: np.ndarray, mode: int, exps: Sequence[int], segments, run
) -> tuple[np.ndarray, list[float]]:
    """The Gram matrix's integer sums (2, pairs, count), high and low parts, as interpolation.gram sums them,
    and each vector's largest magnitude (NaN where it holds any)."""
    k = len(exps)
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    pi = np.array([i for i, _ in pairs], np.int64)
    pj = np.array([j for _, j in pairs], np.int64)
    scale = np.array([pair_scale(exps[i], exps[j]) for i, j in pairs])
    n, count, length = xs[0].size, segments.count, segments.length
    acc = np.zeros((2, len(pairs), count), np.int64)
    if segments.strided:  # threads take columns, each adding to its own
        args = (xs, b, mode, scale, pi, pj, count)
        tops = run(lambda s, e: _gram_columns(*args, s, e, acc), count, max(BLOCK, -(-count // 16)))
        return acc, _largest(tops, k)
    args = (xs, b, mode, scale, pi, pj, length)
    if count > 1:  # threads take whole rows, each adding to its own
        tops = run(lambda s, e: _gram_rows(*args, s * length, e * length, acc), count, max(1, PART // length))
        return acc, _largest(tops, k)
    # threads take shares of the one vector, summed after
    parts = run(lambda s, e: _gram_part(args, s, e, len(pairs)), n, max(PART, -(-n // 16)))
    for part, _ in parts:
        acc += part  # exact: fixed_point's bounds
    return acc, _largest([top for _, top in parts], k)


def _gram_part(args: tuple, start: int, stop: int, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    acc = np.zeros((2, pairs, 1), np.int64)
    return acc, _gram_rows(*args, start, stop, acc)


def combine_range(xs: tuple, b: np.ndarray, mode: int, coefs: np.ndarray, segments, run) -> MergeRange:
    """merge_range for sum_j coefs[segment, j] * v_j (coefs (count, k) float64, cast to float32 as the
    torch path casts them)."""
    c32 = np.ascontiguousarray(coefs, dtype=np.float32)
    length, strided = max(segments.length, 1), segments.strided

    def merge_range(start: int, end: int, out) -> None:
        run(lambda s, e: _combine(xs, b, mode, c32, length, strided, start + s, out[s:e]), end - start)

    return merge_range


def copy_range(x: np.ndarray, run) -> MergeRange:
    def merge_range(start: int, end: int, out) -> None:
        run(lambda s, e: copy_as(x, start + s, out[s:e]), end - start)

    return merge_range


def nearswap_range(x: np.ndarray, b: np.ndarray, t: float, run) -> MergeRange:
    t32 = np.float32(t)

    def merge_range(start: int, end: int, out) -> None:
        run(lambda s, e: _nearswap(x, b, t32, start + s, out[s:e]), end - start)

    return merge_range


def sphere_fused(sphere, tensors, base, models: Sequence[Any], params: Any, run, context: TensorContext | None):
    """Sphere.fused: Sphere.prepare's passes as kernels, then the combination in ranges."""
    xs = tuple(tensors)
    numel = xs[0].size
    shape = context.shape if context is not None and context.shape else (numel,)
    segments = sphere.segments(shape, params)
    mode = mode_of(sphere.vectors, base is not None)
    b = base if base is not None else np.empty(0, xs[0].dtype)
    if numel == 0:
        return copy_range(xs[0], run)
    k = len(xs) + (mode == BASE_FIRST)

    def gram_at(exps: list[int]) -> tuple[np.ndarray, list[float]]:
        sums, found = gram_sums(xs, b, mode, exps, segments, run)
        return from_sums(sums, exps, k), found

    sample = sample_peaks(xs, b, mode, k)
    G = gram_by_guess(sample, gram_at, lambda: peaks(xs, b, mode, k, run), segments.count)
    coefs = sphere.coefficients(G, models, params, context)
    if coefs is None:
        return copy_range(xs[0], run)
    return combine_range(xs, b, mode, coefs, segments, run)

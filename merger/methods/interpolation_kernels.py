"""Fused CPU kernels (numba) for merger.methods.interpolation: slerp, nuslerp, multislerp, karcher, nearswap.

The same bytes as the torch path (Sphere.prepare and Sphere.fn, nearswap): the Gram matrix's dot
products are summed in the same fixed-point digits (exact, so the order does not matter), the
coefficients come from the same float64 functions, and each entry is combined with the same float32
operations in the same order (no FMA, no fast-math: see merger.kernels). Two passes over a tensor:
the Gram matrix's digit sums (at scales guessed from the tensor's first entries, and each vector's largest
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
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from merger.kernels import BLOCK, U, _bits_of_f32, borrow, keep_alive, kernel, lend, load, store
from merger.methods import fixed_point
from merger.methods.base import MergeRange, TensorContext
from merger.methods.fixed_point import LIMBS, digit_bits, from_limbs, gram_by_guess

PLAIN, BASE_FIRST, TASK = 0, 1, 2
GRAM_BLOCK = 1024  # entries per inner loop of the Gram pass (its float32 vectors stay in L1)
LANES = 8  # the Gram pass's digit sums: float64 lanes, in registers
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


@kernel
def _scaled(xs, b, mode, st, m, vs, scale, scale_hi, w, w_hi):  # pragma: no cover - compiled
    """The vectors' entries [st, st + m) in float64 times scale[j] (into w) and scale_hi[j] (w_hi):
    powers of two, so exact."""
    _vectors(xs, b, mode, st, m, vs)
    for j in range(vs.shape[0]):
        s = scale[j]
        sh = scale_hi[j]
        for i in range(m):
            v = np.float64(vs[j, i])
            w[j, i] = v * s
            w_hi[j, i] = v * sh


def _splat(builder, x, n):
    """x in every lane of an n-vector."""
    vt = ir.VectorType(x.type, n)
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(i32, n), [0] * n))


@intrinsic
def _lane_digits(typingctx, vi, vj, m, scale, two):
    """(sum d0, sum d1, sum d2) over entries e < m - m % LANES of float32 arrays vi, vj: the digits of
    q = float64(vi[e]) * float64(vj[e]) * scale (exact), as _digits cuts them, summed in LANES float64
    lanes kept in registers (the loop vectorizer leaves such sums alone without fast-math; they are
    exact integers, so their order does not matter)."""
    if vi.dtype != types.float32 or vj.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        v8 = ir.VectorType(ir.DoubleType(), LANES)
        f32s = ir.VectorType(ir.FloatType(), LANES).as_pointer()
        pi = context.make_array(sig.args[0])(context, builder, args[0]).data
        pj = context.make_array(sig.args[1])(context, builder, args[1]).data
        scale, two = _splat(builder, args[3], LANES), _splat(builder, args[4], LANES)
        trunc = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8]), f"llvm.trunc.v{LANES}f64")
        sums = [cgutils.alloca_once_value(builder, ir.Constant(v8, [0.0] * LANES)) for _ in range(3)]
        stop = builder.and_(args[2], ir.Constant(args[2].type, -LANES))
        with cgutils.for_range_slice(builder, ir.Constant(stop.type, 0), stop, ir.Constant(stop.type, LANES)) as (i, _):
            a = builder.fpext(builder.load(builder.bitcast(builder.gep(pi, [i]), f32s), align=4), v8)
            c = builder.fpext(builder.load(builder.bitcast(builder.gep(pj, [i]), f32s), align=4), v8)
            q = builder.fmul(builder.fmul(a, c), scale)
            for limb in range(3):
                d = builder.call(trunc, [q])
                builder.store(builder.fadd(builder.load(sums[limb]), d), sums[limb])
                q = builder.fmul(builder.fsub(q, d), two)
        out = []
        for acc in sums:
            v = builder.load(acc)
            total = builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
            for lane in range(1, LANES):
                total = builder.fadd(total, builder.extract_element(v, ir.Constant(ir.IntType(32), lane)))
            out.append(total)
        return context.make_tuple(builder, sig.return_type, out)

    return types.UniTuple(types.float64, 3)(vi, vj, m, scale, two), codegen


@kernel
def _pair_sums(vi, vj, m, scale, two):  # pragma: no cover - compiled
    """The three digit sums of float64(vi[e]) * float64(vj[e]) * scale over e < m (see _digits)."""
    s0, s1, s2 = _lane_digits(vi, vj, m, scale, two)
    for i in range(m - m % LANES, m):
        q = np.float64(vi[i]) * np.float64(vj[i]) * scale
        d0 = np.trunc(q)
        q = (q - d0) * two
        d1 = np.trunc(q)
        q = (q - d1) * two
        s0 += d0
        s1 += d1
        s2 += np.trunc(q)
    return s0, s1, s2


@kernel
def _digits(w, w_hi, pi, pj, two, m, lanes, at):  # pragma: no cover - compiled
    """For each pair p and entry i < m: q = w_hi[pi[p], i] * w[pj[p], i] (exact, |q| < 2**bits) cut
    into three digits of `bits` bits, truncated as interpolation.gram cuts them; each added to
    lanes[limb, p, at + i]. Every partial sum stays an exact integer."""
    for p in range(pi.size):
        a = w_hi[pi[p]]
        c = w[pj[p]]
        l0 = lanes[0, p]
        l1 = lanes[1, p]
        l2 = lanes[2, p]
        for i in range(m):
            q = a[i] * c[i]
            d0 = np.trunc(q)
            q = (q - d0) * two
            d1 = np.trunc(q)
            q = (q - d1) * two
            l0[U(at + i)] += d0
            l1[U(at + i)] += d1
            l2[U(at + i)] += np.trunc(q)


@kernel
def _gram_rows(xs, b, mode, scale, pi, pj, two, length, start, stop, acc):  # pragma: no cover - compiled
    """Add the digit sums of the segments of `length` consecutive entries over [start, stop) to
    acc[limb, pair, segment] (segment 0 alone where acc has one column: a share of the whole tensor);
    scale[p]: pair p's power of two. Returns each vector's largest bit pattern of |v| there (_peak_bits)."""
    xs, b, mode, scale, pi, pj, two, length, start, stop, acc = borrow(
        (xs, b, mode, scale, pi, pj, two, length, start, stop, acc)
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
            for p in range(pi.size):
                d0, d1, d2 = _pair_sums(vs[pi[p]], vs[pj[p]], m, scale[p], two)
                acc[0, p, seg] += d0
                acc[1, p, seg] += d1
                acc[2, p, seg] += d2
        st = end
    keep_alive((vs_own, top_own))
    return _tops(top_own)


@kernel
def _gram_columns(xs, b, mode, scale, scale_hi, pi, pj, two, count, c0, c1, acc):  # pragma: no cover
    """Add the digit sums of the strided vectors (entry i in vector i % count) c0 <= c < c1 to
    acc[limb, pair, c]. Returns each vector's largest bit pattern of |v| there (_peak_bits)."""
    xs, b, mode, scale, scale_hi, pi, pj, two, count, c0, c1, acc = borrow(
        (xs, b, mode, scale, scale_hi, pi, pj, two, count, c0, c1, acc)
    )
    k = scale.size
    vs_own, vs = lend(np.empty((k, BLOCK), np.float32))
    w_own, w = lend(np.empty((k, BLOCK), np.float64))
    w_hi_own, w_hi = lend(np.empty((k, BLOCK), np.float64))
    top_own, top = lend(np.zeros((k, BLOCK), np.uint32))
    for r in range(xs[0].size // count):
        for c in range(c0, c1, BLOCK):
            m = min(BLOCK, c1 - c)
            _scaled(xs, b, mode, r * count + c, m, vs, scale, scale_hi, w, w_hi)
            _track(vs, m, top)
            _digits(w, w_hi, pi, pj, two, m, acc, c)
    keep_alive((vs_own, w_own, w_hi_own, top_own))
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
def _copy(x, start, out):  # pragma: no cover - compiled
    """out = x's entries from `start`, as float32 would hold them, in out's dtype."""
    for i in range(out.size):
        store(out, U(i), load(x, U(start + i)))


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
    xs: tuple, b: np.ndarray, mode: int, exps: Sequence[int], bits: int, segments, run
) -> tuple[np.ndarray, list[float]]:
    """The Gram matrix's digit sums (LIMBS, pairs, count), as interpolation.gram sums them, and each
    vector's largest magnitude (NaN where it holds any)."""
    k = len(exps)
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    pi = np.array([i for i, _ in pairs], np.int64)
    pj = np.array([j for _, j in pairs], np.int64)
    two = 2.0**bits
    n, count, length = xs[0].size, segments.count, segments.length
    acc = np.zeros((3, len(pairs), count))
    if segments.strided:  # threads take columns, each adding to its own
        scale = np.array([2.0**-e for e in exps])
        scale_hi = np.array([2.0 ** (bits - e) for e in exps])
        args = (xs, b, mode, scale, scale_hi, pi, pj, two, count)
        tops = run(lambda s, e: _gram_columns(*args, s, e, acc), count, max(BLOCK, -(-count // 16)))
        return acc, _largest(tops, k)
    args = (xs, b, mode, np.array([2.0 ** (bits - exps[i] - exps[j]) for i, j in pairs]), pi, pj, two, length)
    if count > 1:  # threads take whole rows, each adding to its own
        tops = run(lambda s, e: _gram_rows(*args, s * length, e * length, acc), count, max(1, PART // length))
        return acc, _largest(tops, k)
    # threads take shares of the one vector, summed after
    parts = run(lambda s, e: _gram_part(args, s, e, len(pairs)), n, max(PART, -(-n // 16)))
    for part, _ in parts:
        acc += part  # exact: integers below 2**52
    return acc, _largest([top for _, top in parts], k)


def _gram_part(args: tuple, start: int, stop: int, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    acc = np.zeros((3, pairs, 1))
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
        run(lambda s, e: _copy(x, start + s, out[s:e]), end - start)

    return merge_range


def nearswap_range(x: np.ndarray, b: np.ndarray, t: float, run) -> MergeRange:
    t32 = np.float32(t)

    def merge_range(start: int, end: int, out) -> None:
        run(lambda s, e: _nearswap(x, b, t32, start + s, out[s:e]), end - start)

    return merge_range


def sphere_fused(sphere, tensors, base, models: Sequence[Any], params: Any, run, context: TensorContext | None):
    """Sphere.fused: Sphere.prepare's passes as kernels, then the combination in ranges."""
    assert LIMBS == 3, "the kernels cut three digits"
    xs = tuple(tensors)
    numel = xs[0].size
    shape = context.shape if context is not None and context.shape else (numel,)
    segments = sphere.segments(shape, params)
    mode = mode_of(sphere.vectors, base is not None)
    b = base if base is not None else np.empty(0, xs[0].dtype)
    if numel == 0:
        return copy_range(xs[0], run)
    k = len(xs) + (mode == BASE_FIRST)
    bits = digit_bits(segments.length)

    def gram_at(exps: list[int]) -> tuple[np.ndarray, list[float]]:
        sums, found = gram_sums(xs, b, mode, exps, bits, segments, run)
        return from_limbs(sums, exps, bits, k), found

    sample = sample_peaks(xs, b, mode, k)
    G = gram_by_guess(sample, gram_at, lambda: peaks(xs, b, mode, k, run), segments.count)
    coefs = sphere.coefficients(G, models, params, context)
    if coefs is None:
        return copy_range(xs[0], run)
    return combine_range(xs, b, mode, coefs, segments, run)

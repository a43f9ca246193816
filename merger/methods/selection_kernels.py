"""Fused CPU kernels (numba) for merger.methods.selection: Model Stock, Arcee Fusion, RAM and RAM+.

Each reads the stored bytes (bfloat16, float16 or float32, as merger.kernels' `load`) and does, per entry, the
same float32 operations in the same order as the torch path in selection.py (no fast-math, no FMA), so that
the output is the same bytes. Whole-tensor statistics are the torch path's too: Model Stock's and Arcee
Fusion's sums as the same two int64 limbs per float64 term (integer sums: any order gives the same), RAM+'s
counts in integers; what follows from the sums is computed by the same numpy code in both paths
(selection.stock_ratio, selection.fusion_kl).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from merger.kernels import BLOCK, Runner, U, _bits_of_f32, kernel, load, store

_MAGIC = 6755399441055744.0  # 1.5 * 2**52: h + _MAGIC holds an integer h, |h| <= 2**51, in its low bits
_TWO52 = 4503599627370496.0  # 2**52: f + _TWO52 rounds f in [0, 2**51] to an integer, ties to even
FAST_BITS = 51  # limbs of at most this many bits take the bit tricks above (rows of 1024 entries or more)


@intrinsic
def _bits_of_f64(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


# --- Model Stock ---------------------------------------------------------------------------------------------


@kernel
def _abs_peaks(xs, b):  # pragma: no cover - compiled
    """Per model, the bits of max |x_j - b| in float32 (as unsigned: they order like the magnitudes, and a
    NaN above every number, as torch's amax propagates it)."""
    n = b.size
    peaks = np.zeros(len(xs), np.uint32)
    bf = np.empty(BLOCK, np.float32)
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        for i in range(m):
            bf[i] = load(b, U(st + i))
        for j in range(len(xs)):
            x = xs[j]
            top = peaks[j]
            for i in range(m):
                top = max(top, _bits_of_f32(load(x, U(st + i)) - bf[i]) & np.uint32(0x7FFFFFFF))
            peaks[j] = top
    return peaks


@kernel
def _limb_sums(a, c, m, scale, fast):  # pragma: no cover - compiled
    """sum floor(v) and sum rint(frac(v) * scale), v = a[i] * c[i] * scale over i < m: selection._limbs' two
    limbs summed. fast (scale <= 2**51): the conversions to int64 as bit tricks, which vectorize."""
    hs = np.int64(0)
    ls = np.int64(0)
    if fast:
        mb = _bits_of_f64(_MAGIC)
        tb = _bits_of_f64(_TWO52)
        for i in range(m):
            v = a[i] * c[i] * scale
            h = np.floor(v)
            hs += _bits_of_f64(h + _MAGIC) - mb
            ls += _bits_of_f64((v - h) * scale + _TWO52) - tb
    else:
        for i in range(m):
            v = a[i] * c[i] * scale
            h = np.floor(v)
            hs += np.int64(h)
            ls += np.int64(np.rint((v - h) * scale))
    return hs, ls


@kernel
def _stock_sums(xs, b, scale, limb, cols, offset, hi, lo):  # pragma: no cover - compiled
    """Model Stock's exact dot products of every pair (i <= j) of scaled task vectors over a flat range
    starting at `offset`: hi[p, r], lo[p, r] += the limb sums of row offset // cols + r."""
    n = b.size
    nm = len(xs)
    fast = limb <= 2.0**FAST_BITS
    sd = np.empty((nm, BLOCK), np.float64)
    bf = np.empty(BLOCK, np.float32)
    row0 = offset // cols
    pos = 0
    while pos < n:
        r = (offset + pos) // cols - row0
        end = min(n, (row0 + r + 1) * cols - offset)
        for st in range(pos, end, BLOCK):
            m = min(BLOCK, end - st)
            for i in range(m):
                bf[i] = load(b, U(st + i))
            for j in range(nm):
                x = xs[j]
                s = scale[j]
                dj = sd[j]
                for i in range(m):
                    dj[i] = np.float64(load(x, U(st + i)) - bf[i]) * s  # exact: a power of two
            p = 0
            for i in range(nm):
                for j in range(i, nm):
                    h, low = _limb_sums(sd[i], sd[j], m, limb, fast)
                    hi[p, r] += h
                    lo[p, r] += low
                    p += 1
        pos = end


@kernel
def _stock_merge(xs, b, out, t, cols, offset, inv):  # pragma: no cover - compiled
    """(x_0 + ... + x_{n-1}) * inv * t + b * (1 - t), t of each entry's row: selection.model_stock."""
    n = b.size
    one = np.float32(1)
    mean = np.empty(BLOCK, np.float32)
    pos = 0
    while pos < n:
        row = (offset + pos) // cols
        end = min(n, (row + 1) * cols - offset)
        tr = t[row]
        rest = one - tr
        for st in range(pos, end, BLOCK):
            m = min(BLOCK, end - st)
            x0 = xs[0]
            for i in range(m):
                mean[i] = load(x0, U(st + i))
            for j in range(1, len(xs)):
                x = xs[j]
                for i in range(m):
                    mean[i] += load(x, U(st + i))
            for i in range(m):
                store(out, U(st + i), mean[i] * inv * tr + load(b, U(st + i)) * rest)
        pos = end


def abs_peaks(xs: Sequence[np.ndarray], base: np.ndarray, run: Runner) -> np.ndarray:
    """max |x_j - base| per model, float32."""
    xs = tuple(xs)
    parts = run(lambda s, e: _abs_peaks(tuple(x[s:e] for x in xs), base[s:e]), base.size)
    return np.maximum.reduce(parts).view(np.float32) if parts else np.zeros(len(xs), np.float32)


def stock_sums(
    xs: Sequence[np.ndarray], base: np.ndarray, scale: np.ndarray, bits: int, cols: int, rows: int, run: Runner
) -> tuple[np.ndarray, np.ndarray]:
    """The (pairs, rows) int64 limb sums selection._ExactRowSums holds after model_stock_prepare's second pass."""
    xs = tuple(xs)
    pairs = len(xs) * (len(xs) + 1) // 2
    limb = 2.0**bits

    def part(s: int, e: int):
        first, last = s // cols, (e - 1) // cols
        hi = np.zeros((pairs, last + 1 - first), np.int64)
        lo = np.zeros_like(hi)
        _stock_sums(tuple(x[s:e] for x in xs), base[s:e], scale, limb, cols, s, hi, lo)
        return first, hi, lo

    hi = np.zeros((pairs, rows), np.int64)
    lo = np.zeros_like(hi)
    for first, h, low in run(part, base.size):
        hi[:, first : first + h.shape[1]] += h
        lo[:, first : first + h.shape[1]] += low
    return hi, lo


def stock_merge(
    xs: Sequence[np.ndarray], base: np.ndarray, out: np.ndarray, t: np.ndarray, cols: int, start: int, run: Runner
) -> None:
    """Model Stock into `out` from flat index `start` (xs and base from there on, as many as out has)."""
    xs = tuple(xs)
    inv = np.float32(1 / len(xs))

    def part(s: int, e: int) -> None:
        _stock_merge(tuple(x[s:e] for x in xs), base[s:e], out[s:e], t, cols, start + s, inv)

    run(part, out.size)


# --- RAM and RAM+ --------------------------------------------------------------------------------------------


@kernel
def _ram_counts(xs, b, eps):  # pragma: no cover - compiled
    """Per model, its changed entries (|x_j - b| > eps) that another model changes too, and that it alone does."""
    n = b.size
    nm = len(xs)
    shared = np.zeros(nm, np.int64)
    unique = np.zeros(nm, np.int64)
    bf = np.empty(BLOCK, np.float32)
    count = np.empty(BLOCK, np.int32)
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        for i in range(m):
            bf[i] = load(b, U(st + i))
            count[i] = 0
        for j in range(nm):
            x = xs[j]
            for i in range(m):
                count[i] += np.int32(abs(load(x, U(st + i)) - bf[i]) > eps)
        for j in range(nm):
            x = xs[j]
            c = np.int32(0)  # changed entries of the block (c implies count >= 1: shared = changed - unique)
            u = np.int32(0)
            for i in range(m):
                ci = np.int32(abs(load(x, U(st + i)) - bf[i]) > eps)
                c += ci
                u += ci & np.int32(count[i] == 1)
            shared[j] += c - u
            unique[j] += u
    return shared, unique


@kernel
def _ram_merge(xs, b, out, eps, gains):  # pragma: no cover - compiled
    """selection._ram: base + per entry the one changing model's change (times gains[j], RAM+; gains empty:
    RAM), or the changes of several divided by their count."""
    n = b.size
    nm = len(xs)
    zero = np.float32(0)
    one = np.float32(1)
    scaled = gains.size > 0
    bf = np.empty(BLOCK, np.float32)
    count = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        for i in range(m):
            bf[i] = load(b, U(st + i))
            count[i] = zero
            acc[i] = zero
        for j in range(nm):
            x = xs[j]
            for i in range(m):
                count[i] += one if abs(load(x, U(st + i)) - bf[i]) > eps else zero
        for j in range(nm):
            x = xs[j]
            g = gains[j] if scaled else one
            for i in range(m):
                d = load(x, U(st + i)) - bf[i]
                changed = abs(d) > eps
                alone = d * g if scaled else d
                term = alone if changed & (count[i] == one) else (d / count[i] if changed & (count[i] > one) else zero)
                acc[i] += term
        for i in range(m):
            store(out, U(st + i), acc[i] + bf[i])


def ram_counts(xs: Sequence[np.ndarray], base: np.ndarray, epsilon: float, run: Runner) -> tuple[np.ndarray, ...]:
    """(shared, unique) int64 per model over the whole tensors, as selection.ramplus_prepare counts them."""
    xs = tuple(xs)
    eps = np.float32(epsilon)
    parts = run(lambda s, e: _ram_counts(tuple(x[s:e] for x in xs), base[s:e], eps), base.size)
    zero = np.zeros(len(xs), np.int64)
    return sum((p[0] for p in parts), zero), sum((p[1] for p in parts), zero)


def ram_merge(
    xs: Sequence[np.ndarray], base: np.ndarray, out: np.ndarray, epsilon: float, gains: np.ndarray | None, run: Runner
) -> None:
    xs = tuple(xs)
    eps = np.float32(epsilon)
    g = np.empty(0, np.float32) if gains is None else np.asarray(gains, np.float32)

    def part(s: int, e: int) -> None:
        _ram_merge(tuple(x[s:e] for x in xs), base[s:e], out[s:e], eps, g)

    run(part, out.size)

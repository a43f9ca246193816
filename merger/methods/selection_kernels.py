"""Fused CPU kernels (numba) for merger.methods.selection: Model Stock, Arcee Fusion, RAM and RAM+.

Each reads the stored bytes (bfloat16, float16 or float32, as merger.kernels' `load`) and does, per entry, the
same float32 operations in the same order as the torch path in selection.py (no fast-math, no FMA), so that
the output is the same bytes. Whole-tensor statistics are the torch path's too: Model Stock's and Arcee
Fusion's sums as the same two int64 limbs per float64 term (integer sums: any order gives the same), RAM+'s
counts in integers; what follows from the sums is computed by the same numpy code in both paths
(selection.stock_ratio). Arcee Fusion's exp and log are merger.methods.elementary's, operation for operation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from merger.kernels import (
    BLOCK,
    ROUND,
    ROUND_BITS,
    SAMPLE_RUN,
    Runner,
    U,
    _bits_of_f32,
    _bits_of_f64,
    _f32_from_bits,
    _f64_from_bits,
    band_block,
    borrow,
    keep_alive,
    kernel,
    lend,
    load,
    prefetch_run,
    radix_bin,
    rounded,
    sample_histograms,
    select_in_bands,
    store,
)
from merger.methods import elementary as el

ABS = np.uint32(0x7FFFFFFF)
INF = np.uint32(0x7F800000)  # the magnitude bits of inf: those of NaN are above
_BOUND_BITS = np.uint32(np.float32(el.TABLE_BOUND).view(np.uint32))  # |v| <= TABLE_BOUND: its bits <= these
FAST_BITS = 51  # limbs of at most this many bits take merger.kernels.rounded (rows of 1024 entries or more)


# --- Model Stock ---------------------------------------------------------------------------------------------


@kernel
def _abs_peaks(xs, b, finite):  # pragma: no cover - compiled
    """Per model, the bits of max |x_j - b| in float32 (as unsigned: they order like the magnitudes, NaN
    above inf); with `finite`, over its finite entries only (0 where none is)."""
    xs, b = borrow((xs, b))
    n = b.size
    peaks = np.zeros(len(xs), np.uint32)
    bf_own, bf = lend(np.empty(BLOCK, np.float32))
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        for i in range(m):
            bf[i] = load(b, U(st + i))
        for j in range(len(xs)):
            x = xs[j]
            top = peaks[j]
            if finite:
                for i in range(m):
                    v = _bits_of_f32(load(x, U(st + i)) - bf[i]) & ABS
                    top = max(top, v if v < INF else np.uint32(0))
            else:  # a plain maximum, which vectorises
                for i in range(m):
                    top = max(top, _bits_of_f32(load(x, U(st + i)) - bf[i]) & ABS)
            peaks[j] = top
    keep_alive((bf_own,))
    return peaks


@kernel
def _limb_sums(a, c, m, scale, fast):  # pragma: no cover - compiled
    """sum floor(v) and sum rint(frac(v) * scale), v = a[i] * c[i] * scale over i < m: selection._limbs' two
    limbs summed. fast (scale <= 2**51): the conversions to int64 as merger.kernels.rounded, which vectorizes."""
    hs = np.int64(0)
    ls = np.int64(0)
    if fast:
        for i in range(m):
            v = a[U(i)] * c[U(i)] * scale
            h = np.floor(v)
            hs += rounded(h)
            ls += rounded((v - h) * scale)
    else:
        for i in range(m):
            v = a[i] * c[i] * scale
            h = np.floor(v)
            hs += np.int64(h)
            ls += np.int64(np.rint((v - h) * scale))
    return hs, ls


@njit(inline="always")
def _mend_block(xs, bf, st, m, sd):  # pragma: no cover - compiled
    """A block's task-vector entries that are not finite set to 0 in sd (nm, BLOCK). Returns how many of its
    entries have one in any model."""
    count = 0
    for i in range(m):
        found = False
        for j in range(len(xs)):
            if (_bits_of_f32(load(xs[j], U(st + i)) - bf[i]) & ABS) >= INF:
                sd[j, i] = 0.0
                found = True
        count += found
    return count


@kernel
def _stock_sums(xs, b, scale, limb, cols, offset, hi, lo, bad, clean, peaks):  # pragma: no cover - compiled
    """Model Stock's exact dot products of every pair (i <= j) of scaled task vectors over a flat range
    starting at `offset`: hi[p, r], lo[p, r] += the limb sums of row offset // cols + r, a task vector's
    entries that are not finite taken as 0 there and counted (any model's) in bad[r]; unchecked where
    `clean` (every entry is finite, or the sums are not used where one is not). peaks[j]: the bits of
    max |x_j - b| (as _abs_peaks without `finite`), which tells whether the scales bounded the range."""
    xs, b, scale, limb, cols, offset, hi, lo, bad = borrow((xs, b, scale, limb, cols, offset, hi, lo, bad))
    n = b.size
    nm = len(xs)
    fast = limb <= 2.0**FAST_BITS
    sd_own, sd = lend(np.empty((nm, BLOCK), np.float64))
    bf_own, bf = lend(np.empty(BLOCK, np.float32))
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
                top = peaks[j]
                for i in range(m):
                    d = load(x, U(st + i)) - bf[i]
                    top = max(top, _bits_of_f32(d) & ABS)
                    dj[i] = np.float64(d) * s  # exact: a power of two
                peaks[j] = top
            if not clean:
                bad[r] += _mend_block(xs, bf, st, m, sd)
            p = 0
            for i in range(nm):
                for j in range(i, nm):
                    h, low = _limb_sums(sd[i], sd[j], m, limb, fast)
                    hi[p, r] += h
                    lo[p, r] += low
                    p += 1
        pos = end
    keep_alive((sd_own, bf_own))


@kernel
def _stock_merge(xs, b, out, t, cols, offset, inv):  # pragma: no cover - compiled
    """(x_0 + ... + x_{n-1}) * inv * t + b * (1 - t), t of each entry's row: selection.model_stock."""
    xs, b, out, t, cols, offset, inv = borrow((xs, b, out, t, cols, offset, inv))
    n = b.size
    one = np.float32(1)
    mean_own, mean = lend(np.empty(BLOCK, np.float32))
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
    keep_alive((mean_own,))


def abs_peaks(xs: Sequence[np.ndarray], base: np.ndarray, run: Runner) -> tuple[np.ndarray, bool]:
    """(max |x_j - base| per model over its finite entries, float32; whether every entry is finite): a plain
    maximum, then, where that is not finite (rare), the finite entries' in a second pass."""
    xs = tuple(xs)

    def peaks(finite: bool) -> np.ndarray:
        parts = run(lambda s, e: _abs_peaks(tuple(x[s:e] for x in xs), base[s:e], finite), base.size)
        return np.maximum.reduce(parts) if parts else np.zeros(len(xs), np.uint32)

    found = peaks(False)
    clean = bool((found < INF).all())
    return (found if clean else peaks(True)).view(np.float32), clean


def stock_sums(
    xs: Sequence[np.ndarray],
    base: np.ndarray,
    scale: np.ndarray,
    bits: int,
    cols: int,
    rows: int,
    run: Runner,
    clean: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The (pairs, rows) int64 limb sums selection._ExactRowSums holds after model_stock_prepare's sums pass,
    the (rows,) counts of entries where a task vector is not finite (not looked for where `clean`) and each
    task vector's largest magnitude (float32; inf or NaN where it holds one, and then a `clean` pass's sums
    mean nothing)."""
    xs = tuple(xs)
    pairs = len(xs) * (len(xs) + 1) // 2
    limb = 2.0**bits

    def part(s: int, e: int):
        first, last = s // cols, (e - 1) // cols
        hi = np.zeros((pairs, last + 1 - first), np.int64)
        lo = np.zeros_like(hi)
        bad = np.zeros(last + 1 - first, np.int64)
        peaks = np.zeros(len(xs), np.uint32)
        _stock_sums(tuple(x[s:e] for x in xs), base[s:e], scale, limb, cols, s, hi, lo, bad, clean, peaks)
        return first, hi, lo, bad, peaks

    hi = np.zeros((pairs, rows), np.int64)
    lo = np.zeros_like(hi)
    bad = np.zeros(rows, np.int64)
    peaks = np.zeros(len(xs), np.uint32)
    for first, h, low, b, p in run(part, base.size):
        hi[:, first : first + h.shape[1]] += h
        lo[:, first : first + h.shape[1]] += low
        bad[first : first + b.size] += b
        np.maximum(peaks, p, out=peaks)
    return hi, lo, bad, peaks.view(np.float32)


def stock_merge(
    xs: Sequence[np.ndarray], base: np.ndarray, out: np.ndarray, t: np.ndarray, cols: int, start: int, run: Runner
) -> None:
    """Model Stock into `out` from flat index `start` (xs and base from there on, as many as out has)."""
    xs = tuple(xs)
    inv = np.float32(1 / len(xs))

    def part(s: int, e: int) -> None:
        _stock_merge(tuple(x[s:e] for x in xs), base[s:e], out[s:e], t, cols, start + s, inv)

    run(part, out.size)


# --- Arcee Fusion --------------------------------------------------------------------------------------------

ROWS_PART = 1 << 16  # entries per part of the row pass (whole rows, at least one): a few hundred microseconds each
SCRATCH = 1 << 15  # a row's exps are kept for its divergence up to this many entries (two float64 arrays,
# 512 KiB); a longer row computes them again


@intrinsic
def _div(typingctx, a, b):  # a / b in float64 without Python's check for 0 (a branch: the loop would not vectorize)
    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return types.float64(types.float64, types.float64), codegen


@njit(inline="always")
def _pow2(k):  # 2.0 ** k for an integer-valued float64 k in [-1022, 1023], from the bits: elementary._pow2
    return _f64_from_bits((rounded(k) + 1023) << 52)


@njit(inline="always")
def _exp(v):  # elementary.exp_, operation for operation
    if v < el.EXP_FLOOR:  # not for NaN, as torch's clamp
        v = el.EXP_FLOOR
    k = np.floor(v * el.INV_LN2 + 0.5)
    hi = v - k * el.LN2_HI
    lo = k * el.LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (el.P1 + t * (el.P2 + t * (el.P3 + t * (el.P4 + t * el.P5))))
    y = 1.0 - ((lo - _div(r * c, 2.0 - c)) - hi)
    half = np.floor(k * 0.5)
    return y * _pow2(half) * _pow2(k - half)


@njit(inline="always")
def _log(x):  # elementary.log_, operation for operation (x positive and normal)
    bits = _bits_of_f64(x)
    e = np.int64(U(bits) >> U(52))  # x > 0: a logical shift, which AVX2 has for 64-bit lanes (not an arithmetic one)
    m = _f64_from_bits((bits & el.MANTISSA) | el.ONE_BITS)
    if m > el.SQRT2:
        m = m * 0.5
        e += 1
    dk = _f64_from_bits(ROUND_BITS + (e - 1023)) - ROUND
    f = m - 1.0
    hfsq = 0.5 * f * f
    s = _div(f, f + 2.0)
    z = s * s
    w = z * z
    t2 = z * (el.LG1 + w * (el.LG3 + w * (el.LG5 + w * el.LG7)))
    t1 = w * (el.LG2 + w * (el.LG4 + w * el.LG6))
    return s * (hfsq + (t2 + t1)) + dk * el.LN2_LO - hfsq + f + dk * el.LN2_HI


@njit(inline="always")
def _key(u):  # float32 bits as an int32 that orders like the value (NaN aside); its own inverse
    s = np.int32(u)
    return s ^ ((s >> np.int32(31)) & np.int32(0x7FFFFFFF))


@njit(inline="always")
def _row_peaks(x, b, o, cols):  # pragma: no cover - compiled
    """The maxima of x and b over the row at o (float32), whether either holds a NaN, and whether each one's
    entries are all bfloat16 values within el.TABLE_BOUND (their exps from the table): on integer keys,
    which vectorize where a float max does not (-0.0 and 0.0 may come out either way, as from torch.amax:
    exp(v - peak) is the same for both)."""
    kx = kb = np.int32(-0x80000000)
    inf = np.uint32(0x7F800000)  # above it (sign clear): NaN
    ax = ab = lx = lb = np.uint32(0)
    for i in range(cols):
        u = _bits_of_f32(load(x, U(o + i)))
        v = _bits_of_f32(load(b, U(o + i)))
        kx = max(kx, _key(u))
        kb = max(kb, _key(v))
        ax = max(ax, u & np.uint32(0x7FFFFFFF))
        ab = max(ab, v & np.uint32(0x7FFFFFFF))
        lx |= u & np.uint32(0xFFFF)
        lb |= v & np.uint32(0xFFFF)
    bad = (ax > inf) | (ab > inf)
    tabled = (lx == 0) & (ax <= _BOUND_BITS), (lb == 0) & (ab <= _BOUND_BITS)
    return _f32_from_bits(np.uint32(_key(kx))), _f32_from_bits(np.uint32(_key(kb))), bad, tabled


@njit(inline="always")
def _exps(v, start, m, peak, out, at, table, tabled):  # pragma: no cover - compiled
    """out[at + i] = exp(v[start + i] - peak), i < m: elementary.exp_diff's float64 exps (one input per loop:
    two in one spill registers). tabled: every entry is a bfloat16 value within el.TABLE_BOUND (so is the
    peak, their maximum): table[v] * exp(-peak) for all, without a branch per entry."""
    scale = _exp(-peak)
    if tabled:
        for i in range(m):
            out[U(at + i)] = table[_bits_of_f32(load(v, U(start + i))) >> np.uint32(16)] * scale
        return
    inside = abs(peak) <= el.TABLE_BOUND
    for i in range(m):
        f = load(v, U(start + i))
        u = _bits_of_f32(f)
        if inside and (u & np.uint32(0xFFFF)) == 0 and (u & np.uint32(0x7FFFFFFF)) <= _BOUND_BITS:
            out[U(at + i)] = table[u >> np.uint32(16)] * scale
        else:
            out[U(at + i)] = _exp(np.float64(f) - peak)


@njit(inline="always")
def _normaliser(v, start, cols, peak, e, keep, ones, limb, fast, table, tabled):  # pragma: no cover - compiled
    """The limb sums of exp(v - peak) over the row at `start` (selection's _ExactRowSums); e keeps the row's
    exps (keep) or is scratch of BLOCK."""
    hi = lo = np.int64(0)
    for st in range(0, cols, BLOCK):
        m = min(BLOCK, cols - st)
        at = st if keep else 0
        _exps(v, start + st, m, peak, e, at, table, tabled)
        h, low = _limb_sums(e[at:], ones, m, limb, fast)  # a * 1 * scale: the limbs of a * scale, exactly
        hi += h
        lo += low
    return hi, lo


@njit(inline="always")
def _terms(ex, eb, at, m, zx, zb, eps, shrink, terms):  # pragma: no cover - compiled
    """terms[i] = p * log(p / q) * shrink, p = ex * (1 / zx) + eps and q = eb * (1 / zb) + eps at at + i, i < m:
    a reciprocal per row, not a division per entry (float64 division is the slow one on Intel's cores: the
    row pass took 13% less on an Emerald Rapids VM)."""
    rx = _div(1.0, zx)
    rb = _div(1.0, zb)
    for i in range(m):
        p = ex[U(at + i)] * rx + eps
        q = eb[U(at + i)] * rb + eps
        terms[U(i)] = p * _log(_div(p, q)) * shrink


@njit(inline="always")
def _row_divergence(x, b, o, cols, px, pb, work, keep, bits, eps, bound, table, tabled):  # pragma: no cover
    """KL(softmax(x row) || softmax(b row)) of the row at o in float64, as selection.arcee_fusion_prepare
    (table, tabled: _exps', for x and b; work: the exps of x and of b, BLOCK ones, scratch of BLOCK)."""
    ex, eb, ones, terms = work
    limb = 2.0**bits
    unit = 2.0**-bits
    fast = limb <= 2.0**FAST_BITS
    h, low = _normaliser(x, o, cols, px, ex, keep, ones, limb, fast, table, tabled[0])
    zx = (np.float64(h) + np.float64(low) * unit) * unit
    h, low = _normaliser(b, o, cols, pb, eb, keep, ones, limb, fast, table, tabled[1])
    zb = (np.float64(h) + np.float64(low) * unit) * unit
    hd = ld = np.int64(0)
    for st in range(0, cols, BLOCK):
        m = min(BLOCK, cols - st)
        at = st if keep else 0
        if not keep:
            _exps(x, o + st, m, px, ex, at, table, tabled[0])
            _exps(b, o + st, m, pb, eb, at, table, tabled[1])
        _terms(ex, eb, at, m, zx, zb, eps, 2.0**-bound, terms)
        h, low = _limb_sums(terms, ones, m, limb, fast)
        hd += h
        ld += low
    return (np.float64(hd) + np.float64(ld) * unit) * unit * 2.0**bound


@kernel
def _fusion_rows(x, b, cols, bits, eps, bound, scratch, kl, table):  # pragma: no cover - compiled
    """Over whole rows of `cols` entries: each row's KL divergence into kl (float32) as
    selection.arcee_fusion_prepare computes it (maxima; exps and their limb sums; p, q, p * log(p / q) *
    2**-bound and theirs; all in float64); NaN for a row holding a NaN or +inf, or only -inf. Rows of up to
    `scratch` entries keep their exps for the divergence; longer ones compute them again."""
    x, b, cols, bits, eps, bound, scratch, kl, table = borrow((x, b, cols, bits, eps, bound, scratch, kl, table))
    keep = cols <= scratch
    ex_own, ex = lend(np.empty(cols if keep else BLOCK, np.float64))
    eb_own, eb = lend(np.empty_like(ex))
    ones_own, ones = lend(np.ones(BLOCK, np.float64))
    terms_own, terms = lend(np.empty(BLOCK, np.float64))
    for r in range(kl.size):
        o = r * cols
        mx, mb, bad, tabled = _row_peaks(x, b, o, cols)
        if bad or not (np.isfinite(mx) and np.isfinite(mb)):  # as torch.amax: NaN where the row holds one
            kl[r] = np.float32(np.nan)
            continue
        px, pb = np.float64(mx), np.float64(mb)
        d = _row_divergence(x, b, o, cols, px, pb, (ex, eb, ones, terms), keep, bits, eps, bound, table, tabled)
        kl[r] = np.float32(0.0 if d < 0 else abs(d))
    keep_alive((ex_own, eb_own, ones_own, terms_own))


@njit(inline="always")
def _importances(x, b, kl, cols, st, e, w):  # pragma: no cover - compiled
    """w[:m] = the importances |x - b| * kl[row] in float32 of the m entries from flat index st on: up to e, at
    most BLOCK, and where rows hold BLOCK entries or more, up to the end of st's row (one row's block: a loop
    that vectorises). Returns m."""
    r = st // cols
    if cols >= BLOCK:
        m = min(BLOCK, e - st, (r + 1) * cols - st)
        k = kl[U(r)]
        for i in range(m):
            w[U(i)] = abs(load(x, U(st + i)) - load(b, U(st + i))) * k
        return m
    m = min(BLOCK, e - st)
    c = st - r * cols
    for i in range(m):  # short rows, several to a block
        w[U(i)] = abs(load(x, U(st + i)) - load(b, U(st + i))) * kl[U(r)]
        c += 1
        if c == cols:
            c = 0
            r += 1
    return m


@kernel
def _fusion_sample(x, b, kl, cols, starts, length, hist):  # pragma: no cover - compiled
    """hist[radix_bin(importance)] += 1 over the sample runs of `length` entries at `starts`
    (kernels.sample_histograms' fill), each run's lines prefetched eight runs ahead."""
    x, b, kl, cols, starts, length, hist = borrow((x, b, kl, cols, starts, length, hist))
    w_own, w = lend(np.empty(BLOCK, np.float32))
    for r in range(starts.size):
        prefetch_run(starts, r + 8, length, b, (x,))
        st = starts[r]
        e = st + length
        while st < e:
            m = _importances(x, b, kl, cols, st, e, w)
            for i in range(m):
                hist[radix_bin(w[U(i)])] += 1
            st += m
    keep_alive((w_own,))


@kernel
def _fusion_bands(x, b, kl, cols, s, e, lo, hi, vals, idx):  # pragma: no cover - compiled
    """kernels.BandPass over the importances of the flat entries [s, e), for each quartile's band j (lo[j],
    hi[j]): how many are above it, and those in it (or NaN) gathered into vals[j], idx[j] (kernels.band_block
    on each block of importances). Returns (above, gathered)."""
    x, b, kl, cols, s, e, lo, hi, vals, idx = borrow((x, b, kl, cols, s, e, lo, hi, vals, idx))
    nb = lo.size
    above = np.zeros(nb, np.int64)
    got = np.zeros(nb, np.int64)
    w_own, w = lend(np.empty(BLOCK, np.float32))
    zeros_own, zeros = lend(np.zeros(BLOCK, np.float32))  # |w - 0| = w: importances are >= 0 (or NaN)
    st = s
    while st < e:
        m = _importances(x, b, kl, cols, st, e, w)
        for j in range(nb):
            cnt, got[j] = band_block(w, 0, zeros, m, lo[j], hi[j], vals[j], idx[j], got[j], st)
            above[j] += cnt
        st += m
    keep_alive((w_own, zeros_own))
    return above, got


@kernel
def _fusion_merge(x, b, kl, cols, s, out, threshold):  # pragma: no cover - compiled
    """selection.arcee_fusion over the flat entries from s on, as many as out has: (x - b where the importance
    |x - b| * kl[row] >= threshold, else 0) + b."""
    x, b, kl, cols, s, out, threshold = borrow((x, b, kl, cols, s, out, threshold))
    zero = np.float32(0)
    w_own, w = lend(np.empty(BLOCK, np.float32))
    e = s + out.size
    st = s
    while st < e:
        m = _importances(x, b, kl, cols, st, e, w)
        for i in range(m):
            bi = load(b, U(st + i))
            d = load(x, U(st + i)) - bi
            # not inside store's arguments: numba's inlining drops the store
            kept = d if w[U(i)] >= threshold else zero
            store(out, U(st - s + i), kept + bi)
        st += m
    keep_alive((w_own,))


@kernel
def _exp_table(bound):  # pragma: no cover - compiled
    """elementary.exp_table's values, from the twin _exp (without torch)."""
    out = np.zeros(1 << 16, np.float64)
    for h in range(1 << 16):
        v = np.float64(_f32_from_bits(np.uint32(h) << np.uint32(16)))
        if abs(v) <= bound:  # not NaN
            out[h] = _exp(v)
    return out


@functools.cache
def exp_table() -> np.ndarray:
    """elementary.exp_table() as an array, the same bits, computed here so that the fused path needs no torch."""
    return _exp_table(el.TABLE_BOUND)


def fusion_divergences(
    x: np.ndarray, base: np.ndarray, cols: int, bits: int, eps: float, bound: int, run: Runner
) -> np.ndarray:
    """Arcee Fusion's KL divergence of each row of `cols` entries (float32; NaN for a row without a softmax);
    each part of the work holds whole rows, so that a row's sums are one part's."""
    n = base.size
    assert n % cols == 0, (n, cols)
    kl = np.empty(n // cols, np.float32)
    table = exp_table()

    def part(s: int, e: int) -> None:
        a, z = s * cols, e * cols
        _fusion_rows(x[a:z], base[a:z], cols, bits, eps, bound, SCRATCH, kl[s:e], table)

    run(part, n // cols, max(1, ROWS_PART // cols))
    return kl


def fusion_quartiles(
    x: np.ndarray, base: np.ndarray, kl: np.ndarray, ranks: Sequence[int], run: Runner
) -> list[tuple[float, int, int]]:
    """The ranks-th largest importances |x - base| * kl[row] (kernels.select_in_bands: their thresholds, ties
    and cutoffs), from a sample and one pass over the inputs for all ranks, no importance stored."""
    n, cols = base.size, base.size // kl.size

    def fill(starts: np.ndarray, hist: np.ndarray) -> None:
        _fusion_sample(x, base, kl, cols, starts, SAMPLE_RUN, hist[0])

    def band_pass(todo: list[int], s: int, e: int, lo: np.ndarray, hi: np.ndarray, vals, idx):
        return _fusion_bands(x, base, kl, cols, s, e, lo, hi, vals, idx)

    def sampled() -> np.ndarray:
        return sample_histograms(n, 1, fill, run)[[0] * len(ranks)]  # one histogram for every rank

    return select_in_bands(n, ranks, sampled, band_pass, run)


def fusion_merge(
    x: np.ndarray, base: np.ndarray, kl: np.ndarray, start: int, out: np.ndarray, threshold: np.float32, run: Runner
) -> None:
    """Arcee Fusion into `out`: the flat entries from `start` on, as many as out has."""
    assert start >= 0 and start + out.size <= base.size, (start, out.size, base.size)
    cols = base.size // kl.size

    def part(s: int, e: int) -> None:
        _fusion_merge(x, base, kl, cols, start + s, out[s:e], threshold)

    run(part, out.size)


# --- RAM and RAM+ --------------------------------------------------------------------------------------------


@kernel
def _ram_counts(xs, b, eps):  # pragma: no cover - compiled
    """Per model, its changed entries (|x_j - b| > eps) that another model changes too, and that it alone does."""
    xs, b, eps = borrow((xs, b, eps))
    n = b.size
    nm = len(xs)
    shared = np.zeros(nm, np.int64)
    unique = np.zeros(nm, np.int64)
    bf_own, bf = lend(np.empty(BLOCK, np.float32))
    count_own, count = lend(np.empty(BLOCK, np.int32))
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
    keep_alive((bf_own, count_own))
    return shared, unique


@kernel
def _ram_merge(xs, b, out, eps, gains):  # pragma: no cover - compiled
    """selection._ram: base + per entry the one changing model's change (times gains[j], RAM+; gains empty:
    RAM), or the changes of several divided by their count."""
    xs, b, out, eps, gains = borrow((xs, b, out, eps, gains))
    n = b.size
    nm = len(xs)
    zero = np.float32(0)
    one = np.float32(1)
    scaled = gains.size > 0
    bf_own, bf = lend(np.empty(BLOCK, np.float32))
    count_own, count = lend(np.empty(BLOCK, np.float32))
    acc_own, acc = lend(np.empty(BLOCK, np.float32))
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
    keep_alive((bf_own, count_own, acc_own))


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

"""Fused CPU kernels (numba) for the sparse task-vector methods (merger.methods.sparse): DARE, Breadcrumbs,
DELLA and SCE on the stored bytes, bit-identical to sparse.py's torch path.

The torch path's pieces, reproduced exactly: the counter-based draws (draws.py's splitmix64, on unsigned
64-bit integers here), Breadcrumbs' thresholds (merger.kernels.top_k_abs_deltas) and SCE's (variance_top:
merger.kernels.select_in_bands over variances computed as it goes), both with the tie rule of
task_vectors.kth_largest, DELLA's ranks within fibers (a stable radix sort of the magnitudes' bits, NaN
last as torch sorts it), the exact whole-tensor sums (an integer mantissa per entry, added without rounding:
a block of entries whose exponents lie close together is added as one fixed-point integer, any other entry
on its own; the exact total is rounded once in Python, as _ExactSums rounds it), and the per-entry float32
arithmetic in the torch path's order (no fast-math, no FMA contraction; stores round as torch's casts do)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from merger.errors import NaNTaskVector
from merger.kernels import (
    BLOCK,
    COMPRESS_STORE,
    EXACT_BELOW,
    SAMPLE_RUN,
    U,
    _bits_of_f32,
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
    sample_histograms,
    select_in_bands,
    store,
    store_elected,
)

GAMMA = U(0x9E3779B97F4A7C15)  # draws.GAMMA
MIX1 = U(0xBF58476D1CE4E5B9)  # draws.MIX
MIX2 = U(0x94D049BB133111EB)
U32 = np.uint32
ABS = U32(0x7FFFFFFF)
QNAN = U32(0x7FC00000)  # every NaN magnitude, for sorting: torch ranks NaN above everything, ties by index
LOW62 = U((1 << 62) - 1)
INF_BIN = 560  # exact sums: a count of inf and NaN entries (the sum is then inf, as _ExactSums says)
BINS = 564  # bins[p] holds a 124-bit integer in two limbs (value * 2 ** p): p < 255 for |d|, < 534 for d * d
ABS_UNIT, SQUARE_UNIT = 149, 298  # the sums' unit: 2 ** -149 for float32 magnitudes, its square for squares

# drop modes (sparse.Family.drop) and per-model kinds (SparseState.kept)
RANDOM, OUTLIERS, MAGPRUNE, VARIANCE = 0, 1, 2, 3
ALL, NONE, BY_ENTRY = 0, 1, 2
# a Top (sparse.Top) as flag, threshold, cutoff: False, True, or (threshold, cutoff)
NO, YES, RANKED = 0, 1, 2


@njit(inline="always")
def _mix(z):  # pragma: no cover - compiled
    """splitmix64's output function (draws.MIX), wrapping on uint64."""
    z = (z ^ (z >> U(30))) * MIX1
    z = (z ^ (z >> U(27))) * MIX2
    return z ^ (z >> U(31))


@njit(inline="always")
def _in_top(a, g, flag, t, cut):  # pragma: no cover - compiled
    """sparse._in_top for one magnitude a at flat index g."""
    if flag == YES:
        return True
    if flag == NO:
        return False
    return (a > t) | ((a == t) & (g < cut))


@njit(inline="always")
def _add(bins, p, t):  # pragma: no cover - compiled
    """bins[p] += t (t < 2 ** 63), the low limb kept below 2 ** 62."""
    lo = bins[p, 0] + t
    bins[p, 1] += lo >> U(62)
    bins[p, 0] = lo & LOW62


@njit(inline="always")
def _picked(mb, kp, i, masked):  # pragma: no cover - compiled
    """The magnitude bits mb[i], or 0 where kp[i] is not set (if masked)."""
    return mb[i] & (U32(0) - U32(kp[i])) if masked else mb[i]


@njit(inline="always")
def _extent(mb, kp, start, m, masked):  # pragma: no cover - compiled
    """(largest, smallest non-zero) of the picked magnitude bits in [start, start + m): they order as the
    magnitudes do; smallest is 0xFFFFFFFF where all are 0. The least v - 1 (0 wraps to the top, above any
    magnitude's bits) and unsigned indices: the loop vectorizes (with a select per entry and signed indices
    it did not: _abs_sums took 0.60 ns an entry, now 0.26)."""
    hi = U32(0)
    lo = U32(0xFFFFFFFF)
    for i in range(m):
        v = _picked(mb, kp, U(start + i), masked)
        hi = max(hi, v)
        lo = min(lo, U32(v - U32(1)))  # numba widens uint32 arithmetic to 64 bits: wrapped back here
    lo = U32(lo + U32(1))  # 0 where every v is 0
    return hi, lo if lo else U32(0xFFFFFFFF)


@njit(inline="always")
def _mantissa(v):  # pragma: no cover - compiled
    """(biased exponent, 24-bit mantissa with its implicit bit) of float32 bits v."""
    e = v >> U32(23)
    return e, (v & U32(0x7FFFFF)) | (U32(0x800000) if e else U32(0))


@njit(inline="always")
def _unit_at(emin):  # pragma: no cover - compiled
    """2 ** (150 - emin) in float64: what turns a float32 magnitude into its fixed-point integer at emin."""
    return _f64_from_bits((np.int64(1023 + 150) - np.int64(emin)) << np.int64(52))


@njit(inline="always")
def _fixed(v, unit):  # pragma: no cover - compiled
    """The float32 magnitude whose bits are v as an integer at exponent emin (unit: _unit_at(emin), e >= emin
    or a subnormal with emin 1): mantissa * 2 ** (max(e, 1) - emin), the float32 times the unit, exact in
    float64 (24 significant bits) and in its conversion (below 2 ** 56; fewer vector operations than
    shifting the decoded mantissa: _fixed_sums took 0.20 ns an entry against 0.25)."""
    return np.int64(np.float64(_f32_from_bits(v)) * unit)


@njit
def _abs_sum(mb, kp, start, m, masked, bins):  # pragma: no cover - compiled
    """Add the float32 magnitudes whose bits are mb[start:start + m] (where kp is set, if masked) to bins
    exactly: value = mantissa * 2 ** (max(e, 1) - 150), e the biased exponent."""
    hi, lo = _extent(mb, kp, start, m, masked)
    if hi == 0:
        return
    if hi >= U32(0x7F800000):
        bins[INF_BIN, 0] += U(1)
        return
    emin = max(lo >> U32(23), U32(1))
    if max(hi >> U32(23), U32(1)) - emin <= 31:  # one fixed-point integer: 2 ** 24 * 2 ** 31 * BLOCK < 2 ** 63
        unit = _unit_at(emin)
        t = np.int64(0)
        for i in range(start, start + m):
            t += _fixed(_picked(mb, kp, i, masked), unit)
        _add(bins, U(emin - 1), U(t))
        return
    for i in range(start, start + m):
        e, mant = _mantissa(_picked(mb, kp, i, masked))
        _add(bins, U(max(e, U32(1)) - 1), U(mant))


@njit
def _abs_sums(mb, kp, start, m, every, kept):  # pragma: no cover - compiled
    """_abs_sum of all of mb[start:start + m] into `every` and of the kept ones into `kept`, in one pass
    where their exponents lie close together (the sums are exact: how a sum is split into bins does not
    change it)."""
    hi, lo = _extent(mb, kp, start, m, False)
    emin = max(lo >> U32(23), U32(1))
    if hi == 0 or hi >= U32(0x7F800000) or max(hi >> U32(23), U32(1)) - emin > 31:
        _abs_sum(mb, kp, start, m, False, every)
        _abs_sum(mb, kp, start, m, True, kept)
        return
    _fixed_sums(mb, kp, start, m, emin, every, kept)


@njit(inline="always")
def _fixed_sums(mb, kp, start, m, emin, every, kept):  # pragma: no cover - compiled
    """Add the magnitudes mb[start:start + m] (all, and the kept ones) to bins as one fixed-point integer each
    at exponent emin, at most 31 below every exponent there (2 ** 24 * 2 ** 31 * BLOCK < 2 ** 63)."""
    unit = _unit_at(emin)
    t = np.int64(0)
    tk = np.int64(0)
    for i in range(start, start + m):
        v = _fixed(mb[U(i)], unit)
        t += v
        tk += v & (np.int64(0) - np.int64(kp[U(i)]))
    _add(every, U(emin - 1), U(t))
    _add(kept, U(emin - 1), U(tk))


@njit
def _square_sum(mb, kp, m, bins):  # pragma: no cover - compiled
    """Add the squares of the float32 values whose magnitudes' bits are mb[:m], where kp is set, to bins
    exactly: mantissa ** 2 * 2 ** (2 * (max(e, 1) - 1) - 298), the square split in two 24-bit halves."""
    hi, lo = _extent(mb, kp, 0, m, True)
    if hi == 0:
        return
    if hi >= U32(0x7F800000):
        bins[INF_BIN, 0] += U(1)
        return
    emin = max(lo >> U32(23), U32(1))
    fits = max(hi >> U32(23), U32(1)) - emin <= 15  # 2 ** 24 * 4 ** 15 * BLOCK < 2 ** 63
    t_lo = U(0)
    t_hi = U(0)
    for i in range(m):
        v = _picked(mb, kp, i, True)
        e, mant32 = _mantissa(v)
        mant = U(mant32)
        sq = mant * mant
        if fits:
            shift = U(2 * (max(e, emin) - emin))
            t_lo += (sq & U(0xFFFFFF)) << shift
            t_hi += (sq >> U(24)) << shift
        elif v:
            p = U(2 * (max(e, U32(1)) - 1))
            _add(bins, p, sq & U(0xFFFFFF))
            _add(bins, p + U(24), sq >> U(24))
    if fits:
        _add(bins, U(2 * (emin - 1)), t_lo)
        _add(bins, U(2 * (emin - 1) + 24), t_hi)


def exact_totals(parts: Sequence[np.ndarray], unit: int) -> tuple[list[float], list[int]]:
    """The sums the bins of every part hold (parts: arrays (..., BINS, 2)), each rounded once to a float as
    _ExactSums rounds it (inf where an entry was inf or NaN), and how many entries were inf or NaN."""
    lead = parts[0].shape[:-2]
    folded = np.zeros((math.prod(lead), BINS, 2), np.uint64)
    _fold(np.stack(parts).reshape(len(parts), *folded.shape), folded)  # the parts' sums in one, in numba
    out = []
    for bins in folded:
        if bins[INF_BIN, 0]:
            out.append(float("inf"))
            continue
        total = 0
        for p in np.flatnonzero(bins[:INF_BIN].any(axis=1)):
            total += ((int(bins[p, 1]) << 62) + int(bins[p, 0])) << int(p)
        out.append(total / (1 << unit))
    return out, [int(c) for c in folded[:, INF_BIN, 0]]


@kernel
def _fold(parts, out):  # pragma: no cover - compiled
    """out[l] += parts[q, l] for every part q: bins of two limbs (_add's), the low one kept below 2 ** 62."""
    parts, out = borrow((parts, out))
    for q in range(parts.shape[0]):
        for lead in range(out.shape[0]):
            for p in range(BINS):
                _add(out[lead], p, parts[q, lead, p, 0])
                out[lead, p, 1] += parts[q, lead, p, 1]


@intrinsic
def _pack64(typingctx, kp, i, bits, q):
    """bits[q:q + 8] = the flags kp[i:i + 64] (each 0 or 1) as 64 bits, flag i + t at bit t % 8 of byte q + t // 8:
    one vector compare whose 64 results, as an integer, are those bytes in little-endian order (on AVX-512
    one vptestmb; the loop below needs some 24 instructions a byte)."""

    def codegen(context, builder, sig, args):
        flags = ir.VectorType(ir.IntType(8), 64)
        src = context.make_array(sig.args[0])(context, builder, args[0]).data
        dst = context.make_array(sig.args[2])(context, builder, args[2]).data
        v = builder.load(builder.bitcast(builder.gep(src, [args[1]]), flags.as_pointer()), align=1)
        word = builder.bitcast(builder.icmp_unsigned("!=", v, ir.Constant(flags, None)), ir.IntType(64))
        builder.store(word, builder.bitcast(builder.gep(dst, [args[3]]), ir.IntType(64).as_pointer()), align=1)
        return context.get_dummy_value()

    if kp != types.Array(types.uint8, 1, "C") or bits != types.Array(types.uint8, 1, "C"):
        return None
    return types.void(kp, types.intp, bits, types.intp), codegen


@njit(inline="always")
def _pack(kp, m, bits, first):  # pragma: no cover - compiled
    """The flags kp[:m] as bits into bits[first:], whole bytes (the last one's high bits 0)."""
    whole = m >> 3
    done = whole - whole % 8
    for c in range(0, done, 8):
        _pack64(kp, 8 * c, bits, first + c)
    for c in range(done, whole):
        e = 8 * c
        bits[first + c] = (
            kp[e]
            | (kp[e + 1] << np.uint8(1))
            | (kp[e + 2] << np.uint8(2))
            | (kp[e + 3] << np.uint8(3))
            | (kp[e + 4] << np.uint8(4))
            | (kp[e + 5] << np.uint8(5))
            | (kp[e + 6] << np.uint8(6))
            | (kp[e + 7] << np.uint8(7))
        )
    if m & 7:
        byte = np.uint8(0)
        for t in range(m & 7):
            byte |= kp[8 * whole + t] << np.uint8(t)
        bits[first + whole] = byte


@intrinsic
def _compress16(typingctx, flags, i, out, n):
    """out[n:n + 16] = the indices i + t (t < 16) where flags[i + t] is set, in order, as int32, then whatever
    (out must hold 16 entries past the last index): one compress of a vector of the 16 indices under the flags'
    mask into a register (vpcompressd on AVX-512) and one store of it. Returns n plus their count. Not a compress
    store to memory (llvm.masked.compressstore): AMD's Zen 4 runs that form in microcode, over 100 cycles each
    (one_thread.py there: DELLA's prepare 7.6-11.5 ns an entry against 6.2-6.8 by the loop of _open_indices)."""

    def codegen(context, builder, sig, args):
        byte16, int16 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(32), 16)
        src = context.make_array(sig.args[0])(context, builder, args[0]).data
        dst = context.make_array(sig.args[2])(context, builder, args[2]).data
        v = builder.load(builder.bitcast(builder.gep(src, [args[1]]), byte16.as_pointer()), align=1)
        mask = builder.icmp_unsigned("!=", v, ir.Constant(byte16, None))
        start, zeros = builder.trunc(args[1], ir.IntType(32)), ir.Constant(int16, None)
        first = builder.insert_element(zeros, start, ir.Constant(ir.IntType(32), 0))
        every = builder.shuffle_vector(first, zeros, ir.Constant(int16, None))  # start in every lane
        indices = builder.add(every, ir.Constant(int16, list(range(16))))
        compress_type = ir.FunctionType(int16, [int16, int16, mask.type])
        compress = cgutils.get_or_insert_function(builder.module, compress_type, "llvm.x86.avx512.mask.compress.v16i32")
        packed = builder.call(compress, [indices, zeros, mask])
        builder.store(packed, builder.bitcast(builder.gep(dst, [args[3]]), int16.as_pointer()), align=4)
        count_type = ir.FunctionType(ir.IntType(16), [ir.IntType(16)])
        count = builder.call(cgutils.get_or_insert_function(builder.module, count_type, "llvm.ctpop.i16"),
                             [builder.bitcast(mask, ir.IntType(16))])  # fmt: skip
        return builder.add(args[3], builder.zext(count, ir.IntType(64)))

    if flags != types.Array(types.uint8, 1, "C") or out != types.Array(types.int32, 1, "C"):
        return None
    return types.int64(flags, types.intp, out, types.int64), codegen


@njit(inline="always")
def _open_indices(flags, length, out, compress):  # pragma: no cover - compiled
    """out[:count] = the indices p < length where flags[p] is set, in order; returns the count. compress
    (COMPRESS_STORE, where the CPU has AVX-512): by compresses, 16 flags at a time, then one by one; out holds
    length + 16 entries (each compress stores 16)."""
    n = np.int64(0)
    whole = length - length % 16 if compress else 0
    for p in range(0, whole, 16):  # 0.08 ns an entry against the loop below's 0.33 (one thread, 20% set)
        n = _compress16(flags, p, out, n)
    for p in range(whole, length):
        out[U(n)] = p
        n += flags[U(p)]
    return n


@njit(inline="always")
def _bit(bits, g):  # pragma: no cover - compiled
    """Flag g of a bit array (bit g % 8 of byte g // 8)."""
    return (bits[U(g) >> U(3)] >> np.uint8(U(g) & U(7))) & np.uint8(1)


@njit(inline="always")
def _keep_block(drop, x, bf, st, m, g0, key, thr, tf, tt, tc, j, kp):  # pragma: no cover - compiled
    """Model j's keep flags (sparse._keep) for the block of m entries at st (flat index g0) into kp: DARE's
    draws (RANDOM) or Breadcrumbs' band (OUTLIERS); DELLA's masks and DARE's kept draws are read as bits
    by _masked_block."""
    if drop == RANDOM:
        z0 = key + U(g0 + 1) * GAMMA
        for i in range(m):
            kp[i] = _mix(z0 + U(i) * GAMMA) < thr
    else:  # OUTLIERS: the largest `upto`, less the largest `below`
        uf, ut, uc = tf[j, 1], tt[j, 1], tc[j, 1]  # read once: inside the loop they would be reloaded per entry
        lf, lt, lc = tf[j, 0], tt[j, 0], tc[j, 0]
        for i in range(m):
            a = abs(load(x, U(st + i)) - bf[U(i)])
            g = g0 + i
            kp[U(i)] = _in_top(a, g, uf, ut, uc) & (_in_top(a, g, lf, lt, lc) ^ True)


def _scan_of(drop: int):
    """The rescale's sums kernel of one drop mode (RANDOM or OUTLIERS), `drop` a constant, as _merge_of."""

    def scan(xs, b, todo, keys, thr, tf, tt, tc, offset, bins, keeps):  # pragma: no cover - compiled
        """The rescale's sums (sparse._rescale) for the models in todo: per model, bins[j, 0] the magnitudes,
        bins[j, 1] the kept ones, over a flat chunk starting at `offset` (a multiple of 8); and DARE's keep
        flags into keeps (models, bytes) as bits (flat index g: bit g % 8 of byte g // 8)."""
        xs, b, todo, keys, thr, tf, tt, tc, bins, keeps = borrow((xs, b, todo, keys, thr, tf, tt, tc, bins, keeps))
        n = b.size
        bf_own, bf = lend(np.empty(BLOCK, np.float32))
        mb_own, mb = lend(np.empty(BLOCK, np.uint32))
        kp_own, kp = lend(np.empty(BLOCK, np.uint8))
        for st in range(0, n, BLOCK):
            m = min(BLOCK, n - st)
            for i in range(m):
                bf[i] = load(b, U(st + i))
            for j in range(len(xs)):
                if not todo[j]:
                    continue
                x = xs[j]
                for i in range(m):
                    mb[i] = _bits_of_f32(load(x, U(st + i)) - bf[i]) & ABS
                _keep_block(drop, x, bf, st, m, offset + st, keys[j], thr[j], tf, tt, tc, j, kp)
                _abs_sums(mb, kp, 0, m, bins[j, 0], bins[j, 1])
                if drop == RANDOM:  # DARE's draws, kept for the merge: whole bytes (offset + st a multiple of 8)
                    _pack(kp, m, keeps[j], (offset + st) >> 3)
        keep_alive((bf_own, mb_own, kp_own))

    return _of_mode(scan, drop)


@njit(inline="always")
def _variance(d, nm, i):  # pragma: no cover - compiled
    """sparse._variance of entry i of the task vectors d (nm, BLOCK), in its order of operations."""
    fn = np.float32(nm)
    mean = d[0, i]
    for j in range(1, nm):
        mean += d[j, i]
    mean /= fn
    var = (d[0, i] - mean) * (d[0, i] - mean)
    for j in range(1, nm):
        var += (d[j, i] - mean) * (d[j, i] - mean)
    return var / fn


@njit(inline="always")
def _task_block(xs, b, st, m, d):  # pragma: no cover - compiled
    """d[j, :m] = x_j - base over the block of m entries at st, for every model j."""
    for j in range(len(xs)):
        x = xs[j]
        dj = d[j]
        for i in range(m):
            dj[i] = load(x, U(st + i)) - load(b, U(st + i))


@njit(inline="always")
def _variance_block(xs, b, st, m, d, w):  # pragma: no cover - compiled
    """w[:m] = each entry's variance across the task vectors over the block of m <= BLOCK entries at st (d:
    their task vectors, (models, BLOCK) scratch)."""
    nm = len(xs)
    _task_block(xs, b, st, m, d)
    for i in range(m):  # w's index unsigned: with a signed one this loop did not vectorize (0.75 ns an entry, now 0.19)
        w[U(i)] = _variance(d, nm, i)


@kernel
def _variance_sample(xs, b, starts, length, hist):  # pragma: no cover - compiled
    """hist[radix_bin(variance)] += 1 over the sample runs of `length` entries at `starts`
    (kernels.sample_histograms' fill), each run's lines prefetched eight runs ahead."""
    xs, b, starts, length, hist = borrow((xs, b, starts, length, hist))
    d_own, d = lend(np.empty((len(xs), BLOCK), np.float32))
    w_own, w = lend(np.empty(BLOCK, np.float32))
    for r in range(starts.size):
        prefetch_run(starts, r + 8, length, b, xs)
        for st in range(starts[r], starts[r] + length, BLOCK):
            m = min(BLOCK, starts[r] + length - st)
            _variance_block(xs, b, st, m, d, w)
            for i in range(m):
                hist[radix_bin(w[U(i)])] += 1
    keep_alive((d_own, w_own))


@kernel
def _variance_bands(xs, b, lo, hi, vals, idx, offset):  # pragma: no cover - compiled
    """kernels.BandPass over the variances of a flat chunk starting at flat index `offset`:
    how many are above the band (lo[0], hi[0]), and those in it (or NaN) gathered into vals[0], idx[0]
    (kernels.band_block on each block of variances); and how many are not 0 (NaN among them), which SCE's k
    counts. Returns (above, gathered, nonzero), arrays of one."""
    xs, b, lo, hi, vals, idx, offset = borrow((xs, b, lo, hi, vals, idx, offset))
    n = b.size
    d_own, d = lend(np.empty((len(xs), BLOCK), np.float32))
    w_own, w = lend(np.empty(BLOCK, np.float32))
    zeros_own, zeros = lend(np.zeros(BLOCK, np.float32))  # |w - 0| = w: variances are >= 0 (or NaN)
    above = np.zeros(1, np.int64)
    got = np.zeros(1, np.int64)
    nonzero = np.zeros(1, np.int64)
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        _variance_block(xs, b, st, m, d, w)
        count = 0
        for i in range(m):
            count += w[U(i)] != 0
        nonzero[0] += count
        cnt, got[0] = band_block(w, 0, zeros, m, lo[0], hi[0], vals[0], idx[0], got[0], offset + st)
        above[0] += cnt
    keep_alive((d_own, w_own, zeros_own))
    return above, got, nonzero


def variance_top(xs: tuple, base: np.ndarray, k_of, run) -> tuple[tuple[float, int, int] | None, int]:
    """SCE's threshold: the k-th largest variance across the task vectors, k = k_of(how many are not 0), as
    kernels.select_in_bands gives it (threshold, ties, cutoff; None where k is 0 or every entry), and k; from
    a sample and one pass over the inputs, no variance stored. That pass counts the nonzero variances too: its
    band is chosen for k as the sample estimates it, then the pass settles k (a band that misses the settled
    rank is moved as any other), so the inputs are read once, not once to count and once to select. A NaN
    variance is refused (NaNTaskVector) only where there is a k-th to rank."""
    n = base.size
    if not n:
        return None, k_of(0)
    counts: list[int] = []  # the nonzero variances of the first pass's parts
    settled: list[int] = []  # k, once the first pass is over

    def fill(starts: np.ndarray, hist: np.ndarray) -> None:
        _variance_sample(xs, base, starts, SAMPLE_RUN, hist[0])

    def band_pass(todo: list[int], s: int, e: int, lo: np.ndarray, hi: np.ndarray, vals, idx):
        above, got, nonzero = _variance_bands(tuple(x[s:e] for x in xs), base[s:e], lo, hi, vals, idx, s)
        if not settled:
            counts.append(int(nonzero[0]))
        return above, got

    def settle() -> list[int]:
        settled.append(k_of(sum(counts)))
        return [min(max(settled[0], 1), n)]  # a rank to select even where k is 0 or n (then unused)

    hist = sample_histograms(n, 1, fill, run) if n > EXACT_BELOW else None
    zeros = hist[0, 0] / hist[0].sum() if hist is not None else 0.0  # the sample's share in radix bin 0
    estimate = min(max(k_of(round(n * (1 - zeros))), 1), n)
    try:
        found = select_in_bands(n, [estimate], lambda: hist, band_pass, run, settle=settle)[0]
    except NaNTaskVector:
        if 0 < settled[0] < n:
            raise
        found = None
    k = settled[0]
    return (found if 0 < k < n else None), k


@kernel
def _square_sums(xs, b, vf, vt, vc, offset, bins):  # pragma: no cover - compiled
    """SCE's weights' sums: per model, the squares of its task vector where the variance is kept."""
    xs, b, vf, vt, vc, offset, bins = borrow((xs, b, vf, vt, vc, offset, bins))
    n = b.size
    nm = len(xs)
    d_own, d = lend(np.empty((nm, BLOCK), np.float32))
    mb_own, mb = lend(np.empty(BLOCK, np.uint32))
    kp_own, kp = lend(np.empty(BLOCK, np.uint8))
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        _task_block(xs, b, st, m, d)
        for i in range(m):
            kp[i] = _in_top(_variance(d, nm, i), offset + st + i, vf, vt, vc)
        for j in range(nm):
            dj = d[j]
            for i in range(m):
                mb[i] = _bits_of_f32(dj[i]) & ABS
            _square_sum(mb, kp, m, bins[j])
    keep_alive((d_own, mb_own, kp_own))


@njit
def _radix_order(kb, ki, tb, ti, cnt, length):  # pragma: no cover - compiled
    """Sort (kb, ki)[:length] by kb, stably (ki starts as 0, 1, ...): four passes of 8 bits from the low
    end, a pass skipped where every key shares its digit. Returns the arrays holding the result."""
    for shift in range(0, 32, 8):
        for c in range(257):
            cnt[c] = 0
        for p in range(length):
            cnt[((kb[p] >> U32(shift)) & U32(255)) + 1] += 1
        if cnt[((kb[0] >> U32(shift)) & U32(255)) + 1] == length:
            continue
        for c in range(1, 257):
            cnt[c] += cnt[c - 1]
        for p in range(length):
            digit = (kb[p] >> U32(shift)) & U32(255)
            q = cnt[digit]
            cnt[digit] = q + 1
            tb[q] = kb[p]
            ti[q] = ki[p]
        kb, tb = tb, kb
        ki, ti = ti, ki
    return kb, ki


HEADS = 1 << 15  # magnitudes by their top 16 bits (sign clear): buckets that order as the magnitudes do
OPEN = 8  # at most this many odd magnitudes of a fiber whose rank their bucket leaves open: each ranked by a scan
ODD = np.int64(1) << np.int64(32)  # a bucket's count: odd magnitudes above, plain ones below
LOW32 = ODD - np.int64(1)


@njit(inline="always")
def _fiber_keys(x, b, start, r, length, kb):  # pragma: no cover - compiled
    """A fiber's sort keys into kb: its magnitudes' bits, NaN as QNAN (which sums as NaN does). Returns the
    range of the keys' buckets: (the least nonzero bucket - 1, wrapping to 0xFFFFFFFF where all are 0; the
    greatest), and how many keys are odd (low 16 bits set)."""
    below = U32(0xFFFFFFFF)
    hi = U32(0)
    n_odd = U32(0)
    for p in range(length):
        g = U(start + p * r)
        v = _bits_of_f32(load(x, g) - load(b, g)) & ABS
        k = QNAN if v > U32(0x7F800000) else v
        kb[U(p)] = k
        head = k >> U32(16)
        below = min(below, U32(head - U32(1)))  # bucket 0 (zeros, subnormals) wraps to the top: totalled apart
        hi = max(hi, head)
        n_odd += U32((k & U32(0xFFFF)) != U32(0))
    return below, hi, n_odd


@njit(inline="always")
def countable(length, below, hi, n_odd):  # pragma: no cover - compiled
    """Whether _keep_by_counts may rank a fiber (below, hi, n_odd: _fiber_keys'): at most half its keys odd
    (bf16 task vectors' are few; float32 ones' most), its buckets few enough to total, and its indices int32's."""
    return 2 * np.int64(n_odd) <= length < 1 << 31 and np.int64(hi) - np.int64(below) <= 2 * length + 1025


@njit
def _keep_by_counts(kb, z0, step, tj, length, below, hi, scratch, kp):  # pragma: no cover - compiled
    """DELLA's keep flags into kp without sorting the fiber (one that countable allows): draw p (_mix(z0 + p *
    step), top 53 bits) is kept where it lies below tj[its rank]. tj does not fall with rank: a draw below tj[0]
    is kept and one at or above tj[length - 1] dropped, whatever the rank; only the draws between need one.
    A magnitude with low 16 bits 0 (plain: most of a bf16 task vector's) is the least of its bucket (its top
    16 bits), so its rank is the bucket's start plus the equal ones before it (ties go by index, as in the
    sort): a counting sort's placement, counted in index order as the buckets are. The odd ones (low bits
    set) rank after their bucket's plain ones: _ranked_keeps. Returns False, with kp unfinished, where
    _ranked_keeps declines. scratch: keep_scratch's; its counts are zero again on return."""
    cs, opened, draws, starts, before, between = scratch
    first, last = tj[0], tj[U(length - 1)]
    for p in range(length):  # the draws, in a loop of their own that vectorises
        d = _mix(z0 + U(p) * step) >> U(11)
        draws[U(p)] = d
        kp[U(p)] = d < first
        between[U(p)] = (d >= first) & (d < last)
    n_open = _open_indices(between, length, opened, COMPRESS_STORE)  # the draws that rank decides
    for p in range(length):  # per bucket: plain ones below, odd ones above; each one's plain ones before it
        k = kb[U(p)]
        h = k >> U32(16)
        c = cs[h]
        cs[h] = c + (ODD if (k & U32(0xFFFF)) != U32(0) else np.int64(1))
        before[U(p)] = U32(c & LOW32)
    lo = np.int64(below) + 1  # 2**32 where every magnitude is in bucket 0: no other bucket to total
    c = cs[0]  # bucket 0, then lo..hi: where each starts
    starts[0] = 0
    total = (c & LOW32) + (c >> np.int64(32))
    for head in range(lo, np.int64(hi) + 1):
        c = cs[U(head)]
        starts[U(head)] = total
        total += (c & LOW32) + (c >> np.int64(32))
    settled = _ranked_keeps(kb, draws, tj, cs, starts, before, opened, n_open, length, kp)
    cs[0] = 0
    for head in range(lo, np.int64(hi) + 1):
        cs[U(head)] = 0
    return settled


@njit(inline="always")
def _ranked_keeps(kb, draws, tj, cs, starts, before, opened, n_open, length, kp):  # pragma: no cover - compiled
    """The flags of the draws that rank decides (opened[:n_open]: their indices). A plain one ranks at its
    bucket's start plus the plain ones before it. Bucket h's odd ones hold the ranks starts[h] + its plain
    count (cs[h]'s low half) on, as many as its odd count (the high half), in some order: a draw below tj[the
    first] is kept and one at or above tj[the last] is dropped, whatever the order. The rest (few: the
    thresholds rise by 2 epsilon / (L - 1) a rank) are ranked by a scan of the fiber each. Returns False
    where over OPEN are left so."""
    n_odd = 0
    for o in range(n_open):
        p = opened[U(o)]
        k = kb[U(p)]
        h = k >> U32(16)
        d = draws[U(p)]
        if (k & U32(0xFFFF)) == U32(0):
            kp[U(p)] = d < tj[U(starts[h] + np.int64(before[U(p)]))]
            continue
        c = cs[h]
        first = starts[h] + (c & LOW32)
        keep = d < tj[U(first)]
        kp[U(p)] = keep
        opened[U(n_odd)] = p  # overwrites only entries already read
        n_odd += (not keep) & (d < tj[U(first + (c >> np.int64(32)) - 1)])
    if n_odd > OPEN:
        return False
    for o in range(n_odd):
        p = opened[U(o)]
        kp[U(p)] = draws[U(p)] < tj[U(_rank(kb, p, length))]
    return True


@njit(inline="always")
def _rank(kb, p, length):  # pragma: no cover - compiled
    """Entry p's place in the stable sort of kb[:length]: the keys below its own, and its equals before it."""
    k = kb[U(p)]
    rank = np.int64(0)
    for o in range(length):
        rank += kb[U(o)] < k
    for o in range(p):
        rank += kb[U(o)] == k
    return rank


@njit
def keep_scratch(length):  # pragma: no cover - compiled
    """_keep_by_counts' scratch for fibers of `length`: bucket counts (zeroed), open indices (int32), draws, the
    buckets' starts, each entry's plain ones before it in its bucket, whether its draw needs its rank."""
    return (
        np.zeros(HEADS, np.int64),
        np.empty(length + 16, np.int32),  # _open_indices' compresses store 16 at a time
        np.empty(length, np.uint64),
        np.empty(HEADS, np.int64),
        np.empty(length, np.uint32),
        np.empty(length, np.uint8),
    )


@njit(inline="always")
def _fiber_sums(mb, kp, length, below, hi, every, kept):  # pragma: no cover - compiled
    """_abs_sums of a fiber's magnitudes (and kept ones): one fixed-point integer per block at the fiber's
    least exponent where all its exponents lie within 31 of it (below, hi: _fiber_keys' bucket range; the
    sums are exact, however they are split into bins)."""
    emin = max(U32(below + U32(1)) >> U32(7), U32(1))  # below + 1 wraps to 0 where all are in bucket 0
    if hi >= U32(0x7F80) or (hi >> U32(7)) > emin + U32(31):  # inf or NaN; or too wide
        for c in range(0, length, BLOCK):
            _abs_sums(mb, kp, c, min(BLOCK, length - c), every, kept)
        return
    for c in range(0, length, BLOCK):
        _fixed_sums(mb, kp, c, min(BLOCK, length - c), emin, every, kept)


@kernel
def _magprune(xs, b, a0, a1, length, r, todo, keys, thresholds, masks, bins):  # pragma: no cover - compiled
    """DELLA's kept entries (sparse._magprune_masks) of fibers a0..a1 (of r fibers each, `length` entries
    r apart) for the models in todo, as bits into masks (zeroed; flat index g: bit g % 8 of byte g // 8;
    a0 * length * r a multiple of 8), and the rescale's sums into bins (as SCANS'). Entry p of a fiber is
    kept where its draw's top 53 bits are below thresholds[j, its rank] (rank 0 the least magnitude)."""
    xs, b, a0, a1, length, r, todo, keys, thresholds, masks, bins = borrow(
        (xs, b, a0, a1, length, r, todo, keys, thresholds, masks, bins)
    )
    kb_own, kb = lend(np.empty(length, np.uint32))
    ki_own, ki = lend(np.empty(length, np.uint32))
    tb_own, tb = lend(np.empty(length, np.uint32))
    ti_own, ti = lend(np.empty(length, np.uint32))
    sb_own, sb = lend(np.empty(length, np.uint32))
    kp_own, kp = lend(np.empty(length, np.uint8))
    cnt_own, cnt = lend(np.empty(257, np.int64))
    scratch = keep_scratch(length)
    counting = np.ones(len(xs), np.bool_)
    for a in range(a0, a1):
        for ri in range(r):
            start = a * length * r + ri
            for j in range(len(xs)):
                if not todo[j]:
                    continue
                below, hi, n_odd = _fiber_keys(xs[j], b, start, r, length, kb)
                z0 = keys[j] + U(start + 1) * GAMMA
                step = U(r) * GAMMA
                tj = thresholds[j]
                counting[j] = counting[j] and countable(length, below, hi, n_odd)  # if not, sort the range's rest
                if not (counting[j] and _keep_by_counts(kb, z0, step, tj, length, below, hi, scratch, kp)):
                    for p in range(length):  # sorted in sb and tb, kb kept for the sums
                        ki[p] = p
                        sb[p] = kb[p]
                    sk, si = _radix_order(sb, ki, tb, ti, cnt, length)
                    for q in range(length):
                        p = si[q]
                        kp[p] = (_mix(z0 + U(p) * step) >> U(11)) < tj[q]
                mj = masks[j]
                if r == 1 and start % 8 == 0:
                    _pack(kp, length, mj, start >> 3)
                else:
                    for p in range(length):
                        g = U(start + p * r)
                        mj[g >> U(3)] |= np.uint8(kp[p]) << np.uint8(g & U(7))
                _fiber_sums(kb, kp, length, below, hi, bins[j, 0], bins[j, 1])
    keep_alive((kb_own, ki_own, tb_own, ti_own, sb_own, kp_own, cnt_own))


@njit(inline="always")
def _drop_block(xs, bf, st, m, g0, drop, kinds, scales, keys, thr, tf, tt, tc, masks, vf, vt, vc, d, kp, shared):
    """Each model's kept, scaled task vector (sparse.merge's first loop) of the block of m entries at st (flat
    index g0) into d (nm, BLOCK): (d if kept else 0) * scale."""  # pragma: no cover - compiled
    zero = np.float32(0)
    nm = len(xs)
    if drop == VARIANCE:
        for j in range(nm):
            x = xs[j]
            dj = d[j]
            for i in range(m):
                dj[i] = load(x, U(st + i)) - bf[i]
        for i in range(m):
            shared[i] = _in_top(_variance(d, nm, i), g0 + i, vf, vt, vc)
    for j in range(nm):
        x = xs[j]
        dj = d[j]
        sj = scales[j]
        if drop == VARIANCE:
            for i in range(m):
                dj[i] = (dj[i] if shared[i] else zero) * sj
        elif drop == MAGPRUNE:
            _masked_block(x, bf, st, m, g0, kinds[j], masks[j if kinds[j] == BY_ENTRY else 0], sj, dj)
        elif kinds[j] == BY_ENTRY:
            _keep_block(drop, x, bf, st, m, g0, keys[j], thr[j], tf, tt, tc, j, kp)
            for i in range(m):
                v = load(x, U(st + i)) - bf[U(i)]
                dj[U(i)] = (v if kp[U(i)] else zero) * sj
        elif kinds[j] == ALL:
            for i in range(m):
                dj[U(i)] = (load(x, U(st + i)) - bf[U(i)]) * sj
        else:
            for i in range(m):
                dj[i] = zero * sj


@njit(inline="always")
def _masked_block(x, bf, st, m, g0, kind, mj, sj, dj):  # pragma: no cover - compiled
    """One model's (d if kept else 0) * scale of the block, kept by its bits mj (BY_ENTRY), or by every entry
    (ALL) or none (NONE): 32 entries to a word of bits, each kept entry's float bits and-ed with all ones and
    a dropped one's with 0 (+0.0, whatever d, as the select gives), in loops that vectorise."""
    fill = U32(0xFFFFFFFF) if kind == ALL else U32(0)
    whole = m & ~31 if g0 % 8 == 0 else 0  # words from whole bytes
    for c in range(whole >> 5):
        w = _word(mj, (g0 >> 3) + 4 * c) if kind == BY_ENTRY else fill
        for t in range(32):
            i = 32 * c + t
            keep = U32(0) - ((w >> U32(t)) & U32(1))
            dj[U(i)] = _f32_from_bits(_bits_of_f32(load(x, U(st + i)) - bf[U(i)]) & keep) * sj
    for i in range(whole, m):  # a block's tail, or a block not on a byte of bits
        kept = _bit(mj, g0 + i) if kind == BY_ENTRY else kind == ALL
        v = load(x, U(st + i)) - bf[U(i)]
        dj[U(i)] = (v if kept else np.float32(0)) * sj


@njit(inline="always")
def _word(bits, q):  # pragma: no cover - compiled
    """Bytes q..q + 3 of a bit array as one little-endian word: flags 8q .. 8q + 31."""
    return U32(bits[q]) | (U32(bits[q + 1]) << U32(8)) | (U32(bits[q + 2]) << U32(16)) | (U32(bits[q + 3]) << U32(24))


@njit(inline="always")
def _elect_block(d, m, by_count, weights, after, s, num, den):  # pragma: no cover - compiled
    """TIES' election on the block's task vectors d: s the elected signs, num the agreeing entries' sum (each
    times after[j]), den the agreeing models' weights' sum; in sparse.merge's order."""
    zero = np.float32(0)
    one = np.float32(1)
    for i in range(m):
        s[U(i)] = zero
        num[U(i)] = zero
        den[U(i)] = zero
    for j in range(d.shape[0]):
        if by_count:
            for i in range(m):
                v = d[j, U(i)]
                s[U(i)] += (one if v > zero else zero) - (one if v < zero else zero)
        else:
            for i in range(m):
                s[U(i)] += d[j, U(i)]
    for i in range(m):  # the elected sign: +1, -1, or 0 where the votes cancel or are NaN
        v = s[U(i)]
        s[U(i)] = (one if v > zero else zero) - (one if v < zero else zero)
    for j in range(d.shape[0]):
        wj = weights[j]
        aj = after[j]
        for i in range(m):
            v = d[j, U(i)]
            agree = v * s[U(i)] > zero
            den[U(i)] += wj if agree else zero
            num[U(i)] += (v if agree else zero) * aj


def _merge_of(drop: int):
    """The merge kernel of one drop mode (sparse.merge on a flat chunk starting at flat index `offset`), with
    `drop` a constant, so that only its branch is compiled: with every mode's branches in one kernel, LLVM
    vectorised none of the per-entry loops (the README's performance section has the figures)."""

    def merge(
        xs,
        b,
        out,
        kinds,
        scales,
        keys,
        thr,
        tf,
        tt,
        tc,
        masks,
        vf,
        vt,
        vc,
        elect,
        by_count,
        normalize,
        weights,
        after,
        lam,
        offset,
    ):  # pragma: no cover - compiled
        """Drop (_masked_block's bits, _keep_block's draws or band, or the variance's shared keep), scale, then
        sum, or elect signs and sum (or average) the agreeing entries; in the torch path's float32 operations
        and order."""
        xs, b, out, kinds, scales, keys, thr, tf, tt, tc = borrow((xs, b, out, kinds, scales, keys, thr, tf, tt, tc))
        masks, vf, vt, vc, weights, after = borrow((masks, vf, vt, vc, weights, after))
        n = b.size
        bf_own, bf = lend(np.empty(BLOCK, np.float32))
        s_own, s = lend(np.empty(BLOCK, np.float32))
        num_own, num = lend(np.empty(BLOCK, np.float32))
        den_own, den = lend(np.empty(BLOCK, np.float32))
        kp_own, kp = lend(np.empty(BLOCK, np.uint8))
        shared_own, shared = lend(np.empty(BLOCK, np.uint8))
        d_own, d = lend(np.empty((len(xs), BLOCK), np.float32))
        for st in range(0, n, BLOCK):
            m = min(BLOCK, n - st)
            for i in range(m):
                bf[i] = load(b, U(st + i))
            _drop_block(
                xs, bf, st, m, offset + st, drop, kinds, scales, keys, thr, tf, tt, tc, masks, vf, vt, vc, d, kp, shared
            )
            if not elect:  # merged = d_0 + d_1 + ...; * lam; + base
                for i in range(m):
                    s[i] = d[0, i]
                for j in range(1, len(xs)):
                    dj = d[j]
                    for i in range(m):
                        s[i] += dj[i]
                for i in range(m):
                    store(out, U(st + i), s[i] * lam + bf[i])
                continue
            _elect_block(d, m, by_count, weights, after, s, num, den)
            store_elected(out, st, m, num, den, bf, lam, normalize)
        keep_alive((d_own, bf_own, s_own, num_own, den_own, kp_own, shared_own))

    return _of_mode(merge, drop)


def _of_mode(fn, drop: int):
    """fn as a kernel of its own name in numba's cache (`merge_2`, say): closures of one function would share
    one index file, told apart by their closure's hash alone, and two processes filling it at once could
    leave one mode's key pointing at another mode's code, of the same signature."""
    fn.__qualname__ = f"{fn.__qualname__}_{drop}"
    return kernel(fn)


# by drop mode, each compiled on first use: the rescale's sums (DARE's draws, Breadcrumbs' band; DELLA's
# masks come from _magprune, SCE keeps by variance) and the merges
SCANS = {drop: _scan_of(drop) for drop in (RANDOM, OUTLIERS)}
MERGES = tuple(_merge_of(drop) for drop in (RANDOM, OUTLIERS, MAGPRUNE, VARIANCE))

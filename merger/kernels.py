"""Fused CPU kernels (numba) for the methods whose eager torch form is compute-bound.

TIES in eager torch costs about 25 elementwise ops per entry plus a radix select; these kernels read
the stored bytes (bfloat16, float16 or float32) straight from the memory-mapped inputs, compute in
float32 in registers and write the output dtype, in two passes per tensor: one that counts and
gathers around each model's trim threshold, one that merges. Results are bit-identical to the eager
path (same float32 operations in the same order, no fast-math, no FMA contraction).

Arrays reach the kernels as the numpy views merger.sources.MappedReader makes: bfloat16 as int16
bits and float16 as uint16 bits (numba has neither type), float32 as itself. Indices inside the
loops are unsigned, which lets LLVM vectorize them (a signed index costs a negative-index check per
access); where its loop vectorizer gives up (the band pass's compares into bit masks), an intrinsic
emits the LLVM vector operations directly. Kernels are compiled on first use and cached on disk in
merger's own cache directory (`numba/` in merger.files.cache_dir()), which only this user may write:
numba's cache index is a pickle, and loading one somebody else wrote could run their code. Where that
directory is not private, kernels are compiled in every process instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numba
import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.core.caching import FunctionCache
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from merger import budget
from merger.errors import NaNTaskVector
from merger.files import private_cache
from merger.sources import KERNEL_DTYPES

_cache_dir = private_cache("numba")
CACHE = _cache_dir is not None
if CACHE:  # read by numba when each kernel below is decorated: before that, whatever NUMBA_CACHE_DIR says
    numba.config.CACHE_DIR = str(_cache_dir)

# CPUs whose 512-bit vectors run the kernels faster than LLVM's default 256 (its tuning for every AVX-512 Intel
# CPU, against the clock drop of early ones): one_thread.py on an Emerald Rapids VM, alternating, took 4-24% less
# for TIES, DARE, DELLA, SCE, Arcee Fusion and slerp. Sapphire Rapids is the same core; others are unmeasured.
WIDE_VECTORS = frozenset({"sapphirerapids", "emeraldrapids"})


def wide_vector_features(cpu: str, features: str) -> str | None:
    """The LLVM feature string that lets the kernels use 512-bit vectors on `cpu` (features: what numba would
    compile for, numba.core.codegen.get_host_cpu_features(): '' where LLVM cannot tell, AVX off under
    NUMBA_ENABLE_AVX=0), or None where LLVM's default is kept."""
    return f"{features},-prefer-256-bit" if cpu in WIDE_VECTORS and "+avx512f" in features.split(",") else None


# read by numba when the process's first numba function is decorated (the target machine of its codegen, which
# every later one shares, and the cache's key): merger's kernels are, unless merger runs as a library after other
# numba code. NUMBA_CPU_NAME or NUMBA_CPU_FEATURES, where set, decide instead
if numba.config.CPU_NAME is None and numba.config.CPU_FEATURES is None:
    numba.config.CPU_FEATURES = wide_vector_features(binding.get_host_cpu_name(), get_host_cpu_features())

# Whether the kernels compile for AVX-512, whose compress stores (vpcompressd) write a vector's selected lanes side
# by side: elsewhere LLVM spells them out lane by lane, slower than a scalar loop, so kernels choose by this
# (a named NUMBA_CPU_NAME without features: unknown, so not)
_FEATURES = numba.config.CPU_FEATURES or ("" if numba.config.CPU_NAME else get_host_cpu_features())
COMPRESS_STORE = "+avx512f" in _FEATURES.split(",")


@functools.cache
def sources_digest(root: Path = Path(__file__).parent) -> str:
    """A digest of every Python source under `root` (merger's own, by default), names and bytes."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _MendingCache(FunctionCache):
    """numba's on-disk cache of a kernel, except that files a crash or a full disk left damaged (numba
    raises on a truncated index) are dropped and the kernel compiled again, instead of ending the merge.

    numba keys a cached kernel to its own file's mtime and size alone, but a kernel inlines helpers and
    freezes constants from other modules (sparse_kernels.py from this one): a change to kernels.py alone
    would leave sparse_kernels' cached code as it was compiled. Here the key also holds sources_digest,
    so that any change to merger's sources compiles the kernels again, and whether numba checks bounds
    (NUMBA_BOUNDSCHECK, which numba's key leaves out): a checked run never loads unchecked code, nor a
    later run the checked (slower) code."""

    def __init__(self, py_func):
        super().__init__(py_func)
        stamp = (self._cache_file._source_stamp, sources_digest(), numba.config.BOUNDSCHECK)
        self._cache_file._source_stamp = stamp

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:
            if _from_an_interrupt(e):
                raise
            self._drop()
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception:
            self._drop()  # the next run compiles it again

    def _drop(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.unlink(self._cache_file._index_path)


def _from_an_interrupt(e: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt caused `e` (numba reraises one that lands in its loader as SystemError)."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def kernel(fn):
    """A numba kernel: compiled on first use without the GIL, cached in merger's private cache."""
    dispatcher = njit(nogil=True, cache=False, boundscheck=False)(fn)
    if CACHE:
        dispatcher._cache = _MendingCache(fn)  # what njit(cache=True) sets, with the mending above
    return dispatcher


U = np.uint64
BLOCK = 256  # entries per inner loop of every kernel: their float32 scratch stays in L1 (1024 measured 15-20% slower
# for TIES merging and linear sums with the inputs in DRAM, 2 to 5 models)
SUPPORTED = KERNEL_DTYPES  # safetensors codes the kernels read and write


def supported(*codes: str) -> bool:
    return all(c in SUPPORTED for c in codes)


@kernel
def count_masked(bits, mask):  # pragma: no cover - compiled
    """Entries whose bits under `mask` are all set (with a float format's exponent mask: inf and NaN)."""
    n = 0
    for i in range(U(bits.size)):
        n += (bits[i] & mask) == mask
    return n


@intrinsic
def _f32_from_bits(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_f32(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_of_f64(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _f64_from_bits(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


ROUND = 1.5 * 2.0**52  # q + ROUND holds q rounded to an integer (ties to even) in its low bits, for |q| <= 2**51
ROUND_BITS = np.int64(np.float64(ROUND).view(np.int64))


@njit(inline="always")
def rounded(q):  # pragma: no cover - compiled
    """q (|q| <= 2**51) rounded to the nearest integer, ties to even, as int64: the low bits of q + ROUND, in
    operations that vectorize (a conversion to int64 does not)."""
    return _bits_of_f64(q + ROUND) - ROUND_BITS


@intrinsic
def _f32_from_half(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _half_from_f32(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _trailing_zeros(typingctx, u):  # the index of the lowest set bit of u != 0
    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


@intrinsic
def _prefetch(typingctx, a, i):  # ask the CPU to fetch the cache line holding a[i] (no fault if unmapped)
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep, data
        return context.get_dummy_value()

    return types.none(a, types.uint64), codegen


@intrinsic
def _popcount(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


def _lanes(context, builder, arrty, arr, off):
    """arr[off:off + 8] as an LLVM <8 x float>: bfloat16 (int16 bits), float16 (uint16 bits) or float32."""
    data = context.make_array(arrty)(context, builder, arr).data
    f32x8 = ir.VectorType(ir.FloatType(), 8)
    if arrty.dtype == types.float32:
        return builder.load(builder.bitcast(builder.gep(data, [off]), f32x8.as_pointer()), align=4)
    if arrty.dtype == types.uint16:
        half = ir.VectorType(ir.HalfType(), 8)
        return builder.fpext(builder.load(builder.bitcast(builder.gep(data, [off]), half.as_pointer()), align=2), f32x8)
    i32x8 = ir.VectorType(ir.IntType(32), 8)
    v = builder.load(builder.bitcast(builder.gep(data, [off]), ir.VectorType(ir.IntType(16), 8).as_pointer()), align=2)
    return builder.bitcast(builder.shl(builder.zext(v, i32x8), ir.Constant(i32x8, [16] * 8)), f32x8)


@intrinsic
def _marks8(typingctx, x, xoff, bf, boff, low, high):
    """For the eight a_i = |x[xoff + i] - bf[boff + i]| (bf float32): bit i set where a_i >= low or
    a_i is NaN (an unordered compare), bit 8 + i where a_i > high (ordered: not NaN), as LLVM vector
    compares. A NaN thus lands in the band and is gathered, where it is counted for nothing here.
    The loop vectorizer does not turn the scalar form into this."""
    if x.dtype not in (types.int16, types.uint16, types.float32) or bf.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        f32x8 = ir.VectorType(ir.FloatType(), 8)
        i32x8 = ir.VectorType(ir.IntType(32), 8)
        d = builder.fsub(
            _lanes(context, builder, sig.args[0], args[0], args[1]),
            _lanes(context, builder, sig.args[2], args[2], args[3]),
        )
        a = builder.bitcast(builder.and_(builder.bitcast(d, i32x8), ir.Constant(i32x8, [0x7FFFFFFF] * 8)), f32x8)

        def splat(f):
            v = builder.insert_element(ir.Constant(f32x8, ir.Undefined), f, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(v, ir.Constant(f32x8, ir.Undefined), ir.Constant(i32x8, [0] * 8))

        i64 = ir.IntType(64)
        reach = builder.zext(builder.bitcast(builder.fcmp_unordered(">=", a, splat(args[4])), ir.IntType(8)), i64)
        over = builder.zext(builder.bitcast(builder.fcmp_ordered(">", a, splat(args[5])), ir.IntType(8)), i64)
        return builder.or_(reach, builder.shl(over, ir.Constant(i64, 8)))

    return types.uint64(x, types.uint64, bf, types.uint64, types.float32, types.float32), codegen


def _borrowed(context, builder, ty, value):
    """value (of numba type ty) with every array in it holding no reference: meminfo and parent null."""
    if isinstance(ty, types.Array):
        arr = context.make_array(ty)(context, builder, value=value)
        arr.meminfo = cgutils.get_null_value(arr.meminfo.type)
        arr.parent = cgutils.get_null_value(arr.parent.type)
        return arr._getvalue()
    if isinstance(ty, types.BaseTuple):
        for i, t in enumerate(ty):
            value = builder.insert_value(value, _borrowed(context, builder, t, builder.extract_value(value, i)), i)
    return value


@intrinsic
def borrow(typingctx, a):
    """The arrays of `a` (an array, or a tuple holding arrays and other values) as views that hold no
    reference to their memory. numba counts references to every array a kernel binds (each `x = xs[j]`,
    each `v = a[j]` view) with an atomic increment and decrement of its memory's count, which its
    per-block loops did tens of millions of times per merge: 9% of a TIES merge's CPU time, 18% of
    dare_linear's (perf). A view with no memory info skips them (NRT_incref of NULL returns at once).
    For a kernel's arguments, which its caller holds for the whole call, and for arrays the kernel makes
    itself, held to the end by keep_alive()."""

    def codegen(context, builder, sig, args):
        return _borrowed(context, builder, sig.args[0], args[0])

    return a(a), codegen


@intrinsic
def keep_alive(typingctx, a):
    """Nothing, but a use of `a`: numba frees a kernel's own array after its last use, so a borrowed view
    of it (`v = borrow(own)`) is valid up to a `keep_alive(own)` after the loops that use the view."""

    def codegen(context, builder, sig, args):
        return context.get_dummy_value()

    return types.none(a), codegen


@njit(inline="always")
def lend(own):  # pragma: no cover - compiled
    """(own, a borrowed view of it), for a kernel's own array: `x_own, x = lend(np.empty(...))`, the loops
    using x, then keep_alive((x_own, ...)) after them."""
    return own, borrow(own)


def load(a, i):  # a[i] as float32
    raise NotImplementedError


@overload(load, inline="always")
def _load(a, i):
    if a.dtype == types.int16:  # bfloat16: the high half of a float32
        return lambda a, i: _f32_from_bits(np.uint32(np.uint16(a[i])) << np.uint32(16))
    if a.dtype == types.uint16:
        return lambda a, i: _f32_from_half(a[i])
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    return None


def store(a, i, v):  # a[i] = v, rounded to nearest even as torch's casts do
    raise NotImplementedError


@overload(store, inline="always")
def _store(a, i, v):
    if a.dtype == types.int16:

        def store_bf16(a, i, v):
            u = _bits_of_f32(v)
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = np.uint32(0) - np.uint32(v != v)  # all ones for NaN, which becomes torch's quiet NaN
            a[i] = np.int16(np.uint16((r & ~nan) | (np.uint32(0x7FC0) & nan)))

        return store_bf16
    if a.dtype == types.uint16:

        def store_f16(a, i, v):
            a[i] = _half_from_f32(v)

        return store_f16
    if a.dtype == types.float32:

        def store_f32(a, i, v):
            a[i] = v

        return store_f32
    return None


@kernel
def copy_as(x, start, out):  # pragma: no cover - compiled
    """out = x's entries from `start`, as float32 would hold them, in out's dtype (passthrough's scale 1; the
    engine's float32 copies of ingredients stored in different dtypes)."""
    for i in range(out.size):
        store(out, U(i), load(x, U(start + i)))


RADIX_BINS = 1 << 15  # the top 16 bits of a non-negative float32 (sign clear): the same order as the value


@njit(inline="always")
def radix_bin(v):  # pragma: no cover - compiled
    """v's bin of RADIX_BINS (v a float32 >= 0, or NaN): its top 16 bits with the sign cleared, so that a NaN
    of either sign (inf - inf gives one with the sign set) lands in the NaN bins, inside the histogram."""
    return U((_bits_of_f32(v) >> np.uint32(16)) & np.uint32(0x7FFF))


@njit(inline="always")
def prefetch_run(starts, r, run, b, xs):  # pragma: no cover - compiled
    """Ask for the cache lines of sample run r (the `run` entries at starts[r], if r is a run) of b and of each
    array of xs: sample runs lie a page apart, too far for the hardware prefetcher."""
    if r < starts.size:
        p = starts[r]
        for q in range(0, run, 64 // b.itemsize):
            _prefetch(b, U(p + q))
            for j in range(len(xs)):
                _prefetch(xs[j], U(p + q))


@kernel
def _sample_hist(xs, b, starts, run, hist):  # pragma: no cover - compiled
    """hist[j, top 16 bits of |x_j - b|] += 1 over the runs of `run` entries at `starts`.

    The runs lie a page apart, too far for the hardware prefetcher: each run's lines are prefetched
    eight runs ahead (2.9 -> 1.8 ns per entry and model with the inputs in memory)."""
    xs, b, starts, run, hist = borrow((xs, b, starts, run, hist))
    bf_own, bf = lend(np.empty(run, np.float32))
    for r in range(starts.size):
        prefetch_run(starts, r + 8, run, b, xs)
        s = starts[r]
        for i in range(run):
            bf[i] = load(b, U(s + i))
        for j in range(len(xs)):
            x = xs[j]
            h = hist[j]
            for i in range(run):
                v = abs(load(x, U(s + i)) - bf[i])
                h[radix_bin(v)] += 1
    keep_alive((bf_own,))


@kernel
def _kth_largest(vals, rank):  # pragma: no cover - compiled
    """The rank-th largest of non-negative float32 values: a radix select on their bit patterns
    (which order like the values), 14 bits of the remaining span per round, no sort."""
    while True:
        u = vals.view(np.uint32)
        low = u[0]
        high = u[0]
        for i in range(u.size):  # one pass for both ends
            low = min(low, u[i])
            high = max(high, u[i])
        span = high - low
        if span == 0:
            return vals[0]
        shift = np.uint32(0)
        while (span >> shift) >= np.uint32(1 << 14):
            shift += np.uint32(1)
        hist = np.zeros((1 << 14) + 1, np.int64)
        for i in range(u.size):
            hist[U((u[i] - low) >> shift)] += 1
        k = hist.size - 1
        while hist[k] < rank:
            rank -= hist[k]
            k -= 1
        members = np.empty(hist[k], np.float32)
        g = 0
        for i in range(u.size):
            if ((u[i] - low) >> shift) == k:
                members[g] = vals[i]
                g += 1
        vals = members


@njit(inline="always")
def band_block(x, st, bf, m, low, high, vj, ij, g, first):  # pragma: no cover - compiled
    """Over the block of m entries a_i = |x[st + i] - bf[i]|: how many are > high, and those with
    low <= a_i <= high, or NaN, appended in index order to vj, ij from g on (ij: first + i). Returns
    (the count above, the new g).

    Eight entries at a time give two bit masks (>= lo, > hi); 64 entries' masks give the count above
    (a popcount) and the band entries (set bits of reach & ~above), which are few."""
    full = m - m % 64
    cnt = U(0)
    for w0 in range(0, full, 64):
        reach = U(0)
        over = U(0)
        for k in range(8):
            marks = _marks8(x, U(st + w0 + 8 * k), bf, U(w0 + 8 * k), low, high)
            reach |= (marks & U(0xFF)) << U(8 * k)
            over |= (marks >> U(8)) << U(8 * k)
        cnt += _popcount(over)
        band = reach & ~over
        while band:
            i = w0 + np.int64(_trailing_zeros(band))
            band &= band - U(1)
            vj[U(g)] = abs(load(x, U(st + i)) - bf[i])
            ij[U(g)] = first + i
            g += 1
    for i in range(full, m):  # the block's tail
        v = abs(load(x, U(st + i)) - bf[i])
        cnt += U(v > high)
        if not ((v < low) | (v > high)):  # in the band, or NaN
            vj[U(g)] = v
            ij[U(g)] = first + i
            g += 1
    return np.int64(cnt), g


@kernel
def _band_pass(xs, b, lo, hi, vals, idx, offset):  # pragma: no cover - compiled
    """Per model j: how many |x_j - b| > hi[j], and the entries with lo[j] <= |x_j - b| <= hi[j], or
    NaN, gathered in index order into vals[j], idx[j] (flat index + offset): band_block over each
    block. Returns (above, gathered)."""
    xs, b, lo, hi, vals, idx, offset = borrow((xs, b, lo, hi, vals, idx, offset))
    n = b.size
    nm = len(xs)
    above = np.zeros(nm, np.int64)
    got = np.zeros(nm, np.int64)
    bf_own, bf = lend(np.empty(BLOCK, np.float32))
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        for i in range(m):
            bf[i] = load(b, U(st + i))
        for j in range(nm):
            cnt, got[j] = band_block(xs[j], st, bf, m, lo[j], hi[j], vals[j], idx[j], got[j], offset + st)
            above[j] += cnt
    keep_alive((bf_own,))
    return above, got


@njit(inline="always")
def store_elected(out, st, m, num, den, bf, lam, normalize):  # pragma: no cover - compiled
    """out[st:st + m] = the agreeing entries' mean (num / den) or sum (num), times lam, plus the base bf: the
    last step of TIES' election, in its float32 order."""
    if normalize:  # den is 0 only where nothing agrees and num is 0: 0 / tiny is 0
        tiny = np.float32(np.finfo(np.float32).tiny)
        for i in range(m):
            store(out, U(st + i), num[i] / max(den[i], tiny) * lam + bf[i])
    else:
        for i in range(m):
            store(out, U(st + i), num[i] * lam + bf[i])


@kernel
def _ties_merge(xs, b, out, gt, ge, cut, w, lam, normalize, by_count, offset):  # pragma: no cover - compiled
    """TIES on a flat chunk starting at flat index `offset`. Model j keeps |d_j| > gt[j] at flat
    indices >= cut[j] and |d_j| > ge[j] (ge = the float just below the threshold, i.e. >= threshold)
    below it; gt[j] < 0 keeps everything. Same float32 operations, in the same order, as the eager
    `ties`."""
    xs, b, out, gt, ge, cut, w, lam, normalize, by_count, offset = borrow(
        (xs, b, out, gt, ge, cut, w, lam, normalize, by_count, offset)
    )
    n = b.size
    nm = len(xs)
    zero = np.float32(0)
    one = np.float32(1)
    bf_own, bf = lend(np.empty(BLOCK, np.float32))
    s_own, s = lend(np.empty(BLOCK, np.float32))
    num_own, num = lend(np.empty(BLOCK, np.float32))
    den_own, den = lend(np.empty(BLOCK, np.float32))
    trimmed_own, trimmed = lend(np.empty((nm, BLOCK), np.float32))
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        for i in range(m):
            bf[i] = load(b, U(st + i))
            s[i] = zero
            num[i] = zero
            den[i] = zero
        for j in range(nm):
            x = xs[j]
            wj = w[j]
            dj = trimmed[j]
            c = min(max(cut[j] - offset - st, 0), m)
            if gt[j] < zero:  # keep everything (NaN too, as the eager path does)
                for i in range(m):
                    dj[i] = (load(x, U(st + i)) - bf[i]) * wj
            elif c == 0 or c == m:  # ties at the threshold kept in the whole block, or in none of it
                t = ge[j] if c == m else gt[j]
                for i in range(m):
                    d = load(x, U(st + i)) - bf[i]
                    dj[i] = d * wj if abs(d) > t else zero
            else:  # the one block that holds the cutoff: ties are kept below it
                for i in range(m):
                    d = load(x, U(st + i)) - bf[i]
                    a = abs(d)
                    dj[i] = d * wj if (a > gt[j]) | ((a > ge[j]) & (i < c)) else zero
            if by_count:
                for i in range(m):
                    s[i] += np.float32(dj[i] > zero) - np.float32(dj[i] < zero)
            else:
                for i in range(m):
                    s[i] += dj[i]
        for i in range(m):  # the elected sign: +1, -1, or 0 where the votes cancel or are NaN
            s[i] = (one if s[i] > zero else zero) - (one if s[i] < zero else zero)
        for j in range(nm):
            awj = abs(w[j])
            dj = trimmed[j]
            for i in range(m):
                v = dj[i]
                agree = v * s[i] > zero  # exact: s[i] is a sign
                num[i] += v if agree else zero
                den[i] += awj if agree else zero
        store_elected(out, st, m, num, den, bf, lam, normalize)
    keep_alive((trimmed_own, bf_own, s_own, num_own, den_own))


@kernel
def _weighted_sum(xs, b, out, w, scale, divisor):  # pragma: no cover - compiled
    """out = sum_j w[j] * x_j, divided by `divisor` unless it is 0 (linear), or with a base b (an
    array with entries): out = b + scale * sum_j w[j] * (x_j - b) (task arithmetic)."""
    xs, b, out, w, scale, divisor = borrow((xs, b, out, w, scale, divisor))
    n = out.size
    with_base = b.size > 0
    zero = np.float32(0)
    bf_own, bf = lend(np.zeros(BLOCK, np.float32))
    acc_own, acc = lend(np.empty(BLOCK, np.float32))
    for st in range(0, n, BLOCK):
        m = min(BLOCK, n - st)
        for i in range(m):
            acc[i] = zero
        if with_base:
            for i in range(m):
                bf[i] = load(b, U(st + i))
        for j in range(len(xs)):
            x = xs[j]
            wj = w[j]
            for i in range(m):
                acc[i] += wj * (load(x, U(st + i)) - bf[i])
        if with_base:
            for i in range(m):
                store(out, U(st + i), acc[i] * scale + bf[i])
        elif divisor != zero:
            for i in range(m):
                store(out, U(st + i), acc[i] / divisor)
        else:
            for i in range(m):
                store(out, U(st + i), acc[i])
    keep_alive((bf_own, acc_own))


def weighted_sum(
    xs: Sequence[np.ndarray],
    base: np.ndarray | None,
    out: np.ndarray,
    weights: Sequence[float],
    run: Runner,
    *,
    scale: float = 1.0,
    divisor: float = 0.0,
) -> None:
    """Linear (base None): out = sum w_j x_j (/ divisor). Task arithmetic: out = base + scale *
    sum w_j (x_j - base)."""
    w = np.array(weights, np.float32)
    xs = tuple(xs)
    none = np.empty(0, np.float32)

    def part(s: int, e: int) -> None:
        b = base[s:e] if base is not None else none
        _weighted_sum(tuple(x[s:e] for x in xs), b, out[s:e], w, np.float32(scale), np.float32(divisor))

    run(part, out.size)


# run(fn, n[, size]): calls fn(start, end) over consecutive ranges covering [0, n) (of `size`
# entries, by default the engine's chunk), possibly on several threads at once, and returns the
# results in range order.
Runner = Callable[..., list]

SAMPLE_RUN = 128  # consecutive entries per sample point: 256 bytes of bfloat16, each run costs a page walk
SAMPLE_EVERY = 16  # one entry in SAMPLE_EVERY is sampled: a run per 4 KiB page of bfloat16
EXACT_BELOW = 1 << 16  # smaller tensors gather every entry: exact in one pass
SAMPLE_PART = 1 << 21  # the fewest entries per thread's share of the sample pass (it samples 1/16 of them)


def top_k_abs_deltas(
    xs: Sequence[np.ndarray], base: np.ndarray, ks: Sequence[int], run: Runner
) -> list[tuple[float, int, int] | None]:
    """For each model j, the ks[j]-th largest |x_j - base| over the flat tensors with the same tie
    rule as task_vectors.kth_largest: (threshold, ties kept, flat index just past the last kept tie),
    or None where ks[j] covers every entry (select_in_bands, with their sample and band passes). A NaN
    entry cannot be ranked: NaNTaskVector(j, count) for the first model j that needs a trim and has any."""
    n = base.size
    wanted = [j for j, k in enumerate(ks) if 0 < k < n]
    # k = 0 keeps nothing: no magnitude is above inf, and no tie at it comes before flat index 0
    result: list[tuple[float, int, int] | None] = [None if k else (math.inf, 0, 0) for k in ks]
    if not wanted:
        return result
    sel = tuple(xs[j] for j in wanted)

    def band_pass(todo: list[int], s: int, e: int, lo: np.ndarray, hi: np.ndarray, vals, idx):
        return _band_pass(tuple(sel[w][s:e] for w in todo), base[s:e], lo, hi, vals, idx, s)

    try:
        found = select_in_bands(n, [ks[j] for j in wanted], lambda: _sample(sel, base, run), band_pass, run)
    except NaNTaskVector as e:
        raise NaNTaskVector(wanted[e.model], e.count) from None
    for w, j in enumerate(wanted):
        result[j] = found[w]
    return result


class BandPass(Protocol):
    """band_pass(todo, start, end, lo, hi, vals, idx) -> (above, gathered): over the flat entries [start, end)
    of the populations todo (indices into select_in_bands' ks), the count of each one's values above its
    band hi[i], and its values in [lo[i], hi[i]] or NaN gathered in index order into vals[i], idx[i] (their
    flat indices), as _band_pass does; above and gathered are arrays of len(todo)."""

    def __call__(
        self, todo: list[int], start: int, end: int, lo: np.ndarray, hi: np.ndarray, vals: np.ndarray, idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


def select_in_bands(
    n: int,
    ks: Sequence[int],
    sampled: Callable[[], np.ndarray],
    band_pass: BandPass,
    run: Runner,
    settle: Callable[[], Sequence[int]] | None = None,
) -> list[tuple[float, int, int]]:
    """For each k of ks (1 <= k <= n), the k-th largest of its population of n non-negative float32 values,
    as _select gives it: (threshold, ties kept, flat index just past the last kept tie).

    sampled() gives each population's radix histogram over a sample (rows in the order of ks:
    sample_histograms); a band [lo, hi] around each threshold comes from it, band_pass counts the values above
    each band and gathers those in it, and the exact threshold is selected among the gathered ones. A band
    that misses (an unlucky sample) is moved to the side it missed, four times wider, and the pass repeated
    for that population; the last resort is the whole side, so the answer is always exact. A band holding
    more than budget.gathered_most(n) values (many ties, or a wide last resort) is not kept but narrowed by
    counting (_count_select). Populations of EXACT_BELOW entries or fewer are gathered whole, unsampled. A
    NaN value cannot be ranked: NaNTaskVector(w, count) for the first population w (an index into ks)
    holding any. settle: where ks are estimates that the first band pass settles (SCE's k counts the nonzero
    variances that pass sees), called once it is over: the ranks to select, as ks."""
    lo = np.zeros(len(ks), np.float32)
    hi = np.full(len(ks), np.inf, np.float32)
    hist = None
    if n > EXACT_BELOW:  # small tensors gather every entry (the band [0, inf])
        hist = sampled()
        for w, k in enumerate(ks):
            lo[w], hi[w] = _band(hist[w], k / n, 1)
    widen = [1] * len(ks)
    todo = list(range(len(ks)))
    result: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(ks)
    while todo:
        found = _gather(todo, n, band_pass, lo[todo], hi[todo], run)
        if settle is not None:
            ks, settle = settle(), None
        exact, retry = [], []
        for i, band in enumerate(found):
            w = todo[i]
            if band.nans:
                raise NaNTaskVector(w, band.nans)
            k = ks[w]
            if lo[w] <= 0 and hi[w] == np.inf or band.above < k <= band.above + band.count:
                exact.append(i)
                continue
            widen[w] *= 4
            new_lo, new_hi = _band(hist[w], k / n, widen[w])
            if band.above >= k:  # the threshold lies above the band
                lo[w], hi[w] = hi[w], new_hi
            else:
                lo[w], hi[w] = new_lo, lo[w]
            retry.append(w)

        picks = [(found[i], todo[i]) for i in exact if found[i].vals is not None]
        run(functools.partial(_select_one, picks, ks, result), len(picks), 1)  # side by side on the threads
        for i in exact:
            if found[i].vals is None:
                w = todo[i]
                result[w] = _count_select(w, n, band_pass, (lo[w], hi[w]), ks[w] - found[i].above, run)
        todo = retry
    return result


def _select_one(picks: list, ks: Sequence[int], result: list, i: int, _: int) -> None:
    band, j = picks[i]
    result[j] = _select(band.vals, band.idx, ks[j] - band.above)


def _sample(xs: tuple[np.ndarray, ...], base: np.ndarray, run: Runner) -> np.ndarray:
    """Per model, a radix histogram of |x_j - base| over a sample of 1/SAMPLE_EVERY of the entries."""

    def fill(starts: np.ndarray, hist: np.ndarray) -> None:
        _sample_hist(xs, base, starts, SAMPLE_RUN, hist)

    return sample_histograms(base.size, len(xs), fill, run)


def sample_histograms(n: int, rows: int, fill: Callable[[np.ndarray, np.ndarray], None], run: Runner) -> np.ndarray:
    """rows radix histograms (rows, RADIX_BINS: radix_bin's) of populations of n values over a sample of
    1/SAMPLE_EVERY of their entries: runs of SAMPLE_RUN at random starts, fixed per size so that runs are
    reproducible. fill(starts, hist) adds the runs at `starts` (ascending) to hist; a run may reach past the
    part it starts in, never past n."""
    rng = np.random.default_rng(n)
    starts = np.sort(rng.integers(0, n - SAMPLE_RUN, max(EXACT_BELOW, n // SAMPLE_EVERY) // SAMPLE_RUN)).astype(
        np.int64
    )

    def part(s: int, e: int) -> np.ndarray:
        hist = np.zeros((rows, RADIX_BINS), np.int64)
        fill(starts[np.searchsorted(starts, s) : np.searchsorted(starts, e)], hist)
        return hist

    # up to 16 parts (the engine's most threads), of at least SAMPLE_PART entries: few histograms to add
    first, *rest = run(part, n, max(SAMPLE_PART, -(-n // 16)))
    for h in rest:
        first += h
    return first


def _band(hist: np.ndarray, p: float, widen: int) -> tuple[float, float]:
    """Values that bracket the top-p quantile of the population a sample's radix histogram came from,
    with a margin of 4 standard deviations of the sample rank (doubled: entries of a sample run are
    correlated), times `widen`; 0 and inf where the margin runs off the sample."""
    size = int(hist.sum())
    spread = widen * (8 * math.sqrt(size * p * (1 - p)) + 2 * SAMPLE_RUN)
    top, bottom = int(p * size - spread), int(p * size + spread)  # ranks from the top
    from_top = np.cumsum(hist[::-1])  # from_top[i]: entries in bins >= RADIX_BINS - 1 - i
    hi, lo = np.inf, 0.0
    if top >= 1:  # the bin holding the top-th largest, and its upper edge
        b = RADIX_BINS - 1 - int(np.searchsorted(from_top, top))
        hi = float(np.uint32((b + 1) << 16).view(np.float32)) if b + 1 < RADIX_BINS else np.inf
    if bottom < size:
        b = RADIX_BINS - 1 - int(np.searchsorted(from_top, bottom))
        lo = float(np.uint32(b << 16).view(np.float32))
    return lo, hi


class Band(NamedTuple):
    """One population's band pass over all entries: the values above the band, in it and NaN, and the
    band's values with their flat indices (ascending), or None where more than the gather's limit."""

    above: int
    count: int
    nans: int
    vals: np.ndarray | None
    idx: np.ndarray | None


def _gather(todo: list[int], n: int, band_pass: BandPass, lo: np.ndarray, hi: np.ndarray, run: Runner) -> list[Band]:
    """Per population of todo, its Band over all n entries (select_in_bands' band_pass). A population keeps
    at most budget.gathered_most(n) of its band's values: past that, the parts that follow drop theirs, so
    that a band of ties never holds the whole tensor."""
    nm = len(todo)
    most = budget.gathered_most(n)
    kept = np.zeros(nm, np.int64)  # values gathered so far, per population (under the lock)
    lock = threading.Lock()

    def part(s: int, e: int):
        vals = np.empty((nm, e - s), np.float32)
        idx = np.empty((nm, e - s), np.int64)
        above, got = band_pass(todo, s, e, lo, hi, vals, idx)
        nans = [int(np.isnan(vals[j, : got[j]]).sum()) for j in range(nm)]  # gathered with the band's
        with lock:
            kept[:] += got
            fits = kept <= most
        pieces = [(vals[j, : got[j]].copy(), idx[j, : got[j]].copy()) if fits[j] else None for j in range(nm)]
        return above, got, nans, pieces

    parts = run(part, n)
    bands = []
    for j in range(nm):
        pieces = [p[3][j] for p in parts]
        for p in parts:
            p[3][j] = None  # each piece goes once it is joined: the band's values are held once, not twice
        whole = None if kept[j] > most else _joined(pieces)
        bands.append(
            Band(
                int(sum(p[0][j] for p in parts)),
                int(sum(p[1][j] for p in parts)),
                int(sum(p[2][j] for p in parts)),
                *(whole or (None, None)),
            )
        )
    return bands


def _joined(pieces: list) -> tuple[np.ndarray, np.ndarray]:
    """The (values, indices) pieces end to end, each piece released once it is copied."""
    total = sum(v.size for v, _ in pieces)
    vals, idx = np.empty(total, np.float32), np.empty(total, np.int64)
    at = 0
    for i, (v, x) in enumerate(pieces):
        vals[at : at + v.size], idx[at : at + v.size] = v, x
        at += v.size
        pieces[i] = None
    return vals, idx


def _count_select(w: int, n: int, band_pass: BandPass, band: tuple, rank: int, run: Runner) -> tuple[float, int, int]:
    """_select's answer for population w when its band [lo, hi] holds the rank-th largest of the band's
    values but too many of them to gather: radix histograms of the band's bit patterns (which order like
    the values), 16 bits a pass, narrow it to one value; then a pass counts that value's entries per part,
    and the part holding the rank-th of them (in index order) is gathered alone. Each part is reduced as
    soon as it is gathered: a part's values at most are held."""
    low, high = (int(np.float32(v).view(np.uint32)) for v in band)
    while low < high:
        shift = max(0, (high - low).bit_length() - 16)
        hist = np.zeros(((high - low) >> shift) + 1, np.int64)
        run(functools.partial(_add_bucket_counts, w, band_pass, low, high, shift, hist, threading.Lock()), n)
        from_top = np.cumsum(hist[::-1])
        b = hist.size - 1 - int(np.searchsorted(from_top, rank))  # the bucket holding the rank-th largest
        rank -= int(from_top[hist.size - 2 - b]) if b < hist.size - 1 else 0
        low, high = low + (b << shift), min(high, low + ((b + 1) << shift) - 1)
    threshold = np.uint32(low).view(np.float32)
    ties = run(functools.partial(_tie_counts, w, band_pass, threshold), n)
    before = 0
    for s, e, count in ties:
        if before + count >= rank:
            idx = _gathered(w, band_pass, threshold, threshold, s, e)[1]
            return float(threshold), rank, int(idx[rank - before - 1]) + 1
        before += count
    raise AssertionError("unreachable: the band holds the rank-th value")


def _gathered(w: int, band_pass: BandPass, lo, hi, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Population w's values in [lo, hi] over the entries [s, e), and their flat indices."""
    vals = np.empty((1, e - s), np.float32)
    idx = np.empty((1, e - s), np.int64)
    _, got = band_pass([w], s, e, np.array([lo], np.float32), np.array([hi], np.float32), vals, idx)
    return vals[0, : got[0]], idx[0, : got[0]]


def _add_bucket_counts(
    w: int, band_pass: BandPass, low: int, high: int, shift: int, hist, lock, s: int, e: int
) -> None:
    """hist[b] += how many of population w's values over [s, e) have a bit pattern in [low, high] that is b
    after - low, >> shift."""
    vals = _gathered(w, band_pass, *np.array([low, high], np.uint32).view(np.float32), s, e)[0]
    counts = np.bincount((vals.view(np.uint32) - np.uint32(low)) >> np.uint32(shift), minlength=hist.size)
    with lock:
        hist += counts


def _tie_counts(w: int, band_pass: BandPass, threshold, s: int, e: int) -> tuple[int, int, int]:
    return s, e, _gathered(w, band_pass, threshold, threshold, s, e)[0].size


def _select(vals: np.ndarray, idx: np.ndarray, rank: int) -> tuple[float, int, int]:
    """The rank-th largest of vals, how many entries equal to it are kept (the lowest indices first),
    and the index just past the last kept one."""
    threshold, ties, cutoff = _select_kernel(vals, idx, rank)
    return float(threshold), int(ties), int(cutoff)


@kernel
def _select_kernel(vals, idx, rank):  # pragma: no cover - compiled
    """_select in one compiled call: the threshold, then one pass counting the entries above it and
    one (stopping early) finding the last tie kept; idx is ascending."""
    threshold = _kth_largest(vals, rank)
    above = 0
    for i in range(vals.size):
        above += vals[i] > threshold
    ties = rank - above
    seen = 0
    for i in range(vals.size):
        seen += vals[i] == threshold
        if seen == ties:
            return threshold, ties, idx[i] + 1
    return threshold, ties, np.int64(-1)  # unreachable: rank <= vals.size


def ties_merge(
    xs: Sequence[np.ndarray],
    base: np.ndarray,
    out: np.ndarray,
    trim: Sequence[tuple[float, int, int] | None],
    weights: Sequence[float],
    lam: float,
    normalize: bool,
    by_count: bool,
    run: Runner,
    start: int = 0,
) -> None:
    """TIES into `out` given each model's trim (from top_k_abs_deltas over the whole tensors): xs and
    base are the entries from flat index `start` on, as many as out has."""
    gt = np.array([-1.0 if t is None else t[0] for t in trim], np.float32)
    ge = np.array([-1.0 if t is None else np.nextafter(np.float32(t[0]), np.float32(-1)) for t in trim], np.float32)
    cut = np.array([0 if t is None else t[2] for t in trim], np.int64)
    w = np.array(weights, np.float32)
    xs = tuple(xs)

    def part(s: int, e: int) -> None:
        _ties_merge(
            tuple(x[s:e] for x in xs),
            base[s:e],
            out[s:e],
            gt,
            ge,
            cut,
            w,
            np.float32(lam),
            normalize,
            by_count,
            start + s,
        )

    run(part, out.size)

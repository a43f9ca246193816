"""Exact dot products in fixed point, for interpolation's torch path and its numba kernels alike.

SLERP, NuSLERP, Multi-SLERP and the Karcher mean all return a linear combination of their inputs
whose scalar coefficients depend only on the inputs' dot products. The dot products are sums over
every entry, computed chunk by chunk: in floating point their low bits would depend on the chunking
and the device. They are summed in fixed point instead: each product (exact in float64 for float32
inputs) is scaled by a power of two to below 1 in magnitude and cut into LIMBS integer digits of
`bits` bits; a float64 sum of integers stays exact while every partial sum is below 2**53, which
`bits` guarantees for any order. The sums are then the same on any chunking and device.

Each vector's scale 2**-e must bound its entries (|v| < 2**e). Rather than a pass over the whole tensor
for its largest magnitude, e is guessed from the tensor's first SAMPLE entries and checked by the Gram
pass, which finds each vector's largest magnitude as it goes; only a wrong guess costs a second pass
(gram_by_guess). The rule depends on the entries alone, so the sums stay the same on any chunking and
device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

LIMBS = 3  # 3 * bits >= 63 for the largest tensors (2**31 entries): a relative error below 2**-32
SAMPLE = 1 << 16  # the first entries of a tensor, whose largest magnitudes guess its vectors' scales
HEADROOM = 4  # a guess lies this many binades above its sample's peak p: it bounds every entry unless one
# reaches 2**(exponent(p) + 4), 16 to 32 times p (then the pass is made again at the true peaks). Real weights
# have sparse outliers no sample finds: all-MiniLM-L6-v2's MLP output matrices hold entries 10-29x their
# first 65536 entries' largest (a headroom of 2 failed on 3 of its 104 tensors, 4 on none). The cost:
# 2 * HEADROOM bits of the LIMBS * bits below each product's bound (63 at least): the truncated digits sum to
# under 2**-39 of the norms' product for 2**31 entries whose peak is 100x their root mean square (2**-60 at
# 2**24 entries), from 2**-47 (2**-68) at the peaks' own scales.


def digit_bits(length: int) -> int:
    """Bits per digit for vectors of `length` entries: length * 2**bits <= 2**52, so every partial sum of
    digits stays exact in float64."""
    return 52 - (length - 1).bit_length()


def from_limbs(sums: np.ndarray, exps: Sequence[int], bits: int, k: int) -> np.ndarray:
    """The Gram matrix (count, k, k) from its digit sums (LIMBS, pairs, count), exact integers (the
    pairs (i, j), i <= j, in order), for vectors scaled by 2**-exps."""
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    count = sums.shape[2]
    out = np.empty((count, k, k))
    for p, (i, j) in enumerate(pairs):
        value = np.zeros(count)
        for limb in range(LIMBS):
            value = value * 2.0**bits + sums[limb, p]
        out[:, i, j] = out[:, j, i] = np.ldexp(value, exps[i] + exps[j] - LIMBS * bits)
    return out


def exponent(peak: float) -> int:
    """The e with |v| < 2**e for a vector whose largest magnitude is `peak` (finite, 0 or more)."""
    return math.frexp(peak)[1]


def gram_by_guess(
    sample: Sequence[float],
    gram_at: Callable[[list[int]], tuple[np.ndarray, list[float]]],
    peaks: Callable[[], list[float]],
    count: int,
) -> np.ndarray:
    """The Gram matrix (count, k, k), NaN where any entry is.

    sample: each vector's largest magnitude over the tensor's first SAMPLE entries; gram_at(exps): the
    Gram matrix at scales 2**-exps and each vector's largest magnitude over the whole tensor (a pass);
    peaks(): those largest magnitudes alone (a pass). The scales: HEADROOM binades above the sample's
    peaks where those bound every entry; else (or where a vector's sample is all zeros, which guesses
    nothing) the whole tensor's peaks' exponents."""
    k = len(sample)
    nan = np.full((count, k, k), np.nan)
    if not all(math.isfinite(p) for p in sample):
        return nan
    if all(p > 0 for p in sample):
        guess = [exponent(p) + HEADROOM for p in sample]
        G, found = gram_at(guess)
        if not all(math.isfinite(p) for p in found):
            return nan
        if all(exponent(p) <= e for p, e in zip(found, guess)):
            return G
    else:
        found = peaks()
        if not all(math.isfinite(p) for p in found):
            return nan
    return gram_at([exponent(p) for p in found])[0]

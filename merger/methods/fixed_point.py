"""Dot products in fixed point, for interpolation's torch path and its numba kernels alike.

SLERP, NuSLERP, Multi-SLERP and the Karcher mean all return a linear combination of their inputs
whose scalar coefficients depend only on the inputs' dot products. The dot products are sums over
every entry, computed chunk by chunk: in floating point their low bits would depend on the chunking
and the device. They are summed in fixed point instead: each product (exact in float64 for float32
inputs) is scaled by a power of two to below 2**PRODUCT_BITS in magnitude and rounded to an integer
(to nearest, ties to even); integers add exactly in int64 in any order, so the sums are the same on any
chunking and device. Each integer is split at bit SPLIT into a high part (t >> SPLIT) and a low one
(t & LOW), summed apart, so that neither sum can overflow for tensors of up to 2**35 entries (a kernel may
first add up to 2**11 integers, below 2**62, and split their sum: the same totals).

Precision: each product is rounded by at most 2**-(PRODUCT_BITS + 1) of its bound 2**(e_i + e_j), which the
scales below keep within 2**(2 + 2 * HEADROOM) of the product of the two vectors' peaks: 2**-42 of it. Over n
entries that is at most 2**-42 * (peak / rms)**2 of the norms' product (2**-28.7 for a peak 100x the root
mean square, whatever n); rounding to nearest errs both ways, so the sum of errors is usually some sqrt(n)
times smaller.

Each vector's scale 2**-e must bound its entries (|v| < 2**e). Rather than a pass over the whole tensor
for its largest magnitude, e is guessed from the tensor's first SAMPLE entries and checked by the Gram
pass, which finds each vector's largest magnitude as it goes; only a wrong guess costs a second pass
(gram_by_guess). The rule depends on the entries alone, so the sums stay the same on any chunking and
device. Model Stock's exact sums (merger.methods.selection) guess their scales by this SAMPLE and HEADROOM
too (selection.stock_sums_by_guess), at a cost of 2 * HEADROOM of their limbs' bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

PRODUCT_BITS = 51  # |scaled product| < 2**51: float64's q + 1.5 * 2**52 rounds it to an integer, as torch.round does
SPLIT = 26  # each integer's high part (>> SPLIT) and low part (& LOW) are summed apart
LOW = (1 << SPLIT) - 1
SAMPLE = 1 << 16  # the first entries of a tensor, whose largest magnitudes guess its vectors' scales
HEADROOM = 4  # a guess lies this many binades above its sample's peak p: it bounds every entry unless one
# reaches 2**(exponent(p) + 4), 16 to 32 times p (then the pass is made again at the true peaks). Real weights
# have sparse outliers no sample finds: all-MiniLM-L6-v2's MLP output matrices hold entries 10-29x their
# first 65536 entries' largest (a headroom of 2 failed on 3 of its 104 tensors, 4 on none). The cost:
# 2 * HEADROOM of the PRODUCT_BITS bits below each product's bound (module docstring).


def pair_scale(ei: int, ej: int) -> float:
    """The power of two that takes the product of entries of vectors bounded by 2**ei and 2**ej below
    2**PRODUCT_BITS."""
    return 2.0 ** (PRODUCT_BITS - ei - ej)


def from_sums(sums: np.ndarray, exps: Sequence[int], k: int) -> np.ndarray:
    """The Gram matrix (count, k, k) from its sums (2, pairs, count) int64: the high parts' and the low
    parts' of the rounded products (the pairs (i, j), i <= j, in order), for vectors scaled by 2**-exps.
    The exact total, carried into a canonical (high, low), is rounded the same way whatever the sums' split."""
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    high = sums[0] + (sums[1] >> SPLIT)  # (pairs, count): every total's low part below 2**SPLIT
    value = np.ldexp(high.astype(np.float64), SPLIT) + (sums[1] & LOW).astype(np.float64)
    out = np.empty((sums.shape[2], k, k))
    for p, (i, j) in enumerate(pairs):
        out[:, i, j] = out[:, j, i] = np.ldexp(value[p], exps[i] + exps[j] - PRODUCT_BITS)
    return out


def exponent(peak: float) -> int:
    """The e with |v| < 2**e for a vector whose largest magnitude is `peak` (finite, 0 or more)."""
    return math.frexp(peak)[1]


def peak(v: Tensor) -> Tensor:
    """max |v| as a 0-d tensor, without a temporary of v's size; NaN if v holds any."""
    import torch

    lo, hi = torch.aminmax(v.reshape(-1))
    return torch.maximum(lo.neg(), hi)


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

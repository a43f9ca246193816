"""Exact dot products in fixed point, for interpolation's torch path and its numba kernels alike.

SLERP, NuSLERP, Multi-SLERP and the Karcher mean all return a linear combination of their inputs
whose scalar coefficients depend only on the inputs' dot products. The dot products are sums over
every entry, computed chunk by chunk: in floating point their low bits would depend on the chunking
and the device. They are summed in fixed point instead: each product (exact in float64 for float32
inputs) is scaled by a power of two to below 1 in magnitude and cut into LIMBS integer digits of
`bits` bits; a float64 sum of integers stays exact while every partial sum is below 2**53, which
`bits` guarantees for any order. The sums are then the same on any chunking and device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LIMBS = 3  # 3 * bits >= 63 for the largest tensors (2**31 entries): a relative error below 2**-32


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

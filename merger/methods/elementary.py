"""float64 exp and log from IEEE basic operations alone, and a division by a number, so that every device
gives the same bits.

Libraries round exp and log differently by an ulp (torch's CPU kernels, CUDA's, glibc's), which would
make a merge that ranks by them depend on where it ran. These are fdlibm's algorithms (Sun, 1993; as
musl and FreeBSD carry them), each under 1 ulp: +, -, *, / (correctly rounded everywhere), floor and
exact bit manipulation of the exponent, in a fixed order with no fused multiply-add. The functions
here work in place on float64 tensors on any device (no host synchronisation);
merger.methods.selection_kernels holds their numba twins (`_exp`, `_log`), which do the same
operations in the same order, so that Arcee Fusion's fused kernel and its torch path agree to the bit.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

INV_LN2 = 1.44269504088896338700e00
LN2_HI = 6.93147180369123816490e-01  # the top 32 bits of log(2): k * LN2_HI is exact for |k| < 2**20
LN2_LO = 1.90821492927058770002e-10  # log(2) - LN2_HI
# exp(r) = 1 + 2r / (2 - c(r)), |r| <= log(2) / 2: c's Remez coefficients (fdlibm e_exp.c)
P1 = 1.66666666666666019037e-01
P2 = -2.77777777770155933842e-03
P3 = 6.61375632143793436117e-05
P4 = -1.65339022054652515390e-06
P5 = 4.13813679705723846039e-08
# log(1 + f) = f - hfsq + s (hfsq + R(s)), s = f / (2 + f): R's Remez coefficients (fdlibm e_log.c)
LG1 = 6.666666666666735130e-01
LG2 = 3.999999999940941908e-01
LG3 = 2.857142874366239149e-01
LG4 = 2.222219843214978396e-01
LG5 = 1.818357216161805012e-01
LG6 = 1.531383769920937332e-01
LG7 = 1.479819860511658591e-01
SQRT2 = 1.4142135623730951  # mantissas above it are halved: f in (-0.293, 0.415]
EXP_FLOOR = -746.0  # exp(-746) < 2**-1075, which rounds to 0: lower arguments are clamped to it
MANTISSA = (1 << 52) - 1  # a float64's fraction bits
ONE_BITS = 1023 << 52  # the bits of 1.0
# exp(v - peak) as TABLE[v] * exp(-peak) where v is a bfloat16 value (a float32 with low 16 bits 0) and
# |v|, |peak| <= TABLE_BOUND: v - peak >= -2 TABLE_BOUND, so the product is a normal number, within 2.5 ulp
TABLE_BOUND = 64.0


def divide_(t: Tensor, d: float) -> Tensor:
    """t / d in place for a float32 or float64 t and a Python number d (rounded to t's dtype first, as torch
    rounds a number), the quotient rounded once on every device; returns t. CUDA's torch divides by a host
    number as a multiply by its reciprocal (an ulp off the quotient in some entries); by a tensor on t's
    device it divides, as the CPU and the fused kernels do."""
    import torch

    return t.div_(torch.full((), d, dtype=t.dtype, device=t.device))


def _pow2(k: Tensor) -> Tensor:
    """2.0 ** k for float64 tensors of integers in [-1022, 1023], built from the bits."""
    import torch

    return ((k.long() + 1023) << 52).view(torch.float64)


def exp_(v: Tensor) -> Tensor:
    """exp(v) in place for float64 v (meant for v <= 0; correct up to 709), within 1 ulp; returns v.

    k = round(v / log 2) and r = v - k log 2 (hi - lo, Cody and Waite), exp(r) from its rational form,
    then 2**k as two powers of two (2**-1076 would not fit one): the last product rounds once where
    the result is subnormal. NaN stays NaN; -inf gives 0."""
    import torch

    v.clamp_(min=EXP_FLOOR)
    k = v.mul(INV_LN2).add_(0.5).floor_()
    hi = v.sub_(k * LN2_HI)
    lo = k * LN2_LO
    r = hi - lo
    t = r * r
    c = t.mul(P5).add_(P4).mul_(t).add_(P3).mul_(t).add_(P2).mul_(t).add_(P1).mul_(t)
    c.neg_().add_(r)  # r - t * (...): a subtraction is the addition of the negation, bit for bit
    rc = torch.mul(r, c, out=t)
    rc.div_(c.neg_().add_(2.0))  # r * c / (2 - c)
    y = lo.sub_(rc).sub_(hi).neg_().add_(1.0)  # 1 - ((lo - r c / (2 - c)) - hi)
    half = torch.mul(k, 0.5, out=r).floor_()
    y.mul_(_pow2(half)).mul_(_pow2(k.sub_(half)))
    return v.copy_(y)


def log_(x: Tensor) -> Tensor:
    """log(x) in place for float64 x, positive and normal (not 0, subnormal, inf or NaN: the bits would
    be read as a number), within 1 ulp; returns x.

    x = 2**e * m, m in (sqrt(2) / 2, sqrt(2)] from the bits; with f = m - 1 (exact) and s = f / (2 + f),
    log(m) = f - hfsq + s (hfsq + R), hfsq = f * f / 2 and R a polynomial in s * s; plus e log 2."""
    import torch

    bits = x.view(torch.int64)
    e = bits >> 52
    bits.bitwise_and_(MANTISSA).bitwise_or_(ONE_BITS)  # x = m in [1, 2)
    big = x > SQRT2
    bits.sub_(big.long() << 52)  # m / 2: one less in the exponent
    dk = e.add_(big).sub_(1023).double()
    del e, big
    f = x.sub_(1.0)
    hfsq = f.mul(0.5).mul_(f)
    s = f / f.add(2.0)
    z = s * s
    w = z * z
    r = w.mul(LG7).add_(LG5).mul_(w).add_(LG3).mul_(w).add_(LG1).mul_(z)  # z (LG1 + w (LG3 + w (LG5 + w LG7)))
    t1 = torch.mul(w, LG6, out=z).add_(LG4).mul_(w).add_(LG2).mul_(w)  # w (LG2 + w (LG4 + w LG6)), in z
    del w
    r.add_(t1).add_(hfsq).mul_(s)  # s (hfsq + R), R = t2 + t1
    del t1
    r.add_(dk * LN2_LO).sub_(hfsq).add_(f).add_(dk.mul_(LN2_HI))  # ... + dk lo - hfsq + f + dk hi
    return x.copy_(r)


@functools.cache
def exp_table() -> Tensor:
    """exp_(v) for every bfloat16 value v with |v| <= TABLE_BOUND, indexed by its 16 bits (0 elsewhere), on
    the CPU: exp_diff's table (selection_kernels.exp_table has the same bits, for the fused path)."""
    import torch

    v = (torch.arange(1 << 16, dtype=torch.int32) << 16).view(torch.float32).double()
    outside = (v.abs() <= TABLE_BOUND).logical_not_()  # NaN too
    return exp_(v.masked_fill_(outside, 0.0)).masked_fill_(outside, 0.0)


@functools.cache
def _table_on(device: str) -> Tensor:
    """exp_table() on a device, copied there once (a copy per chunk would wait for the host each time)."""
    return exp_table().to(device)


def exp_diff(v: Tensor, peak: Tensor) -> Tensor:
    """exp(v - peak) in float64 for float32 v and peak (broadcasting to v): exp_table()[v] * exp_(-peak)
    where v is a bfloat16 value and |v| and |peak| are at most TABLE_BOUND, else exp_(v - peak); the same
    bits as selection_kernels' row exps."""
    import torch

    direct = exp_(v.to(torch.float64, copy=True).sub_(peak))  # a copy: v may be float64 already
    if v.dtype != torch.float32:
        return direct
    bits = v.view(torch.int32)
    table = _table_on(str(v.device))
    scaled = table[(bits >> 16).bitwise_and_(0xFFFF).long()].mul_(exp_(peak.to(torch.float64, copy=True).neg_()))
    low = bits.bitwise_and(0xFFFF)
    inside = (low == 0).logical_and_(v.abs() <= TABLE_BOUND).logical_and_(peak.abs() <= TABLE_BOUND)
    return torch.where(inside, scaled, direct)

"""Counter-based random draws: entry j of stream s under seed k gets a uniform in [0, 1) that depends on
(k, s, j) alone, so a merge that samples is the same bytes whatever its chunks, threads, workers or device.

Each draw is splitmix64's output function applied to a Weyl sequence: z = key(k, s) + (j + 1) * GAMMA
(mod 2**64), then three xor-shift-multiply rounds. torch has no unsigned 64-bit arithmetic on every
device, so the rounds run on int64: multiplication wraps modulo 2**64 as two's complement does, and a
logical right shift is an arithmetic one with the sign-extended bits masked off. No torch.Generator: its
streams depend on how the work is split and on the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: 2**64 over the golden ratio, odd
MIX = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None))  # (shift, multiplier) per round


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


def mix64(z: int) -> int:
    """splitmix64's output function on a Python int (the reference the tensor version must equal)."""
    z &= MASK64
    for shift, mult in MIX:
        z ^= z >> shift
        if mult is not None:
            z = (z * mult) & MASK64
    return z


def stream_key(seed: int, stream: int) -> int:
    """The Weyl sequence's start for (seed, stream): both hashed, so that two streams' sequences are
    2**64-periodic shifts of each other by an amount no one chooses."""
    return mix64(mix64(seed * GAMMA + 1) ^ mix64((stream + 1) * 0xD1B54A32D192ED03))


def _srl(z: Tensor, shift: int) -> Tensor:
    """z >> shift as on uint64 (int64's >> copies the sign bit in), in one temporary."""
    return (z >> shift).bitwise_and_((1 << (64 - shift)) - 1)


def bits(seed: int, stream: int, start: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """The 64-bit draws of entries [start, start + n) of a stream, as int64 (n,)."""
    import torch

    z = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(GAMMA)).add_(_signed(stream_key(seed, stream)))  # the Weyl sequence, wrapping
    for shift, mult in MIX:
        z.bitwise_xor_(_srl(z, shift))
        if mult is not None:
            z.mul_(_signed(mult))
    return z


def uniform(
    seed: int,
    stream: int,
    start: int,
    n: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Uniforms in [0, 1) for entries [start, start + n) of a stream (n,): the draw's top 53 bits over
    2**53 in float64 (exact on every device), or its top 24 over 2**24 in float32."""
    import torch

    dtype = dtype or torch.float64
    width = 24 if dtype == torch.float32 else 53
    return _srl(bits(seed, stream, start, n, device), 64 - width).to(dtype).mul_(2.0**-width)

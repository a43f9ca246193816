"""Interpolation on the sphere and between weights: slerp, nuslerp, multislerp, karcher, nearswap."""

from __future__ import annotations

from merger.methods.base import Method

METHODS: tuple[Method, ...] = ()

"""Interference reduction in each matrix's singular subspaces: TSV-Merge and Iso-C / Iso-CTS."""

from __future__ import annotations

from merger.methods.base import Method

METHODS: tuple[Method, ...] = ()

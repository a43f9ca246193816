"""Methods that weigh or pick whole task vectors: Model Stock, Arcee Fusion, RAM."""

from __future__ import annotations

from merger.methods.base import Method

METHODS: tuple[Method, ...] = ()

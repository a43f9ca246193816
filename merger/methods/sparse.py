"""The task-vector family that drops entries: DARE, Breadcrumbs, DELLA, SCE and TIES' global trim, as parameterisations of one routine."""

from __future__ import annotations

from merger.methods.base import Method

METHODS: tuple[Method, ...] = ()

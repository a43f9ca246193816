"""The method registry: built-in methods and plugins register through the same `register` call."""

from __future__ import annotations

from importlib.metadata import entry_points

from merger.methods import base, greedy, interpolation, linear, passthrough, selection, sparse, subspace, task_vectors
from merger.methods.base import Fused, GpuFootprint, MergeFn, Method, Params, Prepare, TensorContext, tensor_seed

__all__ = [
    "Method",
    "MergeFn",
    "Prepare",
    "Fused",
    "Params",
    "GpuFootprint",
    "TensorContext",
    "tensor_seed",
    "register",
    "get_method",
    "all_methods",
]

BUILTIN = (
    linear.METHOD,
    task_vectors.TASK_ARITHMETIC,
    task_vectors.TIES,
    greedy.METHOD,
    passthrough.METHOD,
    *interpolation.METHODS,
    *sparse.METHODS,
    *selection.METHODS,
    *subspace.METHODS,
)
PLUGIN_GROUP = "merger.methods"  # a plugin's entry point names a Method object

_registry: dict[str, Method] = {}
_loaded = False


def register(method: Method) -> None:
    if method.name in _registry and _registry[method.name] is not method:
        raise ValueError(f"merge method '{method.name}' is registered twice")
    _registry[method.name] = method


def all_methods() -> dict[str, Method]:
    global _loaded
    if not _loaded:
        for m in BUILTIN:
            register(m)
        for ep in entry_points(group=PLUGIN_GROUP):
            register(ep.load())
        _loaded = True
    return dict(_registry)


def get_method(name: str) -> Method | None:
    return all_methods().get(name)


base.lookup = get_method  # how a Method pickled into a --workers process is found there

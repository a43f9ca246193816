"""A parameter as a recipe may give it, and its value for one tensor: a number, a gradient over the
layers, or filters on the tensor's name (mergekit's forms).

- a value: `weight: 0.5`
- a gradient: `weight: [0, 0.5, 1]`, a list of numbers interpolated piecewise linearly over the
  layer's position t in [0, 1] (the list's points spread evenly over it); a list of other values
  (`normalize: [true, false]`) is not interpolated: t takes the one at int(t * (len - 1)), as in mergekit;
- filters: `weight: [{filter: self_attn, value: 0.3}, {filter: mlp, value: [0, 1]}, {value: 0.5}]`,
  where the first entry whose filter is part of the tensor's name (or that has none, or `*`) gives
  the value, itself a value or a gradient. Where none matches, the parameter is not set at that level.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

Setting = Any  # a value, a list of numbers, or a list of {filter, value} mappings (see the module)


def is_gradient(setting: Setting) -> bool:
    return isinstance(setting, list) and bool(setting) and all(_is_number(v) or _scientific(v) for v in setting)


def is_steps(setting: Setting) -> bool:
    """A list of other values (booleans, names), which mergekit does not interpolate: the layer at t takes
    the one at int(t * (len - 1)), as its evaluate_setting does (`normalize: [true, false]`)."""
    scalar = (str, int, float, bool)
    return isinstance(setting, list) and bool(setting) and all(isinstance(v, scalar) for v in setting)


def is_filters(setting: Setting) -> bool:
    return isinstance(setting, list) and bool(setting) and all(isinstance(v, dict) for v in setting)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# YAML 1.1 (PyYAML) reads a float only with a dot: `1e-4` is a string, which mergekit takes as the number
_SCIENTIFIC = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def _scientific(v: object) -> bool:
    return isinstance(v, str) and _SCIENTIFIC.fullmatch(v) is not None


def _point(v: Any) -> float:
    """A gradient's point as a number (one written in scientific notation without a dot: a string)."""
    return float(v) if isinstance(v, str) else v


def at(setting: Setting, name: str, t: float) -> Any | None:
    """The value of `setting` for tensor `name` at layer position t (0 to 1); None where filters leave
    it unset."""
    if is_filters(setting):
        for entry in setting:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or pattern in name:
                return at(entry["value"], name, t)
        return None
    if is_gradient(setting):
        scaled = t * (len(setting) - 1)
        i = min(int(math.floor(scaled)), len(setting) - 1)
        j = min(i + 1, len(setting) - 1)
        frac = scaled - i
        a, b = _point(setting[i]), _point(setting[j])
        return a if frac == 0 else (1 - frac) * a + frac * b
    if is_steps(setting):
        return setting[int(t * (len(setting) - 1))]
    return setting


def leaves(setting: Setting, loc: tuple = ()) -> Iterator[tuple[Any, tuple]]:
    """Every value a setting can give as written (each gradient point, each filter's value), with its
    location under the setting: what is validated before any tensor is read (a gradient's values in
    between lie between two valid ones)."""
    if is_filters(setting):
        for i, entry in enumerate(setting):
            yield from leaves(entry.get("value"), (*loc, i, "value"))
    elif is_steps(setting):  # a gradient's points too
        for i, v in enumerate(setting):
            yield v, (*loc, i)
    else:
        yield setting, loc


def problem(setting: Setting) -> str | None:
    """What is wrong with the form of a setting, or None (the values are checked by the method's
    parameter model)."""
    if not isinstance(setting, list | dict):
        return None
    if isinstance(setting, dict):
        return "a parameter is a value, a list of numbers (a gradient) or a list of {filter, value} entries"
    if not setting:
        return "an empty list gives no value"
    if not (is_steps(setting) or is_filters(setting)):  # steps: any list of values, a gradient's too
        return "a list is either values (numbers: a gradient) or {filter, value} entries, not a mix"
    if is_filters(setting):
        for entry in setting:
            extra = set(entry) - {"filter", "value"}
            if extra:
                return f"a filter entry has the keys filter and value, not {', '.join(sorted(map(str, extra)))}"
            if "value" not in entry:
                return "a filter entry needs a value"
            if "filter" in entry and not isinstance(entry["filter"], str):
                return "a filter is part of a tensor name: a string"
            if is_filters(entry["value"]) or isinstance(entry["value"], dict):
                return "a filter's value is a value or a gradient, not more filters"
            inner = problem(entry["value"])
            if inner:
                return inner
    return None

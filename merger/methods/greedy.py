"""Greedy soup: the uniform soup of the ingredients a held-out search keeps (the search is merger/soup.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merger.methods.base import GpuFootprint, MergeRange, Method, Params, TensorContext
from merger.methods.linear import LinearModelParams, LinearParams, linear, linear_fused

if TYPE_CHECKING:
    from torch import Tensor


class NoParams(Params):
    """Greedy soup takes no parameters: every kept ingredient has the same weight."""


_UNIFORM = LinearParams(normalize=True)
_ONE = LinearModelParams(weight=1.0)


def uniform_soup(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    models: Sequence[NoParams],
    params: NoParams,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    # The linear soup with weights 1, so a greedy soup is bit for bit the linear merge of what it kept.
    return linear(tensors, None, [_ONE] * len(tensors), _UNIFORM)


def uniform_soup_fused(
    tensors, base, models: Sequence[NoParams], params: NoParams, run, *, context: TensorContext | None = None
) -> MergeRange:
    return linear_fused(tensors, None, [_ONE] * len(tensors), _UNIFORM, run)


METHOD = Method(
    name="greedy_soup",
    in_mergekit=False,
    fn=uniform_soup,
    model_params=NoParams,
    params=NoParams,
    needs_base=False,
    summary="Score each model on held-out data, add them best first to a uniform soup and keep each only if "
    "the soup's score does not get worse; needs an evaluation: section.",
    paper="Wortsman et al. 2022, Model soups (greedy soup, Recipe 1), arXiv:2203.05482",
    fused=uniform_soup_fused,
    cpu_ns=0.5,
    gpu=GpuFootprint(words=2),  # linear's sum and one model's term
)

"""Uniform / weighted soup: the (normalised) weighted average of the models' tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from merger.methods.base import GpuFootprint, MergeRange, Method, Params, TensorContext, normalizable
from merger.methods.elementary import divide_

if TYPE_CHECKING:
    from torch import Tensor


class LinearModelParams(Params):
    weight: float = Field(1.0, description="weight of this model in the sum")


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of the weights")


def linear(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    models: Sequence[LinearModelParams],
    params: LinearParams,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    import torch

    out = torch.zeros_like(tensors[0])
    term = torch.empty_like(out)  # w * x rounded, then added: add_'s alpha would fuse them into one rounding
    for x, m in zip(tensors, models):
        out.add_(torch.mul(x, m.weight, out=term))
    if params.normalize:
        divide_(out, sum(m.weight for m in models))
    return out


def linear_fused(
    tensors,
    base,
    models: Sequence[LinearModelParams],
    params: LinearParams,
    run,
    *,
    context: TensorContext | None = None,
) -> MergeRange:
    from merger import kernels

    weights = [m.weight for m in models]
    divisor = sum(weights) if params.normalize else 0.0

    def merge_range(start: int, end: int, out) -> None:
        kernels.weighted_sum([x[start:end] for x in tensors], None, out, weights, run, divisor=divisor)

    return merge_range


METHOD = Method(
    name="linear",
    fn=linear,
    model_params=LinearModelParams,
    params=LinearParams,
    needs_base=False,
    summary="Weighted average (model soup): sum(w_i * x_i) / sum(w_i), or the plain sum without normalize.",
    paper="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
    check=normalizable,
    fused=linear_fused,
    cpu_ns=0.5,
    gpu=GpuFootprint(words=2),  # the sum and one model's term
)

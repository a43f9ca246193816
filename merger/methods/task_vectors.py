"""Task-vector methods: task arithmetic and TIES, both over deltas x_i - base."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merger.methods.base import Method, Params


class TaskModelParams(Params):
    weight: float = Field(1.0, description="scale of this model's task vector; negative subtracts it")


class TiesModelParams(TaskModelParams):
    density: float = Field(1.0, gt=0, le=1, description="fraction of largest-magnitude entries kept")


class TaskArithmeticParams(Params):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the sum by the sum of the weights")


class TiesParams(TaskArithmeticParams):
    normalize: bool = Field(True, description="weighted mean over agreeing entries, else their sum")
    consensus_method: Literal["sum", "count"] = Field(
        "sum", description="elect each entry's sign by the weighted sum, or by a majority count"
    )
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect in merger")


def task_arithmetic(
    tensors: Sequence[Tensor], base: Tensor, models: Sequence[TaskModelParams], params: TaskArithmeticParams
) -> Tensor:
    acc = torch.zeros_like(base)
    delta = torch.empty_like(base)  # reused: x - base is exact-ish in float32, sum(w*x) - W*base is not
    for x, m in zip(tensors, models):
        torch.sub(x, base, out=delta)
        acc.add_(delta, alpha=m.weight)
    scale = params.lambda_
    if params.normalize:
        scale /= sum(m.weight for m in models)
    return acc.mul_(scale).add_(base)


def keep_count(n: int, density: float) -> int:
    """floor(density * n), at least 1, computed on the decimal the user wrote (0.29 * 100 is 29, not 28)."""
    return max(1, math.floor(Fraction(repr(density)) * n))


def trim(delta: Tensor, density: float) -> Tensor:
    """Zero, in place, all but exactly keep_count(n, density) largest-magnitude entries of `delta`.

    Among entries equal to the threshold magnitude, the lowest flat indices are kept, so the result is
    deterministic. kthvalue is a selection, not a full sort.
    """
    n = delta.numel()
    k = keep_count(n, density)
    if k >= n:
        return delta
    mag = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:  # ties at the threshold: take the first `missing` of them
        tied = (mag == threshold).nonzero().reshape(-1)[:missing]
        keep[tied] = True
    return delta.mul_(keep.view_as(delta))


def ties(tensors: Sequence[Tensor], base: Tensor, models: Sequence[TiesModelParams], params: TiesParams) -> Tensor:
    # Trimmed, weighted task vectors, one per model, kept as a list rather than stacked (n_models, ...)
    # so the big embedding matrices need no extra copy.
    deltas = [trim(x - base, m.density).mul_(m.weight) for x, m in zip(tensors, models)]
    if params.consensus_method == "sum":
        elected = deltas[0].clone()
        for d in deltas[1:]:
            elected.add_(d)
        elected.sign_()
    else:
        elected = sum(d.sign() for d in deltas).sign_()
    # An entry whose votes cancel exactly elects sign 0 (sgn(0) = 0 in the paper): nothing agrees with it.
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if params.normalize else None
    agree = torch.empty_like(base, dtype=torch.bool)
    for d, m in zip(deltas, models):
        torch.gt(d * elected, 0, out=agree)
        merged.add_(d * agree)
        if divisor is not None:
            divisor.add_(agree, alpha=abs(m.weight))
    if divisor is not None:
        # |w|: a negative weight negates its task vector and still counts as that much of the mean.
        merged.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))
    return merged.mul_(params.lambda_).add_(base)


TASK_ARITHMETIC = Method(
    name="task_arithmetic",
    fn=task_arithmetic,
    model_params=TaskModelParams,
    params=TaskArithmeticParams,
    needs_base=True,
    summary="base + lambda * sum(w_i * (x_i - base)); a negative weight subtracts a task vector.",
    paper="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    check=lambda models, params: (
        "the weights sum to 0, so they cannot be normalised; set normalize: false or change a weight"
        if params.normalize and sum(m.weight for m in models) == 0
        else None
    ),
)

TIES = Method(
    name="ties",
    fn=ties,
    model_params=TiesModelParams,
    params=TiesParams,
    needs_base=True,
    summary="Trim each task vector to its top-density entries, elect a sign per entry, average the agreeing "
    "entries: base + lambda * disjoint_mean.",
    paper="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
)

"""Task-vector methods: task arithmetic and TIES, both over deltas x_i - base."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merger.methods.base import Method, Params, normalizable


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


_RADIX = {torch.float32: (torch.int32, 15), torch.float64: (torch.int64, 47)}  # top 16 bits of |x|


def kth_largest(magnitudes: Callable[[], Iterable[Tensor]], k: int) -> tuple[float, int]:
    """The k-th largest of non-negative floats given as chunks, and how many entries equal to it are
    among the k largest. A radix select: a histogram of the top 16 bits of each float (for
    non-negative floats the bit pattern orders like the value) finds the bucket holding the k-th
    largest, then only that bucket's entries are gathered for kthvalue. Two passes, no sort, and the
    chunks can stream from disk."""
    hist = None
    int_dtype = shift = None
    for m in magnitudes():
        int_dtype, shift = _RADIX[m.dtype]
        h = torch.bincount((m.view(int_dtype) >> shift).reshape(-1), minlength=1 << 16)
        hist = h if hist is None else hist.add_(h)
    from_top = hist.flip(0).cumsum(0)  # from_top[j]: entries in buckets >= 65535 - j
    j = int(torch.searchsorted(from_top, k))
    bucket = (1 << 16) - 1 - j
    above = int(from_top[j - 1]) if j else 0
    vals = torch.cat([m[(m.view(int_dtype) >> shift) == bucket] for m in magnitudes()])
    rank = k - above  # the k-th largest overall is the rank-th largest in its bucket
    threshold = torch.kthvalue(vals.cpu(), vals.numel() - rank + 1).values
    greater = above + int((vals > threshold.to(vals.device)).sum())
    return float(threshold), k - greater


@dataclass
class TrimState:
    """Per model: keep |delta| > threshold, plus the first `ties_left` entries equal to it (flat order)."""

    thresholds: list[float | None]  # None: keep everything
    ties_left: list[int]


def ties_prepare(
    task_vectors: Callable[[int], Iterable[Tensor]], numel: int, models: Sequence[TiesModelParams], params: TiesParams
) -> TrimState:
    state = TrimState([], [])
    for i, m in enumerate(models):
        k = keep_count(numel, m.density)
        if k >= numel:
            state.thresholds.append(None)
            state.ties_left.append(0)
        else:
            threshold, ties = kth_largest(lambda i=i: (d.abs() for d in task_vectors(i)), k)
            state.thresholds.append(threshold)
            state.ties_left.append(ties)
    return state


def _trim_(delta: Tensor, state: TrimState, i: int) -> Tensor:
    """Zero, in place, the entries of this chunk of model i's task vector that the trim drops."""
    threshold = state.thresholds[i]
    if threshold is None:
        return delta
    mag = delta.abs()
    keep = mag > threshold
    if state.ties_left[i] > 0:  # entries equal to the threshold: the first ones in flat order
        tied = (mag == threshold).reshape(-1).nonzero().reshape(-1)[: state.ties_left[i]]
        keep.reshape(-1)[tied] = True
        state.ties_left[i] -= tied.numel()
    return delta.mul_(keep)


def ties(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[TiesModelParams],
    params: TiesParams,
    state: TrimState | None = None,
) -> Tensor:
    if state is None:  # called on whole tensors: the statistics come from them in one chunk
        state = ties_prepare(lambda i: [(tensors[i] - base).reshape(-1)], base.numel(), models, params)
    # Trimmed, weighted task vectors, one per model, kept as a list rather than stacked (n_models, ...).
    deltas = [_trim_(x - base, state, i).mul_(m.weight) for i, (x, m) in enumerate(zip(tensors, models))]
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
    check=normalizable,
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
    prepare=ties_prepare,
)

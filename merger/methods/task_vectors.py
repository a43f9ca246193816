"""Task-vector methods: task arithmetic and TIES, both over deltas x_i - base."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from merger.errors import NaNTaskVector
from merger.methods.base import MergeRange, Method, Params, normalizable

if TYPE_CHECKING:
    from torch import Tensor


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
    import torch

    acc = torch.zeros_like(base)
    delta = torch.empty_like(base)  # reused: x - base is exact-ish in float32, sum(w*x) - W*base is not
    for x, m in zip(tensors, models):
        torch.sub(x, base, out=delta)
        acc.add_(delta, alpha=m.weight)
    return acc.mul_(_scale(models, params)).add_(base)


def _scale(models: Sequence[TaskModelParams], params: TaskArithmeticParams) -> float:
    """lambda, over the sum of the weights with normalize."""
    return params.lambda_ / sum(m.weight for m in models) if params.normalize else params.lambda_


def keep_count(n: int, density: float) -> int:
    """floor(density * n), at least 1, computed on the decimal the user wrote (0.29 * 100 is 29, not 28)."""
    return max(1, math.floor(Fraction(repr(density)) * n))


def kth_largest(magnitudes: Callable[[], Iterable[Tensor]], k: int) -> tuple[float, int, int]:
    """The k-th largest of non-negative floats given as consecutive flat chunks, and which entries
    equal to it are among the k largest (the lowest flat indices first): (threshold, how many of them,
    the flat index just past the last of them).

    A radix select: a histogram of the top 16 bits of each float (for non-negative floats the bit
    pattern orders like the value) finds the bucket holding the k-th largest, then only that bucket's
    entries (and flat indices) are gathered for kthvalue. Two passes, no sort, and the chunks can
    stream from disk. NaN cannot be ranked: NaNTaskVector(-1, count) if any entry is NaN."""
    import torch

    radix = {torch.float32: (torch.int32, 15), torch.float64: (torch.int64, 47)}  # top 16 bits of |x|
    hist = None
    int_dtype = shift = None
    nans = 0
    for m in magnitudes():
        int_dtype, shift = radix[m.dtype]
        h = torch.bincount((m.view(int_dtype) >> shift).reshape(-1), minlength=1 << 16)
        hist = h if hist is None else hist.add_(h)
        nans += int(torch.isnan(m).sum())
    if nans:
        raise NaNTaskVector(-1, nans)
    from_top = hist.flip(0).cumsum(0)  # from_top[j]: entries in buckets >= 65535 - j
    j = int(torch.searchsorted(from_top, k))
    bucket = (1 << 16) - 1 - j
    above = int(from_top[j - 1]) if j else 0
    vals, where, offset = [], [], 0
    for m in magnitudes():
        flat = m.reshape(-1)
        idx = ((flat.view(int_dtype) >> shift) == bucket).nonzero().reshape(-1)
        vals.append(flat[idx].cpu())
        where.append(idx.cpu().add_(offset).to(torch.int32 if offset + flat.numel() < 2**31 else torch.int64))
        offset += flat.numel()
    values, indices = torch.cat(vals), torch.cat(where)
    rank = k - above  # the k-th largest overall is the rank-th largest in its bucket
    threshold = torch.kthvalue(values, values.numel() - rank + 1).values
    ties = k - above - int((values > threshold).sum())
    tied = indices[values == threshold]  # ascending: chunks in order, nonzero() in order
    return float(threshold), ties, int(tied[ties - 1]) + 1


@dataclass(frozen=True)
class TrimState:
    """Per model: keep |delta| > threshold, and the entries equal to it whose flat index is below the
    cutoff (so exactly keep_count entries survive, the lowest indices winning ties). Every chunk can
    be trimmed on its own, in any order."""

    thresholds: list[float | None]  # None: keep everything
    cutoffs: list[int]


def ties_prepare(
    task_vectors: Callable[[int], Iterable[Tensor]], numel: int, models: Sequence[TiesModelParams], params: TiesParams
) -> TrimState:
    """Each model's trim threshold, the models side by side on threads (torch releases the GIL;
    `task_vectors` may be called from several threads at once)."""

    def select(i: int) -> tuple[float | None, int]:
        k = keep_count(numel, models[i].density)
        if k >= numel:
            return None, 0
        try:
            threshold, _, cutoff = kth_largest(lambda: (d.abs() for d in task_vectors(i)), k)
        except NaNTaskVector as e:
            raise NaNTaskVector(i, e.count) from None
        return threshold, cutoff

    workers = min(len(models), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="merger-trim") as pool:
            picked = list(pool.map(select, range(len(models))))
    else:
        picked = [select(i) for i in range(len(models))]
    return TrimState([t for t, _ in picked], [c for _, c in picked])


def _trim_(delta: Tensor, state: TrimState, i: int, offset: int) -> Tensor:
    """Zero, in place, the entries of model i's task vector chunk (starting at flat index `offset`)
    that the trim drops."""
    threshold = state.thresholds[i]
    if threshold is None:
        return delta
    mag = delta.abs()
    keep = mag > threshold
    n = delta.numel()
    if state.cutoffs[i] > offset:  # tied entries below the cutoff are kept
        tied = mag == threshold
        if state.cutoffs[i] < offset + n:
            tied.reshape(-1)[state.cutoffs[i] - offset :] = False
        keep |= tied
    return delta.masked_fill_(keep.logical_not_(), 0)  # not delta * keep: a dropped inf would become NaN


def ties(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[TiesModelParams],
    params: TiesParams,
    state: TrimState | None = None,
    offset: int = 0,
) -> Tensor:
    """TIES on whole tensors, or (given `state` from ties_prepare) on the chunk of the flattened
    tensors that starts at flat index `offset`."""
    import torch

    if state is None:  # called on whole tensors: the statistics come from them in one chunk
        state = ties_prepare(lambda i: [(tensors[i] - base).reshape(-1)], base.numel(), models, params)
    # Trimmed, weighted task vectors, one per model, kept as a list rather than stacked (n_models, ...).
    deltas = [_trim_(x - base, state, i, offset).mul_(m.weight) for i, (x, m) in enumerate(zip(tensors, models))]
    if params.consensus_method == "sum":
        elected = deltas[0].clone()
        for d in deltas[1:]:
            elected.add_(d)
        elected.sign_()
    else:  # a NaN entry abstains (sign NaN would void the whole vote)
        elected = sum(d.sign().nan_to_num_(0) for d in deltas).sign_()
    # An entry whose votes cancel exactly elects sign 0 (sgn(0) = 0 in the paper): nothing agrees with it.
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if params.normalize else None
    agree = torch.empty_like(base, dtype=torch.bool)
    for d, m in zip(deltas, models):
        torch.gt(d * elected, 0, out=agree)
        if divisor is not None:
            divisor.add_(agree, alpha=abs(m.weight))
        merged.add_(d.masked_fill_(agree.logical_not_(), 0))  # not d * agree: inf * 0 is NaN
    if divisor is not None:
        # |w|: a negative weight negates its task vector and still counts as that much of the mean.
        merged.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))
    return merged.mul_(params.lambda_).add_(base)


def task_arithmetic_fused(
    tensors, base, models: Sequence[TaskModelParams], params: TaskArithmeticParams, run
) -> MergeRange:
    from merger import kernels

    weights, scale = [m.weight for m in models], _scale(models, params)

    def merge_range(start: int, end: int, out) -> None:
        kernels.weighted_sum([x[start:end] for x in tensors], base[start:end], out, weights, run, scale=scale)

    return merge_range


def ties_fused(tensors, base, models: Sequence[TiesModelParams], params: TiesParams, run) -> MergeRange:
    """TIES through merger.kernels: one counting pass over the whole tensors finds every model's trim
    threshold exactly, then ranges merge in one pass each; bit-identical to `ties`."""
    from merger import kernels

    trim = kernels.top_k_abs_deltas(tensors, base, [keep_count(base.size, m.density) for m in models], run)
    weights = [m.weight for m in models]

    def merge_range(start: int, end: int, out) -> None:
        kernels.ties_merge(
            [x[start:end] for x in tensors],
            base[start:end],
            out,
            trim,
            weights,
            params.lambda_,
            params.normalize,
            params.consensus_method == "count",
            run,
            start,
        )

    return merge_range


TASK_ARITHMETIC = Method(
    name="task_arithmetic",
    fn=task_arithmetic,
    model_params=TaskModelParams,
    params=TaskArithmeticParams,
    needs_base=True,
    summary="base + lambda * sum(w_i * (x_i - base)); a negative weight subtracts a task vector.",
    paper="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    check=normalizable,
    fused=task_arithmetic_fused,
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
    fused=ties_fused,
)

"""Task-vector methods: task arithmetic and TIES, both over deltas x_i - base."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from merger.errors import NaNTaskVector
from merger.methods.base import (
    GpuFootprint,
    InputChunks,
    MergeRange,
    Method,
    Params,
    TensorContext,
    kept_for_mergekit,
    normalizable,
)

if TYPE_CHECKING:
    from torch import Tensor


class TaskModelParams(Params):
    weight: float = Field(1.0, description="scale of this model's task vector; negative subtracts it")


class TiesModelParams(TaskModelParams):
    density: float = Field(1.0, ge=0, le=1, description="fraction of largest-magnitude entries kept (0: none)")


class TaskArithmeticParams(Params):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the sum by the sum of the weights")


class TiesParams(TaskArithmeticParams):
    normalize: bool = Field(True, description="weighted mean over agreeing entries, else their sum")
    consensus_method: Literal["sum", "count"] = Field(
        "sum", description="elect each entry's sign by the weighted sum, or by a majority count"
    )
    int8_mask: bool = kept_for_mergekit(False, " in merger")


class TiesTrimParams(TiesParams):
    trim_scope: Literal["tensor", "model"] = Field(
        "tensor",
        description="tensor: keep each tensor's top density entries (mergekit); model: one threshold per model "
        "over its whole task vector, as the paper trims (a pass over every input first)",
    )


def task_arithmetic(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[TaskModelParams],
    params: TaskArithmeticParams,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    import torch

    acc = torch.zeros_like(base)
    delta = torch.empty_like(base)  # reused: x - base is exact-ish in float32, sum(w*x) - W*base is not
    for x, m in zip(tensors, models):
        acc.add_(torch.sub(x, base, out=delta).mul_(m.weight))  # rounded, then added, as the fused kernel does
    return acc.mul_(_scale(models, params)).add_(base)


def _scale(models: Sequence[TaskModelParams], params: TaskArithmeticParams) -> float:
    """lambda, over the sum of the weights with normalize."""
    return params.lambda_ / sum(m.weight for m in models) if params.normalize else params.lambda_


def keep_count(n: int, density: float) -> int:
    """floor(density * n), at least 1, computed on the decimal the user wrote (0.29 * 100 is 29, not 28);
    0 for density 0, which keeps none of the task vector (as mergekit's magnitude does)."""
    return max(1, math.floor(Fraction(repr(density)) * n)) if density > 0 else 0


# The radix digits of |x| (sign bit 0), from the top: (shift, width) per float dtype.
_DIGITS = {"float32": ((15, 16), (0, 15)), "float64": ((47, 16), (31, 16), (15, 16), (0, 15))}
DISCARD = 1024  # histogram bins for entries that no longer match, spread by their low bits: a GPU's atomic
# adds to one bin would queue behind each other


def kth_largest(chunks: Callable[[], Iterable[Sequence[Tensor]]], ks: Sequence[int]) -> list[tuple[float, int, int]]:
    """For several vectors of non-negative floats given side by side as consecutive flat chunks (each
    item of chunks() holds every vector's next chunk), the ks[i]-th largest of vector i and which
    entries equal to it are among its k largest, the lowest flat indices first: (threshold, how many
    of them, the flat index just past the last of them).

    A radix select: for non-negative floats the bit pattern orders like the value, so each pass over
    the chunks histograms one digit of the entries that match the digits found so far and picks the
    digit that holds the k-th largest (two passes for float32, four for float64); a last pass finds
    where the kept ties end. No sort and no gathering; the chunks can stream from disk; the bookkeeping
    stays on the chunks' device, so a GPU is synchronised at the end, never per chunk. NaN cannot be
    ranked: NaNTaskVector(i, count) for the first vector holding any."""
    select = _RadixSelect(ks)
    level = 0
    while level < select.levels:  # known from the first chunk
        select.histogram_pass(chunks(), level)
        level += 1
    offset = 0
    for chunk in chunks():
        for i, m in enumerate(chunk):
            select.find_cutoff(select.bits(m), i, offset)
        offset += chunk[0].numel()
    return select.results()


class _RadixSelect:
    """kth_largest's bookkeeping, one entry per vector in tensors on the chunks' device, made when the
    first chunk shows their dtype and device (not from a chunk of its own: in pieces on a GPU, making
    one means uploading it)."""

    def __init__(self, ks: Sequence[int]):
        self.ks = list(ks)
        self.digits: tuple[tuple[int, int], ...] = ((0, 0),)  # (shift, width) per level, from the top
        self.ties = None

    @property
    def levels(self) -> int:
        return len(self.digits)

    def _start(self, first: Tensor) -> None:
        import torch

        self.dtype, self.ints = first.dtype, {torch.float32: torch.int32, torch.float64: torch.int64}[first.dtype]
        self.digits = _DIGITS[str(first.dtype).removeprefix("torch.")]
        device = first.device
        self.prefix = torch.zeros(len(self.ks), dtype=torch.int64, device=device)  # the digits found so far
        self.need = torch.empty_like(self.prefix)  # the rank sought among them
        for i, k in enumerate(self.ks):
            # a fill kernel, k its argument: `need[i] = k` and torch.tensor(ks, device=...) copy from pageable
            # memory, which waits for the GPU (torch's sync debug mode raised on the first, on an H100)
            self.need[i].fill_(k)
        self.nans = torch.zeros_like(self.prefix)
        self.cutoff = torch.full_like(self.prefix, -1)
        self.one = torch.ones(1, dtype=torch.int64, device=device)

    def bits(self, m: Tensor) -> Tensor:
        return m.reshape(-1).view(self.ints)

    def histogram_pass(self, chunks: Iterable[Sequence[Tensor]], level: int) -> None:
        """Histogram the digit of this level over every chunk, then pick each vector's (the first pass
        also counts NaN)."""
        import torch

        hist = None
        for chunk in chunks:
            if hist is None:
                if level == 0:
                    self._start(chunk[0])
                shift, width = self.digits[level]
                hist = torch.zeros((len(self.ks), (1 << width) + DISCARD), dtype=torch.int64, device=self.prefix.device)
            for i, m in enumerate(chunk):
                self.count(hist[i], self.bits(m), i, shift, width, level)
                if level == 0:
                    self.nans[i] += torch.count_nonzero(torch.isnan(m))
        self.pick(hist[:, : 1 << width], width)

    def count(self, hist: Tensor, bits: Tensor, i: int, shift: int, width: int, level: int) -> None:
        """Add one chunk of vector i to the histogram of the digit at `shift`; entries that do not
        match the digits found so far go to the DISCARD bins after it."""
        import torch

        digit = (bits >> shift) & ((1 << width) - 1)
        if level:  # most entries match no longer: spread them over DISCARD bins, not one (atomic adds)
            digit = torch.where((bits >> (shift + width)) == self.prefix[i], digit, (1 << width) + (bits & DISCARD - 1))
        hist.index_add_(0, digit, self.one.expand(digit.numel()))  # no sync, unlike bincount on CUDA

    def pick(self, hist: Tensor, width: int) -> None:
        """Each vector's digit that holds its sought rank, from its histogram (n_vectors, 2**width)."""
        import torch

        from_top = hist.flip(1).cumsum(1)  # [i, j]: entries of vector i in digits >= 2**width - 1 - j
        j = torch.searchsorted(from_top, self.need[:, None]).squeeze(1).clamp_(max=(1 << width) - 1)
        above = torch.where(j > 0, from_top.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), 0)
        self.need -= above
        self.prefix = (self.prefix << width) | ((1 << width) - 1 - j)

    def find_cutoff(self, bits: Tensor, i: int, offset: int) -> None:
        """In vector i's chunk starting at flat index `offset`, where its self.need-th tie lies, if there."""
        import torch

        if self.ties is None:
            self.ties = self.need.clone()  # the ties among the k largest; need now counts those still ahead
        if not bits.numel():
            return
        seen = (bits == self.prefix[i]).cumsum(0, dtype=torch.int64 if bits.numel() >= 1 << 31 else torch.int32)
        pos = torch.searchsorted(seen, self.need[i : i + 1].to(seen.dtype))[0]  # not seen promoted to int64
        here = (self.cutoff[i] < 0) & (pos < bits.numel())
        self.cutoff[i] = torch.where(here, offset + pos + 1, self.cutoff[i])
        self.need[i] -= seen[-1]

    def results(self) -> list[tuple[float, int, int]]:
        import torch

        thresholds = self.prefix.to(self.ints).view(self.dtype).cpu().tolist()
        ties, cutoff, nans = torch.stack([self.ties, self.cutoff, self.nans]).cpu().tolist()
        bad = next((i for i, n in enumerate(nans) if n), None)
        if bad is not None:
            raise NaNTaskVector(bad, nans[bad])
        return list(zip(thresholds, ties, cutoff))


@dataclass(frozen=True)
class TrimState:
    """Per model: keep |delta| > threshold, and the entries equal to it whose flat index is below the
    cutoff (so exactly keep_count entries survive, the lowest indices winning ties). Every chunk can
    be trimmed on its own, in any order."""

    thresholds: list[float | None]  # None: keep everything
    cutoffs: list[int]


def ties_prepare(
    task_vectors: Callable[[], Iterable[list[Tensor]]],
    numel: int,
    models: Sequence[TiesModelParams],
    params: TiesParams,
    *,
    context: TensorContext | None = None,
    inputs: InputChunks | None = None,
) -> TrimState:
    """Each model's trim threshold: every model's in the same streaming passes (kth_largest); with
    trim_scope: model, the whole model's (context.model_state, from ties_model_prepare)."""
    if context is not None and context.model_state is not None:
        return context.model_state
    ks = [keep_count(numel, m.density) for m in models]
    trimmed = [i for i, k in enumerate(ks) if 0 < k < numel]  # the others keep everything, or nothing
    thresholds: list[float | None] = [None if k else math.inf for k in ks]  # nothing is above inf
    cutoffs = [0] * len(models)
    if trimmed:

        def chunks() -> Iterator[list[Tensor]]:  # the chunks are fresh: made magnitudes in place
            return ([chunk[i].abs_() for i in trimmed] for chunk in task_vectors())

        try:
            found = kth_largest(chunks, [ks[i] for i in trimmed])
        except NaNTaskVector as e:
            raise NaNTaskVector(trimmed[e.model], e.count) from None
        for i, (threshold, _, cutoff) in zip(trimmed, found):
            thresholds[i], cutoffs[i] = threshold, cutoff
    return TrimState(thresholds, cutoffs)


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
    *,
    context: TensorContext | None = None,
) -> Tensor:
    """TIES on whole tensors, or (given `state` from ties_prepare) on the chunk of the flattened
    tensors that starts at flat index `offset`."""
    import torch

    if state is None:  # called on whole tensors: the statistics come from them in one chunk
        chunks = lambda: [[(x - base).reshape(-1) for x in tensors]]  # noqa: E731
        state = ties_prepare(chunks, base.numel(), models, params, context=context)
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
            divisor.add_(agree, alpha=abs(m.weight))  # 0 or |w|: exact, fused or not
        merged.add_(d.masked_fill_(agree.logical_not_(), 0))  # not d * agree: inf * 0 is NaN
    if divisor is not None:
        # |w|: a negative weight negates its task vector and still counts as that much of the mean.
        merged.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))
    return merged.mul_(params.lambda_).add_(base)


def task_arithmetic_fused(
    tensors,
    base,
    models: Sequence[TaskModelParams],
    params: TaskArithmeticParams,
    run,
    *,
    context: TensorContext | None = None,
) -> MergeRange:
    from merger import kernels

    weights, scale = [m.weight for m in models], _scale(models, params)

    def merge_range(start: int, end: int, out) -> None:
        kernels.weighted_sum([x[start:end] for x in tensors], base[start:end], out, weights, run, scale=scale)

    return merge_range


def ties_fused(
    tensors, base, models: Sequence[TiesModelParams], params: TiesParams, run, *, context: TensorContext | None = None
) -> MergeRange:
    """TIES through merger.kernels: one counting pass over the whole tensors finds every model's trim
    threshold exactly, then ranges merge in one pass each; bit-identical to `ties`."""
    from merger import kernels

    if context is not None and context.model_state is not None:  # trim_scope: model
        found = context.model_state
        trim = [None if t is None else (t, 0, c) for t, c in zip(found.thresholds, found.cutoffs)]
    else:
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


def trims_whole_model(params: TiesTrimParams) -> bool:  # a named function: --workers pickles the method
    return params.trim_scope == "model"


def ties_model_prepare(tensors, params: TiesTrimParams) -> dict[str, TrimState]:
    """trim_scope: model: per model, one threshold over its task vector across every merged tensor, keeping
    the sum over tensors of floor(density * numel) entries (the density may vary by tensor: gradients,
    filters), ties at the threshold kept lowest plan-order index first; each tensor's TrimState is that
    threshold with the cutoff moved to the tensor's own flat indices. Every model in the same passes."""
    listed = list(tensors())  # (name, numel, models, task_vectors)
    n, total = len(listed[0][2]), sum(numel for _, numel, _, _ in listed)
    ks = [sum(keep_count(numel, models[i].density) for _, numel, models, _ in listed) for i in range(n)]
    trimmed = [i for i, k in enumerate(ks) if 0 < k < total]
    found: list[tuple[float, int, int]] = []
    if trimmed:

        def chunks() -> Iterator[list[Tensor]]:  # the model's tensors one after the other, as one vector
            for _, _, _, task_vectors in listed:
                for chunk in task_vectors():
                    yield [chunk[i].abs_() for i in trimmed]

        found = kth_largest(chunks, [ks[i] for i in trimmed])
    states, start = {}, 0
    for name, numel, _, _ in listed:
        thresholds: list[float | None] = [None if k else math.inf for k in ks]
        cutoffs = [0] * n
        for i, (threshold, _, cutoff) in zip(trimmed, found):
            thresholds[i], cutoffs[i] = threshold, min(max(cutoff - start, 0), numel)
        states[name] = TrimState(thresholds, cutoffs)
        start += numel
    return states


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
    cpu_ns=0.6,
    gpu=GpuFootprint(words=2),  # the sum and one task vector
)

TIES = Method(
    name="ties",
    not_taken=(
        (
            "rescale",
            "ties with rescale (mergekit 0.1.5 then scales each trimmed task vector back to its L1 norm) "
            "is not supported yet; leave it out for TIES as the paper has it",
        ),
    ),
    fn=ties,
    model_params=TiesModelParams,
    params=TiesTrimParams,
    needs_base=True,
    summary="Trim each task vector to its top-density entries, elect a sign per entry, average the agreeing "
    "entries: base + lambda * disjoint_mean.",
    paper="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
    prepare=ties_prepare,
    fused=ties_fused,
    model_prepare=ties_model_prepare,
    model_wide=trims_whole_model,
    cpu_ns=3.0,
    # fn: the trimmed task vectors; the elected signs, the sum, the divisor, one vote; the agreement mask.
    # prepare (the trim's selection): a digit, its match and a first chunk beside the task vectors, and
    # per model three int64 histograms of a 16-bit digit (counts, flipped, summed).
    gpu=GpuFootprint(
        words=4,
        per_model=1,
        masks=1,
        prepare_words=3,
        prepare_masks=1,
        fixed_per_model=8 * ((1 << 16) + DISCARD) + 512,  # kth_largest's histogram of int64 counts, rounded up
        settle_per_model=3 * (8 * ((1 << 16) + DISCARD) + 512),  # that, flipped, and its cumulative sums
    ),
)

"""The task-vector family that drops entries: DARE, Breadcrumbs, DELLA and SCE, as parameterisations of one
routine (drop entries of each task vector, optionally elect a sign per entry as TIES does, combine).

What needs a whole tensor (Breadcrumbs' and SCE's magnitude thresholds, DELLA's ranks within rows, the L1
rescale) is found by `prepare` in passes over flat chunks; `merge` is then elementwise given that state and
the chunk's offset. Random drops come from merger.methods.draws, a function of (seed, model, flat index),
and whole-tensor sums are exact (_ExactSums), so the bytes written do not depend on chunks or device."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from merger import budget
from merger.errors import NaNTaskVector
from merger.methods import draws
from merger.methods.base import (
    GpuFootprint,
    InputChunks,
    MergeRange,
    Method,
    Misfit,
    Params,
    TensorContext,
    kept_for_mergekit,
    normalizable,
)
from merger.methods.elementary import divide_
from merger.methods.task_vectors import (
    DISCARD,
    TaskArithmeticParams,
    TaskModelParams,
    TiesParams,
    _scale,
    kth_largest,
)

if TYPE_CHECKING:
    from torch import Tensor

Drop = Literal["random", "outliers", "magprune", "variance"]
RESCALE_EPS = 1e-7  # mergekit leaves a task vector unscaled when its L1 norm, before or after the drop, is below this
SCE_EPS = 1e-6  # and SCE's weights uniform when their sum is below this


# --- parameters (mergekit's names and defaults) ---


class DareModelParams(TaskModelParams):
    density: float = Field(1.0, ge=0, le=1, description="fraction of entries kept, each with this probability")


class BreadcrumbsModelParams(DareModelParams):
    density: float = Field(
        1.0, ge=0, le=1, description="fraction of entries kept: the largest magnitudes after the gamma dropped"
    )
    gamma: float = Field(0.01, ge=0, le=1, description="fraction of largest-magnitude entries dropped first")


class DellaModelParams(DareModelParams):
    density: float = Field(
        1.0, ge=0, le=1, description="mean keep probability: each entry's by its magnitude's rank in its row"
    )
    epsilon: float = Field(
        0.15, ge=0, lt=0.5, description="keep probabilities run from density - epsilon (smallest) to + epsilon"
    )


class SparseLinearParams(TaskArithmeticParams):
    rescale: bool = Field(True, description="scale the kept entries so each task vector keeps its L1 norm")
    int8_mask: bool = kept_for_mergekit(False, " in merger")


class SparseTiesParams(TiesParams):
    normalize: bool = Field(False, description="weighted mean over agreeing entries, else their sum")
    rescale: bool = Field(True, description="scale the kept entries so each task vector keeps its L1 norm")


class BreadcrumbsParams(SparseLinearParams):
    rescale: bool = Field(False, description="scale the kept entries so each task vector keeps its L1 norm")


class BreadcrumbsTiesParams(SparseTiesParams):
    rescale: bool = Field(False, description="scale the kept entries so each task vector keeps its L1 norm")


class DellaParams(SparseTiesParams):
    normalize: bool = Field(True, description="weighted mean over agreeing entries, else their sum")


class SceModelParams(Params):
    """SCE weighs its models by their task vectors' mean squares. Configs published for SCE often weight
    their models too; mergekit 0.1.5's sce takes no weight (the key has no effect there), so they run here
    unchanged and mean the same."""

    weight: float = kept_for_mergekit(1.0, ": the mean squares set the weights")


class SceParams(Params):
    select_topk: float = Field(
        1.0, ge=0, le=1, description="fraction of entries kept: those whose task vectors vary most across models"
    )
    int8_mask: bool = kept_for_mergekit(False, " in merger")


def share(n: int, fraction: float) -> int:
    """floor(fraction * n) on the decimal the user wrote, as task_vectors.keep_count, but possibly 0."""
    return math.floor(Fraction(repr(fraction)) * n)


# --- whole-tensor statistics ---


def _no_totals(count: int) -> tuple[list[float], list[int]]:
    """Exact sums (as _ExactSums.results gives them) of `count` vectors that nothing was added to."""
    return [0.0] * count, [0] * count


class _ExactSums:
    """Exact sums of several vectors of non-negative floats, given chunk by chunk in any order: each value
    is an integer mantissa times a power of two, so int64 histograms of mantissas by exponent add without
    rounding, on the chunks' device, and Python's integers total them at the end. The result is the exact
    sum rounded once: the same whatever the chunks, their order or the device (a float sum is not)."""

    def __init__(self, n: int):
        self.n = n
        self.hist: Tensor | None = None

    def add(self, i: int, values: Tensor) -> None:
        import torch

        flat = values.reshape(-1)
        if self.hist is None:
            self.wide = values.dtype == torch.float64
            # float32: fractions and counts by exponent (256); float64: the fraction's high 26 bits, its low
            # 26 bits, and counts, by exponent (2048). A count stands for the implicit leading bit.
            shape = (self.n, 3, 2048) if self.wide else (self.n, 2, 256)
            self.hist = torch.zeros(shape, dtype=torch.int64, device=values.device)
            self.one = torch.ones(1, dtype=torch.int64, device=values.device)
        h = self.hist[i]
        if self.wide:
            bits = flat.view(torch.int64)
            exp = bits >> 52
            frac = bits & ((1 << 52) - 1)
            h[0].index_add_(0, exp, frac >> 26)
            h[1].index_add_(0, exp, frac.bitwise_and_((1 << 26) - 1))
        else:
            bits = flat.view(torch.int32)
            exp = bits >> 23
            h[0].index_add_(0, exp, (bits & ((1 << 23) - 1)).to(torch.int64))
        h[-1].index_add_(0, exp, self.one.expand(flat.numel()))

    def results(self) -> tuple[list[float], list[int]]:
        """The sums (inf where a value was inf or NaN), and how many values were inf or NaN, per vector."""
        if self.hist is None:
            return _no_totals(self.n)
        hist = self.hist.cpu().tolist()  # the one synchronisation
        out, nonfinite = [], []
        for h in hist:
            if self.wide:  # value = (2**52 [if exp > 0] + fraction) * 2 ** (max(exp, 1) - 1075)
                fracs = [(hi << 26) + lo for hi, lo in zip(h[0], h[1])]
                lead, top, unit = 52, 2047, 1074
            else:  # value = (2**23 [if exp > 0] + fraction) * 2 ** (max(exp, 1) - 150)
                fracs, lead, top, unit = h[0], 23, 255, 149
            counts = h[-1]
            nonfinite.append(counts[top])
            if counts[top]:  # inf or NaN
                out.append(math.inf)
                continue
            total = fracs[0] + sum(
                (f + (c << lead)) << (e - 1) for e, (f, c) in enumerate(zip(fracs, counts)) if e and c
            )
            out.append(total / (1 << unit))  # int / int: correctly rounded, however large
        return out, nonfinite


# A set of the k largest entries of a vector (task_vectors.kth_largest): those above the threshold and the
# ones equal to it whose flat index is below the cutoff; or every entry (True), or none (False).
Top = tuple[float, int] | bool


def _in_top(mag: Tensor, top: Top, offset: int) -> Tensor | bool:
    if isinstance(top, bool):
        return top
    threshold, cutoff = top
    keep = mag > threshold
    if cutoff > offset:
        tied = mag == threshold
        if cutoff < offset + mag.numel():
            tied[cutoff - offset :] = False
        keep |= tied
    return keep


def _tops(chunks: Callable[[], Iterable[Sequence[Tensor]]], ks: Sequence[int], numel: int) -> list[Top]:
    """The set of each vector's ks[i] largest entries (ties: the lowest flat indices first)."""
    tops: list[Top] = [k > 0 for k in ks]
    ranked = [i for i, k in enumerate(ks) if 0 < k < numel]
    if ranked:
        try:
            found = kth_largest(lambda: ([c[i] for i in ranked] for c in chunks()), [ks[i] for i in ranked])
        except NaNTaskVector as e:
            raise NaNTaskVector(ranked[e.model], e.count) from None
        for i, (threshold, _, cutoff) in zip(ranked, found):
            tops[i] = (threshold, cutoff)
    return tops


@dataclass(frozen=True)
class SparseState:
    """What `prepare` found for one tensor; `merge` reads it for any chunk."""

    kept: list[bool | None]  # per model: all kept (density 1), none (density 0), or by entry (None)
    tops: list[tuple[Top, Top]]  # Breadcrumbs, per model: (the largest, dropped; those and the kept ones)
    masks: list[Tensor | None]  # DELLA, per model: its kept entries, flat
    variance: Top  # SCE: the entries kept, by the variance of the task vectors across models
    scales: list[float]  # per model: what its kept entries are multiplied by (weight, L1 rescale)
    weights: list[float]  # per model: its share of the divisor of normalize
    after: list[float] | None = None  # SCE, per model: its weight, applied after the election (on plain task vectors)


@dataclass(frozen=True)
class Family:
    """How one member of the family drops entries, and whether it elects signs."""

    drop: Drop
    elect: bool


def _variance(deltas: Sequence[Tensor]) -> Tensor:
    """Each entry's population variance across models, in one fixed order of operations (torch.var's
    depends on the device and layout; prepare and merge must agree bit for bit)."""
    n = len(deltas)
    mean = deltas[0].clone()
    for d in deltas[1:]:
        mean.add_(d)
    divide_(mean, n)
    var = (deltas[0] - mean).square_()
    for d in deltas[1:]:
        var.add_((d - mean).square_())
    return divide_(var, n)


def _keep(family: Family, state: SparseState, models, i: int, delta: Tensor, offset: int, seed: int):
    """Which entries of model i's task vector chunk (at flat `offset`) survive: a bool tensor, or True."""
    if state.kept[i] is not None:
        return state.kept[i]
    if family.drop == "random":
        return draws.uniform(seed, i, offset, delta.numel(), delta.device) < models[i].density
    if family.drop == "magprune":
        return state.masks[i][offset : offset + delta.numel()]
    mag = delta.abs()
    below, upto = state.tops[i]
    keep = _in_top(mag, upto, offset)
    above = _in_top(mag, below, offset)
    if keep is False or above is True:
        return False
    if above is False:
        return keep
    return above.logical_not_() if keep is True else above.logical_not_().logical_and_(keep)


def _apply(d: Tensor, keep) -> Tensor:
    """d with the entries not kept zeroed, in place (masked_fill, not d * keep: a dropped inf would be NaN)."""
    if keep is False:
        return d.zero_()
    return d if keep is True else d.masked_fill_(keep.logical_not(), 0)


def _fibers(shape, numel: int) -> tuple[int, int, int]:
    """DELLA's fibers of a tensor: (a, L, r), a * r fibers of L entries r apart (mergekit ranks along dim 1: a
    2-D tensor's rows; a 1-D tensor is one fiber)."""
    return (1, numel, 1) if len(shape) <= 1 else (shape[0], shape[1], math.prod(shape[2:]))


def _block_rows(fiber: int) -> int:
    """How many rows of fibers (`fiber` entries each) _magprune_masks ranks at once: DELLA_BLOCK entries'
    worth, at least one."""
    return max(1, DELLA_BLOCK // fiber)


def _magprune_masks(task_vectors, numel, models, shape, seed) -> list[Tensor | None]:
    """DELLA's kept entries per model: keep probability density - epsilon + 2 epsilon * rank / (L - 1), rank
    0..L-1 by magnitude within its fiber of L entries (mergekit ranks along dim 1: a 2-D tensor's rows, a
    1-D tensor whole; ties by flat index), one model at a time."""
    import torch

    a, length, r = _fibers(shape, numel)
    masks: list[Tensor | None] = [None] * len(models)
    for i, m in enumerate(models):
        if m.density >= 1:
            continue
        if m.density <= 0:
            continue  # none kept (SparseState.kept)
        mags = None
        offset = 0
        for chunk in task_vectors():  # this model's magnitudes, whole: its rows may span chunks
            d = chunk[i]
            if mags is None:
                mags = torch.empty(numel, dtype=d.dtype, device=d.device)
            torch.abs(d, out=mags[offset : offset + d.numel()])
            offset += d.numel()
        mask = masks[i] = torch.empty(numel, dtype=torch.bool, device=mags.device)
        fibers = mags.view(a, length, r)
        rows = _block_rows(length * r)
        positions = torch.arange(length, device=mags.device, dtype=torch.float64).view(1, length, 1)
        spread = divide_(positions, length - 1) if length > 1 else positions.fill_(0.5)  # one entry: density
        spread.mul_(2 * m.epsilon).add_(m.density - m.epsilon)  # the keep probability of each rank
        for s in range(0, a, rows):
            block = fibers[s : s + rows]
            order = block.argsort(dim=1, stable=True)  # ascending: the largest gets the highest probability
            probs = torch.empty(block.shape, dtype=torch.float64, device=mags.device)
            probs.scatter_(1, order, spread.expand(block.shape))
            start = s * length * r
            u = draws.uniform(seed, i, start, block.numel(), mags.device).view(block.shape)
            mask[start : start + block.numel()] = (u < probs).reshape(-1)
        del mags
    return masks


# Entries ranked at once: their argsort's temporaries (40 bytes an entry, 170 MB at 1 << 22), not the tensor's,
# bound the memory. Each block costs about 37 torch ops, each a kernel launch on a GPU, so blocks are large:
# at 1 << 14 entries the launches set DELLA's CUDA time (tests/test_gpu_launches.py).
DELLA_BLOCK = 1 << 22


def _kept(models: Sequence[Params], family: Family) -> list[bool | None]:
    """Per model: every entry kept (density 1; SCE keeps by variance alone), none (density 0), or by entry."""
    return [True if family.drop == "variance" or m.density >= 1 else False if m.density <= 0 else None for m in models]


def _outlier_ks(models: Sequence[Params], numel: int) -> list[int]:
    """Breadcrumbs, per model: how many of the largest magnitudes it drops, and how many it drops or keeps
    (mergekit: the n_top largest dropped, then the smallest down to `density`)."""
    ks = []
    for m in models:
        if m.density >= 1 or m.density <= 0:  # decided by `kept`
            ks += [0, numel]
            continue
        target = share(numel, m.density)
        below = max(0, numel - target - share(numel, m.gamma))  # the smallest, dropped
        ks += [numel - below - target, numel - below]
    return ks


def _outlier_tops(task_vectors, numel: int, n: int, ks: list[int]) -> list[tuple[Top, Top]]:
    def magnitudes() -> Iterator[list[Tensor]]:
        for chunk in task_vectors():
            mags = [d.abs_() for d in chunk]
            yield [mags[j // 2] for j in range(2 * n)]

    try:
        found = _tops(magnitudes, ks, numel)
    except NaNTaskVector as e:
        raise NaNTaskVector(e.model // 2, e.count) from None
    return [(found[2 * i], found[2 * i + 1]) for i in range(n)]


def _variance_top(task_vectors, numel: int, params: Params) -> Top:
    """SCE: the select_topk share of the entries whose variance is not 0, the largest variances."""
    import torch

    nonzero = None
    for chunk in task_vectors():
        c = torch.count_nonzero(_variance(chunk))
        nonzero = c if nonzero is None else nonzero + c
    k = share(int(nonzero), params.select_topk) if nonzero is not None else 0
    return _tops(lambda: ([_variance(c)] for c in task_vectors()), [k], numel)[0]


# A value in the sums that is inf or NaN makes a whole-tensor statistic inf or NaN, and with it every entry of the
# output (or, where signs are elected, none of the task vector's entries agree: the base, silently). Refused, where
# mergekit would write the NaNs.
_NO_SUM = "NaN or infinite (a NaN or an infinity in that model or in the base): {what} every entry finite"


def _sce_weights(totals: tuple[list[float], list[int]], numel: int, n: int) -> list[float]:
    """SCE: each model's share of the kept task vectors' mean squares (uniform if they sum below SCE_EPS), from
    the exact sums of their squares and their counts of inf or NaN values (refused: NaNTaskVector)."""
    sums, nonfinite = totals
    for i, count in enumerate(nonfinite):
        if count:
            raise NaNTaskVector(
                i, count, _NO_SUM.format(what="SCE's weights, from the sums of the kept entries' squares, need")
            )
    means = [s / numel for s in sums] if numel else [0.0] * n
    total = sum(means)
    return [1 / n] * n if abs(total) < SCE_EPS else [s / total for s in means]


def _sce_state(task_vectors, numel: int, state: SparseState) -> SparseState:
    import torch

    n = len(state.kept)
    sums = _ExactSums(n)
    offset = 0
    for chunk in task_vectors():
        keep = _in_top(_variance(chunk), state.variance, offset)
        for i, d in enumerate(chunk):
            kept = _apply(d, keep)
            sums.add(i, kept.double().square_() if kept.dtype == torch.float32 else kept.square_())
        offset += chunk[0].numel()
    weights = _sce_weights(sums.results(), numel, n)
    return dataclasses.replace(state, scales=[1.0] * n, weights=weights, after=weights)


def _rescaled(models: Sequence[Params], params: Params, kept: Sequence[bool | None]) -> list[int]:
    """The models whose kept entries are scaled to their task vector's L1 norm (mergekit's rescale)."""
    return [i for i in range(len(models)) if getattr(params, "rescale", False) and kept[i] is None]


def _scales(models: Sequence[Params], rescaled: Sequence[int], totals: tuple[list[float], list[int]]) -> list[float]:
    """Each model's weight, times its L1 norm before the drop over that after it (totals: the exact sums, 2 i
    before and 2 i + 1 after, and their counts of inf or NaN values), unless either is below RESCALE_EPS. A
    rescaled task vector holding inf or NaN: NaNTaskVector."""
    sums, nonfinite = totals
    scales = [m.weight for m in models]
    for i in rescaled:
        if nonfinite[2 * i]:
            what = "rescaling the kept entries to the task vector's L1 norm (rescale: true) needs"
            raise NaNTaskVector(i, nonfinite[2 * i], _NO_SUM.format(what=what))
        before, after = sums[2 * i], sums[2 * i + 1]
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            scales[i] *= before / after
    return scales


def _rescale_state(task_vectors, models, params, state: SparseState, family: Family, seed: int) -> SparseState:
    n = len(models)
    rescaled = _rescaled(models, params, state.kept)
    totals = _no_totals(2 * n)
    if rescaled:
        sums = _ExactSums(2 * n)
        offset = 0
        for chunk in task_vectors():
            for i in rescaled:
                mag = chunk[i].abs_()
                sums.add(2 * i, mag)
                keep = _keep(family, state, models, i, mag, offset, seed)
                sums.add(2 * i + 1, _apply(mag, keep))
            offset += chunk[0].numel()
        totals = sums.results()
    return dataclasses.replace(state, scales=_scales(models, rescaled, totals))


def prepare(
    task_vectors: Callable[[], Iterable[list[Tensor]]],
    numel: int,
    models: Sequence[Params],
    params: Params,
    *,
    context: TensorContext | None = None,
    inputs: InputChunks | None = None,
    family: Family,
) -> SparseState:
    """The whole-tensor part of a family member: which entries each model keeps, then the scale of each."""
    seed = context.seed if context is not None else 0
    shape = context.shape if context is not None and context.shape else (numel,)
    n = len(models)
    kept = _kept(models, family)
    tops: list[tuple[Top, Top]] = [(False, True)] * n
    masks: list[Tensor | None] = [None] * n
    variance: Top = True
    if family.drop == "outliers":
        tops = _outlier_tops(task_vectors, numel, n, _outlier_ks(models, numel))
    elif family.drop == "magprune":
        masks = _magprune_masks(task_vectors, numel, models, shape, seed)
    elif family.drop == "variance" and params.select_topk < 1:
        variance = _variance_top(task_vectors, numel, params)
    weights = [abs(getattr(m, "weight", 1.0)) for m in models]
    state = SparseState(kept, tops, masks, variance, [getattr(m, "weight", 1.0) for m in models], weights)
    if family.drop == "variance":
        return _sce_state(task_vectors, numel, state)
    return _rescale_state(task_vectors, models, params, state, family, seed)


def merge(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[Params],
    params: Params,
    state: SparseState | None = None,
    offset: int = 0,
    *,
    context: TensorContext | None = None,
    family: Family,
) -> Tensor:
    """A family member on whole tensors, or (given `state` from prepare) on the chunk of the flattened
    tensors at flat index `offset`: drop, scale, then sum (or elect signs and sum those that agree)."""
    import torch

    shape = base.shape
    base = base.reshape(-1)
    if state is None:  # whole tensors: the statistics come from them in one chunk
        state = prepare(
            lambda: [[x.reshape(-1) - base for x in tensors]],
            base.numel(),
            models,
            params,
            context=context if context is not None and context.shape else _shaped(context, shape),
            family=family,
        )
    seed = context.seed if context is not None else 0
    deltas = [x.reshape(-1) - base for x in tensors]  # (numel,) per model
    shared = _in_top(_variance(deltas), state.variance, offset) if family.drop == "variance" else True
    for i, d in enumerate(deltas):
        keep = shared if family.drop == "variance" else _keep(family, state, models, i, d, offset, seed)
        _apply(d, keep).mul_(state.scales[i])

    lam = getattr(params, "lambda_", 1.0)
    if not family.elect:  # a sum; mul and add, never add(alpha=): one rounding per step on every device
        merged = deltas[0]
        for d in deltas[1:]:
            merged.add_(d)
        return merged.mul_(_scale(models, params)).add_(base).reshape(shape)
    if getattr(params, "consensus_method", "sum") == "sum":
        elected = deltas[0].clone()
        for d in deltas[1:]:
            elected.add_(d)
        elected.sign_()
    else:  # a NaN entry abstains
        elected = deltas[0].sign().nan_to_num_(0)
        for d in deltas[1:]:
            elected.add_(d.sign().nan_to_num_(0))
        elected.sign_()
    # An entry whose votes cancel exactly elects sign 0 (sgn(0) = 0 in the TIES paper): nothing agrees with it.
    merged = torch.zeros_like(base)
    normalize = getattr(params, "normalize", True)
    divisor = torch.zeros_like(base) if normalize else None
    for i, (d, w) in enumerate(zip(deltas, state.weights)):
        agree = (d * elected).gt_(0).bool()
        if divisor is not None:
            divisor.add_(agree.to(divisor.dtype).mul_(w))
        d.masked_fill_(~agree, 0)
        merged.add_(d if state.after is None else d.mul_(state.after[i]))
    if divisor is not None:
        merged.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))
    return merged.mul_(lam).add_(base).reshape(shape)


# --- the fused CPU path (merger.methods.sparse_kernels): the same bytes as prepare and merge ---


def fused(
    tensors, base, models: Sequence[Params], params: Params, run, *, context: TensorContext | None = None, family
) -> MergeRange:
    """A family member through merger.methods.sparse_kernels, on the stored bytes (base.Fused): the whole-
    tensor passes here, then merge_range merges ranges; bit-identical to prepare and merge in float32."""
    import numpy as np

    from merger.methods import sparse_kernels as sk

    xs = tuple(tensors)
    k, scales, weights, after = _fused_state(xs, base, models, params, run, context, family)
    if family.elect:
        lam = getattr(params, "lambda_", 1.0)
        normalize = getattr(params, "normalize", True)
    else:
        lam, normalize = _scale(models, params), False
    count = getattr(params, "consensus_method", "sum") == "count"
    f32 = [np.array(v, np.float32) for v in (scales, weights, after)]

    def merge_range(start: int, end: int, out) -> None:
        def part(s: int, e: int) -> None:
            sk.MERGES[k.drop](
                tuple(x[start + s : start + e] for x in xs),
                base[start + s : start + e],
                out[s:e],
                k.kinds,
                f32[0],
                k.keys,
                k.thr,
                *k.tops,
                k.masks,
                *k.variance,
                family.elect,
                count,
                normalize,
                f32[1],
                f32[2],
                np.float32(lam),
                start + s,
            )

        run(part, end - start)

    return merge_range


def _fused_state(xs, base, models, params, run, context, family: Family):
    """fused's whole-tensor passes: the kernels' view of SparseState, and the scales, divisor weights and
    SCE's after-election weights."""
    import numpy as np

    from merger.methods import sparse_kernels as sk

    numel, n = base.size, len(models)
    seed = context.seed if context is not None else 0
    kept = _kept(models, family)
    k = _KernelState(
        drop=_DROPS[family.drop],
        kinds=np.array([sk.ALL if c is True else sk.NONE if c is False else sk.BY_ENTRY for c in kept], np.int64),
        keys=np.array([draws.stream_key(seed, i) for i in range(n)], np.uint64),
        thr=np.array([_draw_threshold(getattr(m, "density", 1.0)) for m in models], np.uint64),
        tops=(np.zeros((n, 2), np.int64), np.zeros((n, 2), np.float32), np.zeros((n, 2), np.int64)),
        masks=np.zeros((1, 1), np.uint8),
        variance=(sk.YES, np.float32(0), 0),
    )
    weights = [abs(getattr(m, "weight", 1.0)) for m in models]
    after = [1.0] * n
    if family.drop == "variance":
        if params.select_topk < 1:
            k.variance = _fused_variance_top(xs, base, params, run)
        scales = [1.0] * n
        weights = after = _sce_weights(_fused_square_sums(xs, base, k, run), numel, n)
    else:
        rescaled = _rescaled(models, params, kept)
        if family.drop == "outliers":
            k.tops = _fused_outlier_tops(xs, base, _outlier_ks(models, numel), run)
        if family.drop == "magprune":
            shape = context.shape if context is not None and context.shape else (numel,)
            k.masks, totals = _fused_magprune(xs, base, models, shape, k, run)
        else:
            totals = _fused_rescale_sums(xs, base, rescaled, k, run)
        scales = _scales(models, rescaled, totals)
    return k, scales, weights, after


_DROPS = {"random": 0, "outliers": 1, "magprune": 2, "variance": 3}  # sparse_kernels.RANDOM ...


@dataclass
class _KernelState:
    """What the kernels read of SparseState, as arrays: the drop, each model's kind (all, none, by entry),
    its draws' stream key and keep threshold (DARE), Breadcrumbs' tops (flag, threshold, cutoff per model
    and end), DELLA's masks (models, bytes: the keep flags as bits; DARE's draws too, once drawn) and SCE's
    variance top (flag, threshold, cutoff)."""

    drop: int
    kinds: object
    keys: object
    thr: object
    tops: tuple
    masks: object
    variance: tuple


def _draw_threshold(density: float) -> int:
    """DARE keeps entry j where its uniform (the draw's top 53 bits over 2**53) is below density, that is
    where the 64-bit draw is below this (0 < density < 1; else 0, unused)."""
    if not 0 < density < 1:
        return 0
    return math.ceil(density * 2.0**53) << 11  # exact: a power of two times a float, at most 2**64 - 2**11


def _top_of(found, k: int, numel: int):
    """A Top as the kernels read it, from top_k_abs_deltas' answer for k."""
    if 0 < k < numel:
        threshold, _, cutoff = found
        return 2, threshold, cutoff
    return int(k > 0), 0.0, 0


def _fused_outlier_tops(xs, base, ks: list[int], run) -> tuple:
    import numpy as np

    from merger.kernels import top_k_abs_deltas

    numel = base.size
    ranked = [j for j, k in enumerate(ks) if 0 < k < numel]
    try:
        found = top_k_abs_deltas([xs[j // 2] for j in ranked], base, [ks[j] for j in ranked], run)
    except NaNTaskVector as e:
        raise NaNTaskVector(ranked[e.model] // 2, e.count) from None
    by_index = dict(zip(ranked, found))
    tops = [_top_of(by_index.get(j), k, numel) for j, k in enumerate(ks)]
    flags, thresholds, cutoffs = (np.array([t[c] for t in tops]).reshape(-1, 2) for c in range(3))
    return flags.astype(np.int64), thresholds.astype(np.float32), cutoffs.astype(np.int64)


def _fused_rescale_sums(xs, base, rescaled: list[int], k: _KernelState, run) -> tuple[list[float], list[int]]:
    import numpy as np

    from merger.methods import sparse_kernels as sk

    n = len(xs)
    if not rescaled or not base.size:
        return _no_totals(2 * n)
    todo = np.zeros(n, np.bool_)
    todo[rescaled] = True
    # DARE's draws cost more than the bits that keep them: drawn once here, read back by the merge
    keeps = np.empty((n, (base.size + 7) // 8), np.uint8) if k.drop == sk.RANDOM else np.zeros((1, 1), np.uint8)

    def part(first: int, end: int):  # bytes of flags: 8 entries each
        s, e = 8 * first, min(8 * end, base.size)
        bins = np.zeros((n, 2, sk.BINS, 2), np.uint64)
        sk.SCANS[k.drop](tuple(x[s:e] for x in xs), base[s:e], todo, k.keys, k.thr, *k.tops, s, bins, keeps)
        return bins

    # ranges of the engine's chunk size, counted in bytes of flags
    totals = sk.exact_totals(run(part, (base.size + 7) // 8, max(1, budget.CHUNK // 8)), sk.ABS_UNIT)
    if k.drop == sk.RANDOM:  # every model drawn by entry is rescaled (rescale is method-wide): all in the bits
        k.drop, k.masks = sk.MAGPRUNE, keeps
    return totals


PRUNE_PART = 1 << 19  # entries per part of DELLA's mask pass: 22 for a TinyLlama MLP matrix, which two threads share
# evenly (11 parts of 2**20 left one thread idle for the last: 6% slower)


def _fused_magprune(xs, base, models, shape, k: _KernelState, run):
    """DELLA's masks (models, bytes: bits) and the rescale's sums, fibers of the tensor side by side on the threads."""
    import numpy as np

    from merger.methods import sparse_kernels as sk

    numel, n = base.size, len(xs)
    a, length, r = _fibers(shape, numel)
    todo = k.kinds == sk.BY_ENTRY
    masks = np.zeros((n, (numel + 7) // 8), np.uint8) if todo.any() else np.zeros((1, 1), np.uint8)  # bits
    if not todo.any() or not numel:
        return masks, _no_totals(2 * n)
    thresholds = np.zeros((n, length), np.uint64)
    positions = np.arange(length, dtype=np.float64)
    for i, m in enumerate(models):
        if todo[i]:  # as _magprune_masks: density - epsilon + 2 epsilon * rank / (L - 1), in its order
            spread = positions / (length - 1) if length > 1 else np.full(1, 0.5)
            probs = spread * (2 * m.epsilon) + (m.density - m.epsilon)
            # a draw u = top53 / 2**53 < prob exactly where top53 < ceil(prob * 2**53) (an integer, prob in [0, 1])
            thresholds[i] = np.ceil(np.clip(probs, 0.0, 1.0) * 2.0**53)

    def part(s: int, e: int):
        bins = np.zeros((n, 2, sk.BINS, 2), np.uint64)
        sk._magprune(xs, base, s, e, length, r, todo, k.keys, thresholds, masks, bins)
        return bins

    # Parts of PRUNE_PART entries, two at least where there are 16 fibers or more (k_proj's 256 rows were one
    # part: one thread idle), of a multiple of 8 fibers (the ranges' bits in bytes of their own).
    rows = -(-min(-(-a // 2), max(1, PRUNE_PART // (length * r))) // 8) * 8
    totals = sk.exact_totals(run(part, a, rows), sk.ABS_UNIT)
    return masks, totals


def _fused_variance_top(xs, base, params, run) -> tuple:
    import numpy as np

    from merger.methods import sparse_kernels as sk

    numel = base.size
    found, k = sk.variance_top(tuple(xs), base, lambda nonzero: share(nonzero, params.select_topk), run)
    flag, threshold, cutoff = _top_of(found, k, numel)
    return flag, np.float32(threshold), cutoff


def _fused_square_sums(xs, base, k: _KernelState, run) -> tuple[list[float], list[int]]:
    import numpy as np

    from merger.methods import sparse_kernels as sk

    n = len(xs)
    if not base.size:
        return [0.0] * n

    def part(s: int, e: int):
        bins = np.zeros((n, sk.BINS, 2), np.uint64)
        sk._square_sums(tuple(x[s:e] for x in xs), base[s:e], *k.variance, s, bins)
        return bins

    return sk.exact_totals(run(part, base.size), sk.SQUARE_UNIT)


def _shaped(context: TensorContext | None, shape) -> TensorContext:
    """context with the shape of the whole tensors fn was given (DELLA ranks within rows)."""
    return dataclasses.replace(context or TensorContext(""), shape=tuple(shape))


def della_check(models: Sequence[DellaModelParams], params: Params) -> str | Misfit | None:
    """mergekit's rule: with 0 < density < 1, the keep probabilities density -/+ epsilon lie in (0, 1)."""
    for i, m in enumerate(models):
        if 0 < m.density < 1 and not (m.density - m.epsilon > 0 and m.density + m.epsilon < 1):
            return Misfit(
                i,
                ("epsilon", "density"),
                f"density {m.density} and epsilon {m.epsilon} put a keep probability outside (0, 1); "
                "choose epsilon below both density and 1 - density",
            )
    return normalizable(models, params)


# Through the fused kernels (prepare and merge), two bf16 task vectors of 5632 x 2048 (bench_merge's TinyLlama
# up_proj), one thread, scaled so that ties (0.89-0.91 ns per entry and model beside them) is its 3.0: dare_ties
# 3.55-3.98, breadcrumbs_ties 4.35-4.68, sce 3.0-3.2 (three runs, 2026-11-27); della 6.9 (2.06-2.08 ns, once
# ranks come only to the draws that need them, 2026-11-27 night); della 6.3 since its open draws are listed by
# compress stores and its magnitudes kept once (one_thread.py: prepare 10% less, old and new alternating, 2026-11-28).
_CPU_NS = {"random": 3.8, "outliers": 4.5, "magprune": 6.3, "variance": 3.1}


def _method(name: str, family: Family, model_params, params, summary: str, paper: str, gpu: GpuFootprint, check=None):
    return Method(
        name=name,
        fn=functools.partial(merge, family=family),
        model_params=model_params,
        params=params,
        needs_base=True,
        summary=summary,
        paper=paper,
        check=check,
        prepare=functools.partial(prepare, family=family),
        fused=functools.partial(fused, family=family),
        cpu_ns=_CPU_NS[family.drop],
        gpu=gpu,
        bands=(2, 0) if family.drop == "outliers" else (1, 0),  # Breadcrumbs: the gamma and the density thresholds
    )


DARE = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
BREADCRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs, arXiv:2312.06795"
DELLA = "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617"
SCE = "Wan et al. 2024, FuseChat (SCE), arXiv:2408.07990"
_SUMS = 2 * 256 * 8 + 512  # an _ExactSums histogram of float32 values (float64's: 3 * 2048 * 8)
_RADIX = 8 * ((1 << 16) + DISCARD) + 512  # kth_largest's histogram per vector (task_vectors.TIES)
# fn: the sum, the elected signs, the divisor and a vote (linear: the sum); the task vectors; the masks.
# The draws: an int64 counter and its shifted copy, then the float64 uniforms (two words each, one at a time
# beside the task vectors, whose buffers they outlast).
_DRAWS = GpuFootprint(words=4, per_model=1, masks=2, prepare_words=2, prepare_masks=1, fixed_per_model=2 * _SUMS)
_OUTLIERS = GpuFootprint(
    words=5,
    per_model=1,
    masks=3,
    prepare_words=3,
    prepare_masks=2,
    fixed_per_model=2 * _RADIX + 2 * _SUMS,
    settle_per_model=2 * 3 * _RADIX,
)


def _ranked_block(shape: tuple[int, ...]) -> int:
    """Bytes _magprune_masks' ranking of a block of fibers holds (its argsort's temporaries, 40 bytes an entry)."""
    a, length, r = _fibers(shape, math.prod(shape))
    return 40 * min(a, _block_rows(length * r)) * length * r


# DELLA keeps each model's mask (a byte an entry, counted as a word) from prepare to fn; prepare holds one
# model's magnitudes and up to four masks in its two words, and ranks a block of fibers at a time.
_MAGPRUNE = GpuFootprint(
    words=3, per_model=2, masks=1, prepare_words=2, prepare_masks=1, fixed_per_model=2 * _SUMS,
    held_whole_masks_per_model=1,  # the keep masks prepare leaves for fn: the whole tensor's, however small the pieces
    prepare_whole=1,  # the magnitudes of the model it ranks, whole: a fiber may span chunks
    prepare_block=_ranked_block,
)  # fmt: skip
# SCE selects among one vector, the variances across the models: a histogram pass holds one radix histogram,
# picking a digit three (task_vectors.TIES), whatever the models. Its sums are of squares in float64: a kept
# task vector's squares and their exponents, fractions and shifted fractions (eight words of float32), into
# float64's histograms.
_VARIANCE = GpuFootprint(
    words=7,
    per_model=1,
    masks=3,
    prepare_words=8,
    prepare_masks=1,
    fixed_per_model=3 * 2048 * 8 + 512,
    prepare_block=lambda shape: 3 * _RADIX,
)

_RANDOM, _RANDOM_TIES = Family("random", False), Family("random", True)
METHODS: tuple[Method, ...] = (
    _method(
        "dare_linear",
        _RANDOM,
        DareModelParams,
        SparseLinearParams,
        "Drop each task-vector entry with probability 1 - density, rescale the rest to the task vector's L1 norm, "
        "then task arithmetic.",
        DARE,
        _DRAWS,
        normalizable,
    ),
    _method(
        "dare_ties",
        _RANDOM_TIES,
        DareModelParams,
        SparseTiesParams,
        "DARE's random drop and rescale, then TIES' sign election: base + lambda * the agreeing entries' sum.",
        DARE,
        _DRAWS,
    ),
    _method(
        "breadcrumbs",
        Family("outliers", False),
        BreadcrumbsModelParams,
        BreadcrumbsParams,
        "Drop each task vector's largest gamma and smallest entries, keeping a density fraction, then task arithmetic.",
        BREADCRUMBS,
        _OUTLIERS,
        normalizable,
    ),
    _method(
        "breadcrumbs_ties",
        Family("outliers", True),
        BreadcrumbsModelParams,
        BreadcrumbsTiesParams,
        "Breadcrumbs' drop of the largest and smallest entries, then TIES' sign election.",
        BREADCRUMBS,
        _OUTLIERS,
    ),
    _method(
        "della",
        Family("magprune", True),
        DellaModelParams,
        DellaParams,
        "Drop entries at random, larger magnitudes (ranked in their row) kept more often, rescale, then TIES' "
        "sign election and mean.",
        DELLA,
        _MAGPRUNE,
        della_check,
    ),
    _method(
        "della_linear",
        Family("magprune", False),
        DellaModelParams,
        SparseLinearParams,
        "DELLA's magnitude-ranked random drop and rescale, then task arithmetic.",
        DELLA,
        _MAGPRUNE,
        della_check,
    ),
    _method(
        "sce",
        Family("variance", True),
        SceModelParams,
        SceParams,
        "Keep the select_topk entries that vary most across models, elect signs, and average the agreeing "
        "entries weighted by each task vector's mean square.",
        SCE,
        _VARIANCE,
    ),
)

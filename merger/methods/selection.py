"""Methods that weigh or pick whole task vectors: Model Stock, Arcee Fusion, RAM and RAM+ (tensor-local).

Model Stock and Arcee Fusion need sums over whole rows or tensors (cosines, norms, softmaxes). The engine
hands them over in chunks of any size, on the CPU or a GPU, and a float sum's rounding depends on how it is
split; so each term is written as fixed-point integers (two int64 limbs, 2**-bits apart) and summed exactly,
which gives the same bits whatever the chunks and the device (integer addition is associative). RAM is
elementwise; RAM+ counts entries, in integers too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from merger.errors import NaNTaskVector
from merger.methods import fixed_point
from merger.methods.base import GpuFootprint, InputChunks, MergeRange, Method, Params, TensorContext, kept_for_mergekit

if TYPE_CHECKING:
    from torch import Tensor


class NoParams(Params):
    """No parameters."""


class ModelStockParams(Params):
    filter_wise: bool = Field(
        False, description="one interpolation ratio per row (last dimension) instead of one per tensor"
    )


class ModelStockModelParams(Params):
    # Configs published for Model Stock often weight their models; mergekit 0.1.5 ignores the key (its
    # output is the same bytes with and without), so they run here unchanged and mean the same.
    weight: float = kept_for_mergekit(1.0, ": the angle sets the ratio")


class RamParams(Params):
    epsilon: float = Field(1e-5, ge=0, description="a task vector entry counts as changed where |x - base| > epsilon")


class RamPlusParams(RamParams):
    r: float = Field(0.1, ge=0, description="gain on each model's unique updates: 1 + r * min(rho, alpha)")
    alpha: float = Field(0.2, ge=0, description="cap on rho, a model's shared over unique changed entries")


# --- row-wise reductions over flat chunks --------------------------------------------------------------------


def _cols(context: TensorContext | None, numel: int, row_wise: bool) -> int:
    """Entries per row: the last dimension where `row_wise` and the tensor has two or more; else the whole
    tensor is one row."""
    shape = context.shape if context is not None else ()
    if row_wise and len(shape) >= 2:
        return max(1, shape[-1])
    return max(1, numel)


def _by_rows(values: Tensor, offset: int, cols: int, reduce: Callable[..., Tensor]) -> tuple[int, Tensor]:
    """`reduce` (torch.sum, torch.amax) over each row that a flat chunk starting at `offset` touches: the
    first of those rows and a (rows touched,) tensor (partial for a row the chunk holds part of)."""
    import torch

    n = values.numel()
    row, lead = divmod(offset, cols)
    parts, s = [], 0
    if lead:
        s = min(cols - lead, n)
        parts.append(reduce(values[:s], dim=0, keepdim=True))
    full = (n - s) // cols
    if full:
        parts.append(reduce(values[s : s + full * cols].view(full, cols), dim=1))
        s += full * cols
    if s < n:
        parts.append(reduce(values[s:], dim=0, keepdim=True))
    return row, parts[0] if len(parts) == 1 else torch.cat(parts)


def _per_entry(per_row: Tensor, offset: int, n: int, cols: int) -> Tensor:
    """A row statistic (rows,) spread over the n entries of a flat chunk starting at `offset`: a 0-d tensor
    that broadcasts when the chunk lies in one row."""
    first, last = offset // cols, (offset + n - 1) // cols
    if first == last:
        return per_row[first]
    spread = per_row[first : last + 1, None].expand(last + 1 - first, cols).reshape(-1)
    return spread[offset - first * cols : offset - first * cols + n]


def _limbs(values: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """float64 values with |v| <= 1 (overwritten) as two int64 limbs, v ~ (hi + lo * 2**-bits) * 2**-bits, lo in
    [0, 2**bits]: every step exact but the rounding of lo, so the integers do not depend on the device."""
    v = values.mul_(2.0**bits)  # in place: the caller's temporary
    hi = v.floor()
    v.sub_(hi)
    hi = hi.long()
    return hi, v.mul_(2.0**bits).round_().long()


def _bits(terms: int) -> int:
    """Bits per limb so that `terms` terms of magnitude <= 2**bits sum in int64 without overflow."""
    return 62 - max(1, terms).bit_length()


class _ExactRowSums:
    """Sums per row of float64 terms in [-1, 1] given chunk by chunk: (vectors, rows) accumulators of two int64
    limbs, so that the result does not depend on the chunks' sizes, order or device."""

    def __init__(self, vectors: int, rows: int, cols: int, device: Any):
        import torch

        self.cols, self.bits = cols, _bits(cols)
        self.hi = torch.zeros((vectors, rows), dtype=torch.int64, device=device)
        self.lo = torch.zeros_like(self.hi)

    def add(self, i: int, terms: Tensor, offset: int) -> None:
        """Add vector i's terms (float64, |t| <= 1; overwritten) of the flat chunk starting at `offset`."""
        import torch

        hi, lo = _limbs(terms, self.bits)
        row, sums = _by_rows(hi, offset, self.cols, torch.sum)
        self.hi[i, row : row + sums.numel()] += sums
        row, sums = _by_rows(lo, offset, self.cols, torch.sum)
        self.lo[i, row : row + sums.numel()] += sums

    def result(self) -> Tensor:
        """(vectors, rows) float64."""
        return (self.hi.double() + self.lo.double() * 2.0**-self.bits) * 2.0**-self.bits


def _pow2(exponents: Tensor) -> Tensor:
    """2.0 ** e for int tensors, exactly (built from the bits: pow and exp2 need not be exact on a GPU)."""
    import torch

    return ((exponents.long().clamp(-1022, 1023) + 1023) << 52).view(torch.float64)


def _with_shape(context: TensorContext | None, tensor: Tensor) -> TensorContext:
    """The context of a whole tensor, its shape filled in where the caller gave none."""
    if context is None:
        return TensorContext("", shape=tuple(tensor.shape))
    if not context.shape and tensor.dim():
        return dataclasses.replace(context, shape=tuple(tensor.shape))
    return context


# --- Model Stock -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StockState:
    t: Tensor  # (rows,) the interpolation ratio, compute dtype, on the chunks' device
    cols: int


def model_stock_prepare(
    task_vectors: Callable[[], Iterable[list[Tensor]]],
    numel: int,
    models: Sequence[NoParams],
    params: ModelStockParams,
    *,
    context: TensorContext | None = None,
    inputs: InputChunks | None = None,
) -> StockState:
    """t per row (or per tensor) from the mean cosine between every pair of task vectors, from their exact dot
    products (each pair, each with itself included), summed at the scales of stock_sums_by_guess. A row where a
    task vector is not finite (NaN or inf) has no cosine: its t is NaN, as mergekit's; such entries count for
    no peak and as 0 in the sums, which stay exact integers."""
    import torch

    cols = _cols(context, numel, params.filter_wise)
    sample = _stock_peaks(task_vectors, fixed_point.SAMPLE)
    if sample is None:  # an empty tensor
        return StockState(torch.zeros(1), cols)
    sums = stock_sums_by_guess(
        _floats64(sample),
        numel,
        lambda exponent, clean: _stock_sums_pass(task_vectors, exponent, len(models), numel, cols),
        lambda: (_floats64(_stock_peaks(task_vectors)), False),
    )
    t = stock_ratio(sums, len(models))
    return StockState(torch.from_numpy(t).to(device=sample.device, dtype=sample.dtype), cols)


def _floats64(t: Tensor) -> np.ndarray:
    return t.double().cpu().numpy()


def _stock_peaks(task_vectors: Callable[[], Iterable[list[Tensor]]], limit: int | None = None) -> Tensor | None:
    """Each task vector's largest finite magnitude (0 where none is finite) over the tensor's first `limit`
    entries (every entry: a pass), as an (n,) tensor of the chunks' dtype on their device; None for an empty
    tensor."""
    import torch

    peak, need = None, limit
    for chunk in task_vectors():
        m = chunk[0].numel() if need is None else min(need, chunk[0].numel())
        if m:
            found = torch.stack([d[:m].abs().nan_to_num_(0.0, 0.0).amax() for d in chunk])
            peak = found if peak is None else torch.maximum(peak, found)
        del chunk
        if need is not None:
            need -= m
            if not need:
                break
    return peak


def _stock_sums_pass(
    task_vectors: Callable[[], Iterable[list[Tensor]]], exponent: np.ndarray, n: int, numel: int, cols: int
) -> StockSums:
    """The sums' pass at scales 2**-exponent, each task vector's largest magnitude found as it goes (before
    _not_finite mends the chunk). One synchronisation, at the end."""
    import torch

    scale = _pow2_np(-np.asarray(exponent)).tolist()
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    rows = max(1, numel // cols)
    sums = bad = peak = None
    offset = 0
    for chunk in task_vectors():
        if sums is None:
            sums = _ExactRowSums(len(pairs), rows, cols, chunk[0].device)
            bad = torch.zeros(rows, dtype=torch.int64, device=chunk[0].device)
        found = torch.stack([fixed_point.peak(d) for d in chunk])
        peak = found if peak is None else torch.maximum(peak, found)
        not_finite = _not_finite(chunk)
        row, counts = _by_rows(not_finite, offset, cols, torch.sum)
        bad[row : row + counts.numel()] += counts
        scaled = None
        for p, (i, j) in enumerate(pairs):
            if scaled is None or scaled[0] != i:
                scaled = (i, chunk[i].to(torch.float64, copy=True).mul_(scale[i]))  # exact: a power of two
            other = chunk[j].to(torch.float64, copy=True).mul_(scale[j])  # a copy: float64 chunks too
            sums.add(p, scaled[1] * other, offset)  # float32 x float32: exact
        offset += chunk[0].numel()
    hi, lo, bad = (v.cpu().numpy() for v in (sums.hi, sums.lo, bad))
    return StockSums(hi, lo, sums.bits, bad, np.asarray(exponent), _floats64(peak))


def _not_finite(chunk: list[Tensor]) -> Tensor:
    """Where any of the chunk's task vectors is NaN or inf (int64 0 or 1), those entries set to 0 in place."""
    import torch

    found = torch.zeros(chunk[0].shape, dtype=torch.bool, device=chunk[0].device)
    for d in chunk:
        here = d.isfinite().logical_not_()
        found.logical_or_(here)
        d.masked_fill_(here, 0.0)
    return found.long()


def _pow2_np(exponents: np.ndarray) -> np.ndarray:
    """_pow2 in numpy."""
    return ((np.clip(exponents.astype(np.int64), -1022, 1023) + 1023) << 52).view(np.float64)


@dataclass(frozen=True)
class StockSums:
    """A Model Stock sums' pass at scales 2**-exponent: the (pairs, rows) int64 limb sums (hi, lo) of the scaled
    dot products of every pair i <= j, their bits per limb, the (rows,) counts of entries where a task vector is
    not finite (not counted by the kernel's clean pass) and each task vector's largest magnitude (float64, NaN or
    inf where it holds one)."""

    hi: np.ndarray
    lo: np.ndarray
    bits: int
    bad: np.ndarray
    exponent: np.ndarray
    peaks: np.ndarray


def stock_sums_by_guess(
    sample: np.ndarray,
    numel: int,
    sums_at: Callable[[np.ndarray, bool], StockSums],
    peaks: Callable[[], tuple[np.ndarray, bool]],
) -> StockSums:
    """Model Stock's sums at the scales both paths take, through their own passes: sums_at(exponent, clean) (clean:
    every entry may be taken as finite, the peaks showing where one was not) and peaks() (each task vector's
    largest finite magnitude and whether every entry is finite: a pass). sample: the largest finite magnitudes
    over the tensor's first fixed_point.SAMPLE entries.

    The scales: stock_guess's where it guesses and the pass at them finds every entry finite and below them
    (bounded); else those of the largest finite magnitudes, which the guessed pass found where every entry was
    finite, and a peaks pass finds otherwise (the sample, for a tensor no larger)."""
    exponent = stock_guess(sample, numel)
    if exponent is not None:
        sums = sums_at(exponent, True)
        if bounded(sums.peaks, exponent):
            return sums
        if np.isfinite(sums.peaks).all():
            return sums_at(np.frexp(sums.peaks)[1], True)
    found, clean = (sample, False) if numel <= fixed_point.SAMPLE else peaks()  # a small tensor's sample is all of it
    return sums_at(np.frexp(np.asarray(found, np.float64))[1], clean)


def stock_guess(sample: np.ndarray, numel: int) -> np.ndarray | None:
    """The exponents e of the scales 2**-e that stock_sums_by_guess tries first (|d_i| < 2**e_i), from each task
    vector's largest finite magnitude over the tensor's first fixed_point.SAMPLE entries: fixed_point.HEADROOM
    binades above it, or its own where those entries are the whole tensor. None where a sample holds no nonzero
    finite entry: it guesses nothing."""
    sample = np.asarray(sample, np.float64)
    if not (sample > 0).all():
        return None
    return np.frexp(sample)[1] + (0 if numel <= fixed_point.SAMPLE else fixed_point.HEADROOM)


def bounded(found: np.ndarray, exponent: np.ndarray) -> bool:
    """Whether each task vector's largest magnitude (NaN or inf where it holds one) is finite and below
    2**exponent: then the sums made at those scales are the result."""
    found = np.asarray(found, np.float64)
    return bool(np.isfinite(found).all() and (np.frexp(found)[1] <= exponent).all())


def stock_ratio(s: StockSums, n: int) -> np.ndarray:
    """t per row (float64) from the sums of n task vectors, in elementwise float64 operations alone: the same bits
    in both paths. NaN in the rows where a task vector is not finite."""
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    unscaled = _pow2_np(s.exponent)
    sums = (s.hi.astype(np.float64) + s.lo.astype(np.float64) * 2.0**-s.bits) * 2.0**-s.bits
    dots = sums * np.array([unscaled[i] * unscaled[j] for i, j in pairs])[:, None]  # (pairs, rows)
    dots[:, s.bad > 0] = np.nan
    total = None
    with np.errstate(all="ignore"):
        norms = {i: np.sqrt(dots[pairs.index((i, i))]) for i in range(n)}
        for p, (i, j) in enumerate(pairs):
            if i < j:  # mergekit's floor on the norms' product
                c = np.clip(dots[p] / np.maximum(norms[i] * norms[j], 1e-6), -1.0, 1.0)
                total = c if total is None else total + c
        cos = total / float(n * (n - 1) // 2)
        denominator = 1 + (n - 1) * cos
        # Where the fine-tunes cancel out there is no finite ratio: keep the base there (mergekit's choice).
        singular = np.abs(denominator) < 1e-6
        return np.where(singular, 0.0, n * cos / np.where(singular, 1.0, denominator))


def model_stock(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[NoParams],
    params: ModelStockParams,
    state: StockState | None = None,
    offset: int = 0,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    """t * mean(x_i) + (1 - t) * base, t from model_stock_prepare (computed here for whole tensors)."""
    shape = base.shape
    if state is None:
        context = _with_shape(context, base)
        state = model_stock_prepare(
            lambda: [[(x - base).reshape(-1) for x in tensors]], base.numel(), models, params, context=context
        )
    if not base.numel():
        return base.clone()
    t = _per_entry(state.t, offset, base.numel(), state.cols)
    mean = tensors[0].reshape(-1).clone()
    for x in tensors[1:]:
        mean.add_(x.reshape(-1))
    mean.mul_(1 / len(tensors))  # not div_: a GPU divides by a scalar as this, the CPU would not
    return mean.mul_(t).add_(base.reshape(-1) * (1 - t)).reshape(shape)


def _noop(start: int, end: int, out: np.ndarray) -> None:
    """merge_range of an empty tensor."""


def model_stock_fused(
    tensors, base, models: Sequence[NoParams], params: ModelStockParams, run, *, context: TensorContext | None = None
) -> MergeRange:
    """model_stock through selection_kernels: the sums (_fused_stock_sums), then the merge; the same bytes as
    model_stock_prepare and model_stock."""
    from merger.methods import selection_kernels as sk

    numel = base.size
    if not numel:
        return _noop
    cols = _cols(context, numel, params.filter_wise)
    t = stock_ratio(_fused_stock_sums(tensors, base, cols, run), len(tensors)).astype(np.float32)

    def merge_range(start: int, end: int, out: np.ndarray) -> None:
        sk.stock_merge([x[start:end] for x in tensors], base[start:end], out, t, cols, start, run)

    return merge_range


def _fused_stock_sums(tensors, base, cols: int, run) -> StockSums:
    """model_stock_prepare's sums through selection_kernels' passes, at the same scales (stock_sums_by_guess)."""
    from merger.methods import selection_kernels as sk

    numel, bits = base.size, _bits(cols)
    rows = max(1, numel // cols)

    def sums_at(exponent: np.ndarray, clean: bool) -> StockSums:
        hi, lo, bad, peaks = sk.stock_sums(tensors, base, _pow2_np(-exponent), bits, cols, rows, run, clean)
        return StockSums(hi, lo, bits, bad, exponent, peaks.astype(np.float64))

    head = min(numel, fixed_point.SAMPLE)
    sample = sk.abs_peaks([x[:head] for x in tensors], base[:head], run)[0]
    return stock_sums_by_guess(sample, numel, sums_at, lambda: sk.abs_peaks(tensors, base, run))


def at_least_two(models: Sequence[BaseModel], params: BaseModel) -> str | None:
    if len(models) < 2:
        return (
            f"model_stock compares the task vectors of two or more models, not {len(models)}: "
            "give at least two models besides the base model"
        )
    return None


# --- Arcee Fusion ------------------------------------------------------------------------------------------

_KL_EPS = 1e-8  # added to both softmaxes, as mergekit
_NO_SOFTMAX = "in rows holding a NaN or +inf (in that model or in the base): such a row has no softmax to compare"
_KL_BOUND = 5  # |p * log(p / q)| <= (1 + eps) * log((1 + eps) / eps) < 19 < 2**5


@dataclass(frozen=True)
class FusionState:
    kl: Tensor  # (rows,) KL(softmax(x) || softmax(base)) of each row, compute dtype, non-negative
    cols: int
    threshold: float  # keep x's entries whose importance |x - base| * kl >= threshold


def _importance(x: Tensor, b: Tensor, kl: Tensor, offset: int, cols: int) -> Tensor:
    return (x - b).abs_().mul_(_per_entry(kl, offset, x.numel(), cols))


def arcee_fusion_prepare(
    task_vectors: Callable[[], Iterable[list[Tensor]]],
    numel: int,
    models: Sequence[NoParams],
    params: NoParams,
    *,
    context: TensorContext | None = None,
    inputs: InputChunks | None = None,
) -> FusionState:
    """Each row's KL divergence between the softmaxes of the model's and the base's row (three passes:
    maxima, normalisers, the divergence; in float64, summed exactly, exp and log from merger.methods.elementary:
    the same bits on every device and in the fused kernel), then the importance's quartiles (exact, by radix
    selection) and the threshold median + 1.5 * (q3 - q1)."""
    import torch

    from merger.methods.elementary import exp_diff, log_
    from merger.methods.task_vectors import kth_largest

    assert inputs is not None
    cols = _cols(context, numel, row_wise=True)
    rows = max(1, numel // cols)

    def chunks() -> Iterator[tuple[int, Tensor, Tensor]]:
        offset = 0
        for xs, b in inputs():
            yield offset, xs[0].reshape(-1), b.reshape(-1)
            offset += b.numel()

    peaks = None
    for offset, x, b in chunks():
        if peaks is None:
            peaks = torch.full((2, rows), -math.inf, dtype=x.dtype, device=x.device)
        for i, v in enumerate((x, b)):
            row, m = _by_rows(v, offset, cols, torch.amax)
            peaks[i, row : row + m.numel()] = torch.maximum(peaks[i, row : row + m.numel()], m)
    if peaks is None:  # an empty tensor
        return FusionState(torch.zeros(1), cols, 0.0)
    dtype, device = peaks.dtype, peaks.device

    def exps(offset: int, v: Tensor, i: int) -> Tensor:  # exp(v - max of its row): in [0, 1]
        return exp_diff(v, _per_entry(peaks[i], offset, v.numel(), cols))

    normalisers = _ExactRowSums(2, rows, cols, device)
    for offset, x, b in chunks():
        for i, v in enumerate((x, b)):
            normalisers.add(i, exps(offset, v, i), offset)
    inverse = normalisers.result().reciprocal()  # a multiply per entry: the fused kernel's division per row
    divergence = _ExactRowSums(1, rows, cols, device)
    for offset, x, b in chunks():
        p = exps(offset, x, 0).mul_(_per_entry(inverse[0], offset, x.numel(), cols)).add_(_KL_EPS)
        q = exps(offset, b, 1).mul_(_per_entry(inverse[1], offset, x.numel(), cols)).add_(_KL_EPS)
        divergence.add(0, p.mul_(log_(torch.div(p, q, out=q))).mul_(2.0**-_KL_BOUND), offset)
        del p, q  # not held through the quartiles' selection below
    # A KL divergence is >= 0; a rounding below 0 would rank below every importance of 0. abs: no -0.0.
    kl = (divergence.result()[0] * 2.0**_KL_BOUND).clamp_(min=0).abs_().to(dtype)
    # A row holding NaN or +inf (or only -inf) has no softmax: NaN, which the quartiles refuse (NaNTaskVector).
    kl.masked_fill_(peaks.isfinite().all(0).logical_not_(), math.nan)

    ranks = _quartile_ranks(numel)

    def importances() -> Iterator[list[Tensor]]:
        for offset, x, b in chunks():
            imp = _importance(x, b, kl, offset, cols)
            yield [imp, imp, imp]

    try:
        (q1, _, _), (median, _, _), (q3, _, _) = kth_largest(importances, ranks)
    except NaNTaskVector as e:
        raise NaNTaskVector(0, e.count, _NO_SOFTMAX) from None
    q1_, median_, q3_ = (torch.tensor(v, dtype=dtype) for v in (q1, median, q3))
    return FusionState(kl, cols, (median_ + 1.5 * (q3_ - q1_)).item())  # in the compute dtype, as mergekit


def arcee_fusion(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[NoParams],
    params: NoParams,
    state: FusionState | None = None,
    offset: int = 0,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    """base + (x - base) where the importance |x - base| * KL(row) reaches the threshold, else base."""
    shape = base.shape
    x, b = tensors[0].reshape(-1), base.reshape(-1)
    if state is None:
        context = _with_shape(context, base)
        state = arcee_fusion_prepare(
            lambda: [[x - b]], b.numel(), models, params, context=context, inputs=lambda: [([x], b)]
        )
    if not b.numel():
        return base.clone()
    keep = _importance(x, b, state.kl, offset, state.cols) >= state.threshold
    return (x - b).masked_fill_(keep.logical_not_(), 0).add_(b).reshape(shape)  # not * keep: inf * 0 is NaN


def _quartile_ranks(numel: int) -> list[int]:
    """mergekit's quartiles: the sorted importances at floor(q * (n - 1)), from the bottom; as ranks from the top."""
    return [numel - (numel - 1) // 4, numel - (numel - 1) // 2, numel - 3 * (numel - 1) // 4]


def arcee_fusion_fused(
    tensors, base, models: Sequence[NoParams], params: NoParams, run, *, context: TensorContext | None = None
) -> MergeRange:
    """arcee_fusion through selection_kernels: each row's divergence (whole rows per part), the importances'
    quartiles (from a sample and one pass over the inputs, exact; no importance is stored), then the merge;
    the same bytes as arcee_fusion_prepare and arcee_fusion."""
    from merger.methods import selection_kernels as sk

    numel = base.size
    if not numel:
        return _noop
    x = tensors[0]
    cols = _cols(context, numel, row_wise=True)
    kl = sk.fusion_divergences(x, base, cols, _bits(cols), _KL_EPS, _KL_BOUND, run)
    try:
        found = sk.fusion_quartiles(x, base, kl, _quartile_ranks(numel), run)
    except NaNTaskVector as e:  # NaN importances (a row without a softmax, -inf - -inf): the torch path's error
        raise NaNTaskVector(0, e.count, _NO_SOFTMAX) from None
    q1, median, q3 = (np.float32(f[0]) for f in found)
    with np.errstate(all="ignore"):  # inf - inf: NaN, as torch
        threshold = median + np.float32(1.5) * (q3 - q1)  # float32, as arcee_fusion_prepare

    def merge_range(start: int, end: int, out: np.ndarray) -> None:
        sk.fusion_merge(x, base, kl, start, out, threshold, run)

    return merge_range


def exactly_one(models: Sequence[BaseModel], params: BaseModel) -> str | None:
    if len(models) != 1:
        return f"arcee_fusion fuses one model into the base model, not {len(models)}: give one model besides the base"
    return None


# --- RAM and RAM+ ------------------------------------------------------------------------------------------


def _contributions(tensors: Sequence[Tensor], base: Tensor, epsilon: float) -> Tensor:
    """How many task vectors change each entry (|x_i - base| > epsilon), in the compute dtype."""
    count = None
    for x in tensors:
        changed = (x - base).abs_() > epsilon
        count = changed.to(base.dtype) if count is None else count.add_(changed)
    return count


def _ram(tensors: Sequence[Tensor], base: Tensor, epsilon: float, gains: Tensor | None) -> Tensor:
    """base + each entry's changes: one model's alone (times its gain with RAM+), the mean of several."""
    import torch

    count = _contributions(tensors, base, epsilon)
    unique, shared = count == 1, count > 1
    merged = torch.zeros_like(base)
    for i, x in enumerate(tensors):
        d = x - base
        changed = d.abs() > epsilon
        alone = d if gains is None else d * gains[i]
        merged.add_(torch.where(changed & unique, alone, torch.where(changed & shared, d / count, 0)))
    return merged.add_(base)


def ram(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[NoParams],
    params: RamParams,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    return _ram(tensors, base, params.epsilon, None)


@dataclass(frozen=True)
class RamPlusState:
    gains: Tensor  # (models,) 1 + r * clamp(shared_i / unique_i, 0, alpha), compute dtype


def ramplus_prepare(
    task_vectors: Callable[[], Iterable[list[Tensor]]],
    numel: int,
    models: Sequence[NoParams],
    params: RamPlusParams,
    *,
    context: TensorContext | None = None,
    inputs: InputChunks | None = None,
) -> RamPlusState:
    """Per model, over the whole tensor: its changed entries that others change too (shared) and that it
    alone changes (unique), counted exactly; its gain from their ratio."""
    import torch

    shared = unique = None
    dtype = None
    for chunk in task_vectors():
        changed = [d.abs_() > params.epsilon for d in chunk]  # the chunks are fresh: made magnitudes in place
        count = torch.stack(changed).sum(0)
        one, several = count == 1, count > 1
        s = torch.stack([(c & several).sum() for c in changed])
        u = torch.stack([(c & one).sum() for c in changed])
        shared, unique = (s, u) if shared is None else (shared + s, unique + u)
        dtype = chunk[0].dtype
    if shared is None or dtype is None:
        return RamPlusState(torch.ones(len(models)))
    # In the compute dtype, as mergekit computes it in float32; a model with no unique entries has no use for
    # its gain (0 / 0 with epsilon 0 is NaN, which the merge never reads).
    rho = shared.to(dtype) / unique.to(dtype).clamp(min=params.epsilon)
    return RamPlusState(1 + params.r * rho.clamp(min=0, max=params.alpha))


def ramplus_tl(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[NoParams],
    params: RamPlusParams,
    state: RamPlusState | None = None,
    offset: int = 0,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    if state is None:
        state = ramplus_prepare(lambda: [[(x - base).reshape(-1) for x in tensors]], base.numel(), models, params)
    return _ram(tensors, base, params.epsilon, state.gains)


def ram_fused(
    tensors, base, models: Sequence[NoParams], params: RamParams, run, *, context: TensorContext | None = None
) -> MergeRange:
    """ram through selection_kernels: the same bytes."""
    from merger.methods import selection_kernels as sk

    def merge_range(start: int, end: int, out: np.ndarray) -> None:
        sk.ram_merge([x[start:end] for x in tensors], base[start:end], out, params.epsilon, None, run)

    return merge_range


def ramplus_gains(shared: np.ndarray, unique: np.ndarray, params: RamPlusParams) -> np.ndarray:
    """ramplus_prepare's gains in float32 numpy, operation for operation."""
    f32 = np.float32
    with np.errstate(all="ignore"):
        rho = shared.astype(f32) / np.maximum(unique.astype(f32), f32(params.epsilon))
        return f32(1) + f32(params.r) * np.minimum(np.maximum(rho, f32(0)), f32(params.alpha))


def ramplus_tl_fused(
    tensors, base, models: Sequence[NoParams], params: RamPlusParams, run, *, context: TensorContext | None = None
) -> MergeRange:
    """ramplus_tl through selection_kernels: the counts, then the merge; the same bytes."""
    from merger.methods import selection_kernels as sk

    gains = ramplus_gains(*sk.ram_counts(tensors, base, params.epsilon, run), params)

    def merge_range(start: int, end: int, out: np.ndarray) -> None:
        sk.ram_merge([x[start:end] for x in tensors], base[start:end], out, params.epsilon, gains, run)

    return merge_range


METHODS: tuple[Method, ...] = (
    Method(
        name="model_stock",
        fn=model_stock,
        model_params=ModelStockModelParams,
        params=ModelStockParams,
        needs_base=True,
        summary="t * mean(x_i) + (1 - t) * base, t = N cos / (1 + (N - 1) cos) from the mean cosine between "
        "the task vectors, per tensor or per row (filter_wise).",
        paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models, arXiv:2403.19522",
        check=at_least_two,
        prepare=model_stock_prepare,
        fused=model_stock_fused,
        cpu_ns=3.0,  # measured 2.35 (per tensor) to 2.6 (filter_wise) ns per entry and model, 3 models
        # fn: the mean, t spread over the entries, (1 - t) * base. prepare: the chunk's not-finite flags (int64),
        # two task vectors scaled in float64 and their product, its high limb as float64 and as int64 (twelve
        # words of float32); per row (filter_wise), each pair's sums in two int64 limbs, the flags' count and t.
        gpu=GpuFootprint(words=3, prepare_words=12, per_row=lambda n: 16 * (n * (n + 1) // 2) + 24),
    ),
    Method(
        name="arcee_fusion",
        fn=arcee_fusion,
        model_params=NoParams,
        params=NoParams,
        needs_base=True,
        summary="Keep the model's changes whose importance |x - base| * KL(softmax(x) || softmax(base)) per row "
        "reaches median + 1.5 IQR of the tensor's importances; the base elsewhere.",
        paper="Arcee AI 2025, Arcee Fusion (mergekit v0.1), "
        "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
        check=exactly_one,
        prepare=arcee_fusion_prepare,
        fused=arcee_fusion_fused,
        bands=(0, 3),  # the importances' quartiles
        cpu_ns=4.2,  # one_thread.py's figure, plus the writer's copy (README, Performance)
        # fn: x - base, the importance, the KL spread over the entries; the mask. prepare: float64 p (two words
        # of float32) beside q's exp_diff, whose exp_ holds nine float64 temporaries and the table's two (22:
        # tests/test_gpu_memory.py counts them); the radix select's buffers. Per row: the peaks, exact sums in
        # two int64 limbs (normalisers, divergence) and their float64 results, the KL.
        gpu=GpuFootprint(
            words=3,
            masks=1,
            prepare_words=21,
            prepare_masks=1,
            per_row=lambda n: 128,
            fixed_per_model=3 * 8 * ((1 << 16) + 1024) + 512,
            settle_per_model=9 * (8 * ((1 << 16) + 1024) + 512),
        ),
    ),
    Method(
        name="ram",
        fn=ram,
        model_params=NoParams,
        params=RamParams,
        needs_base=True,
        summary="base + per entry the task vector of the one model that changes it (|x_i - base| > epsilon), "
        "or the mean of those of the models that do.",
        paper="Reinforced Agent Merging (RAM), arXiv:2601.13572",
        fused=ram_fused,
        cpu_ns=1.0,  # measured 0.85 ns per entry and model, 3 models
        # the count, the sum, a task vector, its magnitude, the chosen change and the shared mean; masks
        gpu=GpuFootprint(words=6, masks=3),
    ),
    Method(
        name="ramplus_tl",
        fn=ramplus_tl,
        model_params=NoParams,
        params=RamPlusParams,
        needs_base=True,
        summary="RAM with each model's unique changes scaled by 1 + r * min(alpha, shared / unique changed "
        "entries of that model in the tensor).",
        paper="Reinforced Agent Merging (RAM+), arXiv:2601.13572",
        prepare=ramplus_prepare,
        fused=ramplus_tl_fused,
        cpu_ns=1.25,  # measured 1.05 ns per entry and model, 3 models
        gpu=GpuFootprint(words=7, masks=3, prepare_words=1, prepare_masks=4),
    ),
)

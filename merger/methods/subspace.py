"""Interference reduction in each matrix's singular subspaces: TSV-Merge and Iso-C / Iso-CTS.

Each 2-D tensor is merged whole from the SVDs of its task vectors (delta_i = x_i - base, in float64),
so `prepare` gathers them from the engine's flat chunks and computes the merged delta once; `fn` then
adds its slice to the base. Other tensors (norms, biases, convolutions) take the mean of the task
vectors, as both papers' code does. The merged delta is scaled by `alpha` in every case.

Where the reference code leaves the result to LAPACK's choice, it is pinned down here: singular triplets
of negligible value (NEGLIGIBLE: those of a zero or exactly low-rank task vector) are left out rather
than carried as arbitrary directions, and orthogonalising keeps the partial isometry of a basis's
non-negligible singular directions (the polar factor where the basis has full rank, as in the papers;
with identical task vectors, their repeated directions taken once). On full-rank task vectors this is
the reference algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from pydantic import Field

from merger.errors import MergeError, NaNTaskVector, counted
from merger.methods.base import GpuFootprint, InputChunks, Method, Params, TensorContext

if TYPE_CHECKING:
    from torch import Tensor


class SubspaceParams(Params):
    alpha: float = Field(
        1.0, ge=0, description="scale of the merged task vector (the papers pick it on validation data, in (0, 3])"
    )


class IsoCtsParams(SubspaceParams):
    common_space_fraction: float = Field(
        0.8,
        ge=0,
        le=1,
        description="share of each matrix's rank kept from the summed task vectors' top singular directions; "
        "the rest is split evenly among the models' own",
    )


@dataclass(frozen=True)
class _Deltas:
    """One matrix's task vectors, whole, in float64: model i's (one(i)) or their sum (total())."""

    count: int
    shape: tuple[int, int]
    one: Callable[[int], Tensor]
    total: Callable[[], Tensor]
    name: str  # the tensor's, for errors
    dtype: list = field(default_factory=list)  # the chunks' dtype, once one is seen


# Singular values at most this fraction of the matrix's Frobenius norm (its largest singular value's
# bound) are rounding, not signal: float64's rounding in the SVDs and projections stays near 1e-15 of
# it, while a stored task vector's own small singular values, from data of float32 or bf16 precision,
# sit far above (a 16384-wide random matrix's smallest is about 5e-7 of its norm).
NEGLIGIBLE = 1e-10


_NO_SVD = (
    "NaN or infinite (a NaN or an infinity in that model or in the base, or a difference past the compute "
    "dtype's range): a singular value decomposition needs finite values"
)


def _finite(d: _Deltas, a: Tensor, model: int | None) -> Tensor:
    """a (model's task vector, or the sum of all where model is None) where every entry is finite; else
    NaNTaskVector naming the first model whose task vector is not, or a MergeError where each is finite
    and their sum is not (float64 task vectors near its range)."""
    bad = a.isfinite().logical_not_()
    if not bool(bad.any()):
        return a
    if model is not None:
        raise NaNTaskVector(model, int(bad.sum()), _NO_SVD)
    for i in range(d.count):  # the sum is not finite: the first model whose task vector is not
        count = int(d.one(i).isfinite().logical_not_().sum())
        if count:
            raise NaNTaskVector(i, count, _NO_SVD)
    raise MergeError(
        f"tensor '{d.name}': the sum of the models' task vectors is past float64's range in "
        f"{counted(int(bad.sum()))[0]}: a singular value decomposition needs finite values. Is one of those "
        "checkpoints diverged?"
    )


def _top(a: Tensor, k: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """a's top k singular triplets (u: (m, q), s: (q,), vh: (q, n)) without the negligible ones (q <= k)."""
    import torch

    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    q = int((s[:k] > NEGLIGIBLE * scale).sum())  # s descends: the kept ones come first
    if q == s.numel():
        return u, s, vh
    return u[:, :q].clone(), s[:q].clone(), vh[:q].clone()  # not views: the rest of u and vh is freed


def _isometry(a: Tensor) -> tuple[Tensor, Tensor]:
    """a's partial isometry U V^T over its non-negligible singular directions, as its factors (U, V^T).
    Where a has full rank this is its polar factor, the orthonormal basis nearest to a's (the papers'
    whitening)."""
    import torch

    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = int((s > NEGLIGIBLE * s[0]).sum())
    return u[:, :r], vh[:r]


def _recombined(us: list[Tensor], ss: list[Tensor], vhs: list[Tensor], shape: tuple[int, int], flat: bool) -> Tensor:
    """U diag(s) V^T of the concatenated triplets, U's columns and V^T's rows orthogonalised; with `flat`,
    every singular value of the result the mean of s (isotropic)."""
    import torch

    s = torch.cat(ss)
    if not s.numel():
        return torch.zeros(shape, dtype=torch.float64, device=s.device)
    u_left, u_right = _isometry(torch.cat(us, dim=1))  # U (m, K) orthogonalised: (m, r) @ (r, K)
    v_left, v_right = _isometry(torch.cat(vhs, dim=0))  # V^T (K, n): (K, r') @ (r', n)
    if not flat:
        return u_left @ (((u_right * s) @ v_left) @ v_right)
    # U_w V_w^T has a flat unit spectrum where both bases have full rank (the papers' case); where they do
    # not (identical or nested task subspaces) its small core is made an isometry too, so that it stays flat.
    c_left, c_right = _isometry(u_right @ v_left)  # (r, r')
    return ((u_left @ c_left) @ (c_right @ v_right)).mul_(s.mean())


def tsv_delta(d: _Deltas, params: SubspaceParams) -> Tensor:
    """TSV-Merge: each task vector's top 1/T of the rank, the bases whitened, then recombined."""
    k = min(d.shape) // d.count  # the paper's share; 0 when the rank is below the number of models: no change
    us, ss, vhs = [], [], []
    for i in range(d.count):
        delta = _finite(d, d.one(i), i)
        for kept, part in zip((us, ss, vhs), _top(delta, k, delta.norm())):
            kept.append(part)
        del delta
    return _recombined(us, ss, vhs, d.shape, flat=False)


def iso_c_delta(d: _Deltas, params: SubspaceParams) -> Tensor:
    """Iso-C: the summed task vectors' singular values all replaced by their mean."""
    import torch

    total = _finite(d, d.total(), None)
    u, s, vh = _top(total, min(d.shape), total.norm())
    del total
    if not s.numel():
        return torch.zeros(d.shape, dtype=torch.float64, device=s.device)
    return (u @ vh).mul_(s.mean())  # u and vh are orthonormal already


def common_split(rank: int, models: int, fraction: float) -> tuple[int, int]:
    """Iso-CTS's (common dimensions, dimensions per model): the fraction of the rank (of the decimal
    written), then the rest rounded to a multiple of the models (Python's round, as the reference) and
    never more than the rank."""
    common = math.floor(Fraction(repr(fraction)) * rank)
    specific = round((rank - common) / models) * models
    if specific > rank:  # the reference would slice a negative common size here
        specific -= models
    return rank - specific, specific // models


def iso_cts_delta(d: _Deltas, params: IsoCtsParams) -> Tensor:
    """Iso-CTS: the summed task vectors' top singular directions, each model's top directions outside
    them, orthogonalised together, with a flat spectrum."""
    common, per_model = common_split(min(d.shape), d.count, params.common_space_fraction)
    total = _finite(d, d.total(), None)
    u_c, s_c, vh_c = _top(total, common, total.norm())
    del total
    us, ss, vhs = [], [], []
    for i in range(d.count):
        delta = d.one(i)
        scale = delta.norm()
        delta.sub_(u_c @ (u_c.T @ delta))  # what the common subspace (its left singular vectors) leaves
        for kept, part in zip((us, ss, vhs), _top(delta, per_model, scale)):
            kept.append(part)
        del delta
    return _recombined([*us, u_c], [*ss, s_c], [*vhs, vh_c], d.shape, flat=True)


def _whole(tensors: Sequence[Tensor], base: Tensor, shape: tuple[int, int], name: str) -> _Deltas:
    """The task vectors of whole tensors."""

    def one(i: int) -> Tensor:
        return (tensors[i] - base).reshape(shape).double()

    def total() -> Tensor:
        acc = one(0)
        for x in tensors[1:]:
            acc.add_((x - base).reshape(shape))  # summed in float64, as from chunks
        return acc

    return _Deltas(len(tensors), shape, one, total, name)


def _chunked(task_vectors: Callable[[], Iterable[list[Tensor]]], count: int, numel: int, shape, name: str) -> _Deltas:
    """The task vectors from the engine's flat chunks, gathered in one pass over them each (one model's,
    or their sum), so that one whole matrix is held at a time."""
    import torch

    def gather(add: Callable[[Tensor, list[Tensor]], None]) -> Tensor:
        out = None
        offset = 0
        for chunk in task_vectors():
            if out is None:
                out = torch.empty(numel, dtype=torch.float64, device=chunk[0].device)
                deltas.dtype[:] = [chunk[0].dtype]
            n = chunk[0].numel()
            add(out[offset : offset + n], chunk)
            offset += n
        return out.reshape(shape)

    def one(i: int) -> Tensor:
        return gather(lambda seg, chunk: seg.copy_(chunk[i]))

    def total() -> Tensor:
        def add(seg: Tensor, chunk: list[Tensor]) -> None:
            seg.copy_(chunk[0])
            for c in chunk[1:]:
                seg.add_(c)

        return gather(add)

    deltas = _Deltas(count, shape, one, total, name)
    return deltas


def _matrix_shape(context: TensorContext | None, base: Tensor | None = None) -> tuple[int, int] | None:
    """The tensor's shape if it is a non-empty matrix (merged by its SVDs), else None."""
    shape = (
        tuple(context.shape) if context is not None and context.shape else tuple(base.shape) if base is not None else ()
    )
    return shape if len(shape) == 2 and shape[0] and shape[1] else None  # type: ignore[return-value]


def _name(context: TensorContext | None) -> str:
    return context.name if context is not None else "a matrix"


def _mean_merge(tensors: Sequence[Tensor], base: Tensor, alpha: float) -> Tensor:
    """base + alpha * the mean task vector: the non-matrix tensors, elementwise."""
    import torch

    acc = torch.zeros_like(base)
    delta = torch.empty_like(base)
    for x in tensors:
        torch.sub(x, base, out=delta)
        acc.add_(delta)
    return acc.mul_(alpha / len(tensors)).add_(base)


def _method_fns(delta_of: Callable[[_Deltas, Params], Tensor]):
    """(fn, prepare) of a method whose merged delta of a whole matrix is delta_of's (unscaled, float64)."""

    def prepare(
        task_vectors: Callable[[], Iterable[list[Tensor]]],
        numel: int,
        models: Sequence[Params],
        params: SubspaceParams,
        *,
        context: TensorContext | None = None,
        inputs: InputChunks | None = None,
    ) -> Tensor | None:
        """The merged delta of a whole matrix (scaled, in the chunks' dtype and on their device); None for
        other tensors, which merge elementwise."""
        shape = _matrix_shape(context)
        if shape is None:
            return None
        deltas = _chunked(task_vectors, len(models), numel, shape, _name(context))
        merged = delta_of(deltas, params)  # gathers at least once: the dtype is known after
        return merged.mul_(params.alpha).to(deltas.dtype[0])

    def fn(
        tensors: Sequence[Tensor],
        base: Tensor,
        models: Sequence[Params],
        params: SubspaceParams,
        state: Tensor | None = None,
        offset: int = 0,
        *,
        context: TensorContext | None = None,
    ) -> Tensor:
        """On whole tensors (state None), or on the flat chunk starting at `offset` given prepare's state."""
        shape = _matrix_shape(context, base)
        if shape is None:
            return _mean_merge(tensors, base, params.alpha)
        if state is None:  # whole tensors: the merged delta from them
            state = delta_of(_whole(tensors, base, shape, _name(context)), params).mul_(params.alpha).to(base.dtype)
            return state.reshape(base.shape).add_(base)
        flat = base.reshape(-1)
        return (flat + state.reshape(-1)[offset : offset + flat.numel()]).reshape(base.shape)

    return fn, prepare


_tsv_fn, _tsv_prepare = _method_fns(tsv_delta)
_iso_c_fn, _iso_c_prepare = _method_fns(iso_c_delta)
_iso_cts_fn, _iso_cts_prepare = _method_fns(iso_cts_delta)


def _footprint(matrices: int) -> GpuFootprint:
    """`matrices` whole float64 matrices at the peak, counted in float32 words (two each; a float64 merge
    holds half as many words as this says): what tests/test_subspace.py counts, and two more for what
    torch.linalg.svd holds inside (its copy of the input, cuSOLVER's workspace), which no count on the CPU
    sees. The task vectors are gathered one at a time, so nothing grows with the number of models.
    prepare, in pieces, holds as much: whole matrices (held_whole), beside pieces of the inputs."""
    words = 2 * (matrices + 2)
    return GpuFootprint(words=words, prepare_words=words, held_whole=words)


# _CPU_NS: ns per entry and model on one core, measured at bench_merge's small shape (matrices 512 wide,
# two fine-tunes): an SVD is compute, not I/O. Its cost per entry grows with a matrix's smaller side, so a
# 7B model costs several times more per entry than this says; either way device: auto picks the GPU
# wherever there is one.


TSV = Method(
    name="tsv",
    in_mergekit=False,
    fn=_tsv_fn,
    model_params=Params,
    params=SubspaceParams,
    needs_base=True,
    summary="Per matrix: each task vector's top 1/T singular vectors, the bases whitened (orthogonalised) "
    "and recombined: base + alpha * U diag(s) V^T; other tensors the mean task vector.",
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, arXiv:2412.00081",
    prepare=_tsv_prepare,
    # a task vector and its SVD, the kept triplets (2 matrices at most), the whitening's SVDs, the result
    gpu=_footprint(6),
    cpu_ns=1300.0,  # _CPU_NS
)

ISO_C = Method(
    name="iso_c",
    in_mergekit=False,
    fn=_iso_c_fn,
    model_params=Params,
    params=SubspaceParams,
    needs_base=True,
    summary="Per matrix: the summed task vectors with every singular value set to their mean (isotropic): "
    "base + alpha * mean(s) U V^T; other tensors the mean task vector.",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, arXiv:2502.04959",
    prepare=_iso_c_prepare,
    gpu=_footprint(3),  # the summed task vectors, their SVD, the result
    cpu_ns=470.0,  # _CPU_NS
)

ISO_CTS = Method(
    name="iso_cts",
    in_mergekit=False,
    fn=_iso_cts_fn,
    model_params=Params,
    params=IsoCtsParams,
    needs_base=True,
    summary="Iso-C over the summed task vectors' top singular directions plus each model's own outside them, "
    "orthogonalised, with a flat spectrum; other tensors the mean task vector.",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, arXiv:2502.04959",
    prepare=_iso_cts_prepare,
    # the common subspace kept beside a task vector, its projection and SVD, the kept triplets, the result
    gpu=_footprint(8),
    cpu_ns=1900.0,  # _CPU_NS
)

METHODS: tuple[Method, ...] = (TSV, ISO_C, ISO_CTS)

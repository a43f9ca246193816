"""Interpolation on the sphere and between weights: slerp, nuslerp, multislerp, karcher, nearswap."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from merger.errors import MergeError
from merger.methods import fixed_point
from merger.methods.base import GpuFootprint, InputChunks, MergeRange, Method, Params, TensorContext, kept_for_mergekit
from merger.methods.fixed_point import LOW, SPLIT, from_sums, gram_by_guess, pair_scale, peak

if TYPE_CHECKING:
    from torch import Tensor

MERGEKIT = "mergekit (Goddard et al. 2024, arXiv:2403.13257)"


class NoModelParams(Params):
    """Methods whose models take no parameters of their own."""


class WeightParams(Params):
    weight: float = Field(1.0, description="relative weight of this model")


class SlerpParams(Params):
    t: float = Field(0.5, ge=0, le=1, description="interpolation factor: 0 gives the base model, 1 the other")


class NuslerpParams(Params):
    nuslerp_flatten: bool = Field(True, description="interpolate whole tensors, else row or column vectors")
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: vectors along the first dimension (x[:, j]), else the last (x[i, :])"
    )


class MultislerpParams(Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="added to norms before dividing by them")


class KarcherModelParams(Params):
    # Configs written for Karcher often weight their models; mergekit 0.1.5's karcher takes equal weights
    # whatever they say (the key has no effect there), so they run here unchanged and mean the same.
    weight: float = kept_for_mergekit(1.0, ": the mean weighs models equally")


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0, description="most iterations of the Karcher mean's fixed point")
    tol: float = Field(1e-5, ge=0, description="stop when the tangent step is shorter; norms below it are ignored")


class NearswapParams(Params):
    t: float = Field(
        0.5, ge=0, description="distance scale: entries closer than t to the base's take the other model's value"
    )


# ---------------------------------------------------------------------------------------------------
# The Gram matrix of whole tensors, summed exactly.
#


@dataclass(frozen=True)
class Segments:
    """Which vector each flat entry belongs to: one vector (count 1), rows of `length` consecutive
    entries, or (strided) vectors along the first dimension, entry i in vector i % count."""

    count: int
    length: int
    strided: bool = False

    def ids(self, start: int, n: int, device) -> Tensor:
        """The vector of each entry of [start, start + n): (n,) int64."""
        import torch

        idx = torch.arange(start, start + n, device=device)
        return idx.remainder_(self.count) if self.strided else idx.floor_divide_(self.length)


def whole(numel: int) -> Segments:
    return Segments(1, max(numel, 1))


def gram(
    chunks: Callable[[], Iterable[list[Tensor]]], exps: Sequence[int], segments: Segments, device
) -> tuple[np.ndarray, list[float]]:
    """The Gram matrix of each segment of k vectors given as consecutive flat chunks (each item of
    chunks() holds every vector's next chunk), at scales 2**-exps: (count, k, k) float64, the same whatever
    the chunks and device where every |v| < 2**e; and each vector's largest magnitude (NaN if it holds
    any), which tells whether that held (fixed_point.gram_by_guess). One pass; one sync, at the end."""
    import torch

    k = len(exps)
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    acc = torch.zeros((2, len(pairs), segments.count), dtype=torch.int64, device=device)  # high and low parts
    tops = [torch.zeros((), dtype=torch.float64, device=device)] * k
    offset = 0
    for vs in chunks():
        n = vs[0].numel()
        tops = _larger(tops, [peak(v) for v in vs])
        ids = segments.ids(offset, n, device) if segments.count > 1 else None
        for p, (i, j) in enumerate(pairs):
            q = vs[i].reshape(-1).to(torch.float64, copy=True).mul_(vs[j].reshape(-1))  # exact for float32 inputs
            # (n,) |t| <= 2**51, ties to even; where a guessed scale was too small (|q| >= 2**51) the integers mean
            # nothing and are not used: the entries' peaks show it, and gram_by_guess makes the pass again
            t = q.mul_(pair_scale(exps[i], exps[j])).round_().to(torch.int64)
            del q
            high = t >> SPLIT
            low = t.bitwise_and_(LOW)
            del t
            if ids is None:
                acc[0, p, 0] += high.sum()
                acc[1, p, 0] += low.sum()
            else:
                acc[0, p].index_add_(0, ids, high)
                acc[1, p].index_add_(0, ids, low)
            del high, low
        offset += n
        del vs, ids  # before the next chunk is loaded
    both = torch.cat([acc.reshape(-1), torch.stack(tops).double().view(torch.int64)]).cpu().numpy()  # the one sync
    return from_sums(both[:-k].reshape(acc.shape), exps, k), both[-k:].view(np.float64).tolist()


def _larger(peaks: list[Tensor] | None, found: list[Tensor]) -> list[Tensor]:
    """Each vector's running largest magnitude (0-d tensors), NaN kept: torch.maximum propagates it."""
    import torch

    return found if peaks is None else [torch.maximum(p, f) for p, f in zip(peaks, found)]


def _floats(peaks: list[Tensor]) -> list[float]:
    """0-d tensors as float64 floats, in one sync."""
    import torch

    return torch.stack(peaks).double().cpu().tolist()


# ---------------------------------------------------------------------------------------------------
# A tensor's result: sum(c_i * v_i), plus the base when the v_i are task vectors.


@dataclass(frozen=True)
class Combination:
    """What prepare leaves for fn: each vector's coefficient, a float for one vector per tensor or a
    (count,) tensor per vector (one coefficient per segment, on the chunks' device, in the compute
    dtype); over_base: the vectors are task vectors x_i - base and the base is added back; identity:
    the result is the first input as it is (mergekit's answer for a single model)."""

    coefs: tuple[float, ...] | tuple[Tensor, ...]
    segments: Segments
    over_base: bool = False
    identity: bool = False


def combination(coefs: np.ndarray, segments: Segments, over_base: bool, like: Tensor) -> Combination:
    """A Combination from float64 coefficients (count, k), made for chunks like `like`."""
    import torch

    if segments.count == 1:
        return Combination(tuple(float(c) for c in coefs[0]), segments, over_base)
    columns = torch.from_numpy(np.ascontiguousarray(coefs.T)).to(device=like.device, dtype=like.dtype)
    return Combination(tuple(columns), segments, over_base)  # one upload per tensor


def combine(vectors: Sequence[Tensor], base: Tensor | None, state: Combination, offset: int) -> Tensor:
    """The flat chunk of the result at `offset` from the same chunk of each vector (the inputs: task
    vectors are made here, one at a time)."""
    import torch

    n, device = vectors[0].numel(), vectors[0].device
    ids = state.segments.ids(offset, n, device) if state.segments.count > 1 else None  # (n,) int64
    out = None
    for v, c in zip(vectors, state.coefs):
        c = c if ids is None else c[ids]  # a float, or (n,)
        term = torch.sub(v, base).mul_(c) if state.over_base else torch.mul(v, c)  # (n,)
        out = term if out is None else out.add_(term)  # separate kernels: no FMA, the same bits on any device
        del term, c  # before the next one is made
    return out.add_(base) if state.over_base else out


def _without_lingering(items: Iterable[Any]) -> Iterator[Any]:
    """items, holding none of them while the next is made (a chunk held over would be one more buffer)."""
    for item in items:
        yield item
        del item


def _vectors_of(inputs: InputChunks, with_base: bool) -> Iterator[list[Tensor]]:
    """Each chunk's vectors: [base, *xs] (with_base, where there is a base) or xs, none held over."""
    for xs, b in inputs():
        vs = [b, *xs] if with_base and b is not None else xs
        del xs, b
        yield vs
        del vs


@dataclass(frozen=True)
class Sphere:
    """A method whose result is a combination of its inputs with coefficients from their Gram matrix.

    vectors: which vectors, from the ingredients' and the base's chunks: "pair", [base, x] (slerp);
    "task", x_i - base where a base is given, else the x_i; "all", [base, *x_i] where a base is given,
    else the x_i (karcher, which like mergekit takes a named base as one more model).
    coefficients(G, models, params, context) -> (count, k) float64, or None for the first input as it
    is; segments(shape, params): the vectors each tensor is cut into."""

    vectors: str
    coefficients: Callable[[np.ndarray, Sequence[Any], Any, TensorContext | None], np.ndarray | None]
    segments: Callable[[tuple[int, ...], Any], Segments] = lambda shape, params: whole(math.prod(shape))

    def prepare(
        self,
        task_vectors: Callable[[], Iterable[list[Tensor]]],
        numel: int,
        models: Sequence[Any],
        params: Any,
        *,
        context: TensorContext | None = None,
        inputs: InputChunks | None = None,
    ) -> Combination:
        shape = context.shape if context is not None and context.shape else (numel,)
        segments = self.segments(shape, params)
        if numel == 0:
            return Combination((), segments, identity=True)
        sample, over_base, like = self._sample(inputs)
        if over_base:
            chunks = lambda: _without_lingering(task_vectors())  # noqa: E731
        elif self.vectors in ("pair", "all"):
            chunks = lambda: _vectors_of(inputs, with_base=True)  # noqa: E731
        else:
            chunks = lambda: _vectors_of(inputs, with_base=False)  # noqa: E731
        G = gram_by_guess(
            sample,
            lambda exps: gram(chunks, exps, segments, like.device),
            lambda: self._peaks(inputs, over_base),
            segments.count,
        )
        coefs = self.coefficients(G, models, params, context)
        if coefs is None:
            return Combination((), segments, identity=True)
        return combination(coefs, segments, over_base, like)

    def _found(self, xs: list[Tensor], b: Tensor | None, over_base: bool) -> list[Tensor]:
        """Each vector's largest magnitude in one chunk of the inputs (0-d tensors, NaN if it holds any)."""
        if self.vectors == "pair" or (self.vectors == "all" and b is not None):
            return [peak(b), *(peak(x) for x in xs)]
        return [peak(x - b) if over_base else peak(x) for x in xs]  # one task vector at a time

    def _sample(self, inputs: InputChunks) -> tuple[list[float], bool, Tensor]:
        """Each vector's largest magnitude over the tensor's first SAMPLE entries; whether the vectors are
        task vectors (there is a base); an empty tensor like the chunks. (On CUDA a tensor too large to
        stage whole comes in pieces: its first piece is uploaded for this, as the whole tensor was for
        the peaks' pass this replaces.)"""
        import torch

        peaks, need = None, fixed_point.SAMPLE
        for xs, b in _without_lingering(inputs()):
            over_base, like = self.vectors == "task" and b is not None, xs[0]
            m = min(need, like.numel())
            head = [x.reshape(-1)[:m] for x in xs]
            peaks = _larger(peaks, self._found(head, None if b is None else b.reshape(-1)[:m], over_base))
            need -= m
            del xs, b, head
            if need == 0:
                break
        like = torch.empty(0, dtype=like.dtype, device=like.device)  # not the chunk itself
        return _floats(peaks), over_base, like

    def _peaks(self, inputs: InputChunks, over_base: bool) -> list[float]:
        """Each vector's largest magnitude over the whole tensor (NaN if it holds any): a pass."""
        peaks = None
        for xs, b in _without_lingering(inputs()):
            peaks = _larger(peaks, self._found(xs, b, over_base))
            del xs, b
        return _floats(peaks)

    def fused(
        self,
        tensors: Sequence[np.ndarray],
        base: np.ndarray | None,
        models: Sequence[Any],
        params: Any,
        run: Callable[..., list],
        *,
        context: TensorContext | None = None,
    ) -> MergeRange:
        """prepare and fn as numba kernels on the stored bytes (merger.methods.interpolation_kernels): the
        same bytes."""
        from merger.methods.interpolation_kernels import sphere_fused

        return sphere_fused(self, tensors, base, models, params, run, context)

    def fn(
        self,
        tensors: Sequence[Tensor],
        base: Tensor | None,
        models: Sequence[Any],
        params: Any,
        state: Combination | None = None,
        offset: int = 0,
        *,
        context: TensorContext | None = None,
    ) -> Tensor:
        shape = tensors[0].shape
        xs = [x.reshape(-1) for x in tensors]
        b = base.reshape(-1) if base is not None else None
        if state is None:  # whole tensors: the coefficients from them, as one chunk
            context = replace(context or TensorContext(""), shape=tuple(shape))
            state = self.prepare(
                lambda: iter([[x - b for x in xs]]),
                xs[0].numel(),
                models,
                params,
                context=context,
                inputs=lambda: iter([(xs, b)]),
            )
        if state.identity:
            return tensors[0].clone()
        vectors = [b, *xs] if self.vectors in ("pair", "all") and b is not None else xs
        return combine(vectors, b, state, offset).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# The coefficients, from the Gram matrix G (count, k, k), as mergekit 0.1.5 computes them.


def slerp_coefficients(G: np.ndarray, models, params: SlerpParams, context) -> np.ndarray:
    """[base, x]: SLERP by the angle between the two tensors; linear where they are (anti)parallel,
    |cos| > 0.9995. A norm below 1e-8 counts as 1 (a zero tensor is then at a right angle to the other,
    as in mergekit: slerp(0, x, t) = sin(t * pi / 2) * x, not t * x)."""
    t = params.t
    na, nb = (n if n > 1e-8 else 1.0 for n in np.sqrt(np.maximum(np.diagonal(G[0]), 0)))
    dot = float(np.clip(G[0, 0, 1] / (na * nb), -1, 1))
    if abs(dot) > 0.9995:
        return np.array([[1 - t, t]])
    theta = math.acos(dot)
    return np.array([[math.sin((1 - t) * theta), math.sin(t * theta)]]) / math.sin(theta)


def nuslerp_t(models: Sequence[WeightParams]) -> float:
    """t = w_2 / (w_1 + w_2); 0.5 where the weights (nearly) cancel."""
    total = models[0].weight + models[1].weight
    return 0.5 if abs(total) < 1e-6 else models[1].weight / total


def nuslerp_coefficients(G: np.ndarray, models: Sequence[WeightParams], params, context) -> np.ndarray:
    """SLERP of each segment's two vectors; linear where 1 - cos^2 <= 1e-16. Norms are clamped to
    1e-7 (a zero vector is at a right angle to any other)."""
    t = nuslerp_t(models)
    n0, n1 = (np.maximum(np.sqrt(np.maximum(G[:, i, i], 0)), 1e-7) for i in (0, 1))
    cos = np.clip(G[:, 0, 1] / (n0 * n1), -1, 1)  # (count,)
    colinear = (1 - cos**2) <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    sin = np.where(colinear, 1.0, np.sin(theta))
    c0 = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / sin)
    c1 = np.where(colinear, t, np.sin(t * theta) / sin)
    return np.stack([c0, c1], axis=1)


def nuslerp_segments(shape: tuple[int, ...], params: NuslerpParams) -> Segments:
    """Whole tensors with nuslerp_flatten; else vectors along the first dimension (nuslerp_row_wise:
    x[:, j], entries j, j + cols, ...) or the last (x[i, :], consecutive entries)."""
    numel = math.prod(shape)
    if params.nuslerp_flatten or len(shape) <= 1 or numel == 0:
        return whole(numel)
    if params.nuslerp_row_wise:
        return Segments(numel // shape[0], shape[0], strided=True)
    return Segments(numel // shape[-1], shape[-1])


def multislerp_coefficients(
    G: np.ndarray, models: Sequence[WeightParams], params: MultislerpParams, context: TensorContext | None
) -> np.ndarray | None:
    """Barycentric interpolation on the sphere: the unit vectors' weighted mean m, their weighted
    tangent vectors at m mapped back by the exponential map, scaled by the weighted mean norm. Every
    vector here is a combination of the inputs, held as its coefficients (k,); <a, b> = a^T G b."""
    k = len(models)
    if k == 1:
        return None  # the model itself
    g = G[0]
    w = np.array([m.weight for m in models], dtype=np.float64)
    if params.normalize_weights:
        w = w / w.sum()
    eps = params.eps
    norms = np.sqrt(np.maximum(np.diagonal(g), 0))
    if not norms.any():  # every task vector zero (a tensor no fine-tune changed): the base. mergekit
        return np.zeros((1, k))  # 0.1.5 raises here for 3 models or more, and falls back to linear for 2
    mean = w / (norms + eps)  # sum(w_i * u_i), u_i = v_i / (|v_i| + eps)
    mean_norm = math.sqrt(max(mean @ g @ mean, 0))
    if mean_norm < eps:
        if k == 2:
            return w[None, :]  # linear
        name = context.name if context is not None else "a tensor"
        raise MergeError(
            f"tensor '{name}': multislerp's weighted mean of the models' directions is zero (antipodal "
            "models whose weights cancel); change a weight"
        )
    mean = mean / mean_norm
    dots = (g @ mean) / (norms + eps)  # <u_i, mean>
    tangent = w / (norms + eps) - (w @ dots) * mean  # sum(w_i * (u_i - dots_i * mean))
    step = math.sqrt(max(tangent @ g @ tangent, 0)) + eps
    result = mean * math.cos(step) + tangent * (math.sin(step) / step)
    return (result * (norms @ w))[None, :]


def karcher_coefficients(G: np.ndarray, models, params: KarcherParams, context) -> np.ndarray | None:
    """The Karcher (Frechet) mean of the unit vectors, equal weights: Riemannian gradient steps from
    their normalised mean; inputs with a norm at most tol take no part in the direction. The result is
    that direction times the mean norm of all inputs. Vectors as coefficients (k,), <a, b> = a^T G b."""
    k = len(G[0])
    if k == 1:
        return None
    g, tol = G[0], params.tol
    norms = np.sqrt(np.maximum(np.diagonal(g), 0))
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return np.zeros((1, k))
    units = np.zeros((k, k))  # row i: u_i = v_i / |v_i|
    for i in valid:
        units[i, i] = 1 / norms[i]
    alpha = 1 / len(valid)

    def norm(v: np.ndarray) -> float:
        return math.sqrt(max(v @ g @ v, 0))

    mean = alpha * units[valid].sum(0)
    mean = units[valid[0]].copy() if norm(mean) < tol else mean / norm(mean)
    for _ in range(params.max_iter):
        tangent = np.zeros(k)
        for i in valid:
            dot = min(max(mean @ g @ units[i], -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (units[i] - dot * mean)
        step = norm(tangent)
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        if norm(mean) > tol:
            mean = mean / norm(mean)
    return (mean * norms.sum() / k)[None, :]


# ---------------------------------------------------------------------------------------------------
# NearSwap: elementwise.


def nearswap(
    tensors: Sequence[Tensor],
    base: Tensor,
    models: Sequence[NoModelParams],
    params: NearswapParams,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    """w = clamp(t / max(|base - x|, 1e-6), 0, 1); w * x + (1 - w) * base: where x is within t of the
    base it is taken, farther away it fades towards the base."""
    x = tensors[0]
    w = (base - x).abs_().clamp_(min=1e-6).reciprocal_().mul_(params.t).clamp_(0, 1)  # 1/d then * t, as torch does t/d
    out = x * w
    return out.add_(w.neg_().add_(1).mul_(base))


def nearswap_fused(
    tensors, base, models: Sequence[NoModelParams], params: NearswapParams, run, *, context: TensorContext | None = None
) -> MergeRange:
    """nearswap as a numba kernel on the stored bytes: the same float32 operations, the same bytes."""
    from merger.methods.interpolation_kernels import nearswap_range

    return nearswap_range(tensors[0], base, params.t, run)


# ---------------------------------------------------------------------------------------------------
# Checks before any tensor is read.


def _two(name: str) -> Callable[[Sequence[BaseModel], BaseModel], str | None]:
    def check(models: Sequence[BaseModel], params: BaseModel) -> str | None:
        if len(models) != 1:
            return (
                f"{name} interpolates two models, the base_model and one other; this recipe gives "
                f"{len(models)} besides the base"
            )
        return None

    return check


def _nuslerp_check(models: Sequence[BaseModel], params: BaseModel) -> str | None:
    if len(models) != 2:
        return f"nuslerp interpolates exactly two models (besides any base_model); this recipe gives {len(models)}"
    return None


def _multislerp_check(models: Sequence[BaseModel], params: BaseModel) -> str | None:
    if params.normalize_weights and len(models) > 1 and sum(m.weight for m in models) == 0:
        return "the weights sum to 0, so they cannot be normalised; set normalize_weights: false or change a weight"
    return None


SLERP = Sphere("pair", slerp_coefficients)
NUSLERP = Sphere("task", nuslerp_coefficients, nuslerp_segments)
MULTISLERP = Sphere("task", multislerp_coefficients)
KARCHER = Sphere("all", karcher_coefficients)

# cpu_ns: the fused kernels' passes (the Gram matrix's sums, the combination), one thread on a 11.5M-entry bf16
# tensor, scaled as linear's 0.5 was (linear measured 0.22 ns per entry and model in the same run; slerp 2.55,
# nuslerp 1.53, multislerp 1.56 with two models, karcher 1.60 with three, nearswap 0.58), the writer's copy (about
# 0.85 ns an entry) added; times the one-thread ratio of the two passes to the three (slerp 0.98, nuslerp and
# multislerp 0.87, karcher 0.92: prepare and merge of an up_proj, 2026-11-27), then the kernels' part times the
# ratio of the Gram matrix's rounded integers to its three float64 digits per product (slerp 0.55, nuslerp 0.66,
# multislerp 0.64, karcher 0.64: prepare and merge of a 5632 x 2048 bf16 tensor on one thread, 2026-11-27).
# fn: the result and one term; prepare: a product (float64) and its integer (int64), then the integer's two parts,
# beside the vectors. nuslerp by rows also holds the entries' vector ids (int64), in fn a gathered coefficient,
# and in prepare the sums per vector (2 parts * 3 pairs * 8 bytes each: at most a word an entry for vectors of 12
# entries or more).
FLAT = GpuFootprint(words=2, prepare_words=4)
ROWS = GpuFootprint(words=5, prepare_words=7)

METHODS: tuple[Method, ...] = (
    Method(
        name="slerp",
        fn=SLERP.fn,
        model_params=NoModelParams,
        params=SlerpParams,
        needs_base=True,
        summary="Spherical interpolation from the base (t=0) to the other model (t=1) by the angle between "
        "the whole tensors; linear where they are (anti)parallel.",
        paper='Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH',
        check=_two("slerp"),
        prepare=SLERP.prepare,
        fused=SLERP.fused,
        cpu_ns=2.2,
        gpu=FLAT,
    ),
    Method(
        name="nuslerp",
        fn=NUSLERP.fn,
        model_params=WeightParams,
        params=NuslerpParams,
        needs_base=False,
        takes_base=True,
        summary="SLERP of two models (their task vectors with a base) at t = w2 / (w1 + w2), whole tensors or "
        "row/column vectors.",
        paper=MERGEKIT,
        check=_nuslerp_check,
        prepare=NUSLERP.prepare,
        fused=NUSLERP.fused,
        cpu_ns=1.3,
        gpu=ROWS,
    ),
    Method(
        name="multislerp",
        fn=MULTISLERP.fn,
        model_params=WeightParams,
        params=MultislerpParams,
        needs_base=False,
        takes_base=True,
        summary="Weighted barycentric interpolation of any number of models (task vectors with a base) on the "
        "hypersphere, through the tangent space at their mean.",
        paper="Goddard 2024, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); " + MERGEKIT,
        check=_multislerp_check,
        prepare=MULTISLERP.prepare,
        fused=MULTISLERP.fused,
        cpu_ns=1.3,
        gpu=FLAT,
    ),
    Method(
        name="karcher",
        fn=KARCHER.fn,
        model_params=KarcherModelParams,
        params=KarcherParams,
        needs_base=False,
        takes_base=True,  # mergekit averages a named base_model with the models
        summary="Karcher (Frechet) mean of the models' directions on the hypersphere, scaled by their mean norm; "
        "a named base_model is one more model.",
        paper="Karcher 1977, Riemannian center of mass and mollifier smoothing, Comm. Pure Appl. Math.",
        prepare=KARCHER.prepare,
        fused=KARCHER.fused,
        cpu_ns=1.4,
        gpu=FLAT,
    ),
    Method(
        name="nearswap",
        fn=nearswap,
        model_params=NoModelParams,
        params=NearswapParams,
        needs_base=True,
        summary="Take the other model's entries where they are within t of the base's, fading to the base with "
        "distance: w = clamp(t / |base - x|, 0, 1).",
        paper="alchemonaut, QuartetAnemoi-70B-t0.0001 (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); "
        + MERGEKIT,
        check=_two("nearswap"),
        fused=nearswap_fused,
        cpu_ns=1.3,
        gpu=GpuFootprint(words=2),  # the weights and the result
    ),
)

"""Every method's fused CPU kernels on hostile tensor values, against its torch path: random bit patterns (NaN
of either sign, infinities, subnormals, every binade), planted specials, zero task vectors, magnitudes over
240 binades. The two paths refuse alike (the same error, naming the same model) or write the same bytes
(NaN for NaN). The kernels run without bounds checks: CI runs this file again under NUMBA_BOUNDSCHECK=1 with
a fresh kernel cache (.ci/run), where an index past an array's end is an IndexError, not a write into
memory that is not the kernel's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_kernels import as_array, in_pieces, runner

from merger.methods import TensorContext, all_methods, get_method
from merger.methods.base import tensor_seed

# Each fused method's (name[:variant]) models (all: base and two fine-tunes as ingredients; tasks: two fine-tunes over the
# base; pair: one fine-tune over the base; one: a model alone), per-model and method-wide parameters.
CASES = {
    "linear": ("all", {"weight": 0.3}, {}),
    "task_arithmetic": ("tasks", {"weight": 0.3}, {"lambda": 0.7}),
    "ties": ("tasks", {"weight": 0.3, "density": 0.5}, {"lambda": 0.7}),
    "slerp": ("pair", {}, {"t": 0.3}),
    "nuslerp": ("tasks", {"weight": 0.3}, {}),
    "multislerp": ("tasks", {"weight": 0.3}, {}),
    "karcher": ("all", {}, {}),
    "greedy_soup": ("all", {}, {}),  # the soup's merge: a uniform mean
    "nearswap": ("pair", {}, {"t": 0.001}),
    "dare_linear": ("tasks", {"weight": 0.3, "density": 0.5}, {"lambda": 0.7}),
    "dare_ties": ("tasks", {"weight": 0.3, "density": 0.5}, {"lambda": 0.7}),
    "breadcrumbs": ("tasks", {"weight": 0.3, "density": 0.9, "gamma": 0.01}, {"lambda": 0.7}),
    "breadcrumbs_ties": ("tasks", {"weight": 0.3, "density": 0.8, "gamma": 0.1}, {"lambda": 0.7}),
    "della": ("tasks", {"weight": 0.3, "density": 0.5, "epsilon": 0.1}, {"lambda": 0.7}),
    "della_linear": ("tasks", {"weight": 0.3, "density": 0.4, "epsilon": 0.2}, {"lambda": 0.7}),
    "sce": ("tasks", {}, {"select_topk": 0.5}),
    "sce:three": ("three", {}, {"select_topk": 0.5}),  # a mean and variance over 3: no exact division
    "model_stock": ("tasks", {}, {}),
    "model_stock:rows": ("tasks", {}, {"filter_wise": True}),  # a NaN row's t NaN, the other rows' not
    "arcee_fusion": ("pair", {}, {}),
    "ram": ("tasks", {}, {}),
    "ramplus_tl": ("tasks", {}, {}),
    "passthrough": ("one", {}, {}),
}
KINDS = ["bits", "specials", "infinities", "equal", "wide"]
SHAPES = [(1,), (3, 5), (40, 301), (5, 2, 33), (300, 251)]  # the last past kernels.EXACT_BELOW: sampled
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-30, 6e4, -6e4]


def test_every_fused_method_is_here():
    assert {c.split(":")[0] for c in CASES} == {n for n, m in all_methods().items() if m.fused is not None}


def _values(kind: str, n: int, dtype: torch.dtype, rng: np.random.Generator, base: torch.Tensor | None):
    """One tensor of n entries stored as dtype (returned as float32); base: the base's, for a fine-tune."""
    if kind == "bits":  # every bit pattern of the dtype alike
        if dtype == torch.float32:
            return torch.from_numpy(rng.integers(0, 2**32, n, dtype=np.uint32).view(np.float32))
        return torch.from_numpy(rng.integers(-(2**15), 2**15, n).astype(np.int16)).view(dtype).float()
    t = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 0.02
    if base is None:
        return t.to(dtype).float()
    if kind == "equal":  # a zero task vector, or one constant
        return base.clone() if rng.integers(2) else torch.full_like(base, 0.5)
    t = base + t * 0.1
    if kind == "wide":
        t = t * torch.from_numpy((2.0 ** rng.integers(-120, 120, n)).astype(np.float32))
    elif kind in ("specials", "infinities"):
        pool = torch.tensor([v for v in SPECIALS if kind == "specials" or not math.isnan(v)], dtype=torch.float32)
        at = torch.from_numpy(rng.integers(0, n, max(1, n // 7)))
        t[at] = pool[torch.from_numpy(rng.integers(0, pool.numel(), at.numel()))]
        if kind == "specials":
            t.view(torch.int32)[at[: max(1, at.numel() // 5)]] = -(2**22)  # a NaN with its sign bit set: 0xFFC00000
    return t.to(dtype).float()


def _inputs(method: str, kind: str, shape: tuple, dtype: torch.dtype, seed: int, base_dtype: torch.dtype | None = None):
    """(ingredients, base or None) stored as dtype (the base as base_dtype, default dtype), as float32 tensors
    of `shape`."""
    roles = CASES[method][0]
    n = math.prod(shape)
    rng = np.random.default_rng(seed)
    base = _values(kind, n, base_dtype or dtype, rng, None)
    fts = [
        _values(kind, n, dtype, rng, base)
        for _ in range({"all": 2, "tasks": 2, "three": 3, "pair": 1, "one": 1}[roles])
    ]
    xs = [base, *fts] if roles == "all" else fts
    return [x.reshape(shape) for x in xs], base.reshape(shape)


def _outcome(call):
    """("raise", the error's type and model) or ("ok", the output's bits, every NaN as -1)."""
    try:
        out = call()
    except Exception as e:  # the comparison is the test: which error each path raises
        return "raise", (type(e).__name__, getattr(e, "model", None))
    bits = out.view(torch.int16 if out.element_size() == 2 else torch.int32).numpy().copy()
    bits[out.float().isnan().numpy()] = -1
    return "ok", bits


def _both_paths(method: str, kind: str, shape: tuple, dtype: torch.dtype, seed: int, device: str = "cpu", mixed=None):
    """Both paths' outcomes; mixed: (the base's stored dtype, the output's), where they differ from dtype, the
    ingredients'."""
    m = get_method(method.split(":")[0])
    _, per_model, wide = CASES[method]
    base_dtype, out_dtype = mixed or (dtype, dtype)
    xs, base = _inputs(method, kind, shape, dtype, seed, base_dtype)
    b = base if m.reads_base else None
    models = [m.model_params(**per_model) for _ in xs]
    params = m.params(**wide)
    context = TensorContext("t", seed=tensor_seed(seed, "t"), shape=shape)
    n = math.prod(shape)

    def torch_path():
        on = [x.to(device) for x in xs]
        return (
            m.fn(on, None if b is None else b.to(device), models, params, context=context)
            .reshape(-1)
            .to(out_dtype)
            .cpu()
        )

    def fused_path():
        out = torch.empty(n, dtype=out_dtype)
        arrays = [as_array(x.to(dtype).reshape(-1)) for x in xs]
        merge = m.fused(arrays, None if b is None else as_array(b.to(base_dtype).reshape(-1)), models, params,
                        runner(4099, 2), context=context)  # fmt: skip
        in_pieces(merge, as_array(out), 5003)
        return out

    return _outcome(torch_path), _outcome(fused_path)


def _agree(method: str, kind: str, device: str) -> None:
    for shape in SHAPES:
        for dtype in DTYPES:
            (want_kind, want), (got_kind, got) = _both_paths(method, kind, shape, dtype, len(shape), device)
            assert got_kind == want_kind, (shape, dtype, got if got_kind == "raise" else want)
            if want_kind == "raise":
                assert got == want, (shape, dtype)
            else:
                assert np.array_equal(got, want), (shape, dtype, int((got != want).sum()))


@pytest.mark.parametrize("method", sorted(CASES))
def test_the_plan_counts_every_band_the_fused_kernels_gather(monkeypatch, method):
    """Plan.peak_memory counts Method.bands' gathered bands (kernels.select_in_bands) for a tensor: the fused
    kernels never gather more populations at once, on a tensor large enough to be sampled."""
    from merger import kernels

    m = get_method(method.split(":")[0])
    _, per_model, wide = CASES[method]
    xs, base = _inputs(method, "equal", (300, 251), torch.float32, 3)
    g = torch.Generator().manual_seed(3)
    xs = [base + 0.01 * torch.randn(base.shape, generator=g) for _ in xs]  # ordinary task vectors
    gathered = []
    real = kernels._gather

    def spy(todo, *args):
        gathered.append(len(todo))
        return real(todo, *args)

    monkeypatch.setattr(kernels, "_gather", spy)
    models = [m.model_params(**per_model) for _ in xs]
    context = TensorContext("t", seed=1, shape=base.shape)
    b = as_array(base.reshape(-1)) if m.reads_base else None
    merge = m.fused(
        [as_array(x.reshape(-1)) for x in xs], b, models, m.params(**wide), runner(4099, 2), context=context
    )
    in_pieces(merge, np.empty(base.numel(), np.float32))
    by_model, by_tensor = m.bands
    assert max(gathered, default=0) <= by_model * len(xs) + by_tensor
    assert bool(gathered) == (
        method.split(":")[0] in {"ties", "breadcrumbs", "breadcrumbs_ties", "sce", "arcee_fusion"}
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow in float32 casts of inf weights
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(CASES))
def test_fused_kernels_agree_with_the_torch_path_on_hostile_values(method, kind):
    _agree(method, kind, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(CASES))
def test_the_torch_path_on_cuda_agrees_with_the_fused_kernels_on_hostile_values(method, kind):
    _agree(method, kind, "cuda")


# (the ingredients' stored dtype, the base's, the output's): a base saved in bfloat16 with fine-tunes saved in
# float32 (or ingredients of several dtypes, which the engine copies to float32: Plan.widened), and a float16
# fine-tune over a float32 base
MIXED = [(torch.float32, torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32, torch.bfloat16)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", ["bits", "specials", "wide"])
@pytest.mark.parametrize(
    "method", sorted(m for m, (roles, *_) in CASES.items() if roles != "all" and get_method(m.split(":")[0]).reads_base)
)
def test_fused_kernels_read_a_base_stored_in_another_dtype(method, kind):
    """The fused kernels take a base stored in another dtype than the ingredients (Plan.not_fused): the
    torch path's bytes, in the output's dtype."""
    for shape in SHAPES:
        for dtype, base_dtype, out_dtype in MIXED:
            (want_kind, want), (got_kind, got) = _both_paths(
                method, kind, shape, dtype, len(shape), mixed=(base_dtype, out_dtype)
            )
            assert (got_kind, got if got_kind == "raise" else None) == (
                want_kind,
                want if want_kind == "raise" else None,
            ), (shape, dtype)
            if want_kind == "ok":
                assert np.array_equal(got, want), (shape, dtype, int((got != want).sum()))

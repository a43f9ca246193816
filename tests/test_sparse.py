"""The sparse task-vector methods (DARE, Breadcrumbs, DELLA, SCE) through the CLI, against float64 oracles
written here from the papers and mergekit 0.1.5's behaviour (benchmarks/mergekit_sparse.py runs mergekit
itself). The sampling methods' keep-masks are the one thing taken from merger: its draws (the randomness,
not the method); their distribution is tested on its own."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint
from numba import njit

import merger.budget
import merger.stream
from merger.cli import cli
from merger.methods import draws, sparse_kernels, tensor_seed

SHAPES = {"w": (6, 10), "v": (37,), "m": (4, 3, 5)}
WEIGHTS = (0.6, -0.3, 0.4)


@pytest.fixture
def family(tmp_path):
    """A base and three fine-tunes, float32, two shards each."""
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = {"base": base}
    write_checkpoint(tmp_path / "base", base)
    for i in (1, 2, 3):
        models[f"ft{i}"] = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        write_checkpoint(tmp_path / f"ft{i}", models[f"ft{i}"], n_shards=2)
    return models


def recipe(tmp_path, method: str, per_model: list[str], params: str = "", extra: str = "", weights=WEIGHTS) -> Path:
    lines = [f"merge_method: {method}", f"base_model: {tmp_path / 'base'}", "compute_dtype: float64", extra, "models:"]
    for i, p in enumerate(per_model):
        items = ([f"weight: {weights[i]}"] if weights else []) + ([p] if p else [])
        lines += [f"  - model: {tmp_path / f'ft{i + 1}'}", f"    parameters: {{{', '.join(items)}}}"]
    if params:
        lines.append(f"parameters: {{{params}}}")
    path = tmp_path / "r.yaml"
    path.write_text("\n".join(x for x in lines if x) + "\n")
    return path


def apply(tmp_path, path: Path, *args: str, out: str = "out") -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(cli, ["apply", str(path), "-o", str(tmp_path / out), "-q", "--force", *args])
    assert result.exit_code == 0, result.output
    return load_output(tmp_path / out)


def deltas(family, name: str, n: int) -> list[np.ndarray]:
    base = family["base"][name].double().numpy().reshape(-1)
    return [family[f"ft{i + 1}"][name].double().numpy().reshape(-1) - base for i in range(n)]


def combine(ds, base, weights, *, elect: bool, normalize: bool, lam: float = 1.0) -> np.ndarray:
    """The float64 oracle of the combination: task arithmetic, or TIES' election (sign of the weighted
    sum; 0 when it cancels) and the sum, or the |w|-weighted mean, of the agreeing entries."""
    scaled = [w * d for w, d in zip(weights, ds)]
    if not elect:
        total = sum(scaled)
        return base + lam * (total / sum(weights) if normalize else total)
    sign = np.sign(sum(scaled))
    agree = [(np.sign(s) == sign) & (sign != 0) for s in scaled]
    total = sum(np.where(a, s, 0) for a, s in zip(agree, scaled))
    if normalize:
        total = total / np.maximum(sum(np.where(a, abs(w), 0) for a, w in zip(agree, weights)), 1e-300)
    return base + lam * total


def l1_rescaled(d: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """mergekit's rescale: the kept entries scaled to the task vector's L1 norm (unless either is < 1e-7)."""
    kept = np.where(keep, d, 0)
    before, after = np.abs(d).sum(), np.abs(kept).sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


# --- Breadcrumbs (deterministic) ---


def breadcrumbs_mask(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """The paper's mask, as mergekit sizes it: drop the gamma largest magnitudes and the smallest, keeping
    floor(density * n) (fewer large ones dropped when both would not fit); ties, lowest index first."""
    n = d.size
    if density >= 1:
        return np.ones(n, bool)
    target, n_top = math.floor(round(density * n, 9)), math.floor(round(gamma * n, 9))
    n_bot = max(0, n - target - n_top)
    order = sorted(range(n), key=lambda j: (-abs(d[j]), j))  # largest first
    keep = np.zeros(n, bool)
    keep[order[n - n_bot - target : n - n_bot]] = True
    return keep


CRUMBS = [
    ["density: 0.5, gamma: 0.1", "density: 0.3, gamma: 0.2", "density: 0.8, gamma: 0.05"],
    ["density: 0.7, gamma: 0.5"] * 3,  # gamma + density > 1: fewer of the largest dropped
    ["density: 1.0, gamma: 0.3"] * 3,  # density 1: nothing dropped, gamma aside
    ["density: 0.0, gamma: 0.1"] * 3,  # nothing kept: the base
    ["density: 0.4, gamma: 0.2"],  # one model
]


@pytest.mark.parametrize("per_model", CRUMBS, ids=["mixed", "cover", "density1", "density0", "one"])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("params", ["", "normalize: true, rescale: true, lambda: 1.5"])
def test_breadcrumbs_equals_its_oracle(tmp_path, family, method, per_model, params):
    got = apply(tmp_path, recipe(tmp_path, method, per_model, params))
    n = len(per_model)
    specs = [dict(kv.split(": ") for kv in p.split(", ")) for p in per_model]
    for name in SHAPES:
        base = family["base"][name].double().numpy().reshape(-1)
        ds = []
        for d, spec in zip(deltas(family, name, n), specs):
            keep = breadcrumbs_mask(d, float(spec["density"]), float(spec["gamma"]))
            ds.append(
                l1_rescaled(d, keep) if "rescale" in params and float(spec["density"]) < 1 else np.where(keep, d, 0)
            )
        want = combine(
            ds,
            base,
            WEIGHTS[:n],
            elect=method.endswith("ties"),
            normalize="normalize" in params,
            lam=1.5 if "lambda" in params else 1.0,
        )
        torch.testing.assert_close(got[name].reshape(-1).double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6)


# --- SCE (deterministic) ---


def sce_oracle(ds: list[np.ndarray], base: np.ndarray, topk: float) -> np.ndarray:
    """FuseChat's SCE as mergekit runs it: keep the floor(topk * nonzero) entries of largest variance across
    models (population variance), elect signs on the plain task vectors (sum), weigh each model by its
    kept task vector's mean square (uniform if they sum below 1e-6) and average the agreeing entries."""
    tv = np.stack(ds)
    if topk < 1:
        var = tv.var(axis=0)
        k = math.floor(round(topk * np.count_nonzero(var), 9))
        keep = np.zeros(var.size, bool)
        keep[sorted(range(var.size), key=lambda j: (-var[j], j))[:k]] = True
        tv = tv * keep
    means = (tv**2).mean(axis=1)
    w = np.full(len(ds), 1 / len(ds)) if means.sum() < 1e-6 else means / means.sum()
    sign = np.sign(tv.sum(axis=0))
    agree = (np.sign(tv) == sign) & (sign != 0)
    ew = w[:, None] * agree
    return base + (tv * ew).sum(axis=0) / np.maximum(ew.sum(axis=0), 1e-300)


@pytest.mark.parametrize("topk,n", [(0.5, 3), (1.0, 3), (0.3, 2), (0.5, 1), (1.0, 1)])
def test_sce_equals_its_oracle(tmp_path, family, topk, n):
    got = apply(tmp_path, recipe(tmp_path, "sce", [""] * n, f"select_topk: {topk}", weights=()))
    for name in SHAPES:
        base = family["base"][name].double().numpy().reshape(-1)
        want = sce_oracle(deltas(family, name, n), base, topk)
        torch.testing.assert_close(got[name].reshape(-1).double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6)
    if n == 1:  # one model: no variance, so nothing kept below select_topk 1; the model itself at 1
        want = family["base" if topk < 1 else "ft1"]
        for name in SHAPES:
            torch.testing.assert_close(got[name], want[name])


# --- DARE and DELLA (sampling): the oracle given the same keep-masks ---


def dare_keep(name: str, seed: int, i: int, n: int, density: float) -> np.ndarray:
    if density >= 1:
        return np.ones(n, bool)
    return (draws.uniform(tensor_seed(seed, name), i, 0, n) < density).numpy()


def della_keep(name: str, seed: int, i: int, d: np.ndarray, shape, density: float, eps: float) -> np.ndarray:
    """DELLA's MagPrune: keep probability density - eps + 2 eps * rank / (L - 1), rank by magnitude within
    each fiber along dim 1 (a 1-D tensor: one fiber), ties by index."""
    if density >= 1:
        return np.ones(d.size, bool)
    a, length, r = (1, d.size, 1) if len(shape) == 1 else (shape[0], shape[1], math.prod(shape[2:]))
    mags = np.abs(d).reshape(a, length, r)
    ranks = np.argsort(np.argsort(mags, axis=1, kind="stable"), axis=1, kind="stable")
    probs = (density - eps) + ranks / (length - 1) * 2 * eps
    u = draws.uniform(tensor_seed(seed, name), i, 0, d.size).numpy().reshape(a, length, r)
    return (u < probs).reshape(-1)


SAMPLED = {
    "dare_linear": (["density: 0.3", "density: 0.6", "density: 1.0"], ""),
    "dare_ties": (["density: 0.3", "density: 0.6", "density: 0.5"], "normalize: true"),
    "della": (["density: 0.4, epsilon: 0.1", "density: 0.5, epsilon: 0.3", "density: 0.7, epsilon: 0.05"], ""),
    "della_linear": (["density: 0.4, epsilon: 0.1", "density: 0.5, epsilon: 0.3"], "rescale: false, lambda: 0.5"),
}
DEFAULTS = {  # mergekit's: (elect, normalize, rescale)
    "dare_linear": (False, False, True),
    "dare_ties": (True, False, True),
    "della": (True, True, True),
    "della_linear": (False, False, True),
}


@pytest.mark.parametrize("method", sorted(SAMPLED))
def test_sampling_methods_equal_their_oracle_given_the_keep_masks(tmp_path, family, method):
    per_model, params = SAMPLED[method]
    got = apply(tmp_path, recipe(tmp_path, method, per_model, params, "random_seed: 5"))
    elect, normalize, rescale = DEFAULTS[method]
    normalize = "normalize: true" in params or normalize
    rescale = rescale and "rescale: false" not in params
    specs = [dict(kv.split(": ") for kv in p.split(", ")) for p in per_model]
    for name, shape in SHAPES.items():
        base = family["base"][name].double().numpy().reshape(-1)
        ds = []
        for i, (d, spec) in enumerate(zip(deltas(family, name, len(specs)), specs)):
            density = float(spec["density"])
            if method.startswith("dare"):
                keep = dare_keep(name, 5, i, d.size, density)
            else:
                keep = della_keep(name, 5, i, d, shape, density, float(spec["epsilon"]))
            ds.append(l1_rescaled(d, keep) if rescale and density < 1 else np.where(keep, d, 0))
        lam = 0.5 if "lambda" in params else 1.0
        want = combine(ds, base, WEIGHTS[: len(specs)], elect=elect, normalize=normalize, lam=lam)
        torch.testing.assert_close(got[name].reshape(-1).double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6)


@pytest.fixture
def wide(tmp_path):
    """A base and two fine-tunes of one 200 x 500 tensor: enough entries for statistics."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(200, 500, generator=g)
    models = {"base": base}
    write_checkpoint(tmp_path / "base", {"w": base})
    for i in (1, 2):
        models[f"ft{i}"] = base + 0.1 * torch.randn(base.shape, generator=g)
        write_checkpoint(tmp_path / f"ft{i}", {"w": models[f"ft{i}"]})
    return models


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_kept_fraction_rescale_and_expected_value(tmp_path, wide, method):
    """One model: about `density` of the entries kept, each scaled by the same factor (the task vector's L1
    norm over the kept entries'), and the mean of the merged task vector that of task arithmetic."""
    spec = "density: 0.3" + (", epsilon: 0.2" if method == "della_linear" else "")
    got = apply(tmp_path, recipe(tmp_path, method, [spec], weights=(1.0,)))["w"].double()
    d = (wide["ft1"] - wide["base"]).double()
    kept = (got - wide["base"].double()) != 0
    n = d.numel()
    assert abs(kept.double().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    factor = d.abs().sum() / d[kept].abs().sum()
    torch.testing.assert_close(got[kept] - wide["base"].double()[kept], d[kept] * factor, rtol=1e-5, atol=1e-6)
    if method == "della_linear":  # larger magnitudes kept more often: 0.1 + 0.4 rank / (L - 1) on average
        ranks = d.abs().argsort(dim=1).argsort(dim=1).double() / 499
        low, high = kept[ranks < 0.5].double().mean().item(), kept[ranks >= 0.5].double().mean().item()
        assert abs(low - 0.2) < 0.01 and abs(high - 0.4) < 0.01


def test_dare_linear_expected_value_is_task_arithmetics(tmp_path, wide):
    """Each entry's expected value is task arithmetic's (the drop keeps density of it, the rescale restores
    about 1 / density): over 100K entries the mean difference is within a few standard errors of 0."""
    spec = ["density: 0.3", "density: 0.6"]
    dare = apply(tmp_path, recipe(tmp_path, "dare_linear", spec, weights=(0.7, 0.5)))["w"].double()
    ta = recipe(tmp_path, "task_arithmetic", ["", ""], weights=(0.7, 0.5))
    diff = dare - apply(tmp_path, ta, out="ta")["w"].double()
    assert diff.abs().max() > 0.01  # entries differ ...
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(diff.numel())  # ... not on average


def test_dare_ties_expected_magnitude_is_ties_without_a_trim(tmp_path, wide):
    """DARE's rescaled drop keeps the expected task vector: over many entries, the mean of dare_ties with
    density 0.5 is close to that of ties with density 1 (the same election on the full vectors)."""
    dare = apply(tmp_path, recipe(tmp_path, "dare_ties", ["density: 0.5"] * 2, weights=(1.0, 1.0)))["w"]
    ties = apply(tmp_path, recipe(tmp_path, "ties", [""] * 2, "normalize: false", weights=(1.0, 1.0)), out="t")["w"]
    base = wide["base"].double()
    a, b = (dare.double() - base), (ties.double() - base)
    assert abs(a.abs().mean().item() / b.abs().mean().item() - 1) < 0.2


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_all_dropped_is_the_base(tmp_path, family, method):
    got = apply(tmp_path, recipe(tmp_path, method, ["density: 0.0"] * 3))
    for name in SHAPES:
        assert torch.equal(got[name], family["base"][name])


# --- byte identity ---

ALL = {
    "dare_linear": (["density: 0.3"] * 3, ""),
    "dare_ties": (["density: 0.4"] * 3, ""),
    "breadcrumbs": (["density: 0.5, gamma: 0.1"] * 3, "rescale: true"),
    "breadcrumbs_ties": (["density: 0.5, gamma: 0.1"] * 3, ""),
    "della": (["density: 0.4, epsilon: 0.2"] * 3, ""),
    "della_linear": (["density: 0.4, epsilon: 0.2"] * 3, ""),
    "sce": ([""] * 3, "select_topk: 0.4"),
}


def bytes_of(tmp_path, method: str, out: str, *args: str, compute: str = "float32", seed: int = 1) -> dict:
    per_model, params = ALL[method]
    weights = () if method == "sce" else WEIGHTS
    path = recipe(tmp_path, method, per_model, params, f"random_seed: {seed}", weights=weights)
    path.write_text(path.read_text().replace("compute_dtype: float64", f"compute_dtype: {compute}"))
    return {k: v.numpy().tobytes() for k, v in apply(tmp_path, path, *args, out=out).items()}


@pytest.mark.parametrize("method", sorted(ALL))
def test_outputs_are_the_same_bytes_whatever_the_chunks(tmp_path, family, method, monkeypatch):
    for compute in ("float64", "float32"):  # float32 last: `first` is compared with other seeds below
        first = bytes_of(tmp_path, method, "a", compute=compute)
        assert bytes_of(tmp_path, method, "b", compute=compute) == first
        monkeypatch.setattr(merger.budget, "CHUNK", 7)
        assert bytes_of(tmp_path, method, "c", compute=compute) == first
        monkeypatch.setattr(merger.budget, "CHUNK", 23)
        assert bytes_of(tmp_path, method, "d", compute=compute) == first
        monkeypatch.undo()
    if method.startswith(("dare", "della")):
        other = bytes_of(tmp_path, method, "e", seed=2)
        assert all(other[k] != first[k] for k in first)
        assert bytes_of(tmp_path, method, "f", "--random-seed", "2") == other


@pytest.mark.parametrize("method", sorted(ALL))
def test_whole_tensors_give_the_engines_bytes(tmp_path, family, method):
    """fn called on whole tensors without a state (as the GPU path calls it) computes its own and gives what
    the chunked engine wrote."""
    from merger.methods import TensorContext, get_method

    m = get_method(method)
    per_model, params = ALL[method]
    path = recipe(tmp_path, method, per_model, params, "random_seed: 1", weights=() if method == "sce" else WEIGHTS)
    path.write_text(path.read_text().replace("compute_dtype: float64", "compute_dtype: float32"))
    got = apply(tmp_path, path)
    mps = []
    for i, p in enumerate(per_model):
        kv = dict(x.split(": ") for x in p.split(", ")) if p else {}
        mps.append(m.model_params(**({"weight": WEIGHTS[i]} if method != "sce" else {}), **kv))
    ps = m.params(**(dict(x.split(": ") for x in params.split(", ")) if params else {}))
    for name, shape in SHAPES.items():
        xs = [family[f"ft{i + 1}"][name] for i in range(len(per_model))]
        context = TensorContext(name, seed=tensor_seed(1, name), shape=shape)
        out = m.fn(xs, family["base"][name], mps, ps, context=context)
        assert out.shape == shape and torch.equal(out, got[name]), name


# --- bad parameters ---


@pytest.mark.parametrize(
    "method,per_model,params,message",
    [
        ("della", ["density: 0.2, epsilon: 0.3"], "", "{r}:6: models[0].parameters.epsilon: density 0.2 and epsilon "
         "0.3 put a keep probability outside (0, 1); choose epsilon below both density and 1 - density"),
        ("della", [""], "density: 0.1", "{r}:7: parameters.density: density 0.1 and epsilon 0.15 put a keep "
         "probability outside (0, 1); choose epsilon below both density and 1 - density"),  # the default epsilon
        ("dare_ties", ["density: 1.5"], "", "{r}:6: models[0].parameters.density: Input should be less than or "
         "equal to 1, got 1.5"),
        ("breadcrumbs", ["gamma: -0.1"], "", "{r}:6: models[0].parameters.gamma: Input should be greater than or "
         "equal to 0, got -0.1"),
        ("sce", [""], "select_topk: 2", "{r}:7: parameters.select_topk: Input should be less than or equal to 1, got 2"),
        ("dare_linear", ["density: 0.5"], "normalize: true, lambda: 2", None),
    ],
)  # fmt: skip
def test_bad_parameters_are_refused_by_plan_at_their_line(tmp_path, family, method, per_model, params, message):
    weights = () if method == "sce" else (1.0,)
    path = recipe(tmp_path, method, per_model, params, weights=weights)
    result = CliRunner().invoke(cli, ["plan", str(path)])
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {message.format(r=path)}\n"


# --- CUDA ---


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(ALL))
def test_cuda_output_is_the_cpus_bytes(tmp_path, family, method):
    for compute in ("float32", "float64"):
        cpu = bytes_of(tmp_path, method, "cpu", "--device", "cpu", compute=compute)
        assert bytes_of(tmp_path, method, "cuda", "--device", "cuda", compute=compute) == cpu, compute


# --- the fused CPU path (merger.methods.sparse_kernels): the torch path's bytes ---

FUSED_CASES = {  # per-model parameters (with WEIGHTS' weights, but SCE), method-wide parameters
    "dare_linear": ([{"density": 0.3}, {"density": 0.0}, {"density": 1.0}], {"normalize": True}),
    "dare_ties": ([{"density": 0.3}, {"density": 0.6}, {"density": 0.5}], {"consensus_method": "count"}),
    "breadcrumbs": (
        [{"density": 0.5, "gamma": 0.1}, {"density": 0.7, "gamma": 0.5}, {"density": 1.0, "gamma": 0.3}],
        {"rescale": True},
    ),
    "breadcrumbs_ties": ([{"density": 0.9, "gamma": 0.01}] * 3, {"normalize": True, "lambda": 1.5}),
    "della": ([{"density": 0.4, "epsilon": 0.1}, {"density": 0.5, "epsilon": 0.3}, {"density": 1.0}], {}),
    "della_linear": ([{"density": 0.4, "epsilon": 0.2}] * 2, {"rescale": False, "lambda": 0.5}),
    "sce": ([{}] * 3, {"select_topk": 0.4}),
}


def fused_and_torch(method, shape, dtype, seed, per_model=None, params=None, scale=0.01, ranges=4099, piece=5003):
    """The method through its fused kernels (in ranges of `ranges` on two threads, written in pieces of `piece`)
    and through its torch path on whole float32 tensors, both stored as `dtype`."""
    from test_kernels import as_array, in_pieces, runner

    from merger.methods import TensorContext, get_method

    m = get_method(method)
    default_models, default_params = FUSED_CASES[method]
    per_model = default_models if per_model is None else per_model
    weights = [{} if method == "sce" else {"weight": w} for w in WEIGHTS]
    models = [m.model_params(**w, **p) for w, p in zip(weights, per_model)]
    ps = m.params(**(default_params if params is None else params))
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    xs = [(base.float() + scale * torch.randn(n, generator=g)).to(dtype) for _ in models]
    context = TensorContext("t", seed=tensor_seed(seed, "t"), shape=shape)
    want = m.fn([x.float().reshape(shape) for x in xs], base.float().reshape(shape), models, ps, context=context)
    out = torch.empty(n, dtype=dtype)
    merge_range = m.fused([as_array(x) for x in xs], as_array(base), models, ps, runner(ranges, 2), context=context)
    in_pieces(merge_range, as_array(out), piece)
    return out, want.reshape(-1).to(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.view(torch.uint8).numpy().tobytes() == b.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("method", sorted(FUSED_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (37,), (61, 53), (3, 37, 5), (70_001,)])
def test_fused_path_writes_the_torch_paths_bytes(method, dtype, shape):
    for seed in (1, 2):
        got, want = fused_and_torch(method, shape, dtype, seed)
        assert same_bytes(got, want), (seed, int((got != want).sum()))


@pytest.mark.parametrize(
    "method,per_model,params",
    [
        ("dare_ties", [{"density": 0.0}] * 3, {}),  # nothing kept: the base
        ("dare_linear", [{"density": 0.5}], {"rescale": False}),  # one model
        ("breadcrumbs_ties", [{"density": 0.5, "gamma": 0.5}] * 3, {"consensus_method": "count"}),  # none dropped
        ("della", [{"density": 0.5, "epsilon": 0.4}] * 3, {"normalize": False, "rescale": False}),
        # every entry kept, none, and by entry side by side in one merge kernel (bits, and drawn in the merge)
        ("dare_ties", [{"density": 1.0}, {"density": 0.0}, {"density": 0.5}], {}),
        ("dare_linear", [{"density": 0.0}, {"density": 0.4}, {"density": 1.0}], {"rescale": False}),
        ("della_linear", [{"density": 1.0, "epsilon": 0.0}, {"density": 0.5, "epsilon": 0.2}], {}),
        ("della", [{"density": 1.0, "epsilon": 0.0}, {"density": 0.0, "epsilon": 0.0}], {}),  # no mask at all
        ("sce", [{}] * 2, {"select_topk": 1.0}),
        ("sce", [{}], {"select_topk": 0.5}),  # one model: no variance, nothing kept
    ],
)
def test_fused_path_options(method, per_model, params):
    got, want = fused_and_torch(method, (40, 301), torch.bfloat16, 3, per_model, params)
    assert same_bytes(got, want)


def test_the_plan_counts_what_dellas_torch_path_holds_of_the_whole_tensor(tmp_path):
    """Where a tensor goes through torch (compute_dtype: float64), DELLA's prepare holds a model's magnitudes
    of the whole tensor (its fibers span chunks) and every model's keep mask until the merge: `merger plan`'s
    peak memory counts them, where the fused kernels' plan does not need them."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe

    rows, cols = 2048, 1024
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g)
    write_checkpoint(tmp_path / "base", {"w": base.bfloat16()})
    for i in range(2):
        write_checkpoint(tmp_path / f"ft{i}", {"w": (base + 0.01 * torch.randn(rows, cols, generator=g)).bfloat16()})

    def peak(compute: str) -> tuple[int, bool]:
        recipe = (
            f"merge_method: della\nbase_model: {tmp_path / 'base'}\ncompute_dtype: {compute}\nmodels:\n"
            f"  - {{model: {tmp_path / 'ft0'}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
            f"  - {{model: {tmp_path / 'ft1'}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
        )
        plan = build_plan(parse_recipe(recipe), device="cpu")
        return plan.peak_memory, plan.fusable(plan.tensors[0])

    (wide, fused_wide), (narrow, fused_narrow) = peak("float64"), peak("float32")
    numel = rows * cols
    assert fused_narrow and not fused_wide
    # float64 magnitudes and a byte a model: more than the fused plan by at least that (the chunk buffers of
    # float64 add 11.5 MB, less than the 21 MB asked for here)
    assert wide - narrow >= numel * (8 + 2)


def test_sce_counts_nan_variances_of_either_sign_in_its_histogram():
    """A task vector holding inf makes that entry's variance inf - inf: a NaN with its sign set. The sample's
    histogram counts it in its NaN bins, not past its end, and the fused and torch paths refuse the tensor
    alike."""
    from test_kernels import as_array, runner

    from merger import kernels
    from merger.errors import NaNTaskVector
    from merger.methods import TensorContext, get_method

    n = 70_001
    g = torch.Generator().manual_seed(4)
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    xs[0][::1000] = float("inf")
    arrays, b = tuple(as_array(x) for x in xs), as_array(base)
    hist = np.zeros((2, kernels.RADIX_BINS), np.int64)  # the row after the histogram: written past its end?
    starts = np.arange(0, n - kernels.SAMPLE_RUN, 1000, dtype=np.int64)
    sparse_kernels._variance_sample(arrays, b, starts, kernels.SAMPLE_RUN, hist[0])
    assert not hist[1].any() and hist[0, 0x7FC0] == starts.size
    m = get_method("sce")
    models, params = [m.model_params()] * 2, m.params(select_topk=0.5)
    context = TensorContext("t", shape=(n,))
    raised = []
    for path in (
        lambda: m.fn(xs, base, models, params, context=context),
        lambda: m.fused(list(arrays), b, models, params, runner(4099, 2), context=context),
    ):
        with pytest.raises(NaNTaskVector) as e:
            path()
        raised.append((e.value.model, e.value.count))
    assert raised[0] == raised[1] and raised[0][1] == 71


def sce_both_paths(base: torch.Tensor, xs: list[torch.Tensor], topk: float):
    """SCE's output through the fused kernels (ranges of 4099 on two threads) and through torch, or the
    NaNTaskVector each raised."""
    from test_kernels import as_array, runner

    from merger.errors import NaNTaskVector
    from merger.methods import TensorContext, get_method

    m = get_method("sce")
    models, params = [m.model_params()] * len(xs), m.params(select_topk=topk)
    context = TensorContext("t", shape=tuple(base.shape))
    out = torch.empty_like(base)
    got = []
    for path in (
        lambda: m.fn(xs, base, models, params, context=context),
        lambda: (
            m.fused([as_array(x) for x in xs], as_array(base), models, params, runner(4099, 2), context=context)(
                0, base.numel(), as_array(out)
            )
            or out
        ),
    ):
        try:
            got.append(path().clone())
        except NaNTaskVector as e:
            got.append((e.model, e.count))
    return got


def test_sce_settles_its_k_in_the_band_pass_where_the_sample_misjudges_the_zeros(monkeypatch):
    """The fused SCE counts the nonzero variances in its band pass, the band chosen for k as the sample
    estimates it (the sample's share in radix bin 0 as zeros). Variances below 2**-133 share that bin with 0
    and are not 0: here half the entries' are, so the estimate halves k, the band misses, and the pass that
    moves it finds the same threshold as torch's exact count. Beside it: a block of exact zeros, which the
    estimate gets about right; and a tensor whose k is 0, where the NaN variances go unranked, unrefused."""
    n = 140_001
    g = torch.Generator().manual_seed(6)
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    half = torch.arange(n) % 2 == 0  # spread over every sample run
    base[half] = 0.0
    xs[0][half], xs[1][half] = 5e-21, -5e-21  # variance 2.5e-41 (or twice it): radix bin 0, not 0
    fused, torched = sce_both_paths(base, xs, 0.4)
    assert same_bytes(fused, torched)
    from test_kernels import as_array, runner

    passes = []
    bands = sparse_kernels._variance_bands
    monkeypatch.setattr(sparse_kernels, "_variance_bands", lambda *a: passes.append(a[-1]) or bands(*a))
    found, k = sparse_kernels.variance_top(
        tuple(as_array(x) for x in xs), as_array(base), lambda z: 4 * z // 10, runner(4099, 2)
    )
    assert k == 4 * n // 10 and found is not None  # every variance counted: the tiny ones are not 0
    assert passes.count(0) == 2  # the band chosen for half that k missed: a second pass moved it
    monkeypatch.undo()

    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    xs[1][: n // 2] = xs[0][: n // 2]  # a block of zero variances
    fused, torched = sce_both_paths(base, xs, 0.3)
    assert same_bytes(fused, torched)

    xs = [base.clone(), base.clone()]
    xs[0][:: n // 9] = float("nan")  # 10 NaN variances, the only ones not 0: k = floor(0.05 * 10) = 0
    fused, torched = sce_both_paths(base, xs, 0.05)
    assert isinstance(torched, torch.Tensor) and same_bytes(fused, torched)
    fused, torched = sce_both_paths(base, xs, 0.5)  # k = 5: the NaNs cannot be ranked, on either path
    assert fused == torched == (0, 10)


@pytest.mark.parametrize("method", ["dare_ties", "della", "breadcrumbs_ties", "sce"])
@pytest.mark.parametrize("ranges,piece", [(96, 448), (104, 1000), (33, 5003)])
def test_fused_path_on_ranges_off_the_kernels_blocks(method, ranges, piece):
    """Ranges that start on multiples of 32 but not of the kernels' blocks of 256, of 8 but not 32, or
    anywhere: kept bits are read a word, a byte or a flag at a time, and the bytes stay the torch path's."""
    got, want = fused_and_torch(method, (61, 53), torch.bfloat16, 5, ranges=ranges, piece=piece)
    assert same_bytes(got, want)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "sce"])
@pytest.mark.parametrize("shape", [(61, 53), (70_001,)])  # gathered whole, and through a sampled band
def test_thresholds_of_bands_too_large_to_gather_are_counted_to_the_same_bytes(monkeypatch, method, shape):
    from test_kernels import count_every_band

    calls = count_every_band(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16's task vectors are a few ulps: ties at every threshold
        got, want = fused_and_torch(method, shape, dtype, 6)
        assert same_bytes(got, want) and calls
        calls.clear()


@pytest.mark.parametrize("method", ["dare_linear", "breadcrumbs", "della", "sce"])
def test_fused_path_on_wide_exponents_ties_and_infinities(method):
    """Task vectors whose magnitudes span many binades (the exact sums' slow path), coarse values (ties at
    every threshold, DELLA's equal ranks) and an infinity (the sums are inf): the torch path's bytes still."""
    got, want = fused_and_torch(method, (64, 257), torch.float32, 4, scale=1e-12)
    assert same_bytes(got, want)
    from test_kernels import as_array, in_pieces, runner

    from merger.methods import TensorContext, get_method

    m = get_method(method)
    models = [
        m.model_params(**({} if method == "sce" else {"weight": w}), **p)
        for w, p in zip(WEIGHTS, FUSED_CASES[method][0])
    ]
    ps = m.params(**FUSED_CASES[method][1])
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(64 * 257, generator=g) * 4).round()
    spread = torch.float_power(10.0, torch.randint(-30, 5, (64 * 257,), generator=g)).float()
    xs = [base + (torch.randn(base.shape, generator=g) * 2).round() * (spread if i == 0 else 1) for i in range(3)]
    if method == "dare_linear":
        xs[1][77] = float("inf")
    context = TensorContext("t", seed=99, shape=(64, 257))
    want = m.fn([x.reshape(64, 257) for x in xs], base.reshape(64, 257), models, ps, context=context).reshape(-1)
    out = torch.empty(base.numel())
    in_pieces(
        m.fused([as_array(x) for x in xs], as_array(base), models, ps, runner(1000, 2), context=context), as_array(out)
    )
    assert same_bytes(out, want)


@pytest.mark.parametrize("method", sorted(ALL))
def test_engine_takes_the_fused_path_and_writes_the_torch_paths_bytes(tmp_path, family, method, monkeypatch):
    """Through the CLI on bfloat16 checkpoints, small chunks: the fused kernels and the torch path write the
    same bytes."""
    for name in ("base", "ft1", "ft2", "ft3"):
        write_checkpoint(tmp_path / f"{name}16", {k: v.bfloat16() for k, v in family[name].items()}, n_shards=2)
    per_model, params = ALL[method]
    weights = () if method == "sce" else WEIGHTS
    path = recipe(tmp_path, method, per_model, params, "random_seed: 7", weights=weights)
    text = path.read_text().replace("compute_dtype: float64\n", "")
    for name in ("base", "ft1", "ft2", "ft3"):
        text = text.replace(str(tmp_path / name) + "\n", str(tmp_path / f"{name}16") + "\n")
        text = text.replace(str(tmp_path / name) + "}", str(tmp_path / f"{name}16") + "}")
    path.write_text(text)
    from merger.methods import sparse_kernels

    calls = []
    real = sparse_kernels.MERGES
    monkeypatch.setattr(merger.budget, "CHUNK", 23)
    counted = tuple(lambda *a, f=f: calls.append(1) or f(*a) for f in real)
    monkeypatch.setattr(sparse_kernels, "MERGES", counted)
    fast = apply(tmp_path, path, out="fused")
    assert calls  # every tensor through the kernels
    monkeypatch.setattr(merger.stream.Merger, "_fusable", lambda self, t: False)
    calls.clear()
    slow = apply(tmp_path, path, out="torch")
    assert not calls
    for name in SHAPES:
        assert same_bytes(fast[name], slow[name]), name


# Each drop mode's kernels (sparse_kernels.MERGES and SCANS) are closures of one function, each cached under
# a name of its own. This script merges with each mode in a fresh process and prints, per kernel, its cache
# hits and misses (a miss is a compilation).
CACHED_KERNELS = """
import json, numpy as np
from merger.methods import TensorContext, get_method, sparse_kernels as sk
rng = np.random.default_rng(0)
base = rng.standard_normal(4099).astype(np.float32)
xs = [base + np.float32(0.01) * rng.standard_normal(4099).astype(np.float32) for _ in range(2)]
run = lambda fn, n, size=None: [fn(s, min(s + (size or 1024), n)) for s in range(0, n, size or 1024)]
cases = [("dare_ties", {"density": 0.5}, {}), ("dare_linear", {"density": 0.5}, {"rescale": False}),
         ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, {"rescale": True}),
         ("della", {"density": 0.5, "epsilon": 0.1}, {}),
         ("sce", {}, {"select_topk": 0.5})]
for name, per_model, params in cases:
    m = get_method(name)
    merge = m.fused(xs, base, [m.model_params(**per_model) for _ in xs], m.params(**params), run,
                    context=TensorContext("t", seed=1, shape=(4099,)))
    merge(0, 4099, np.empty(4099, np.float32))
kernels = [*sk.MERGES, *sk.SCANS.values()]
print(json.dumps([[sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())] for f in kernels]))
"""


def test_each_drop_modes_kernels_come_from_the_cache_in_a_new_process():
    """A second process compiles none of the per-mode kernels (each mode's merge, DARE's and Breadcrumbs'
    scans): it loads them from the cache the first process filled (a closure numba could not cache would
    compile on every run)."""
    import json
    import subprocess
    import sys

    def counts() -> list[list[int]]:
        done = subprocess.run([sys.executable, "-c", CACHED_KERNELS], capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    counts()
    second = counts()
    assert second == [[1, 0]] * 6  # every mode's merge and both scans: loaded once, compiled never


def splitmix64_top53(z0: int, step: int, n: int) -> np.ndarray:
    """The top 53 bits of splitmix64's output (Steele, Lea and Flood 2014) at states z0 + p * step, p < n."""
    mask = (1 << 64) - 1
    out = []
    for p in range(n):
        z = (z0 + p * step) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append((z ^ (z >> 31)) >> 11)
    return np.array(out, np.float64)


def sorted_keep(keys: np.ndarray, u: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """The oracle of DELLA's keep rule: entry p, of rank r by (magnitude, index), is kept where u[p] < spread[r]."""
    order = np.lexsort((np.arange(keys.size), keys))
    rank = np.empty(keys.size, np.int64)
    rank[order] = np.arange(keys.size)
    return u < spread[rank]


def left_open(keys: np.ndarray, top53: np.ndarray, thresholds: np.ndarray) -> int:
    """How many odd magnitudes (low 16 bits set) have a draw that their bucket's rank range does not decide:
    at or above the threshold of the bucket's first odd rank, below that of its last."""
    heads, odd = keys >> 16, (keys & 0xFFFF) != 0
    opened = 0
    for p in np.flatnonzero(odd):
        first = (heads < heads[p]).sum() + ((heads == heads[p]) & ~odd).sum()
        last = first + ((heads == heads[p]) & odd).sum() - 1
        opened += int(thresholds[first] <= top53[p] < thresholds[last])
    return opened


@njit
def keys_then_counts(mags, length, scratch, kp, z0, step, thresholds):  # pragma: no cover - compiled
    """sparse_kernels' count-based ranking of one fiber of magnitudes (a task vector mags - 0), where
    countable allows it."""
    kb = np.empty(length, np.uint32)
    below, hi, n_odd = sparse_kernels._fiber_keys(mags, np.zeros_like(mags), 0, 1, length, kb)
    if not sparse_kernels.countable(length, below, hi, n_odd):
        return False
    return sparse_kernels._keep_by_counts(kb, z0, step, thresholds, length, below, hi, scratch, kp)


DELLA_FIBERS = [
    "bf16",
    "bf16 with zeros and ties",
    "odd ones tied",
    "odd ones alone in buckets",
    "many odd ones",
    "odd ones in bucket 0",
    "only bucket 0",
    "zeros",
    "many odd ones in a bucket",
    "odd ones left open",
    "float32",
    "wide",
    "short",
    "nan and inf",
]
DECLINED = ("float32", "wide", "odd ones left open")  # fibers the counts cannot rank: sorted instead


def della_fiber(case: str) -> torch.Tensor:
    """One fiber of task-vector magnitudes of the named kind (DELLA_FIBERS)."""
    rng = np.random.default_rng(len(case))
    length = 17 if case == "short" else 4096
    base = torch.from_numpy(rng.standard_normal(length).astype(np.float32)).bfloat16().float()
    scale = 0.1 if case == "many odd ones" else 0.01  # task vectors that cross binades: odd magnitudes
    x = (base + scale * torch.from_numpy(rng.standard_normal(length).astype(np.float32))).bfloat16().float()
    mags = (x - base).abs()
    if case == "bf16 with zeros and ties":
        mags[::3] = 0
        mags[1::7] = mags[1]
    if case == "odd ones tied":  # magnitudes with low bits set, several equal, in the buckets of plain ones
        mags[5:60:4] = torch.tensor(np.float32(mags[5]) * np.float32(1 + 2**-20))
        mags[6:60:8] = torch.tensor(np.float32(mags[6]) * np.float32(1 + 2**-22))
    if case == "odd ones alone in buckets":
        mags[:40] = torch.from_numpy(rng.uniform(10, 11, 40).astype(np.float32))
    if case == "odd ones in bucket 0":  # subnormal magnitudes, some odd, beside zeros
        mags[:30] = torch.from_numpy(rng.integers(1, 1 << 16, 30).astype(np.int32)).view(torch.float32)
        mags[30:40] = 0
        mags[40:50] = mags[0]
    if case == "only bucket 0":  # zeros and a few subnormals (odd): no other bucket at all
        mags = torch.zeros(length)
        mags[7:13] = torch.from_numpy(rng.integers(1, 1 << 16, 6).astype(np.int32)).view(torch.float32)
    if case == "zeros":
        mags = torch.zeros(length)
    if case == "many odd ones in a bucket":  # their bucket spans a few ranks' thresholds: some ranked by scans
        mags[:200] = torch.from_numpy(rng.uniform(0.00599, 0.00601, 200).astype(np.float32))  # mid-ranks
        mags[200:210] = mags[0]  # equal ones among them: ties by index
    if case == "odd ones left open":  # one bucket's odd ones span ranks whose thresholds differ: over OPEN scans
        mags[:1500] = torch.from_numpy(rng.uniform(0.00599, 0.00601, 1500).astype(np.float32))
    if case == "float32":
        mags = torch.from_numpy(np.abs(rng.standard_normal(length)).astype(np.float32))
    if case == "nan and inf":  # near the top of the range, so that the buckets up to NaN's are few
        mags = (mags * 1e36).bfloat16().float()
        mags[3::50] = float("inf")
        mags[7::90] = float("nan")
    if case == "wide":
        mags[0] = 1e-30
        mags[1] = 1e30
    return mags


def assert_counted_like_sorted(case: str, mags: torch.Tensor, scratch) -> None:
    """_keep_by_counts on the fiber keeps what ranking by a sort keeps, or declines it (DECLINED), and
    leaves scratch ready for the next fiber."""
    length = mags.numel()
    keys = mags.numpy().view(np.uint32).copy()
    z0, step = 0x1234_5678_9ABC_DEF0 + len(case), 0x9E37_79B9_7F4A_7C15
    u = splitmix64_top53(z0, step, length) / 2.0**53
    spread = np.arange(length) / (length - 1) * 0.4 + 0.3
    spread[:3] = (-0.5, 0.0, 1e-17)  # thresholds that round: none kept, none, and draws of 0 only
    spread[-2:] = (1.0, 1.5)
    thresholds = np.ceil(np.clip(spread, 0, 1) * 2.0**53).astype(np.uint64)
    kp = np.empty(length, np.uint8)
    settled = keys_then_counts(mags.numpy(), length, scratch, kp, np.uint64(z0), np.uint64(step), thresholds)
    assert settled == (case not in DECLINED)
    assert not scratch[0].any()  # ready for the next fiber
    if settled:
        assert np.array_equal(kp.astype(bool), sorted_keep(keys, u, spread))
    if case in (
        "many odd ones in a bucket",
        "odd ones left open",
    ):  # the scans ran: some (or too many) odd ones' ranks left open
        top53 = splitmix64_top53(z0, step, length)
        opened = left_open(keys, top53, thresholds)
        assert 0 < opened <= sparse_kernels.OPEN if settled else opened > sparse_kernels.OPEN
    odd = ((keys & 0xFFFF) != 0).sum()
    if case.startswith("odd"):
        assert odd >= 14 if case == "odd ones tied" else odd >= 29
    if case == "many odd ones":
        assert odd > length // 20


@pytest.mark.parametrize("case", DELLA_FIBERS)
def test_della_ranks_from_counts_are_the_sorts(case):
    """sparse_kernels._keep_by_counts (bf16 task vectors: ranks from bucket counts) keeps what ranking by a
    sort keeps, and declines (False) the fibers it cannot rank: too many odd magnitudes, too wide a range."""
    mags = della_fiber(case)
    assert_counted_like_sorted(case, mags, sparse_kernels.keep_scratch(mags.numel()))


def test_rank_is_the_place_in_a_stable_sort():
    """sparse_kernels._rank: entry p's place when the keys are sorted ascending, ties by index."""
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 12, 300).astype(np.uint32) * np.uint32(0x10001)  # many equal keys
    order = np.lexsort((np.arange(keys.size), keys))
    ranks = np.empty(keys.size, np.int64)
    ranks[order] = np.arange(keys.size)
    assert [sparse_kernels._rank(keys, p, keys.size) for p in range(keys.size)] == ranks.tolist()


@pytest.mark.parametrize("n_open", [sparse_kernels.OPEN, sparse_kernels.OPEN + 1])
def test_della_counts_rank_up_to_open_odd_ones_by_scans(n_open):
    """A bucket of n_open odd magnitudes (two pairs of them equal) whose thresholds run from 0 to 1 over
    its ranks: every one is left open by the bucket's range. Up to OPEN are ranked by scans, ties by index,
    as the sort ranks them; one more and the fiber is declined."""
    length = 64
    mags = np.resize(np.repeat(np.float32([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]), 8), length)  # plain ones
    odd = np.float32(3.0) * (1 + np.arange(1, n_open + 1, dtype=np.float32) * np.float32(2**-20))
    odd[[1, 4]] = odd[0]
    odd[6] = odd[5]
    mags[[3, 9, 17, 20, 33, 40, 47, 50, 61][:n_open]] = odd[::-1]  # scattered, equal ones out of index order
    keys = mags.view(np.uint32)
    order = np.lexsort((np.arange(length), keys))
    ranks = np.empty(length, np.int64)
    ranks[order] = np.arange(length)
    first = int(ranks[(keys & 0xFFFF) != 0].min())  # the bucket's first rank: its odd ones are the only ones
    spread = np.clip((np.arange(length) - first) / (n_open - 1), 0, 1)  # 0 below the bucket, 1 above
    thresholds = np.ceil(spread * 2.0**53).astype(np.uint64)
    z0, step = 0x0F1E_2D3C_4B5A_6978, 0x9E37_79B9_7F4A_7C15
    u = splitmix64_top53(z0, step, length) / 2.0**53
    kp = np.empty(length, np.uint8)
    scratch = sparse_kernels.keep_scratch(length)
    settled = keys_then_counts(mags, length, scratch, kp, np.uint64(z0), np.uint64(step), thresholds)
    assert settled == (n_open <= sparse_kernels.OPEN)
    assert not scratch[0].any()
    assert left_open(keys, splitmix64_top53(z0, step, length), thresholds) == n_open
    if settled:
        assert np.array_equal(kp.astype(bool), sorted_keep(keys, u, spread))


@njit
def open_indices(flags, length, compress):  # pragma: no cover - compiled
    out = np.full(flags.size, -1, np.int32)
    n = sparse_kernels._open_indices(flags, length, out, compress)
    return out[:n], out[n:]


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 48, 2047])
def test_open_indices_are_the_set_flags_in_order(compress, length):
    """_open_indices lists exactly the set flags below length, in index order, by compresses or one by one, and
    writes nothing past the 16 entries after them (flags past length, as a longer fiber left them in a reused
    scratch, are not read)."""
    flags = (np.random.default_rng(length).random(length + 40) < 0.3).astype(np.uint8)
    flags[length:] = 1
    flags[: min(length, 16)] = [1, 0] * 8 if length >= 16 else flags[:length]
    found, rest = open_indices(flags, length, compress)
    assert found.tolist() == np.flatnonzero(flags[:length]).tolist()
    # a compress stores 16 indices, the set ones first; one by one (the tail), the slot after them may take the last
    assert (rest[16 if compress else 1 :] == -1).all()


def test_della_counts_reuse_their_scratch_from_fiber_to_fiber():
    """One scratch for every kind of fiber in turn, declined ones among them, as _magprune reuses it."""
    scratch = sparse_kernels.keep_scratch(4096)
    for case in DELLA_FIBERS + DELLA_FIBERS[::-1]:
        assert_counted_like_sorted(case, della_fiber(case), scratch)


def test_exact_totals_add_every_parts_bins_with_their_carries():
    """sparse_kernels.exact_totals: each lead index's sum over parts and bins of (hi * 2**62 + lo) * 2**p,
    over 2**unit, rounded once (Python integers as the oracle); low limbs near 2**62 carry; inf where any
    part counts an inf or NaN."""
    rng = np.random.default_rng(7)
    bins, inf_bin = sparse_kernels.BINS, sparse_kernels.INF_BIN
    parts = []
    for _ in range(40):
        part = np.zeros((2, 2, bins, 2), np.uint64)
        cells = rng.choice([0, 7, 50, 300, inf_bin - 1], (2, 2, 3))  # few bins: each gets many near-full limbs
        for idx in np.ndindex(2, 2):
            for p in cells[idx]:
                part[idx][p, 0] = (1 << 62) - 1 - int(rng.integers(0, 1000))  # near the limb's top: carries
                part[idx][p, 1] = int(rng.integers(0, 1 << 20))
        parts.append(part)
    parts[17][1, 0, inf_bin, 0] = 1  # one inf among [1, 0]'s entries
    got, nonfinite = sparse_kernels.exact_totals(parts, sparse_kernels.ABS_UNIT)
    expected = []
    for idx in np.ndindex(2, 2):
        if any(part[idx][inf_bin, 0] for part in parts):
            expected.append(float("inf"))
            continue
        total = sum(
            ((int(part[idx][p, 1]) << 62) + int(part[idx][p, 0])) << p for part in parts for p in range(inf_bin)
        )
        expected.append(total / (1 << sparse_kernels.ABS_UNIT))
    assert got == expected and got[2] == float("inf") and nonfinite == [0, 0, 1, 0]


@pytest.mark.parametrize("masked", [False, True])
def test_extent_is_the_largest_and_least_nonzero_magnitude(masked):
    """sparse_kernels._extent on ranges at every offset: the largest bits and the least non-zero ones (0xFFFFFFFF
    where all are zero), of the kept magnitudes where masked; bits at a binade's end and the largest finite."""
    rng = np.random.default_rng(8)
    mb = (rng.standard_normal(700).astype(np.float32) * 1e-3).view(np.uint32) & np.uint32(0x7FFFFFFF)
    mb[rng.random(700) < 0.3] = 0
    mb[[50, 51, 52]] = [0x3C7FFFFF, 0x3C800000, 0x7F7FFFFF]  # a binade's last and the next's first; the largest
    mb[600:] = 0  # ranges of zeros alone
    kp = (rng.random(700) < 0.5).astype(np.uint8)
    for start, m in [(0, 256), (3, 256), (45, 10), (51, 1), (100, 37), (599, 5), (600, 100), (0, 700), (7, 0)]:
        picked = mb[start : start + m] * (kp[start : start + m] if masked else 1)
        nonzero = picked[picked != 0]
        want = (int(picked.max(initial=0)), int(nonzero.min()) if nonzero.size else 0xFFFFFFFF)
        assert tuple(map(int, sparse_kernels._extent(mb, kp, start, m, masked))) == want, (start, m)


@pytest.mark.parametrize("m", [0, 7, 8, 63, 64, 65, 200, 256])
@pytest.mark.parametrize("first", [0, 3])
def test_pack_writes_flag_g_at_bit_g_mod_8_of_byte_g_div_8(m, first):
    """sparse_kernels._pack (64 flags to a vector compare, then bytes, then the last part-byte) against
    numpy's packbits in little bit order, around bytes it must leave alone."""
    rng = np.random.default_rng(m)
    kp = (rng.random(256) < 0.5).astype(np.uint8)
    bits = np.full(first + 40, 0xA5, np.uint8)
    sparse_kernels._pack(kp, m, bits, first)
    want = np.full(first + 40, 0xA5, np.uint8)
    want[first : first + (m + 7) // 8] = np.packbits(kp[:m], bitorder="little")
    assert bits.tolist() == want.tolist()

"""Each method against an independent float64 oracle, hand-worked TIES cases, and properties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from merger.methods import all_methods, get_method
from merger.methods.task_vectors import keep_count


def _run(method: str, xs, base=None, model_params=None, **params):
    m = get_method(method)
    mp = [m.model_params.model_validate(p) for p in (model_params or [{}] * len(xs))]
    gp = m.params.model_validate(params)
    xs = [torch.as_tensor(x, dtype=torch.float32) for x in xs]
    base = None if base is None else torch.as_tensor(base, dtype=torch.float32)
    return m.fn(xs, base, mp, gp)


# ---- oracles: plain Python over flat lists of floats (float64), written from the papers' definitions


def linear_oracle(xs, weights, normalize=True):
    n = len(xs[0])
    total = [sum(w * x[j] for x, w in zip(xs, weights)) for j in range(n)]
    return [t / sum(weights) for t in total] if normalize else total


def task_arithmetic_oracle(base, xs, weights, lam=1.0, normalize=False):
    n = len(base)
    tv = [sum(w * (x[j] - base[j]) for x, w in zip(xs, weights)) for j in range(n)]
    if normalize:
        tv = [t / sum(weights) for t in tv]
    return [base[j] + lam * tv[j] for j in range(n)]


def sgn(v):
    return (v > 0) - (v < 0)


def ties_oracle(base, xs, weights, densities, lam=1.0, normalize=True, consensus="sum"):
    n = len(base)
    trimmed = []
    for x, w, d in zip(xs, weights, densities):
        tv = [x[j] - base[j] for j in range(n)]
        k = max(1, math.floor(Fraction(str(d)) * n)) if d > 0 else 0  # mergekit's magnitude: density 0 keeps none
        # stable sort by decreasing magnitude: among equal magnitudes the lower index comes first
        order = sorted(range(n), key=lambda j: -abs(tv[j]))
        kept = set(order[:k])
        trimmed.append([w * tv[j] if j in kept else 0.0 for j in range(n)])
    out = []
    for j in range(n):
        col = [t[j] for t in trimmed]
        elected = sgn(sum(col)) if consensus == "sum" else sgn(sum(sgn(c) for c in col))
        agree = [i for i, c in enumerate(col) if c != 0 and sgn(c) == elected]
        total = sum(col[i] for i in agree)
        if normalize and agree:
            total /= sum(abs(weights[i]) for i in agree)
        out.append(base[j] + lam * total)
    return out


def _random_case(seed, n=257, models=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    xs = [base + torch.randn(n, generator=g, dtype=torch.float64) for _ in range(models)]
    return base.tolist(), [x.tolist() for x in xs]


def _close(got: torch.Tensor, want: list[float]):
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=2e-6)


# ---- against the oracles


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_oracle(normalize):
    _, xs = _random_case(1)
    w = [0.5, 0.3, -0.1]
    got = _run("linear", xs, model_params=[{"weight": v} for v in w], normalize=normalize)
    _close(got, linear_oracle(xs, w, normalize))


@pytest.mark.parametrize("lam,normalize", [(1.0, False), (0.7, False), (1.3, True)])
def test_task_arithmetic_matches_oracle(lam, normalize):
    base, xs = _random_case(2)
    w = [1.0, -0.5, 0.25]
    got = _run("task_arithmetic", xs, base, [{"weight": v} for v in w], **{"lambda": lam, "normalize": normalize})
    _close(got, task_arithmetic_oracle(base, xs, w, lam, normalize))


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("densities", [(0.2, 0.5, 0.9), (0.29, 1.0, 0.01), (0.0, 0.5, 0.0)])
def test_ties_matches_oracle(consensus, normalize, densities):
    base, xs = _random_case(3)
    w = [1.0, 0.6, -0.4]
    mp = [{"weight": v, "density": d} for v, d in zip(w, densities)]
    got = _run("ties", xs, base, mp, **{"lambda": 0.9, "normalize": normalize, "consensus_method": consensus})
    _close(got, ties_oracle(base, xs, w, densities, 0.9, normalize, consensus))


# ---- hand-worked TIES cases (base 0, so the task vectors are the inputs)


def test_ties_weights_flip_the_elected_sign():
    # weighted deltas with w2 = 0.5: [1, 2] and [-1.5, 0.5]; sums [-0.5, 2.5] elect [-, +]
    #   entry 0: only model 2 agrees -> -1.5 / 0.5 = -3;  entry 1: both -> 2.5 / 1.5
    got = _run("ties", [[1, 2], [-3, 1]], [0, 0], [{"weight": 1}, {"weight": 0.5}])
    _close(got, [-3.0, 2.5 / 1.5])
    # with w2 = 0.25 the weighted sum of entry 0 is 1 - 0.75 > 0: model 1 wins it alone -> 1
    got = _run("ties", [[1, 2], [-3, 1]], [0, 0], [{"weight": 1}, {"weight": 0.25}])
    _close(got, [1.0, 2.25 / 1.25])


def test_ties_exact_cancellation_keeps_the_base():
    # votes +2 and -2 sum to exactly 0: sgn(0) = 0 elects no sign, nothing agrees, the base stays
    for normalize in (True, False):
        got = _run("ties", [[2.5, 1.5], [-1.5, 1.5]], [0.5, 0.5], normalize=normalize)  # tvs [2, 1], [-2, 1]
        _close(got, [0.5, 0.5 + (1.0 if normalize else 2.0)])


def test_ties_count_consensus_differs_from_sum():
    # signs +, +, - with magnitudes 1, 1, 5: count elects +, sum elects -
    xs = [[1.0], [1.0], [-5.0]]
    _close(_run("ties", xs, [0.0], consensus_method="count"), [1.0])
    _close(_run("ties", xs, [0.0], consensus_method="sum"), [-5.0])


def test_ties_trim_ties_at_threshold_keep_exactly_k_lowest_index_first():
    # |tv| = 3 2 2 1 2, density 0.4 of 5 -> k = 2: keep the 3 and the first 2 (index 1)
    got = _run("ties", [[3, -2, 2, 1, -2]], [0] * 5, [{"density": 0.4}])
    _close(got, [3, -2, 0, 0, 0])
    # k = 3: the 3 and the first two of the three tied 2s
    got = _run("ties", [[3, -2, 2, 1, -2]], [0] * 5, [{"density": 0.6}])
    _close(got, [3, -2, 2, 0, 0])


def test_ties_all_equal_magnitudes():
    got = _run("ties", [[1, -1, 1, -1, 1, -1]], [0] * 6, [{"density": 0.5}])
    _close(got, [1, -1, 1, 0, 0, 0])


def test_ties_tensor_too_small_for_its_density_keeps_one_entry():
    # floor(0.1 * 3) = 0, but at least one entry (the largest) is kept
    got = _run("ties", [[0.5, -4.0, 1.0]], [1.0, 1.0, 1.0], [{"density": 0.1}])
    _close(got, [1.0, -4.0, 1.0])  # task vector [-0.5, -5, 0]: only the -5 survives
    got = _run("ties", [[7.0]], [1.0], [{"density": 0.01}])
    _close(got, [7.0])


def test_keep_count_is_exact_on_the_decimal_written():
    assert 0.29 * 100 < 29  # the float product would floor to 28
    assert keep_count(100, 0.29) == 29
    assert keep_count(10, 0.7) == 7
    assert keep_count(3, 0.1) == 1
    assert keep_count(5, 1.0) == 5


def test_ties_trim_on_a_matrix_counts_the_whole_tensor():
    x = torch.arange(1.0, 13.0).reshape(3, 4)  # magnitudes 1..12; density 0.25 keeps 10, 11, 12
    got = _run("ties", [x], torch.zeros(3, 4), [{"density": 0.25}])
    want = torch.where(x >= 10, x, torch.zeros_like(x))
    torch.testing.assert_close(got, want)


# ---- properties


def test_soup_of_identical_models_is_that_model():
    _, xs = _random_case(4, models=1)
    got = _run("linear", [xs[0]] * 4, model_params=[{"weight": w} for w in (0.1, 0.2, 0.3, 0.4)])
    _close(got, xs[0])


def test_task_arithmetic_lambda_zero_is_the_base():
    base, xs = _random_case(5)
    got = _run("task_arithmetic", xs, base, **{"lambda": 0.0})
    assert torch.equal(got, torch.tensor(base, dtype=torch.float32))


def test_task_arithmetic_negative_weight_subtracts():
    got = _run("task_arithmetic", [[3.0, 1.0]], [1.0, 1.0], [{"weight": -1}])
    _close(got, [-1.0, 1.0])


@pytest.mark.parametrize("weight", [1.0, 0.4, -2.0])
def test_ties_density_one_single_model_is_task_arithmetic(weight):
    base, xs = _random_case(6, models=1)
    ta = _run("task_arithmetic", xs, base, [{"weight": weight}], **{"lambda": 0.8})
    ties = _run("ties", xs, base, [{"weight": weight, "density": 1.0}], **{"lambda": 0.8, "normalize": False})
    torch.testing.assert_close(ties, ta)
    if weight == 1.0:  # normalising by a single weight of 1 changes nothing
        torch.testing.assert_close(_run("ties", xs, base, **{"lambda": 0.8}), ta)


def _every_method_case(name: str, dtype: torch.dtype):
    """(fn's inputs, models, params, context) of a benign 40 x 301 tensor: test_hostile_values' recipes for
    each method (tsv, iso_c and iso_cts: two fine-tunes over the base, defaults)."""
    from test_hostile_values import CASES

    from merger.methods import TensorContext

    roles, per_model, wide = CASES.get(name, ("tasks", {}, {}))
    m = get_method(name)
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, 301, generator=g, dtype=torch.float64).to(dtype)
    fts = [base + 0.1 * torch.randn(40, 301, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    xs = {"all": [base, *fts], "tasks": fts, "pair": fts[:1], "one": fts[:1]}[roles]
    models = [m.model_params(**per_model) for _ in xs]
    context = TensorContext("t", seed=3, shape=(40, 301))
    return xs, base if m.reads_base else None, models, m.params(**wide), context


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_leaves_its_inputs_alone_and_computes_in_float64_as_in_float32(name):
    """fn never modifies its tensors or base, in either compute dtype (a float64 tensor's .double() is itself:
    in-place arithmetic on it once scaled Model Stock's and Arcee Fusion's inputs); and its float64 result is
    its float32 one but for rounding (and for the few entries a rounding moves across a threshold)."""
    m = get_method(name)
    outs = []
    for dtype in (torch.float32, torch.float64):
        xs, base, models, params, context = _every_method_case(name, dtype)
        kept = [t.clone() for t in [*xs, *([base] if base is not None else [])]]
        outs.append(m.fn(xs, base, models, params, context=context))
        assert outs[-1].dtype == dtype
        assert all(torch.equal(t, k) for t, k in zip([*xs, *([base] if base is not None else [])], kept)), dtype
    close = torch.isclose(outs[1], outs[0].double(), rtol=1e-5, atol=1e-5)
    assert close.double().mean() > 0.99, float(close.double().mean())


def test_float64_compute_is_supported():
    m = get_method("ties")
    xs = [torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)]
    out = m.fn(xs, torch.zeros(3, dtype=torch.float64), [m.model_params(density=0.5)], m.params())
    assert out.dtype == torch.float64
    assert out.tolist() == [0.0, 0.0, 3.0]

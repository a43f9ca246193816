"""slerp, nuslerp, multislerp, karcher and nearswap through the CLI, each against a float64 oracle written
here from mergekit's documented behaviour (docs/merge_methods.md, mergekit 0.1.5), on whole tensors; the
same bytes whatever the chunk size, and on CUDA as on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, run_bad, write_checkpoint
from test_gpu_memory import (  # noqa: F401 (cuda_on_cpu: a fixture)
    assert_bounds,
    cuda_on_cpu,
    held_in_pieces,
    held_whole,
    write_models,
)

import merger.budget
from merger.cli import cli

SHAPES = {"w": (6, 5), "v": (7,), "cube": (3, 2, 4)}


def _family(root, n: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """A base and n fine-tunes (float32, two shards each), with the edge cases slerp meets: 'zero' is zero
    in the base, 'twice' is colinear with the base in every model, 'flip' antiparallel to it, 'same' equal."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base |= {"zero": torch.zeros(4, 3), "twice": torch.randn(4, 3, generator=g), "flip": torch.randn(5, generator=g)}
    base["same"] = torch.randn(3, 3, generator=g)
    models, paths = {"base": base}, {"base": write_checkpoint(root / "base", base)}
    for i in range(1, n + 1):
        ft = {k: v + 0.7 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        ft["twice"], ft["flip"], ft["same"] = (1 + i) * base["twice"], -i * base["flip"], base["same"].clone()
        models[f"ft{i}"], paths[f"ft{i}"] = ft, write_checkpoint(root / f"ft{i}", ft)
    return paths, models


@pytest.fixture
def fam(tmp_path):
    return _family(tmp_path)


def merged(tmp_path, recipe: str, out: str = "out", *args: str) -> dict[str, torch.Tensor]:
    (tmp_path / "r.yaml").write_text(recipe + "out_dtype: float32\n")
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q", *args])
    assert result.exit_code == 0, result.output
    return load_output(tmp_path / out)


def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6, msg=name)


# ---- oracles, float64, on whole tensors ----------------------------------------------------------------


def slerp_ref(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's SLERP from base a to b: norms at most 1e-8 count as 1; linear where |cos| > 0.9995."""
    a, b = a.double(), b.double()
    na, nb = (float(x.norm()) if float(x.norm()) > 1e-8 else 1.0 for x in (a, b))
    cos = max(-1.0, min(1.0, float((a / na * (b / nb)).sum())))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """NuSLERP's SLERP of each row (last dimension) of v0 with v1's: norms clamped to 1e-7, linear where
    1 - cos^2 <= 1e-16."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    out = torch.empty_like(v0)
    for r in range(v0.shape[0]):
        c = float(cos[r])
        if 1 - c * c <= 1e-16:
            out[r] = (1 - t) * v0[r] + t * v1[r]
        else:
            th = math.acos(c)
            out[r] = (math.sin((1 - t) * th) * v0[r] + math.sin(t * th) * v1[r]) / math.sin(th)
    return out


def nuslerp_ref(w, x0, x1, base=None, flatten=True, row_wise=False) -> torch.Tensor:
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    x0, x1 = x0.double(), x1.double()
    if base is not None:
        return base.double() + nuslerp_ref(w, x0 - base.double(), x1 - base.double(), None, flatten, row_wise)
    shape = x0.shape
    if flatten or x0.dim() <= 1:
        return slerp_rows(t, x0.reshape(1, -1), x1.reshape(1, -1)).reshape(shape)
    if row_wise:  # vectors along the first dimension: x[:, j] (x[:, j, k] for more dimensions)
        moved = [x.movedim(0, -1).reshape(-1, shape[0]) for x in (x0, x1)]
        return slerp_rows(t, *moved).reshape(*shape[1:], shape[0]).movedim(-1, 0)
    return slerp_rows(t, x0.reshape(-1, shape[-1]), x1.reshape(-1, shape[-1])).reshape(shape)


def multislerp_ref(weights, xs, base=None, normalize=True, eps=1e-8) -> torch.Tensor:
    """Barycentric interpolation on the sphere (mergekit's multislerp): weighted mean of the unit vectors,
    tangent vectors there, exponential map back, times the weighted mean norm."""
    if len(xs) == 1:
        return xs[0].double()
    shape = xs[0].shape
    v = torch.stack([x.double().reshape(-1) for x in xs])
    if base is not None:
        v = v - base.double().reshape(-1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = v.norm(dim=1, keepdim=True)
    u = v / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    if not norms.any():  # merger's choice where mergekit raises (3+ models): nothing moved, the base
        out = torch.zeros_like(v[0])
    elif mean.norm() < eps:
        assert len(xs) == 2
        out = w[0] * v[0] + w[1] * v[1]
    else:
        mean = mean / mean.norm()
        tangent = ((u - (u @ mean)[:, None] * mean) * w[:, None]).sum(0)
        step = tangent.norm() + eps
        out = (mean * torch.cos(step) + tangent * torch.sin(step) / step) * (norms[:, 0] * w).sum()
    out = out.reshape(shape)
    return out + base.double() if base is not None else out


def karcher_ref(xs, max_iter=10, tol=1e-5) -> torch.Tensor:
    """The Karcher mean of the unit vectors with equal weights (Riemannian gradient descent from the
    normalised mean), times the inputs' mean norm; norms at most tol leave the direction alone."""
    if len(xs) == 1:
        return xs[0].double()
    v = [x.double().reshape(-1) for x in xs]
    norms = [float(x.norm()) for x in v]
    units = [x / n for x, n in zip(v, norms) if n > tol]
    if not units:
        return torch.zeros_like(xs[0], dtype=torch.float64)
    a = 1 / len(units)
    mean = sum(a * u for u in units)
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = float((mean @ u).clamp(-1, 1))
            theta = math.acos(dot)
            if theta >= tol:
                tangent += a * theta / math.sin(theta) * (u - dot * mean)
        step = float(tangent.norm())
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (sum(norms) / len(v) * mean).reshape(xs[0].shape)


def nearswap_ref(t: float, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    base, x = base.double(), x.double()
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * base


# ---- each method against its oracle --------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_interpolates_from_the_base_by_the_angle(tmp_path, fam, t):
    """Zero-norm ('zero' in the base: at a right angle to the other, as mergekit has it), colinear,
    antiparallel and equal tensors linear; t=0 is the base and t=1 the other model, bit for bit."""
    paths, models = fam
    got = merged(
        tmp_path,
        f"merge_method: slerp\nbase_model: {paths['base']}\nparameters: {{t: {t}}}\n"
        f"models: [{{model: {paths['base']}}}, {{model: {paths['ft1']}}}]\n",
    )
    base, ft = models["base"], models["ft1"]
    for name in base:
        close(got[name], slerp_ref(t, base[name], ft[name]), name)
        if t in (0.0, 1.0):
            assert torch.equal(got[name], (base if t == 0 else ft)[name]), name
    if 0 < t < 1:  # the zero tensor: sin(t * pi / 2) of the other, not t of it
        close(got["zero"], math.sin(t * math.pi / 2) * ft["zero"].double(), "zero")


def test_slerp_t_follows_a_gradient_over_the_layers(tmp_path):
    g = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.w" for i in range(3)]
    a = {n: torch.randn(4, 4, generator=g) for n in names}
    b = {n: torch.randn(4, 4, generator=g) for n in names}
    write_checkpoint(tmp_path / "a", a)
    write_checkpoint(tmp_path / "b", b)
    got = merged(
        tmp_path,
        f"merge_method: slerp\nbase_model: {tmp_path / 'a'}\nparameters: {{t: [0, 1]}}\n"
        f"models: [{{model: {tmp_path / 'a'}}}, {{model: {tmp_path / 'b'}}}]\n",
    )
    for i, n in enumerate(names):
        close(got[n], slerp_ref(i / 2, a[n], b[n]), n)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
def test_nuslerp_interpolates_models_or_their_task_vectors(tmp_path, fam, with_base, flatten, row_wise):
    paths, models = fam
    base_line = f"base_model: {paths['base']}\n" if with_base else ""
    got = merged(
        tmp_path,
        f"merge_method: nuslerp\n{base_line}"
        f"parameters: {{nuslerp_flatten: {str(flatten).lower()}, nuslerp_row_wise: {str(row_wise).lower()}}}\n"
        f"models: [{{model: {paths['ft1']}, parameters: {{weight: 0.3}}}}, "
        f"{{model: {paths['ft2']}, parameters: {{weight: 0.5}}}}]\n",
    )
    base = models["base"] if with_base else None
    for name in models["base"]:
        b = base[name] if base is not None else None
        want = nuslerp_ref([0.3, 0.5], models["ft1"][name], models["ft2"][name], b, flatten, row_wise)
        close(got[name], want, name)


def test_nuslerp_weights_that_cancel_interpolate_halfway(tmp_path, fam):
    paths, models = fam
    got = merged(
        tmp_path,
        f"merge_method: nuslerp\nmodels: [{{model: {paths['ft1']}, parameters: {{weight: 1}}}}, "
        f"{{model: {paths['ft2']}, parameters: {{weight: -1}}}}]\n",
    )
    for name in models["base"]:
        close(got[name], nuslerp_ref([1, 1], models["ft1"][name], models["ft2"][name]), name)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_interpolates_any_number_of_models(tmp_path, fam, with_base, normalize):
    paths, models = fam
    weights = [0.5, 0.2, 0.3] if normalize else [0.2, 0.3, 0.4]
    base_line = f"base_model: {paths['base']}\n" if with_base else ""
    entries = ", ".join(f"{{model: {paths[f'ft{i + 1}']}, parameters: {{weight: {w}}}}}" for i, w in enumerate(weights))
    got = merged(
        tmp_path,
        f"merge_method: multislerp\n{base_line}parameters: {{normalize_weights: {str(normalize).lower()}}}\n"
        f"models: [{entries}]\n",
    )
    for name in models["base"]:
        xs = [models[f"ft{i + 1}"][name] for i in range(3)]
        b = models["base"][name] if with_base else None
        close(got[name], multislerp_ref(weights, xs, b, normalize), name)


def test_multislerp_of_one_model_is_that_model(tmp_path, fam):
    paths, models = fam
    got = merged(
        tmp_path,
        f"merge_method: multislerp\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['ft2']}, parameters: {{weight: 0.4}}}}]\n",
    )
    for name, x in models["ft2"].items():
        assert torch.equal(got[name], x), name


def test_multislerp_of_two_antipodal_task_vectors_is_linear(tmp_path):
    """Equal weights on x and -x: no mean direction, so two models are averaged linearly (mergekit)."""
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(4, 4, generator=g).round()}  # on a grid: the task vectors are exactly d and -d
    d = (torch.randn(4, 4, generator=g) * 4).round() / 4
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "a", {"w": base["w"] + d})
    write_checkpoint(tmp_path / "b", {"w": base["w"] - d})
    got = merged(
        tmp_path,
        f"merge_method: multislerp\nbase_model: {tmp_path / 'base'}\n"
        f"models: [{{model: {tmp_path / 'a'}}}, {{model: {tmp_path / 'b'}}}]\n",
    )
    close(got["w"], multislerp_ref([1, 1], [base["w"] + d, base["w"] - d], base["w"]), "w")


# ---- the Gram sums' scales, guessed from a tensor's first entries ---------------------------------------


def _guessed(sample, found):
    """fixed_point.gram_by_guess with its passes faked (gram_at's G: how many Gram passes so far): the result,
    and the passes asked for."""
    import numpy as np

    from merger.methods.fixed_point import gram_by_guess

    calls = []

    def gram_at(exps):
        calls.append(("gram", list(exps)))
        return np.full((1, len(exps), len(exps)), float(sum(c[0] == "gram" for c in calls))), found

    def peaks():
        calls.append(("peaks",))
        return found

    return gram_by_guess(sample, gram_at, peaks, 1), calls


def test_the_scales_are_guessed_from_the_sample_and_checked():
    """The rule, from fixed_point's docstring: HEADROOM (4) binades above each sample peak's exponent (0.75 <
    2**0, 3 < 2**2) where the whole tensor's peaks stay below them; else the peaks' own exponents, found by
    the first Gram pass; a sample of zeros guesses nothing (the peaks' pass, then one Gram pass); NaN anywhere
    gives a NaN matrix."""
    from merger.methods.fixed_point import HEADROOM

    assert HEADROOM == 4
    G, calls = _guessed([0.75, 3.0], [15.99, 63.9])
    assert calls == [("gram", [4, 6])] and G[0, 0, 0] == 1
    G, calls = _guessed([0.75, 3.0], [16.0, 2.0])  # 16 = 2**4: not below the guess
    assert calls == [("gram", [4, 6]), ("gram", [5, 2])] and G[0, 0, 0] == 2
    G, calls = _guessed([0.0, 3.0], [0.5, 3.0])
    assert calls == [("peaks",), ("gram", [0, 2])] and G[0, 0, 0] == 1
    G, calls = _guessed([0.0, 0.0], [0.0, 0.0])  # zero vectors: any scale sums zeros
    assert calls == [("peaks",), ("gram", [0, 0])]
    for sample, found, asked in [
        ([math.nan, 1.0], [math.nan, 1.0], []),
        ([1.0, math.inf], [1.0, math.inf], []),
        ([1.0, 1.0], [1.0, math.nan], [("gram", [5, 5])]),
        ([0.0, 1.0], [math.inf, 1.0], [("peaks",)]),
    ]:
        G, calls = _guessed(sample, found)
        assert calls == asked and G.shape == (1, 2, 2) and all(map(math.isnan, G.flat)), (sample, found)


@pytest.mark.parametrize("mode", ["plain", "base_first", "task"])
@pytest.mark.parametrize(
    "segments", [(1, 600, False), (20, 30, False), (30, 20, True)], ids=["whole", "rows", "columns"]
)
def test_the_gram_pass_finds_each_vectors_largest_magnitude(monkeypatch, mode, segments):
    """What checks the guessed scales: each vector's largest magnitude as the Gram pass finds it, through the
    kernels (the whole tensor in shares, rows, strided columns; PART small, so many shares) and through
    torch's gram (in chunks of 7), against numpy's, the largest entries placed late and in different rows."""
    import numpy as np
    from test_kernels import runner

    from merger.methods import interpolation
    from merger.methods import interpolation_kernels as ik

    g = np.random.default_rng(6)
    b, x0, x1 = (g.standard_normal(600).astype(np.float32) for _ in range(3))
    b[599], x0[590], x1[571] = 20.0, 50.0, -70.0
    kind = {"plain": ik.PLAIN, "base_first": ik.BASE_FIRST, "task": ik.TASK}[mode]
    vectors = {"plain": [x0, x1], "base_first": [b, x0, x1], "task": [x0 - b, x1 - b]}[mode]
    want = [float(np.abs(v).max()) for v in vectors]
    exps = [math.frexp(p)[1] for p in want]
    seg = interpolation.Segments(*segments)
    monkeypatch.setattr(ik, "PART", 64)
    _, found = ik.gram_sums((x0, x1), b, kind, exps, seg, runner(100, 2))
    assert found == want
    tv = [torch.from_numpy(v) for v in vectors]
    chunks = lambda: ([v[s : s + 7] for v in tv] for s in range(0, 600, 7))  # noqa: E731
    _, found = interpolation.gram(chunks, exps, seg, "cpu")
    assert found == want


@pytest.mark.parametrize("mode", ["plain", "base_first", "task"])
@pytest.mark.parametrize(
    "segments", [(1, 3000, False), (12, 250, False), (250, 12, True)], ids=["whole", "rows", "columns"]
)
def test_the_gram_sums_are_the_rounded_products_summed_exactly(monkeypatch, mode, segments):
    """The rule in fixed_point's docstring, from Python's exact integers: each product of float32 entries
    (exact in float64) times 2**(51 - e_i - e_j), rounded to the nearest integer with ties to even (Python's
    round), summed exactly; the Gram entry is that integer, rounded once to float64, times 2**(e_i + e_j - 51).
    Through the kernels (in shares of 64 entries, on two threads; rows; strided columns) and through torch's
    gram (chunks of 7), both equal to it. Entries span 2**-40 to 2**2, each vector's peak just below its
    bound 2**3, and 40 entries whose scaled products are ties (odd halves: 1.5 and 2.5 both round to 2)."""
    import numpy as np

    from merger.methods import interpolation
    from merger.methods import interpolation_kernels as ik

    g = np.random.default_rng(8)
    n = 3000

    def draw():
        return (g.standard_normal(n) * 2.0 ** g.integers(-40, -1, n)).astype(np.float32)

    b, x0, x1 = draw(), draw(), draw()
    for v in (b, x0, x1):
        v[n - 3 :] = 0
    b[n - 3], x0[n - 2], x1[n - 1] = 7.9, 7.9, -7.99  # late peaks, alone in their entries
    ties = g.choice(n - 3, 40, replace=False)
    b[ties], x0[ties], x1[ties] = 0, 2.0**-20, g.choice([3.0, 5.0, -3.0, -5.0], 40) * 2.0**-26  # x0 * x1 * 2**45
    kind = {"plain": ik.PLAIN, "base_first": ik.BASE_FIRST, "task": ik.TASK}[mode]
    vectors = {"plain": [x0, x1], "base_first": [b, x0, x1], "task": [x0 - b, x1 - b]}[mode]
    exps = [math.frexp(float(np.abs(v).max()))[1] for v in vectors]
    assert exps == [3] * len(vectors)
    seg = interpolation.Segments(*segments)
    want = _exact_gram(vectors, exps, seg)
    monkeypatch.setattr(ik, "PART", 64)
    _assert_both_paths_give(want, (x0, x1), b, kind, vectors, exps, seg)


def _exact_gram(vectors, exps, seg):
    """fixed_point's rule in Python's integers: (count, k, k)."""
    import numpy as np

    n, k = vectors[0].size, len(vectors)

    def members(c):  # the entries of segment c
        return range(c, n, seg.count) if seg.strided else range(c * seg.length, (c + 1) * seg.length)

    want = np.empty((seg.count, k, k))
    for c in range(seg.count):
        for i in range(k):
            for j in range(k):
                total = sum(
                    round(float(vectors[i][e]) * float(vectors[j][e]) * 2.0 ** (51 - exps[i] - exps[j]))
                    for e in members(c)
                )
                want[c, i, j] = math.ldexp(float(total), exps[i] + exps[j] - 51)  # float(): rounded once
    return want


def _assert_both_paths_give(want, xs, b, kind, vectors, exps, seg):
    """The kernels' sums (on two threads) and torch's gram (in chunks of 7) both give `want`."""
    import numpy as np
    from test_kernels import runner

    from merger.methods import interpolation
    from merger.methods import interpolation_kernels as ik

    sums, _ = ik.gram_sums(xs, b, kind, exps, seg, runner(64, 2))
    got = ik.from_sums(sums, exps, len(vectors))
    assert np.array_equal(got, want), np.abs(got - want).max()
    tv = [torch.from_numpy(v) for v in vectors]
    chunks = lambda: ([v[s : s + 7] for v in tv] for s in range(0, vectors[0].size, 7))  # noqa: E731
    got, _ = interpolation.gram(chunks, exps, seg, "cpu")
    assert np.array_equal(got, want), np.abs(got - want).max()


@pytest.mark.parametrize(
    "segments", [(1, 4096, False), (2, 2048, False), (512, 8, True)], ids=["whole", "rows", "columns"]
)
def test_the_gram_sums_stay_exact_near_their_bound(monkeypatch, segments):
    """Entries of magnitude 4 to 8 (every product within a factor 4 of its bound 2**51 once scaled), in
    whole 1024-entry blocks (each block's sum near 2**61) and totals past 2**53 (float64's integers: the
    high part carries), against the same exact integers, for two vectors and for three."""
    import numpy as np

    from merger.methods import interpolation
    from merger.methods import interpolation_kernels as ik

    g = np.random.default_rng(9)
    n = 4096
    b, x0, x1 = ((4 + 3.99 * g.random(n)) * g.choice([-1.0, 1.0], n) for _ in range(3))
    b, x0, x1 = (v.astype(np.float32) for v in (b, x0, x1))
    x0[: n // 2] = np.abs(x0[: n // 2])  # half the cross products of one sign: their total is large too
    b[: n // 2], x1[: n // 2] = np.abs(b[: n // 2]), np.abs(x1[: n // 2])
    seg = interpolation.Segments(*segments)
    monkeypatch.setattr(ik, "PART", 1024)
    for kind, vectors in ((ik.PLAIN, [x0, x1]), (ik.BASE_FIRST, [b, x0, x1])):
        exps = [3] * len(vectors)
        want = _exact_gram(vectors, exps, seg)
        if not seg.strided:
            assert np.abs(want).max() * 2.0**45 > 2.0**60  # the scaled totals
        _assert_both_paths_give(want, (x0, x1), b, kind, vectors, exps, seg)


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("method", ["slerp", "nuslerp"])
def test_scales_guessed_wrong_or_from_zeros_still_give_the_oracles_result(tmp_path, monkeypatch, method, path):
    """With a sample of 10 entries, in chunks of 7: 'late' has entries 100x and 300x theirs after them (the
    guess fails and the Gram pass is made again, at the peaks' scales), 'lead' only zeros in them (the
    peaks' pass comes first) and 'edge' its peaks at the sample's last entry (in the second chunk: one Gram
    pass); each against the oracle, with the passes counted, through the fused kernels and through torch."""
    from merger.methods import fixed_point, interpolation, interpolation_kernels

    monkeypatch.setattr(fixed_point, "SAMPLE", 10)
    monkeypatch.setattr(merger.budget, "CHUNK", 7)
    counted = []
    if path == "fused":
        passes = {"gram": (interpolation_kernels, "gram_sums"), "peaks": (interpolation_kernels, "peaks")}
    else:
        monkeypatch.setattr(merger.stream, "_kernels", lambda: None)
        passes = {"gram": (interpolation, "gram"), "peaks": (interpolation.Sphere, "_peaks")}
    for name, (owner, attr) in passes.items():
        real = getattr(owner, attr)
        monkeypatch.setattr(owner, attr, lambda *a, _r=real, _n=name: counted.append(_n) or _r(*a))
    g = torch.Generator().manual_seed(11)
    base = {k: torch.randn(8, 9, generator=g) for k in ("late", "lead")}
    base["edge"] = 0.1 * torch.randn(8, 9, generator=g)
    base["late"][-1, -1] = 100.0
    base["lead"].view(-1)[:12] = 0
    base["edge"].view(-1)[9] = 10.0  # the sample's last entry, in the second chunk: the guess holds
    models = {"base": base}
    for i in (1, 2):
        ft = {k: v + 0.7 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        ft["late"][-1, -2] = -300.0 * i
        ft["lead"].view(-1)[:12] = 0
        ft["edge"].view(-1)[9] = 10.0 + 3 * i
        models[f"ft{i}"] = ft
    paths = {k: write_checkpoint(tmp_path / k, v) for k, v in models.items()}
    recipe = recipes({**paths, "ft3": paths["ft2"]})[method]
    got = merged(tmp_path, recipe)
    ft1, ft2 = models["ft1"], models["ft2"]
    for name in base:
        if method == "slerp":  # recipes' slerp: t 0.4 from the base to ft1
            want = slerp_ref(0.4, base[name], ft1[name])
        else:  # weights 0.3 and 0.6, over the base
            want = nuslerp_ref([0.3, 0.6], ft1[name], ft2[name], base[name])
        close(got[name], want, name)
    assert sorted(counted) == ["gram"] * 4 + ["peaks"]  # late: two Gram passes; lead and edge: one each


@pytest.mark.parametrize(("n", "params"), [(3, ""), (2, "{max_iter: 0}"), (3, "{max_iter: 50, tol: 1e-9}"), (1, "")])
def test_karcher_is_the_mean_direction_on_the_sphere(tmp_path, fam, n, params):
    paths, models = fam
    entries = ", ".join(f"{{model: {paths[f'ft{i + 1}']}}}" for i in range(n))
    got = merged(
        tmp_path, f"merge_method: karcher\nmodels: [{entries}]\n" + (f"parameters: {params}\n" if params else "")
    )
    kw = {"max_iter": 0} if "max_iter: 0" in params else {"max_iter": 50, "tol": 1e-9} if params else {}
    for name in models["base"]:
        xs = [models[f"ft{i + 1}"][name] for i in range(n)]
        close(got[name], karcher_ref(xs, **kw), name)
        if n == 1:
            assert torch.equal(got[name], xs[0]), name


@pytest.mark.parametrize("base", ["listed", "named", "both"])
def test_karcher_leaves_zero_tensors_out_of_the_direction(tmp_path, fam, base):
    """The base's 'zero' among the inputs: the direction is the others', the norm the mean of all three. A
    base_model is one more input, as in mergekit, whether listed in models or only named (once if both).
    ('flip' is left out: the base's is antipodal to the others', where no Karcher mean is defined.)"""
    paths, models = fam
    listed = f"{{model: {paths['base']}}}, " if base != "named" else ""
    named = f"base_model: {paths['base']}\n" if base != "listed" else ""
    got = merged(
        tmp_path,
        f"merge_method: karcher\n{named}models: [{listed}{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n",
    )
    for name in set(models["base"]) - {"flip"}:
        close(got[name], karcher_ref([models[m][name] for m in ("base", "ft1", "ft2")]), name)


@pytest.mark.parametrize("t", [0.0, 0.3, 2.0])
def test_nearswap_takes_the_other_model_where_it_is_near_the_base(tmp_path, fam, t):
    paths, models = fam
    got = merged(
        tmp_path,
        f"merge_method: nearswap\nbase_model: {paths['base']}\nparameters: {{t: {t}}}\n"
        f"models: [{{model: {paths['ft1']}}}]\n",
    )
    for name, b in models["base"].items():
        close(got[name], nearswap_ref(t, b, models["ft1"][name]), name)
        if t == 0:
            assert torch.equal(got[name], b), name


# ---- the same bytes whatever the chunks and the device ---------------------------------------------------


def recipes(paths) -> dict[str, str]:
    p = {k: str(v) for k, v in paths.items()}
    two = f"models: [{{model: {p['ft1']}, parameters: {{weight: 0.3}}}}, {{model: {p['ft2']}, parameters: {{weight: 0.6}}}}]\n"
    three = two.rstrip("]\n") + f", {{model: {p['ft3']}, parameters: {{weight: 0.2}}}}]\n"
    return {
        "slerp": f"merge_method: slerp\nbase_model: {p['base']}\nparameters: {{t: 0.4}}\n"
        f"models: [{{model: {p['ft1']}}}, {{model: {p['base']}}}]\n",
        "nuslerp": f"merge_method: nuslerp\nbase_model: {p['base']}\n" + two,
        "nuslerp-rows": "merge_method: nuslerp\nparameters: {nuslerp_flatten: false}\n" + two,
        "nuslerp-columns": f"merge_method: nuslerp\nbase_model: {p['base']}\n"
        "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n" + two,
        "multislerp": f"merge_method: multislerp\nbase_model: {p['base']}\n" + three,
        "multislerp-nobase": "merge_method: multislerp\n" + three,
        "karcher": f"merge_method: karcher\nmodels: [{{model: {p['ft1']}}}, {{model: {p['ft2']}}}, {{model: {p['ft3']}}}]\n",
        "karcher-base": f"merge_method: karcher\nbase_model: {p['base']}\n"
        f"models: [{{model: {p['ft1']}}}, {{model: {p['ft2']}}}]\n",
        "nearswap": f"merge_method: nearswap\nbase_model: {p['base']}\nparameters: {{t: 0.5}}\n"
        f"models: [{{model: {p['ft1']}}}]\n",
    }


@pytest.fixture
def big(tmp_path):
    """Tensors of a few thousand entries, so that a chunk of 7 cuts rows many times over; 'late' ends in
    entries far above a first SAMPLE (100) entries' (in its task vectors too): a guess of its scales fails."""
    g = torch.Generator().manual_seed(5)
    base = {
        "w": torch.randn(64, 48, generator=g),
        "v": torch.randn(301, generator=g),
        "c": torch.randn(5, 9, 11, generator=g),
        "late": torch.randn(30, 40, generator=g),
    }
    base["late"][-1, -1] = 300.0
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in (1, 2, 3):
        ft = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        ft["late"][-1, -1] = 300.0 + 50 * i
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", ft)
    return paths


@pytest.fixture(params=[None, 100], ids=["sample-default", "sample-100"])
def sample(request, monkeypatch):
    """fixed_point.SAMPLE as it is (larger than every test tensor: the guess always holds) or 100 (guesses
    made across chunks, some failing)."""
    from merger.methods import fixed_point

    if request.param is not None:
        monkeypatch.setattr(fixed_point, "SAMPLE", request.param)
    return request.param


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("method", sorted(recipes({k: "" for k in ("base", "ft1", "ft2", "ft3")})))
def test_the_same_bytes_whatever_the_chunk_size(tmp_path, big, monkeypatch, method, compute, sample):
    recipe = recipes(big)[method] + f"compute_dtype: {compute}\n"
    outs = []
    for chunk in (7, 1 << 18):
        monkeypatch.setattr(merger.budget, "CHUNK", chunk)
        outs.append(merged(tmp_path, recipe, f"out{chunk}"))
    for name in outs[1]:
        assert torch.equal(outs[0][name], outs[1][name]), name


@pytest.mark.parametrize("method", sorted(recipes({k: "" for k in ("base", "ft1", "ft2", "ft3")})))
def test_whole_tensors_give_the_chunks_bytes(tmp_path, big, monkeypatch, method):
    """fn on whole tensors (state None: what the GPU does with a tensor that fits) against the CPU's
    chunks of 7 entries, through the engine's own gpu_merge on CPU tensors."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.sources import Confined, MappedReader, to_torch
    from merger.stream import Merger

    monkeypatch.setattr(merger.budget, "CHUNK", 7)
    recipe = recipes(big)[method]
    chunked = merged(tmp_path, recipe)
    plan = build_plan(parse_recipe(recipe + "out_dtype: float32\n"), device="cpu")
    reader = MappedReader(Confined(plan.models))
    for t in plan.tensors:
        views, codes = Merger(plan, reader).inputs_of(t)
        on_device = {k: to_torch(v, codes[k]).clone() for k, v in views.items()}
        whole = Merger(plan, reader).gpu_merge(t, on_device)
        assert torch.equal(whole.reshape(chunked[t.name].shape), chunked[t.name]), t.name
    reader.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(recipes({k: "" for k in ("base", "ft1", "ft2", "ft3")})))
def test_cuda_gives_the_cpus_bytes(tmp_path, big, method):
    outs = {device: merged(tmp_path, recipes(big)[method], device, "--device", device) for device in ("cpu", "cuda")}
    for name, cpu in outs["cpu"].items():
        assert torch.equal(outs["cuda"][name], cpu), name


# ---- refused before any tensor is read ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "error"),
    [
        (
            "merge_method: slerp\nbase_model: base\nparameters:\n  t: 1.5\nmodels: [{model: ft1}]\n",
            "recipe.yaml:4: parameters.t: Input should be less than or equal to 1, got 1.5",
        ),
        (
            "merge_method: slerp\nbase_model: base\nmodels: [{model: ft1}, {model: ft2}]\n",
            "recipe.yaml:3: models: slerp interpolates two models, the base_model and one other; this recipe "
            "gives 2 besides the base",
        ),
        (
            "merge_method: slerp\nmodels: [{model: ft1}, {model: ft2}]\n",
            "recipe.yaml: base_model: slerp needs a base_model",
        ),
        (
            "merge_method: nuslerp\nmodels: [{model: ft1}, {model: ft2}, {model: base}]\n",
            "recipe.yaml:2: models: nuslerp interpolates exactly two models (besides any base_model); this "
            "recipe gives 3",
        ),
        (
            "merge_method: multislerp\nparameters:\n  eps: 0\nmodels: [{model: ft1}]\n",
            "recipe.yaml:3: parameters.eps: Input should be greater than 0, got 0",
        ),
        (
            "merge_method: multislerp\nmodels:\n  - {model: ft1, parameters: {weight: 1}}\n"
            "  - {model: ft2, parameters: {weight: -1}}\n",
            "recipe.yaml:2: models: the weights sum to 0, so they cannot be normalised; set normalize_weights: "
            "false or change a weight",
        ),
        (
            "merge_method: karcher\nparameters:\n  max_iter: -1\nmodels: [{model: ft1}]\n",
            "recipe.yaml:3: parameters.max_iter: Input should be greater than or equal to 0, got -1",
        ),
        (
            "merge_method: nearswap\nbase_model: base\nparameters:\n  t: -0.1\nmodels: [{model: ft1}]\n",
            "recipe.yaml:4: parameters.t: Input should be greater than or equal to 0, got -0.1",
        ),
    ],
)
def test_bad_parameters_are_refused_at_their_line(workdir, recipe, error):
    assert run_bad(recipe, command="plan") == f"error: {error}\n"


# ---- the GPU memory each method states ------------------------------------------------------------------

GPU_RECIPES = {  # the lines before the models ({base}: the base's directory)
    "slerp": "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.3}}\n",
    "nuslerp": "merge_method: nuslerp\nbase_model: {base}\n",
    "nuslerp-rows": "merge_method: nuslerp\nbase_model: {base}\nparameters: {{nuslerp_flatten: false}}\n",
    "nuslerp-columns": "merge_method: nuslerp\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\n",
    "karcher": "merge_method: karcher\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\n",
}


@pytest.mark.usefixtures("cuda_on_cpu")
@pytest.mark.parametrize("method", sorted(GPU_RECIPES))
def test_gpu_estimate_bounds_what_each_method_holds(tmp_path, method, monkeypatch):
    """Plan.gpu_bytes, from each method's GpuFootprint, against what merging holds on the (counted) GPU,
    whole and in pieces, as tests/test_gpu_memory.py holds the other methods."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe

    root = write_models(tmp_path, 3, {"w": (256, 512), "small": (64, 64)}, torch.float32)
    n = 1 if method in ("slerp", "nearswap") else 2 if method.startswith("nuslerp") else 3
    weighted = method.startswith(("nuslerp", "multislerp"))
    entries = ", ".join(
        f"{{model: {root / f'ft{i}'}" + (f", parameters: {{weight: {0.5 + i / 4}}}}}" if weighted else "}")
        for i in range(n)
    )
    plan = build_plan(
        parse_recipe(GPU_RECIPES[method].format(base=root / "base") + f"models: [{entries}]\n"), device="cpu"
    )
    plan.device = "cuda"
    tensors = {t.name: t for t in plan.tensors}
    for name in ("w", "small"):
        assert_bounds(plan.gpu_bytes(tensors[name]), held_whole(plan, tensors[name]), f"{name} whole")
    piece = 50_000  # two pieces and one of 31072 entries
    w = tensors["w"]
    assert_bounds(plan.gpu_bytes(w, piece), held_in_pieces(plan, w, piece, monkeypatch), "w in pieces")


# ---- the fused CPU kernels (merger.methods.interpolation_kernels) against the torch path ----------------


SAMPLE = 150  # fixed_point.SAMPLE in the tests of the two paths: more than a chunk (100), less than most tensors
LEAD = 200  # leading zeros of 'lead': its sample is all zeros


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def stored(request, tmp_path):
    """A base and three fine-tunes stored in bf16 or float32, of odd sizes (more entries than a block of
    the kernels, a tail in every one), with slerp's edge cases: 'zero', colinear 'twice', antiparallel
    'flip', equal 'same'; and for the scales guessed from the first SAMPLE entries, 'late' (an entry far
    above them: the guess fails) and 'lead' (zeros there: nothing to guess from)."""
    dtype = request.param
    g = torch.Generator().manual_seed(9)
    shapes = {"w": (129, 67), "v": (301,), "c": (5, 9, 11), "row": (1, 45), "late": (20, 30), "lead": (20, 30)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base |= {"zero": torch.zeros(4, 3), "twice": torch.randn(4, 3, generator=g), "flip": torch.randn(5, generator=g)}
    base["same"] = torch.randn(3, 3, generator=g)
    base["lead"].view(-1)[:LEAD] = 0
    paths = {"base": write_checkpoint(tmp_path / "base", {k: v.to(dtype) for k, v in base.items()})}
    for i in (1, 2, 3):
        ft = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        ft["twice"], ft["flip"], ft["same"] = (1 + i) * base["twice"], -i * base["flip"], base["same"].clone()
        ft["late"].view(-1)[-3] = 100.0 * i  # far above the first SAMPLE entries, in the task vectors too
        ft["lead"].view(-1)[:LEAD] = 0
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", {k: v.to(dtype) for k, v in ft.items()})
    return paths, dtype


@pytest.mark.parametrize("method", sorted(recipes({k: "" for k in ("base", "ft1", "ft2", "ft3")})))
def test_fused_kernels_write_the_torch_paths_bytes(tmp_path, stored, monkeypatch, method):
    """Every method and recipe variant through the fused kernels (the CPU engine's default) and through
    torch (as without numba), in small chunks and shares of the passes: the same bytes, in the stored dtype."""
    from merger.methods import fixed_point, interpolation_kernels

    paths, dtype = stored
    out_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    recipe = recipes(paths)[method] + f"dtype: {out_dtype}\n"
    monkeypatch.setattr(merger.budget, "CHUNK", 100)
    monkeypatch.setattr(interpolation_kernels, "PART", 64)  # the Gram pass's shares: many, summed
    monkeypatch.setattr(fixed_point, "SAMPLE", SAMPLE)
    used = []
    for name in ("sphere_fused", "nearswap_range"):
        real = getattr(interpolation_kernels, name)
        monkeypatch.setattr(interpolation_kernels, name, lambda *a, _real=real, **k: used.append(1) or _real(*a, **k))
    outs = {}
    for path in ("fused", "torch"):
        if path == "torch":
            monkeypatch.setattr(merger.stream, "_kernels", lambda: None)
        (tmp_path / "r.yaml").write_text(recipe)
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / path), "-q"])
        assert result.exit_code == 0, result.output
        outs[path] = load_output(tmp_path / path)
    assert len(used) == len(outs["fused"])  # every tensor through the kernels in the first run, none in the second
    for name, want in outs["torch"].items():
        got = outs["fused"][name]
        assert got.dtype == dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), name


VIEWS = {torch.bfloat16: "int16", torch.float16: "uint16"}  # the numpy views the kernels read


def _fused_and_torch(method, xs, base, models, params, shape, run) -> tuple[torch.Tensor, torch.Tensor]:
    """method's fused merge_range (in pieces of 1000) and its torch fn on whole tensors (the GPU's
    path), in the stored dtype."""
    from merger.methods.base import TensorContext

    def view(t):
        t = t.reshape(-1)
        return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(VIEWS[t.dtype])

    context = TensorContext("t", shape=shape)
    dtype = xs[0].dtype
    got = torch.empty(math.prod(shape), dtype=dtype)
    merge_range = method.fused(
        [view(x) for x in xs], None if base is None else view(base), models, params, run, context=context
    )
    out = view(got)
    for s in range(0, out.size, 1000):
        merge_range(s, min(s + 1000, out.size), out[s : s + 1000])
    want = method.fn([x.float() for x in xs], None if base is None else base.float(), models, params, context=context)
    return got, want.reshape(-1).to(dtype)


def _cases():
    from merger.methods import interpolation as ip

    w = [ip.WeightParams(weight=0.3), ip.WeightParams(weight=0.6), ip.WeightParams(weight=0.2)]
    none = [ip.NoModelParams()] * 3
    return [
        ("slerp", 1, True, none[:1], ip.SlerpParams(t=0.4)),
        ("nuslerp", 2, True, w[:2], ip.NuslerpParams()),
        ("nuslerp", 2, False, w[:2], ip.NuslerpParams(nuslerp_flatten=False)),
        ("nuslerp", 2, True, w[:2], ip.NuslerpParams(nuslerp_flatten=False, nuslerp_row_wise=True)),
        ("multislerp", 3, True, w, ip.MultislerpParams()),
        ("multislerp", 3, False, w, ip.MultislerpParams(normalize_weights=False)),
        ("multislerp", 1, True, w[:1], ip.MultislerpParams()),
        ("karcher", 3, False, none, ip.KarcherParams()),
        ("karcher", 2, True, none[:2], ip.KarcherParams(max_iter=3)),
        ("karcher", 1, False, none[:1], ip.KarcherParams()),
        ("nearswap", 1, True, none[:1], ip.NearswapParams(t=0.5)),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("special", ["", "nan", "inf", "tiny"])
def test_fused_kernels_give_fn_bytes_on_whole_tensors(dtype, special, sample):
    """The fused merge_range against fn on whole tensors (the GPU's path), for every method and variant,
    float16 too, with NaN, inf or tiny entries (near the smallest normal float32, far below the peaks): in
    the first model at entries 700 and 1000 (beyond a sample of 100: found by the Gram pass), in the
    second at entry 3."""
    from test_kernels import runner

    from merger.methods import interpolation as ip

    methods = {m.name: m for m in ip.METHODS}
    g = torch.Generator().manual_seed(4)
    shape = (23, 61)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.2 * torch.randn(shape, generator=g) for _ in range(3)]
    if special:
        value = {"nan": math.nan, "inf": math.inf, "tiny": 1e-38}[special]
        xs[0].view(-1)[[700, 1000]] = value  # beyond a sample of 100
        xs[1].view(-1)[3] = -value
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    for name, n, with_base, models, params in _cases():
        got, want = _fused_and_torch(
            methods[name], xs[:n], base if with_base else None, models, params, shape, runner(333, 2)
        )
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        nan = want.isnan()  # torch's casts write NaN's bits one way or another (the engine makes them canonical)
        assert torch.equal(got.isnan(), nan), (name, params)
        assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), (name, params)

"""TSV-Merge, Iso-C and Iso-CTS through the CLI against float64 oracles written here from the papers
(numpy, step by step; the whitening through the Gram matrix's inverse square root, not an SVD), their
papers' properties, the edge cases, chunk-size independence and refused parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint
from test_gpu_memory import cuda_on_cpu  # noqa: F401  (a fixture: CUDA's streams and uploads on the CPU)

import merger.budget
from merger.cli import cli
from merger.methods import get_method

NEGLIGIBLE = 1e-10  # relative: the test matrices' singular values are either O(1) or exact zeros

# ---- oracles: numpy float64 over the task vectors (m, n), from the papers' definitions


def whitened(a: np.ndarray) -> np.ndarray:
    """a (a^T a)^{-1/2}: the orthonormal basis nearest to a's columns (TSV's whitening), over the directions
    a spans (pseudo-inverse square root) where its columns are dependent."""
    lam, q = np.linalg.eigh(a.T @ a)
    keep = lam > NEGLIGIBLE * max(lam.max(initial=0), 0)
    return a @ (q[:, keep] / np.sqrt(lam[keep])) @ q[:, keep].T


def top(a: np.ndarray, k: int, scale: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a's top-k singular triplets, without the (exactly) zero ones: at most NEGLIGIBLE * scale (a's norm,
    or that of the matrix a was projected from)."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    scale = np.linalg.norm(a) if scale is None else scale
    q = int(np.sum(s[:k] > NEGLIGIBLE * scale)) if k else 0
    return u[:, :q], s[:q], vt[:q]


def tsv_oracle(deltas: list[np.ndarray]) -> np.ndarray:
    """Gargiulo et al.: keep each task's top 1/T of the rank, whiten the concatenated U and V, recombine."""
    k = min(deltas[0].shape) // len(deltas)
    parts = [top(d, k) for d in deltas]
    u = np.hstack([p[0] for p in parts])
    s = np.concatenate([p[1] for p in parts])
    vt = np.vstack([p[2] for p in parts])
    return whitened(u) @ np.diag(s) @ whitened(vt.T).T


def iso_c_oracle(deltas: list[np.ndarray]) -> np.ndarray:
    """Marczak et al., Iso-C: the sum's spectrum made flat at its mean: mean(s) U V^T = mean(s) * polar(sum),
    polar(sum) = sum (sum^T sum)^{-1/2}, mean(s) = trace((sum^T sum)^{1/2}) / rank."""
    total = sum(deltas)
    lam = np.linalg.eigvalsh(total.T @ total)
    lam = lam[lam > NEGLIGIBLE * max(lam.max(), 0)]
    if not lam.size:
        return np.zeros_like(total)
    return np.sqrt(lam).mean() * whitened(total)


def common_split_oracle(r: int, t: int, fraction: float) -> tuple[int, int]:
    common = int(r * fraction)  # the reference's float arithmetic (the test fractions are exact here)
    specific = round((r - common) / t) * t
    specific -= t if specific > r else 0
    return r - specific, specific // t


def iso_cts_oracle(deltas: list[np.ndarray], fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS: the sum's top `common` left/right singular vectors, each task's top directions of what the
    common left subspace leaves of it, all whitened together; every singular value their mean."""
    common, per_task = common_split_oracle(min(deltas[0].shape), len(deltas), fraction)
    u_c, s_c, vt_c = top(sum(deltas), common)
    parts = [top(d - u_c @ u_c.T @ d, per_task, np.linalg.norm(d)) for d in deltas]
    u = np.hstack([p[0] for p in parts] + [u_c])
    s = np.concatenate([p[1] for p in parts] + [s_c])
    vt = np.vstack([p[2] for p in parts] + [vt_c])
    if not s.size:
        return np.zeros_like(deltas[0])
    # the whitened bases' product is an isometry where they have full rank; where not (task subspaces
    # nested in the common one), making the product itself one keeps the spectrum flat
    return s.mean() * whitened(whitened(u) @ whitened(vt.T).T)


ORACLES = {"tsv": tsv_oracle, "iso_c": iso_c_oracle, "iso_cts": iso_cts_oracle}


def oracle(method: str, base: dict, fts: list[dict], alpha: float = 1.0, **params) -> dict[str, np.ndarray]:
    """The merged tensors: matrices by the method's oracle, other tensors base + alpha * mean task vector."""
    out = {}
    for name, b in base.items():
        b64 = b.double().numpy()
        deltas = [ft[name].double().numpy() - b64 for ft in fts]
        merged = ORACLES[method](deltas, **params) if b.ndim == 2 else sum(deltas) / len(deltas)
        out[name] = b64 + alpha * merged
    return out


# ---- checkpoints: values on a 1/64 grid and low-rank task vectors of integers / 8, so that every x - base
# is exact in float32 and a rank-deficient task vector is exactly so


def grid(g: torch.Generator, shape) -> torch.Tensor:
    return torch.round(torch.randn(shape, generator=g, dtype=torch.float64) * 64) / 64


def low_rank(g: torch.Generator, shape, rank: int) -> torch.Tensor:
    a = torch.randint(-4, 5, (shape[0], rank), generator=g, dtype=torch.float64)
    b = torch.randint(-4, 5, (rank, shape[1]), generator=g, dtype=torch.float64)
    return a @ b / 8


SHAPES = {"square": (6, 6), "tall": (9, 5), "wide": (4, 7), "deficient": (8, 8), "norm": (7,)}


def write_models(root, deltas_of) -> tuple[dict, list[dict]]:
    """A base and fine-tunes of it: deltas_of(g, name, shape) -> each fine-tune's task vector of that tensor."""
    g = torch.Generator().manual_seed(3)
    base = {name: grid(g, shape) for name, shape in SHAPES.items()}
    per_tensor = {name: deltas_of(g, name, shape) for name, shape in SHAPES.items()}
    fts = [{name: base[name] + per_tensor[name][i] for name in SHAPES} for i in range(len(per_tensor["norm"]))]
    write_checkpoint(root / "base", {k: v.float() for k, v in base.items()}, n_shards=2)
    for i, ft in enumerate(fts):
        write_checkpoint(root / f"ft{i}", {k: v.float() for k, v in ft.items()}, n_shards=2)
    return base, fts


def random_deltas(n: int):
    def deltas_of(g, name, shape):
        if name == "deficient":  # rank 2 each: below the 1/T share of 8 for one or two models
            return [low_rank(g, shape, 2) for _ in range(n)]
        return [grid(g, shape) for _ in range(n)]

    return deltas_of


def merge(tmp_path, method: str, n: int, extra: str = "", out: str = "out", compute: str = "float64") -> dict:
    models = ", ".join(f"{{model: {tmp_path / f'ft{i}'}}}" for i in range(n))
    recipe = (
        f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\nmodels: [{models}]\n"
        f"dtype: float32\ncompute_dtype: {compute}\n{extra}"
    )
    (tmp_path / "r.yaml").write_text(recipe)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q", "--force"])
    assert result.exit_code == 0, result.output
    return load_output(tmp_path / out)


def assert_matches(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        # float64 all the way, then rounded to float32 on output: within a float32 rounding of O(1) values
        np.testing.assert_allclose(got[name].double().numpy(), w, rtol=tol, atol=tol, err_msg=name)


def spectrum(got: dict, base: dict, name: str) -> np.ndarray:
    return np.linalg.svd(got[name].double().numpy() - base[name].double().numpy(), compute_uv=False)


PARAMS = {
    "tsv": ({}, "parameters: {alpha: 0.7}\n", {"alpha": 0.7}),
    "iso_c": ({}, "parameters: {alpha: 1.3}\n", {"alpha": 1.3}),
}
PARAMS["iso_cts"] = ({}, "parameters: {alpha: 1.3, common_space_fraction: 0.5}\n", {"alpha": 1.3, "fraction": 0.5})


@pytest.mark.parametrize("with_params", [False, True], ids=["defaults", "params"])
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_each_method_matches_its_oracle(tmp_path, method, with_params):
    """Three models; square, tall, wide and rank-deficient matrices and a norm vector, over two shards."""
    base, fts = write_models(tmp_path, random_deltas(3))
    extra, params = (PARAMS[method][1], PARAMS[method][2]) if with_params else ("", {})
    assert_matches(merge(tmp_path, method, 3, extra), oracle(method, base, fts, **params))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_float32_compute_stays_close_to_the_oracle(tmp_path, method):
    """The task vectors in float32 (exact here), the SVDs still in float64: only the output's rounding."""
    base, fts = write_models(tmp_path, random_deltas(2))
    assert_matches(merge(tmp_path, method, 2, compute="float32"), oracle(method, base, fts), tol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_whole_tensors_merge_as_chunks_do(tmp_path, method):
    """fn on whole tensors (state None: the GPU's whole-tensor path) gives what prepare and fn on chunks give."""
    base, fts = write_models(tmp_path, random_deltas(3))
    got = merge(tmp_path, method, 3)
    m = get_method(method)
    params = m.params()
    for name, b in base.items():
        whole = m.fn([ft[name] for ft in fts], b, [m.model_params()] * 3, params)
        np.testing.assert_allclose(whole.numpy(), got[name].double().numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


# ---- the papers' properties


def test_iso_c_and_iso_cts_spectra_are_flat(tmp_path):
    """Every singular value of the merged update the same (the mean of the spectrum it replaced), over the
    whole rank where the summed task vectors have full rank, over their rank where not."""
    base, fts = write_models(tmp_path, random_deltas(3))
    for method in ("iso_c", "iso_cts"):
        got = merge(tmp_path, method, 3, out=method)
        for name, shape in SHAPES.items():
            if len(shape) == 2:
                s = spectrum(got, base, name)
                rank = min(shape) if name != "deficient" else 6  # three rank-2 task vectors
                np.testing.assert_allclose(s[:rank], s[0], rtol=1e-6, err_msg=f"{method} {name}")
                np.testing.assert_allclose(s[rank:], 0, atol=1e-6, err_msg=f"{method} {name}")
        # Iso-C's level: the mean singular value of the summed task vectors
        total = sum(ft["square"].double().numpy() - base["square"].double().numpy() for ft in fts)
        if method == "iso_c":
            np.testing.assert_allclose(spectrum(got, base, "square"), np.linalg.svd(total, compute_uv=False).mean())


def test_tsv_whitened_bases_are_orthonormal(tmp_path):
    """TSV recombines U_w diag(s) V_w^T with U_w's columns and V_w's rows orthonormal: so the merged update's
    singular values are exactly the tasks' kept ones (each task's top min(m, n) // T), side by side."""
    base, fts = write_models(tmp_path, random_deltas(3))
    got = merge(tmp_path, "tsv", 3)
    for name, shape in SHAPES.items():
        if len(shape) != 2:
            continue
        k = min(shape) // 3
        kept = []
        for ft in fts:
            s = np.linalg.svd(ft[name].double().numpy() - base[name].double().numpy(), compute_uv=False)[:k]
            kept += list(s[s > 1e-9])
        s = spectrum(got, base, name)
        np.testing.assert_allclose(s[: len(kept)], sorted(kept, reverse=True), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(s[len(kept) :], 0, atol=1e-6, err_msg=name)


# ---- edge cases


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_one_model(tmp_path, method):
    """TSV keeps the whole rank of a single task vector: the model itself; Iso-C and Iso-CTS (common and
    specific subspaces together span it) flatten its spectrum."""
    base, fts = write_models(tmp_path, random_deltas(1))
    got = merge(tmp_path, method, 1)
    assert_matches(got, oracle(method, base, fts))
    if method == "tsv":
        assert_matches(got, {k: v.double().numpy() for k, v in fts[0].items()})
    else:
        assert_matches(got, oracle("iso_c", base, fts))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_identical_task_vectors(tmp_path, method):
    """Three copies of one task vector: TSV's three copies of its top third whiten to one copy (the rank-k
    truncation of the task vector); Iso-C flattens three times its spectrum."""
    base, fts = write_models(tmp_path, lambda g, name, shape: [grid(g, shape)] * 3)
    got = merge(tmp_path, method, 3)
    assert_matches(got, oracle(method, base, fts))
    delta = {k: fts[0][k].double().numpy() - base[k].double().numpy() for k in base}
    for name, shape in SHAPES.items():
        b = base[name].double().numpy()
        if len(shape) == 1:
            want = b + delta[name]
        elif method == "tsv":
            u, s, vt = np.linalg.svd(delta[name], full_matrices=False)
            k = min(shape) // 3
            want = b + u[:, :k] @ np.diag(s[:k]) @ vt[:k]
        elif method == "iso_c":
            u, s, vt = np.linalg.svd(3 * delta[name], full_matrices=False)
            want = b + s.mean() * u @ vt
        else:
            continue
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_zero_task_vectors_leave_the_base(tmp_path, method):
    base, fts = write_models(tmp_path, lambda g, name, shape: [torch.zeros(shape, dtype=torch.float64)] * 2)
    got = merge(tmp_path, method, 2)
    for name, b in base.items():
        assert torch.equal(got[name], b.float()), name


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_a_zero_task_vector_among_others_adds_no_directions(tmp_path, method):
    """Model 0 equals the base: its (arbitrary) singular vectors of value 0 take no part in the whitening."""

    def deltas_of(g, name, shape):
        return [torch.zeros(shape, dtype=torch.float64), grid(g, shape), grid(g, shape)]

    base, fts = write_models(tmp_path, deltas_of)
    assert_matches(merge(tmp_path, method, 3), oracle(method, base, fts))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_rank_below_the_number_of_models(tmp_path, method):
    """Five models over matrices of rank 4 or 5 (and 6 ... 8): TSV's share, min(m, n) // 5, is 0 for the
    first, so they keep the base (as the reference's int(r / T)); Iso-CTS's split rounds to whole models."""
    base, fts = write_models(tmp_path, random_deltas(5))
    got = merge(tmp_path, method, 5)
    assert_matches(got, oracle(method, base, fts))
    if method == "tsv":
        assert torch.equal(got["wide"], base["wide"].float())  # rank 4 < 5 models


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
def test_a_task_vector_without_an_svd_is_one_line_naming_the_tensor_and_model(tmp_path, monkeypatch, method, bad):
    """NaN, an infinity, or a difference past float32's range (3e38 over a base of -3e38) in a matrix's task
    vector: no SVD exists, so the merge stops with one line naming the tensor and the model, on the engine's
    chunked path and on the whole tensors the GPU gets (torch's SVD raises on the CPU, and on a GPU returns
    NaN)."""
    from conftest import run_bad

    from merger.errors import NaNTaskVector
    from merger.methods.base import TensorContext

    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(6, 5, generator=g), "norm": torch.randn(5, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    if bad == "overflow":
        base["w"][2, 2], fts[1]["w"][2, 2] = -3e38, 3e38
    else:
        fts[1]["w"][2, 2] = float(bad)
    for name, tensors in [("base", base), *((f"ft{i}", ft) for i, ft in enumerate(fts))]:
        write_checkpoint(tmp_path / name, tensors)
    monkeypatch.chdir(tmp_path)
    models = ", ".join(f"{{model: ft{i}}}" for i in range(3))
    err = run_bad(f"merge_method: {method}\nbase_model: base\nmodels: [{models}]\noutput: {{path: out}}\n")
    assert err == (
        "error: tensor 'w': 1 entry of the task vector of 'ft1' is NaN or infinite (a NaN or an infinity in "
        "that model or in the base, or a difference past the compute dtype's range): a singular value decomposition "
        "needs finite values. Is one of those checkpoints diverged?\n"
    )
    m = get_method(method)
    xs = [ft["w"] for ft in fts]
    with pytest.raises(NaNTaskVector) as e:
        m.fn(xs, base["w"], [m.model_params()] * 3, m.params(), context=TensorContext("w", shape=(6, 5)))
    assert (e.value.model, e.value.count) == (1, 1)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_float64_task_vectors_whose_sum_overflows_are_one_line(tmp_path, monkeypatch, method):
    """Each float64 task vector finite, their sum past float64's range: no SVD of the sum exists."""
    from conftest import run_bad

    g = torch.Generator().manual_seed(2)
    write_checkpoint(tmp_path / "base", {"w": torch.zeros(4, 3, dtype=torch.float64)})
    for i in range(2):
        w = torch.randn(4, 3, generator=g, dtype=torch.float64)
        w[1, 1] = 1e308
        write_checkpoint(tmp_path / f"ft{i}", {"w": w})
    monkeypatch.chdir(tmp_path)
    recipe = f"merge_method: {method}\nbase_model: base\nmodels: [{{model: ft0}}, {{model: ft1}}]\n"
    err = run_bad(recipe + "compute_dtype: float64\ndtype: float64\noutput: {path: out}\n")
    assert err == (
        "error: tensor 'w': the sum of the models' task vectors is past float64's range in 1 entry: a singular value "
        "decomposition needs finite values. Is one of those checkpoints diverged?\n"
    )


def test_iso_cts_splits_the_rank_as_the_reference_does():
    """(common, per model) for (rank, models, fraction), worked by hand from the reference's rule: the
    fraction's floor, the rest rounded half to even to a multiple of the models, never more than the rank."""
    from merger.methods.subspace import common_split

    cases = {
        (768, 8, 0.8): (616, 19),  # int(614.4) = 614; 154 / 8 = 19.25 -> 19 per model, 152
        (4, 3, 0.8): (4, 0),  # 3; 1 / 3 -> 0
        (4, 3, 0.5): (1, 1),  # 2; 2 / 3 -> 1
        (5, 2, 0.0): (1, 2),  # 0; 2.5 -> 2 (half to even)
        (3, 2, 0.0): (1, 1),  # 0; 1.5 -> 2, 4 > 3: one less per model (the reference would slice -1)
        (100, 3, 0.29): (28, 24),  # the decimal written: 29, not int(0.29 * 100) = 28; 71 / 3 -> 24 each, 72
        (6, 1, 1.0): (6, 0),
    }
    for (r, t, f), want in cases.items():
        assert common_split(r, t, f) == want, (r, t, f)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_outputs_do_not_depend_on_the_chunk_size(tmp_path, monkeypatch, method):
    write_models(tmp_path, random_deltas(3))
    outs = []
    for i, chunk in enumerate((7, 1 << 18)):
        monkeypatch.setattr(merger.budget, "CHUNK", chunk)
        outs.append(merge(tmp_path, method, 3, out=f"out{i}", compute="float32"))
    for name in outs[0]:
        assert outs[0][name].numpy().tobytes() == outs[1][name].numpy().tobytes(), name


# ---- refused parameters


@pytest.mark.parametrize(
    ("method", "parameters", "message"),
    [
        ("tsv", "alpha: -0.5", "parameters.alpha: Input should be greater than or equal to 0, got -0.5"),
        (
            "iso_cts",
            "common_space_fraction: 1.5",
            "parameters.common_space_fraction: Input should be less than or equal to 1, got 1.5",
        ),
        (
            "iso_c",
            "common_space_fraction: 0.5",
            "parameters.common_space_fraction: unknown key ('common_space_fraction' belongs to iso_cts); "
            "iso_c takes alpha",
        ),
    ],
)
def test_bad_parameters_are_refused_by_plan(tmp_path, method, parameters, message):
    write_models(tmp_path, random_deltas(2))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\n"
        f"models: [{{model: {tmp_path / 'ft0'}}}, {{model: {tmp_path / 'ft1'}}}]\nparameters: {{{parameters}}}\n"
    )
    result = CliRunner().invoke(cli, ["plan", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {recipe}:4: {message}\n"


# ---- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_cuda_matches_cpu(tmp_path, method):
    """The SVDs run on the GPU (cuSOLVER) in float64: they may differ from LAPACK's in the last bits, and the
    results then round to float32, so the outputs agree to 1e-6 (a few float32 ulps of O(1) values), not
    bit for bit."""
    write_models(tmp_path, random_deltas(3))
    outs = {}
    for device in ("cpu", "cuda"):
        models = ", ".join(f"{{model: {tmp_path / f'ft{i}'}}}" for i in range(3))
        (tmp_path / "r.yaml").write_text(
            f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\nmodels: [{models}]\n"
        )
        result = CliRunner().invoke(
            cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / device), "-q", "--device", device]
        )
        assert result.exit_code == 0, result.output
        outs[device] = load_output(tmp_path / device)
    for name, cpu in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][name], cpu, rtol=1e-6, atol=1e-6, msg=name)


# ---- GPU memory


@pytest.mark.usefixtures("cuda_on_cpu")
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_gpu_estimate_bounds_what_the_svds_hold(tmp_path, method):
    """Plan.gpu_bytes, from the method's GpuFootprint, against what merging a tensor whole holds on the GPU
    (counted on the CPU as tests/test_gpu_memory.py counts it), with 1-3 models and float32 matrices tall and
    wide: at least as much, and at most twice (the footprint adds what torch.linalg.svd holds inside, which
    the count cannot see). In pieces, prepare holds whole matrices all the same, which the plan's per-piece
    figures cannot state (see the report of this change)."""
    from test_gpu_memory import held_whole
    from test_gpu_memory import write_models as gpu_models

    from merger.plan import build_plan
    from merger.recipe import parse_recipe

    root = gpu_models(tmp_path, 3, {"w": (256, 128), "t": (96, 200), "n": (64,)}, torch.float32)
    for n in (1, 2, 3):
        models = ", ".join(f"{{model: {root / f'ft{i}'}}}" for i in range(n))
        recipe = f"merge_method: {method}\nbase_model: {root / 'base'}\nmodels: [{models}]\n"
        plan = build_plan(parse_recipe(recipe), device="cpu")
        plan.device = "cuda"
        for t in plan.tensors:
            estimate, held = plan.gpu_bytes(t), held_whole(plan, t)
            # (vectors merge elementwise, in far less than the matrices' figure, which the method states for all)
            most = 2 * held if len(t.shape) == 2 else estimate
            assert held <= estimate <= most, f"{t.name}, {n} models: estimated {estimate} bytes, held {held}"

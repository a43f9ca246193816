"""Model Stock, Arcee Fusion, RAM and RAM+ through the CLI, each against a float64 oracle written here from
the paper and mergekit's documented behaviour (numpy, not merger's code); chunk-size independence; the
whole-tensor call the GPU path makes; bad parameters refused at their recipe line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint
from test_kernels import as_array, in_pieces, runner

import merger.budget
from merger.cli import cli
from merger.methods import TensorContext, fixed_point, get_method

SHAPES = {"w": (6, 10), "v": (12,), "cube": (2, 3, 5), "same": (4, 8), "ortho": (3, 4), "zero": (5, 3)}


@pytest.fixture
def family(tmp_path):
    """A base and three fine-tunes. 'same': ft0 and ft1 change it identically (cosine 1); 'ortho': ft0 and
    ft1 change different entries of every row (cosine 0); 'zero': nobody changes it."""
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    fts = []
    for i in range(3):
        ft = {n: b + 0.1 * torch.randn(b.shape, generator=g) for n, b in base.items()}
        ft["zero"] = base["zero"].clone()
        ortho = torch.zeros(3, 4)
        ortho[:, i % 4] = 0.5 * (i + 1)
        ft["ortho"] = base["ortho"] + ortho
        fts.append(ft)
    fts[1]["same"] = fts[0]["same"].clone()
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft, n_shards=2)
    return base, fts


def merged(tmp_path, recipe: str, out: str = "out") -> dict[str, torch.Tensor]:
    (tmp_path / "r.yaml").write_text(recipe)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q", "--force"])
    assert result.exit_code == 0, result.output
    return load_output(tmp_path / out)


def recipe(tmp_path, method: str, n: int, params: str = "") -> str:
    models = ", ".join(f"{{model: {tmp_path / f'ft{i}'}}}" for i in range(n))
    text = f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\ndtype: float32\nmodels: [{models}]\n"
    return text + (f"parameters: {{{params}}}\n" if params else "")


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# --- oracles -------------------------------------------------------------------------------------------------


def stock_oracle(xs: list[np.ndarray], b: np.ndarray, filter_wise: bool) -> np.ndarray:
    """Model Stock: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors (mergekit
    floors the product of the norms at 1e-6 and keeps the base where 1 + (N - 1) cos is within 1e-6 of 0)."""
    rows = b.reshape(-1, b.shape[-1]) if filter_wise and b.ndim >= 2 else b.reshape(1, -1)
    ds = [x.reshape(rows.shape) - rows for x in xs]
    n = len(xs)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = np.linalg.norm(ds[i], axis=1) * np.linalg.norm(ds[j], axis=1)
            cos.append(np.clip((ds[i] * ds[j]).sum(1) / np.maximum(norms, 1e-6), -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1, den))
    mean = sum(x.reshape(rows.shape) for x in xs) / n
    return (t * mean + (1 - t) * rows).reshape(b.shape)


def fusion_oracle(x: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arcee Fusion: importance |x - b| * KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) over the last axis; keep
    x where importance >= median + 1.5 (q3 - q1), quartiles the sorted importances at floor(q (n - 1))."""

    def softmax(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(x) + 1e-8, softmax(b) + 1e-8
    importance = np.abs(x - b) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(importance.reshape(-1))
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    keep = importance >= med + 1.5 * (q3 - q1)
    return np.where(keep, x, b), keep


def ram_oracle(xs: list[np.ndarray], b: np.ndarray, eps: float, r: float | None = None, alpha: float = 0):
    """RAM: per entry, the changes (|x_i - b| > eps) of the models that make them, averaged; RAM+ (r given):
    a model's unique changes times 1 + r * min(alpha, shared_i / max(unique_i, eps)), counted over the tensor."""
    ds = np.stack([x - b for x in xs])
    changed = np.abs(ds) > eps
    count = changed.sum(0)
    gains = np.ones(len(xs))
    if r is not None:
        for i in range(len(xs)):
            shared, unique = (changed[i] & (count > 1)).sum(), (changed[i] & (count == 1)).sum()
            if unique:  # else the gain has nothing to scale
                gains[i] = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
    out = b.copy()
    for i in range(len(xs)):
        out += np.where(changed[i] & (count == 1), ds[i] * gains[i], 0)
        out += np.where(changed[i] & (count > 1), ds[i] / np.maximum(count, 1), 0)
    return out


# --- against the oracles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_the_oracle(tmp_path, family, n, filter_wise):
    base, fts = family
    got = merged(tmp_path, recipe(tmp_path, "model_stock", n, f"filter_wise: {str(filter_wise).lower()}"))
    for name, b in base.items():
        want = stock_oracle([np64(ft[name]) for ft in fts[:n]], np64(b), filter_wise)
        torch.testing.assert_close(got[name].double(), torch.from_numpy(want), rtol=2e-6, atol=2e-6, msg=name)


def test_model_stock_edge_cases(tmp_path, family):
    """Identical fine-tunes (cosine 1): t = 1, their mean; orthogonal ones (cosine 0) and zero task vectors:
    t = 0, the base; a 1-D tensor is one row with filter_wise."""
    base, fts = family
    got = merged(tmp_path, recipe(tmp_path, "model_stock", 2))
    torch.testing.assert_close(got["same"], fts[0]["same"])
    assert torch.equal(got["ortho"], base["ortho"]) and torch.equal(got["zero"], base["zero"])
    rows = merged(tmp_path, recipe(tmp_path, "model_stock", 2, "filter_wise: true"), "rows")
    assert torch.equal(rows["v"], got["v"])
    assert torch.equal(rows["ortho"], base["ortho"]) and not torch.equal(rows["w"], got["w"])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the oracle's NaN cosines
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_rows_holding_nan_or_inf_merge_to_nan_as_the_oracle(tmp_path, filter_wise):
    """A task vector's NaN or inf leaves its row (the tensor, without filter_wise) no cosine: NaN there, as the
    oracle (and mergekit) gives, by both paths alike; a huge finite entry is just a number. Before, non-finite
    entries went into the exact sums' integer limbs out of range (undefined behaviour). `merger apply` does not
    write those NaNs where every input is finite: it names the model that holds the NaN."""
    from merger.methods.base import TensorContext

    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 10, generator=g), "v": torch.randn(12, generator=g)}
    fts = [{n: b + 0.1 * torch.randn(b.shape, generator=g) for n, b in base.items()} for _ in range(2)]
    fts[0]["w"][1, 3], fts[0]["w"][2, 0], fts[1]["w"][4, 9] = math.nan, 3e4, math.inf
    fts[1]["v"][5] = -math.inf
    m = get_method("model_stock")
    params = m.params(filter_wise=filter_wise)
    for name, b in base.items():
        want = torch.from_numpy(stock_oracle([np64(ft[name]) for ft in fts], np64(b), filter_wise))
        assert want.isnan().any() and (not filter_wise or name == "v" or not want.isnan().all())
        xs = [ft[name] for ft in fts]
        eager = m.fn(xs, b, [m.model_params()] * 2, params)
        fused = _fused_path(m, xs, b, params, TensorContext(name, shape=tuple(b.shape)), 7, 11).reshape(b.shape)
        for out in (fused, eager):
            torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6, equal_nan=True, msg=name)
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    (tmp_path / "r.yaml").write_text(recipe(tmp_path, "model_stock", 2, f"filter_wise: {str(filter_wise).lower()}"))
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr.startswith("error: tensor ") and "1 entry of '" in result.stderr
    assert "and model_stock spreads it over the tensor" in result.stderr


def _stock_case(case: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two fine-tunes of a (300, 300) base, more entries than fixed_point.SAMPLE: plain; with an entry after the
    first SAMPLE entries some 70 times the largest of theirs (beyond the guess's 16-32 times); with one task
    vector 0 over the first SAMPLE entries; with a NaN after them."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(300, 300, generator=g)
    xs = [base + 0.01 * torch.randn(300, 300, generator=g) for _ in range(2)]
    far = xs[1].view(-1)[fixed_point.SAMPLE + 7 :]
    if case == "outlier":
        far[0] += 3.0
    elif case == "zero-head":
        xs[0].view(-1)[: fixed_point.SAMPLE] = base.view(-1)[: fixed_point.SAMPLE]
    elif case == "nan":
        far[0] = math.nan
    return xs, base


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the oracle's NaN cosine
@pytest.mark.parametrize(
    "case, sums_passes, peak_passes, filter_wise",
    [("plain", 1, 0, False), ("outlier", 2, 0, False), ("zero-head", 1, 1, False), ("nan", 2, 1, True)],
)
def test_model_stock_sums_at_scales_guessed_from_the_first_entries(
    monkeypatch, case, sums_passes, peak_passes, filter_wise
):
    """The sums' scales: guessed from the first SAMPLE entries and kept where the sums' own pass finds every entry
    below them (one pass), else the peaks' (a second sums pass, and a peaks pass where the first could not give
    them). The fused kernels and the torch path, whole and in chunks of 7000, make the same passes, sum at the
    same scales to the same integers, and write the same bytes; the output is the oracle's (NaN in the NaN's
    row alone, with filter_wise)."""
    from merger.methods import selection
    from merger.methods import selection_kernels as sk

    xs, base = _stock_case(case)
    m = get_method("model_stock")
    models, params = [m.model_params()] * 2, m.params(filter_wise=filter_wise)
    context = TensorContext("w", seed=0, shape=tuple(base.shape))
    calls, sums = {"sums": 0, "peaks": 0, "torch sums": 0, "torch peaks": 0}, []

    def counted(key, fn, is_pass=lambda *args: True):
        def call(*args, **kwargs):
            calls[key] += is_pass(*args)
            return fn(*args, **kwargs)

        return call

    def kept(fn):
        def call(*args):
            sums.append(fn(*args))
            return sums[-1]

        return call

    monkeypatch.setattr(sk, "abs_peaks", counted("peaks", sk.abs_peaks, lambda xs, b, run: b.size > fixed_point.SAMPLE))
    monkeypatch.setattr(sk, "stock_sums", counted("sums", sk.stock_sums))
    monkeypatch.setattr(selection, "_stock_sums_pass", counted("torch sums", selection._stock_sums_pass))
    monkeypatch.setattr(
        selection, "_stock_peaks", counted("torch peaks", selection._stock_peaks, lambda tv, limit=None: limit is None)
    )
    monkeypatch.setattr(selection, "stock_sums_by_guess", kept(selection.stock_sums_by_guess))
    out = torch.empty(base.numel())
    arrays = [as_array(x.reshape(-1)) for x in xs]
    in_pieces(
        m.fused(arrays, as_array(base.view(-1)), models, params, runner(4099, 2), context=context), as_array(out), 5003
    )
    whole = m.fn(xs, base, models, params, context=context).reshape(-1)

    def chunks():
        return (
            [x.view(-1)[s : s + 7000] - base.view(-1)[s : s + 7000] for x in xs] for s in range(0, out.numel(), 7000)
        )

    state = selection.model_stock_prepare(chunks, out.numel(), models, params, context=context)
    pieces = m.fn(xs, base, models, params, state, context=context).reshape(-1)
    passes = {"sums": sums_passes, "peaks": peak_passes}
    assert calls == {**passes, **{f"torch {k}": 2 * v for k, v in passes.items()}}  # whole, then in chunks
    assert len(sums) == 3
    for s in sums[1:]:
        for field in ("hi", "lo", "bad", "exponent"):
            assert np.array_equal(getattr(s, field), getattr(sums[0], field)), field
    for got in (whole, pieces):
        assert torch.equal(got.nan_to_num(7.0).view(torch.int32), out.nan_to_num(7.0).view(torch.int32))
    want = torch.from_numpy(stock_oracle([np64(x) for x in xs], np64(base), filter_wise)).reshape(-1)
    assert want.isnan().any() == (case == "nan") and not want.isnan().all()
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6, equal_nan=True)


def test_arcee_fusion_equals_the_oracle(tmp_path, family):
    base, fts = family
    got = merged(tmp_path, recipe(tmp_path, "arcee_fusion", 1))
    kept = 0
    for name, b in base.items():
        want, keep = fusion_oracle(np64(fts[0][name]), np64(b))
        torch.testing.assert_close(got[name].double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6, msg=name)
        kept += keep.sum()
        if name == "zero":  # no change: every importance 0, the threshold 0, the base kept
            assert torch.equal(got[name], b)
    assert 0 < kept < sum(b.numel() for b in base.values())  # a selection, not all or nothing


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ram_equals_the_oracle(tmp_path, family, n):
    base, fts = family
    got = merged(tmp_path, recipe(tmp_path, "ram", n, "epsilon: 0.05"))
    for name, b in base.items():
        want = ram_oracle([np64(ft[name]) for ft in fts[:n]], np64(b), 0.05)
        torch.testing.assert_close(got[name].double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("settings", [(0.1, 0.2, 0.05), (0.5, 10.0, 0.08), (1.0, 0.5, 0.0)])
def test_ramplus_tl_equals_the_oracle(tmp_path, family, n, settings):
    r, alpha, eps = settings
    base, fts = family
    got = merged(tmp_path, recipe(tmp_path, "ramplus_tl", n, f"r: {r}, alpha: {alpha}, epsilon: {eps}"))
    for name, b in base.items():
        want = ram_oracle([np64(ft[name]) for ft in fts[:n]], np64(b), eps, r, alpha)
        torch.testing.assert_close(got[name].double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6, msg=name)


def test_ramplus_tl_scales_unique_changes_only_when_models_overlap(tmp_path, family):
    """One model: nothing is shared, rho = 0, RAM+ is RAM."""
    a = merged(tmp_path, recipe(tmp_path, "ram", 1), "ram")
    b = merged(tmp_path, recipe(tmp_path, "ramplus_tl", 1, "r: 1, alpha: 1"), "plus")
    assert all(torch.equal(a[n], b[n]) for n in a)


# --- chunks, the whole-tensor path, parameters ----------------------------------------------------------------

RECIPES = {
    "model_stock": ("model_stock", 3, ""),
    "model_stock_rows": ("model_stock", 3, "filter_wise: true"),
    "arcee_fusion": ("arcee_fusion", 1, ""),
    "ram": ("ram", 3, "epsilon: 0.05"),
    "ramplus_tl": ("ramplus_tl", 3, "epsilon: 0.05, r: 0.5, alpha: 1"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_output_does_not_depend_on_the_chunk_size(tmp_path, family, monkeypatch, case):
    method, n, params = RECIPES[case]
    outs = {}
    for chunk in (7, 1 << 18):
        monkeypatch.setattr(merger.budget, "CHUNK", chunk)
        outs[chunk] = merged(tmp_path, recipe(tmp_path, method, n, params), f"c{chunk}")
    for name in outs[7]:
        assert torch.equal(outs[7][name], outs[1 << 18][name]), name


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_the_whole_tensor_call_equals_the_chunked_merge(tmp_path, family, case):
    """fn on whole shaped tensors with no state (what the GPU path calls) computes its own state: the same
    bytes as the CPU's prepare and chunks."""
    method, n, params = RECIPES[case]
    base, fts = family
    got = merged(tmp_path, recipe(tmp_path, method, n, params))
    m = get_method(method)
    values = dict(kv.split(": ") for kv in params.split(", ")) if params else {}
    p = m.params.model_validate(values)
    for name, b in base.items():
        whole = m.fn([ft[name] for ft in fts[:n]], b, [m.model_params()] * n, p)
        assert whole.shape == b.shape and torch.equal(whole, got[name]), name


@pytest.mark.parametrize(
    ("method", "n", "params", "line", "message"),
    [
        ("model_stock", 1, "", 4, "models: model_stock compares the task vectors of two or more models, not 1: "
         "give at least two models besides the base model"),
        ("arcee_fusion", 2, "", 4, "models: arcee_fusion fuses one model into the base model, not 2: give one "
         "model besides the base"),
        ("ram", 2, "epsilon: -1", 5, "parameters.epsilon: Input should be greater than or equal to 0, got -1"),
        ("ramplus_tl", 2, "alpha: -0.5", 5, "parameters.alpha: Input should be greater than or equal to 0, got -0.5"),
        ("model_stock", 2, "filter_wize: true", 5, "parameters.filter_wize: unknown key (did you mean 'filter_wise'?)"),
    ],
)  # fmt: skip
def test_bad_parameters_are_refused_at_their_line(tmp_path, family, method, n, params, line, message):
    (tmp_path / "r.yaml").write_text(recipe(tmp_path, method, n, params))
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    where = f"{tmp_path / 'r.yaml'}" + (f":{line}" if line else "")
    assert result.stderr == f"error: {where}: {message}\n"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(RECIPES))
def test_cuda_equals_cpu_bytes(tmp_path, family, case):
    method, n, params = RECIPES[case]
    (tmp_path / "r.yaml").write_text(recipe(tmp_path, method, n, params))
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(
            cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / device), "-q", "--device", device]
        )
        assert result.exit_code == 0, result.output
    for f in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert (tmp_path / "cuda" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("method", ["model_stock", "sce", "karcher"])
def test_methods_that_mergekit_runs_unweighted_accept_and_ignore_weights(tmp_path, method):
    """A per-model weight in a Model Stock, SCE or Karcher config changes nothing in mergekit 0.1.5 (its
    resolve_parameters reads only the parameters a method declares: model_stock and sce declare no weight,
    and karcher weighs its models equally), so merger takes it and writes the same bytes with or without
    it; the model card does not list it as used."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(4, 6, generator=g)}
    for name in ("base", "a", "b"):
        write_checkpoint(
            tmp_path / name,
            {"w": base["w"] + (0 if name == "base" else 0.1) * torch.randn(4, 6, generator=g)},
            n_shards=1,
        )
    outs = []
    for weights in ("", "{weight: 0.3}", "{weight: 2.0}"):
        params = f", parameters: {weights}" if weights else ""
        (tmp_path / "r.yaml").write_text(
            f"merge_method: {method}\nbase_model: {tmp_path}/base\n"
            f"models: [{{model: {tmp_path}/a{params}}}, {{model: {tmp_path}/b}}]\n"
        )
        out = tmp_path / f"out{len(outs)}"
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        outs.append(load_output(out)["w"])
        assert "weight" not in (out / "README.md").read_text().split("## Recipe")[0]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# --- the fused CPU kernels (selection_kernels) against the torch path -----------------------------------------

FUSED_CASES = {  # case: (method, models, parameters)
    "arcee_fusion": ("arcee_fusion", 1, {}),
    "model_stock": ("model_stock", 3, {}),
    "model_stock_2": ("model_stock", 2, {}),
    "model_stock_rows": ("model_stock", 3, {"filter_wise": True}),
    "model_stock_rows_4": ("model_stock", 4, {"filter_wise": True}),
    "ram": ("ram", 3, {"epsilon": 0.004}),
    "ram_1": ("ram", 1, {"epsilon": 0.004}),
    "ramplus_tl": ("ramplus_tl", 3, {"epsilon": 0.004, "r": 0.5, "alpha": 1.0}),
    "ramplus_tl_2": ("ramplus_tl", 2, {"epsilon": 0.003, "r": 1.0, "alpha": 0.05}),
    "ramplus_tl_eps0": ("ramplus_tl", 3, {"epsilon": 0.0, "r": 0.1, "alpha": 0.2}),
}


def _as_array(t: torch.Tensor) -> np.ndarray:
    """The numpy view the kernels read (as sources.MappedReader makes them)."""
    return (
        t.numpy()
        if t.dtype == torch.float32
        else t.view(torch.int16).numpy().view({torch.bfloat16: np.int16, torch.float16: np.uint16}[t.dtype])
    )


def _runner(size: int):
    def run(fn, n, part=None):
        part = part or size
        return [fn(s, min(s + part, n)) for s in range(0, n, part)]

    return run


def _family(shape, dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + 0.01 * (i + 1) * torch.randn(shape, generator=g)).to(dtype) for i in range(n)]
    if n > 1 and base.numel():  # some entries changed by one model only, some by none
        xs[1].reshape(-1)[::3] = base.reshape(-1)[::3]
        xs[0].reshape(-1)[::5] = base.reshape(-1)[::5]
    return base, xs


def _torch_path(m, xs, base, params, context, chunk):
    """What the engine's eager CPU path computes: prepare over flat chunks in float32, then fn chunk by chunk."""
    from merger.methods.base import TensorContext

    flat = [x.float().reshape(-1) for x in xs]
    b = base.float().reshape(-1)
    n = b.numel()
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    models = [m.model_params()] * len(xs)
    state = None
    if m.prepare is not None:
        state = m.prepare(
            lambda: [[x[s:e] - b[s:e] for x in flat] for s, e in bounds],
            n,
            models,
            params,
            context=context,
            inputs=lambda: [([x[s:e].clone() for x in flat], b[s:e].clone()) for s, e in bounds],
        )
    out = torch.empty(n, dtype=base.dtype)
    ctx = TensorContext(context.name, shape=())  # fn sees flat chunks
    for s, e in bounds:
        if state is None:
            out[s:e] = m.fn([x[s:e] for x in flat], b[s:e], models, params, context=ctx).to(base.dtype)
        else:
            out[s:e] = m.fn([x[s:e] for x in flat], b[s:e], models, params, state, s, context=ctx).to(base.dtype)
    return out


def _fused_path(m, xs, base, params, context, chunk, piece):
    out = torch.empty(base.numel(), dtype=base.dtype)
    arrays = [_as_array(x.reshape(-1)) for x in xs]
    merge_range = m.fused(
        arrays, _as_array(base.reshape(-1)), [m.model_params()] * len(xs), params, _runner(chunk), context=context
    )
    view = _as_array(out)
    for s in range(0, view.size, piece):
        merge_range(s, min(s + piece, view.size), view[s : s + piece])
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (1001,), (33, 31), (3, 5, 67), (40, 1100), (0,)])
def test_fused_is_byte_identical_to_the_torch_path(case, dtype, shape):
    from merger.methods.base import TensorContext

    method, n, values = FUSED_CASES[case]
    m = get_method(method)
    params = m.params.model_validate(values)
    base, xs = _family(shape, dtype, n, seed=len(case) + len(shape))
    context = TensorContext("t", shape=shape)
    want = _torch_path(m, xs, base, params, context, chunk=1 << 18)
    for chunk, piece in ((1 << 18, 1 << 18), (7, 5), (1000, 333)):
        got = _fused_path(m, xs, base, params, context, chunk, piece)
        assert _same_bytes(got, want), (chunk, piece, (got.float() - want.float()).abs().max())
    assert _same_bytes(_torch_path(m, xs, base, params, context, chunk=7), want)  # chunking the torch path


@pytest.mark.parametrize("case", sorted(RECIPES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_cli_merges_the_same_bytes_with_and_without_the_fused_kernels(tmp_path, family, monkeypatch, case, dtype):
    """The engine through each method's fused kernel (stored bfloat16 or float32, float32 compute) and through
    torch: the same output bytes, in small chunks too."""
    import merger.stream

    method, n, params = RECIPES[case]
    text = recipe(tmp_path, method, n, params).replace("dtype: float32\n", f"dtype: {dtype}\n")
    used = []
    real = merger.stream.Merger._fusable
    monkeypatch.setattr(merger.stream.Merger, "_fusable", lambda self, t: used.append(real(self, t)) or used[-1])
    fast = merged(tmp_path, text, "fused")
    assert any(used) == (get_method(method).fused is not None)
    monkeypatch.setattr(merger.budget, "CHUNK", 7)
    small = merged(tmp_path, text, "small")
    monkeypatch.setattr(merger.stream, "_kernels", lambda: None)
    slow = merged(tmp_path, text, "eager")
    for name in slow:
        assert _same_bytes(fast[name], slow[name]) and _same_bytes(small[name], slow[name]), name


def _fusion_inputs(shape, dtype, seed):
    """A base and a fine-tune on a coarse grid (ties among the importances, at every quartile), whose first
    rows are special: the fine-tune equal to the base (KL 0), both constant (uniform softmaxes), the fine-tune
    constant over a varying base."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 4).round() / 4
    x = base + (torch.randn(shape, generator=g) * 2).round() / 8
    rows, xr = base.reshape(-1, shape[-1]), x.reshape(-1, shape[-1])
    if rows.shape[0] >= 3:
        xr[0] = rows[0]
        rows[1], xr[1] = 0.5, -1.25
        xr[2] = 3.0
    return base.to(dtype), [x.to(dtype)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 300), (7, 1), (1, 2000), (64, 7), (3, 4), (2, 2, 129)])
@pytest.mark.parametrize("split", ["default", "a row a part, exps computed twice"])
def test_fused_arcee_fusion_on_ties_and_special_rows(monkeypatch, dtype, shape, split):
    """The fused path's bytes are the torch path's where importances tie, rows are constant or unchanged,
    the torch path's chunks cut rows, and the kernel's parts hold one row each or keep no exps."""
    from merger.methods import selection_kernels
    from merger.methods.base import TensorContext

    if split != "default":
        monkeypatch.setattr(selection_kernels, "ROWS_PART", 1)
        monkeypatch.setattr(selection_kernels, "SCRATCH", 100)
    m = get_method("arcee_fusion")
    base, xs = _fusion_inputs(shape, dtype, seed=len(shape))
    context = TensorContext("t", shape=shape)
    want = _torch_path(m, xs, base, m.params(), context, chunk=7)
    for chunk, piece in ((1 << 18, 1 << 18), (3, 11)):
        assert _same_bytes(_fused_path(m, xs, base, m.params(), context, chunk, piece), want), (chunk, piece)


@pytest.mark.parametrize("shape", [(300, 257), (1, 70_001)])
@pytest.mark.parametrize("miss", [None, "above", "below"])
def test_fused_arcee_fusion_of_a_sampled_tensor(monkeypatch, shape, miss):
    """Past kernels.EXACT_BELOW entries the quartiles come from a sample's bands and one pass over the inputs
    computing the importances as it goes (rows of 257 cut by blocks, chunks and pieces; one row of 70001):
    the torch path's bytes, also where a band misses its quartile and is widened."""
    from merger import kernels
    from merger.methods.base import TensorContext

    assert math.prod(shape) > kernels.EXACT_BELOW
    real_band = kernels._band
    widened = []

    def unlucky(hist, p, widen):  # every first band lies wholly on one side of its quartile
        widened.append(widen)
        lo, hi = real_band(hist, p, widen)
        if widen > 1 or miss is None:
            return lo, hi
        return (hi * 1.5, hi * 2) if miss == "above" else (lo / 3, lo / 2)

    monkeypatch.setattr(kernels, "_band", unlucky)
    m = get_method("arcee_fusion")
    base, xs = _fusion_inputs(shape, torch.bfloat16, seed=11)
    context = TensorContext("t", shape=shape)
    want = _torch_path(m, xs, base, m.params(), context, chunk=1 << 18)
    got = _fused_path(m, xs, base, m.params(), context, 1000, 777)
    assert _same_bytes(got, want)
    assert widened.count(1) == 3 and widened.count(4) == (0 if miss is None else 3)


@pytest.mark.parametrize("shape", [(33, 31), (300, 257)])  # gathered whole, and through sampled bands
def test_fused_arcee_fusion_counts_quartile_bands_too_large_to_gather(monkeypatch, shape):
    from test_kernels import count_every_band

    calls = count_every_band(monkeypatch)
    m = get_method("arcee_fusion")
    base, xs = _fusion_inputs(shape, torch.bfloat16, seed=12)
    context = TensorContext("t", shape=shape)
    want = _torch_path(m, xs, base, m.params(), context, chunk=1 << 18)
    assert _same_bytes(_fused_path(m, xs, base, m.params(), context, 1000, 777), want) and calls


def test_fused_arcee_fusion_counts_nan_importances_of_either_sign_in_its_histogram():
    """An importance of inf * 0 (x -inf where the base is -1e30, the rows' softmaxes equal: KL 0) is a NaN with
    its sign set: the sample's histogram counts it in its NaN bins, not past its end, and both paths refuse the
    tensor with the same count."""
    from merger import kernels
    from merger.errors import NaNTaskVector
    from merger.methods import selection_kernels as sk
    from merger.methods.base import TensorContext

    shape = (300, 257)
    base, xs = _fusion_inputs(shape, torch.float32, seed=2)
    x = base.clone()
    x[:, 0], base[:, 0] = -float("inf"), -1e30
    xa, ba = _as_array(x.reshape(-1)), _as_array(base.reshape(-1))
    kl = sk.fusion_divergences(xa, ba, 257, 20, 1e-8, 5, _runner(1 << 18))
    assert not kl.any() and torch.isinf(x[:, 0] - base[:, 0]).all()  # |x - b| * kl: inf * 0
    hist = np.zeros((2, kernels.RADIX_BINS), np.int64)  # the row after the histogram: written past its end?
    starts = np.arange(0, xa.size - kernels.SAMPLE_RUN, 257 * 3, dtype=np.int64)
    sk._fusion_sample(xa, ba, kl, 257, starts, kernels.SAMPLE_RUN, hist[0])
    assert not hist[1].any() and hist[0].sum() == starts.size * kernels.SAMPLE_RUN
    assert hist[0, 0x7FC0] == np.count_nonzero((starts[:, None] + np.arange(kernels.SAMPLE_RUN)) % 257 == 0)
    m = get_method("arcee_fusion")
    context = TensorContext("t", shape=shape)
    counts = []
    for path in (
        lambda: _torch_path(m, [x], base, m.params(), context, chunk=1 << 18),
        lambda: _fused_path(m, [x], base, m.params(), context, 1 << 18, 1 << 18),
    ):
        with pytest.raises(NaNTaskVector) as e:
            path()
        counts.append((e.value.model, e.value.count))
    assert counts == [(0, 300)] * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_arcee_fusion_of_an_unchanged_tensor_is_the_base(dtype):
    """No task vector: every importance 0, the threshold 0, every entry kept: x - base + base, the base."""
    from merger.methods.base import TensorContext

    m = get_method("arcee_fusion")
    base = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    base[0, :3] = -0.0  # 0 + -0.0 is 0.0: the merge writes the torch path's zeros
    context = TensorContext("t", shape=(6, 50))
    want = _torch_path(m, [base.clone()], base, m.params(), context, chunk=1 << 18)
    got = _fused_path(m, [base.clone()], base, m.params(), context, 1 << 18, 1 << 18)
    assert _same_bytes(got, want) and torch.equal(got.float(), base.reshape(-1).float())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_fused_arcee_fusion_refuses_what_the_torch_path_refuses(bad):
    """A row holding NaN or +inf has no softmax: both paths raise NaNTaskVector with the same count."""
    from merger.errors import NaNTaskVector
    from merger.methods.base import TensorContext

    m = get_method("arcee_fusion")
    base, xs = _fusion_inputs((4, 30), torch.float32, seed=3)
    xs[0][3, 5] = bad
    context = TensorContext("t", shape=(4, 30))
    counts = []
    for path in (
        lambda: _torch_path(m, xs, base, m.params(), context, chunk=7),
        lambda: _fused_path(m, xs, base, m.params(), context, 1 << 18, 1 << 18),
    ):
        with pytest.raises(NaNTaskVector) as e:
            path()
        counts.append((e.value.model, e.value.count, e.value.why))
    assert counts[0] == counts[1] and counts[0][:2] == (0, 30) and "no softmax" in counts[0][2]


@pytest.mark.parametrize("row", ["beyond the table", "float32 values", "a peak beyond it", "at the bound"])
def test_fused_arcee_fusion_where_exps_leave_the_table(row):
    """Rows whose exps come from exp_ rather than the bfloat16 table, wholly or entry by entry: the torch
    path's bytes."""
    from merger.methods.base import TensorContext

    m = get_method("arcee_fusion")
    base, xs = _fusion_inputs((4, 30), torch.float32, seed=5)
    x = xs[0]
    if row == "beyond the table":
        x[1, ::3] = 100.0
    if row == "float32 values":
        x[2, ::4] += 1e-3
    if row == "a peak beyond it":
        base[3, 7] = 70.0
    if row == "at the bound":
        x[0, :5] = 64.0
        base[0, 5:9] = -64.0
    context = TensorContext("t", shape=(4, 30))
    want = _torch_path(m, xs, base, m.params(), context, chunk=7)
    assert _same_bytes(_fused_path(m, xs, base, m.params(), context, 1 << 18, 1 << 18), want)


def test_fused_arcee_fusion_of_minus_infinity():
    """-inf in a row with a finite maximum: its exp is 0, its importance inf; the torch path's bytes."""
    from merger.methods.base import TensorContext

    m = get_method("arcee_fusion")
    base, xs = _fusion_inputs((4, 30), torch.float32, seed=3)
    xs[0][3, 5] = -float("inf")
    context = TensorContext("t", shape=(4, 30))
    want = _torch_path(m, xs, base, m.params(), context, chunk=7)
    assert _same_bytes(_fused_path(m, xs, base, m.params(), context, 1 << 18, 1 << 18), want)
    assert want[3 * 30 + 5] == -float("inf")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(33, 31), (1001,), (40, 1100)])
def test_arcee_fusion_on_cuda_gives_the_cpu_bytes(shape):
    """The torch path on a GPU (whole tensors, as the engine's GPU path calls it) and on the CPU: the same
    bytes (exp and log from merger.methods.elementary, sums in integers)."""
    m = get_method("arcee_fusion")
    base, xs = _family(shape, torch.float32, 1, seed=4)
    want = m.fn(xs, base, [m.model_params()], m.params())
    got = m.fn([xs[0].cuda()], base.cuda(), [m.model_params()], m.params()).cpu()
    assert _same_bytes(got, want)

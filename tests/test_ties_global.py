"""TIES with the paper's global trim (trim_scope: model): one magnitude threshold per model over its whole
task vector, every tensor's entries ranked together, checked against a float64 oracle written here from
the paper (Yadav et al. 2023, section 3: trim, elect, disjoint merge)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint

from merger.cli import cli

# Tensors of very different scales: a per-tensor trim keeps half of each, the global one mostly the big ones.
SHAPES = {"embed.weight": (8, 4), "layers.0.w": (6, 5), "layers.1.w": (7, 3), "norm.weight": (5,)}
SCALE = {"embed.weight": 1.0, "layers.0.w": 0.1, "layers.1.w": 3.0, "norm.weight": 0.01}


@pytest.fixture
def family(tmp_path):
    g = torch.Generator().manual_seed(3)
    states = {}
    for m in ("base", "a", "b"):
        spread = 0.0 if m == "base" else 1.0
        states[m] = {n: torch.randn(s, generator=g) * SCALE[n] * spread for n, s in SHAPES.items()}
        if m != "base":
            states[m] = {n: states[m][n] + states["base"][n] for n in SHAPES}
        write_checkpoint(tmp_path / m, states[m], n_shards=2)
    return states


def oracle(states, densities, weights, names):
    """The paper's TIES with the trim over each model's whole task vector (tensors in `names` order, ties
    at the threshold to the lowest index); elected sign = sign of the sum; mean of the agreeing entries
    weighted by |w|; base + result."""
    flat = lambda s: np.concatenate([s[n].double().numpy().ravel() for n in names])  # noqa: E731
    base = flat(states["base"])
    trimmed = []
    for m, d, w in zip(("a", "b"), densities, weights):
        delta = flat(states[m]) - base
        k = sum(max(1, int(np.floor(d * np.prod(SHAPES[n])))) for n in names) if d > 0 else 0
        order = np.argsort(-np.abs(delta), kind="stable")
        keep = np.zeros(delta.size, bool)
        keep[order[:k]] = True
        trimmed.append(np.where(keep, delta, 0.0) * w)
    trimmed = np.stack(trimmed)  # (models, entries)
    sign = np.sign(trimmed.sum(0))
    agree = np.sign(trimmed) == sign
    agree &= sign != 0
    num = np.where(agree, trimmed, 0).sum(0)
    den = np.where(agree, np.abs(np.array(weights))[:, None], 0).sum(0)
    merged = base + np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    out, at = {}, 0
    for n in names:
        size = int(np.prod(SHAPES[n]))
        out[n] = torch.from_numpy(merged[at : at + size].reshape(SHAPES[n]))
        at += size
    return out


def recipe(tmp_path, scope: str, extra: str = "") -> str:
    return (
        f"merge_method: ties\nbase_model: {tmp_path}/base\ndtype: float32\n"
        f"parameters: {{trim_scope: {scope}}}\n{extra}"
        f"models:\n  - model: {tmp_path}/a\n    parameters: {{weight: 0.7, density: 0.3}}\n"
        f"  - model: {tmp_path}/b\n    parameters: {{weight: 1.2, density: 0.6}}\n"
    )


def merge(tmp_path, text: str, *args: str) -> dict[str, torch.Tensor]:
    (tmp_path / "r.yaml").write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(out), "-q", "--force", *args])
    assert result.exit_code == 0, result.output
    return load_output(out)


@pytest.mark.parametrize("compute", ["float32", "float64"])  # the fused kernel, and torch
def test_the_global_trim_ranks_every_tensor_of_a_model_together(tmp_path, family, compute):
    got = merge(tmp_path, recipe(tmp_path, "model", f"compute_dtype: {compute}\n"))
    names = sorted(SHAPES, key=lambda n: (n.startswith("norm"), n))  # the plan's order: embed, layers, norm
    want = oracle(family, (0.3, 0.6), (0.7, 1.2), names)
    for n in SHAPES:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=1e-7, msg=n)
    # and it is not the per-tensor trim: the small-scale tensors lose most of their entries
    per_tensor = merge(tmp_path, recipe(tmp_path, "tensor"))
    assert not torch.equal(per_tensor["layers.0.w"], got["layers.0.w"])
    changed = lambda out: int((out["layers.0.w"] != family["base"]["layers.0.w"]).sum())  # noqa: E731
    assert changed(got) < changed(per_tensor) / 3  # its 0.1-scale deltas mostly trimmed


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("compute", ["float32", "float64"])  # the fused kernel, and torch
def test_density_zero_keeps_none_of_a_models_task_vector(tmp_path, family, scope, compute):
    """As mergekit's magnitude: density 0 zeroes the task vector, so the model neither votes nor counts in
    the mean (the merge is b's trim alone), in either trim scope and on either path."""
    text = recipe(tmp_path, scope, f"compute_dtype: {compute}\n").replace("density: 0.3", "density: 0")
    got = merge(tmp_path, text)
    names = sorted(SHAPES, key=lambda n: (n.startswith("norm"), n))
    if scope == "model":
        want = oracle(family, (0.0, 0.6), (0.7, 1.2), names)
    else:
        want = {n: oracle(family, (0.0, 0.6), (0.7, 1.2), [n])[n] for n in names}
    for n in SHAPES:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=1e-7, msg=n)


def test_the_global_trim_is_the_same_in_chunks_and_with_workers(tmp_path, family, monkeypatch):
    import merger.budget

    whole = merge(tmp_path, recipe(tmp_path, "model"))
    monkeypatch.setattr(merger.budget, "CHUNK", 7)
    for args in ((), ("--workers", "2"), ("--device", "cpu")):
        got = merge(tmp_path, recipe(tmp_path, "model", "compute_dtype: float64\n"), *args)
        for n in SHAPES:
            torch.testing.assert_close(got[n], whole[n], rtol=1e-6, atol=1e-7, msg=f"{n} {args}")
    small = merge(tmp_path, recipe(tmp_path, "model"), "--workers", "2")
    assert all(torch.equal(small[n], whole[n]) for n in SHAPES)  # the fused path, in 7-entry chunks: same bytes


def test_the_global_trim_is_refused_with_slices(tmp_path, family):
    (tmp_path / "r.yaml").write_text(
        f"merge_method: ties\nbase_model: {tmp_path}/base\nparameters: {{trim_scope: model}}\n"
        f"slices:\n  - sources: [{{model: {tmp_path}/base, layer_range: [0, 2]}}, {{model: {tmp_path}/a, layer_range: [0, 2]}}]\n"
    )
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {tmp_path / 'r.yaml'}:3: parameters: ties with trim_scope: model ranks each model's whole task "
        "vector, which slices spread over several slices; use models: (or trim_scope: tensor)\n"
    )


def test_plan_says_the_models_are_read_first_and_low_disk_is_refused(tmp_path, family):
    (tmp_path / "r.yaml").write_text(recipe(tmp_path, "model"))
    shown = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert shown.exit_code == 0 and "and before merging, ties reads the models through a few times" in shown.output
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--low-disk"])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --low-disk fetches Hub shards as the merge reads them, but ties reads every input before merging "
        "(trim_scope: model): leave out --low-disk\n"
    )
    assert not (tmp_path / "out").exists()

"""GPU paths: every method gives the CPU's result within float32 rounding. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import RECIPES, load_output

from merger.cli import cli

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def assert_cuda_equals_cpu(tmp_path, paths, method):
    """The method's recipe merged with --device cpu and --device cuda: the same tensors within float32
    rounding."""
    (tmp_path / "r.yaml").write_text(
        RECIPES[method].format(**{k: str(v) for k, v in paths.items()}) + "out_dtype: float32\n"
    )
    outs = {}
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(
            cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / device), "--device", device, "-q"]
        )
        assert result.exit_code == 0, result.output
        outs[device] = load_output(tmp_path / device)
    for name, cpu in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][name], cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_gpu_equals_cpu(tmp_path, family, method):
    assert_cuda_equals_cpu(tmp_path, family[0], method)


def test_gpu_json_reports_gpu_memory(tmp_path, family):
    import json

    paths, _ = family
    (tmp_path / "r.yaml").write_text(RECIPES["ties"].format(**{k: str(v) for k, v in paths.items()}))
    result = CliRunner().invoke(
        cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o"), "--json", "--device", "cuda"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["device"] == "cuda" and summary["peak_gpu_bytes"] > 0


SOUP_EVAL = """\
def score(candidate):  # lower is better: how far the soup's mean weight is from 0.1
    return abs(float(candidate.state_dict()["layers.0.w"].mean()) - 0.1)
"""


def test_gpu_greedy_soup_equals_cpu(tmp_path, family, monkeypatch):
    """The search's soups are merged on the GPU too: the same choice, and the same soup as on the CPU."""
    import json

    paths, _ = family
    monkeypatch.chdir(tmp_path)
    (tmp_path / "soupeval.py").write_text(SOUP_EVAL)
    models = "".join(f"  - model: {paths[m]}\n" for m in ("ft1", "ft2", "ft3", "base"))
    (tmp_path / "r.yaml").write_text(
        f"merge_method: greedy_soup\nmodels:\n{models}out_dtype: float32\n"
        "evaluation:\n  evaluator: python\n  function: soupeval:score\n  direction: lower\n  cache: false\n"
    )
    reports, outs = {}, {}
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(
            cli, ["apply", "r.yaml", "-o", str(tmp_path / device), "--device", device, "--json"]
        )
        assert result.exit_code == 0, result.output
        reports[device] = json.loads(result.stdout)["greedy_soup"]
        outs[device] = load_output(tmp_path / device)
    assert reports["cuda"]["selected"] == reports["cpu"]["selected"]
    assert reports["cuda"]["score"] == pytest.approx(reports["cpu"]["score"], abs=1e-6)
    for name, cpu in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][name], cpu, rtol=1e-6, atol=1e-6)


def test_gpu_ties_treats_non_finite_weights_as_the_cpu_does(tmp_path, family):
    """Infinities (kept, trimmed, or voting against each other) merge to the CPU's bits; a NaN where a
    trim is needed is refused with the CPU's message."""
    from conftest import write_checkpoint

    paths, models = family
    ft1 = dict(models["ft1"])
    ft1["layers.0.w"] = ft1["layers.0.w"].clone()
    ft1["layers.0.w"][0, :3] = float("inf")
    ft2 = dict(models["ft2"])
    ft2["layers.0.w"] = ft2["layers.0.w"].clone()
    ft2["layers.0.w"][0, 0] = float("-inf")
    write_checkpoint(tmp_path / "inf1", ft1)
    write_checkpoint(tmp_path / "inf2", ft2)
    recipe = RECIPES["ties"].format(base=paths["base"], ft1=tmp_path / "inf1", ft2=tmp_path / "inf2")
    (tmp_path / "r.yaml").write_text(recipe.replace("density: 0.3", "density: 0.02") + "out_dtype: float32\n")
    outs = {}
    for device in ("cpu", "cuda"):
        args = ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / device), "--device", device, "-q"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        outs[device] = load_output(tmp_path / device)
    for name, cpu in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][name], cpu, rtol=1e-6, atol=1e-6, equal_nan=True)

    ft2["layers.0.w"][1, 1] = float("nan")
    write_checkpoint(tmp_path / "inf2", ft2)
    errors = {}
    for device in ("cpu", "cuda"):
        args = ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / f"nan-{device}"), "--device", device]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        errors[device] = result.stderr
    assert errors["cuda"] == errors["cpu"] and "'layers.0.w'" in errors["cpu"] and "NaN" in errors["cpu"]


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_gpu_pieces_equal_cpu(tmp_path, family, method, monkeypatch):
    """Tensors over the GPU budget go through the GPU in pieces (TIES thresholds over all of them) and
    still give the CPU's result: here every merged tensor, in pieces of 10 entries."""
    import merger.budget
    import merger.plan
    import merger.stream

    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1)
    monkeypatch.setattr(merger.plan.Plan, "gpu_piece", lambda self, t, gpu: 10)
    assert_cuda_equals_cpu(tmp_path, family[0], method)


def test_the_ties_trim_never_waits_for_the_host_per_piece():
    """ties_prepare on GPU chunks under torch's sync debug mode, which raises on any synchronising call:
    only the results at the end may synchronise (run here with the mode off for them)."""
    from merger.methods.task_vectors import TiesModelParams, TiesParams, _RadixSelect, ties_prepare

    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(1 << 16, device="cuda", generator=g) for _ in range(3)]
    models = [TiesModelParams(density=d) for d in (0.2, 0.5, 0.9)]
    real = _RadixSelect.results

    def results(self):
        torch.cuda.set_sync_debug_mode("default")
        return real(self)

    _RadixSelect.results = results
    try:
        torch.cuda.set_sync_debug_mode("error")
        chunks = lambda: ([x[s : s + 4096].clone() for x in xs] for s in range(0, 1 << 16, 4096))  # noqa: E731
        on_gpu = ties_prepare(chunks, 1 << 16, models, TiesParams())
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _RadixSelect.results = real
    on_cpu = ties_prepare(lambda: [[x.cpu() for x in xs]], 1 << 16, models, TiesParams())
    assert on_gpu == on_cpu


def test_gpu_ties_writes_the_cpus_bytes(tmp_path, family):
    """TIES in bfloat16 on the GPU: the CPU engine's bytes exactly (the fused
    kernel and torch's ops are the same float32 operations), as make gpu checks at a 3B shape."""
    paths, _ = family
    (tmp_path / "r.yaml").write_text(RECIPES["ties"].format(**{k: str(v) for k, v in paths.items()}))
    for device in ("cpu", "cuda"):
        args = ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / device), "--device", device, "-q"]
        assert CliRunner().invoke(cli, args).exit_code == 0
    for f in (tmp_path / "cpu").glob("*.safetensors"):
        assert (tmp_path / "cuda" / f.name).read_bytes() == f.read_bytes(), f.name

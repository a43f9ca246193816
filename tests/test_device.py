"""`device: auto`: the GPU only where it would be faster, and `merger plan` says which and why."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

import merger.budget
import merger.plan
from merger.cli import cli
from merger.device import Estimate, choose

GB = 10**9
# Llama-2-7B, bf16, a base and two fine-tunes: 6.7G entries merged from two models, 40 GB read, 13.5 GB written
SEVEN_B = dict(entries=2 * 6_700_000_000, eager_entries=0, bytes_read=40 * GB, bytes_written=13_500_000_000)


@pytest.mark.parametrize(
    ("method", "cpu_ns", "cores", "device"),
    [
        ("linear", 0.5, 16, "cpu"),  # bound by reading and writing on any machine
        ("linear", 0.5, 2, "cpu"),
        ("ties", 3.0, 16, "cpu"),  # 16 cores keep up with the disk
        ("ties", 3.0, 2, "cuda"),  # 2 cores do not: ~20 s of arithmetic against ~13 s of I/O
    ],
)
def test_auto_takes_the_gpu_where_the_cpu_arithmetic_sets_the_pace(method, cpu_ns, cores, device):
    estimate = Estimate(cpu_ns=cpu_ns, cores=cores, **SEVEN_B)
    chosen, why = choose("auto", True, estimate, method)
    assert chosen == device
    assert f"{cores} cores" in why and "through the GPU" in why


def test_auto_counts_the_dearer_path_of_methods_without_a_fused_kernel():
    """float64 or a plugin method goes through torch on the CPU, several times dearer per entry: on 8
    cores TIES then leaves the disk waiting, and the GPU is faster."""
    fused = Estimate(cpu_ns=3.0, cores=8, **SEVEN_B)
    assert choose("auto", True, fused, "ties")[0] == "cpu"
    eager = dataclasses.replace(fused, entries=0, eager_entries=fused.entries)
    assert choose("auto", True, eager, "ties")[0] == "cuda"


def test_auto_without_cuda_and_an_explicit_device():
    estimate = Estimate(cpu_ns=3.0, cores=1, **SEVEN_B)
    assert choose("auto", False, estimate, "ties") == ("cpu", "auto: torch sees no CUDA device")
    assert choose("cuda", True, Estimate(cpu_ns=0.1, cores=64, **SEVEN_B), "linear") == ("cuda", "asked for")
    assert choose("cpu", True, estimate, "ties") == ("cpu", "asked for")


def test_plan_shows_the_choice_and_its_reason(tmp_path, family, monkeypatch):
    """On the tests' tiny models CUDA's start-up outweighs everything: auto stays on the CPU even with a
    GPU; with a method made very dear it takes the GPU; `--device cuda` still forces it."""
    paths, _ = family
    (tmp_path / "r.yaml").write_text(
        f"merge_method: ties\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['ft1']}, parameters: {{density: 0.5}}}}, {{model: {paths['ft2']}}}]\n"
    )

    def planned(*args: str) -> dict:
        result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    info = planned()
    assert (info["device"], info["device_reason"]) == ("cpu", "auto: torch sees no CUDA device")
    monkeypatch.setattr(merger.plan, "cuda_available", lambda: True)
    monkeypatch.setattr(merger.budget, "gpu_budget", lambda: 1 << 40)  # CUDA stood in: this machine has none
    monkeypatch.setattr(merger.budget, "pinned_budget", lambda: 1 << 40)
    info = planned()
    assert info["device"] == "cpu" and info["device_reason"].startswith("auto: the GPU would not be faster; about")
    assert planned("--device", "cuda")["device"] == "cuda"
    ties = merger.plan.Plan.estimate.fget

    def dear(plan):  # as if every entry took a tenth of a second of CPU
        return dataclasses.replace(ties(plan), cpu_ns=1e8)

    monkeypatch.setattr(merger.plan.Plan, "estimate", property(dear))
    info = planned()
    assert info["device"] == "cuda" and "bound by the CPU's arithmetic" in info["device_reason"]
    human = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")]).output
    assert "device:       cuda (compute float32; auto: the merge is bound by the CPU's arithmetic; about" in human

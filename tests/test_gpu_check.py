"""benchmarks/gpu_check.py, the script `make gpu` runs, checked on a CPU: its byte-for-byte comparison of two
outputs, its sanitizer verdict, a self-test of its steps, and its stop when torch sees no GPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import gpu_check
finally:
    sys.path.pop(0)


def tensor_bytes(directory: Path, name: str) -> tuple[Path, int, int]:
    """The shard holding `name`, and where its data starts and ends in that file."""
    shard = directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]
    header, start = gpu_check._header(shard)
    s, e = header[name]["data_offsets"]
    return shard, start + s, start + e


@pytest.fixture
def twins(tmp_path):
    """Two identical outputs: bf16, float32 and int64 tensors over two shards."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.w": torch.randn(16, 8, generator=g).bfloat16(),
        "b.w": torch.randn(32, generator=g),
        "ids": torch.arange(5),
        "c.w": torch.randn(4, 4, generator=g).bfloat16(),
    }
    write_checkpoint(tmp_path / "a", tensors)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    return tmp_path / "a", tmp_path / "b", tensors


def test_identical_outputs_have_no_difference(twins):
    a, b, _ = twins
    assert gpu_check.compare_outputs(a, b) == []


def test_one_flipped_bit_is_found_named_and_measured(twins):
    a, b, tensors = twins
    shard, start, _ = tensor_bytes(b, "a.w")
    data = bytearray(shard.read_bytes())
    data[start + 2 * 37] ^= 1  # entry 37 of a.w (bf16, little-endian): its lowest mantissa bit
    shard.write_bytes(bytes(data))
    flipped = tensors["a.w"].reshape(-1).view(torch.int16)[37].item() ^ 1
    new = torch.tensor([flipped], dtype=torch.int16).view(torch.bfloat16).float().item()
    old = tensors["a.w"].reshape(-1)[37].float().item()

    (d,) = gpu_check.compare_outputs(a, b)
    assert (d.file, d.tensor, d.dtype, d.shape, d.differing, d.first) == (shard.name, "a.w", "BF16", (16, 8), 1, 37)
    assert d.max_abs_diff == abs(new - old) > 0 and d.first_values == (old, new)
    assert d.describe().startswith(f"{shard.name}: tensor 'a.w' BF16 [16, 8]: 1 of 128 entries differ, max abs diff")


def test_nan_payloads_and_every_differing_tensor_count(twins):
    """Two NaNs with different bits differ; so does a NaN against a number. Each tensor is reported once, its
    largest difference taken over the entries where both sides are numbers."""
    a, b, tensors = twins
    for directory, payload in ((a, 0x7FC0), (b, 0x7FC1)):
        shard, start, _ = tensor_bytes(directory, "c.w")
        data = bytearray(shard.read_bytes())
        data[start : start + 2] = payload.to_bytes(2, "little")  # c.w[0, 0]: NaN, two payloads
        shard.write_bytes(bytes(data))
    shard, start, end = tensor_bytes(b, "b.w")
    data = bytearray(shard.read_bytes())
    data[start : start + 4] = torch.tensor([1.5]).numpy().tobytes()  # b.w[0]: 1.5
    data[end - 4 : end] = torch.tensor([float("nan")]).numpy().tobytes()  # b.w[31]: NaN on one side only
    shard.write_bytes(bytes(data))

    diffs = {d.tensor: d for d in gpu_check.compare_outputs(a, b)}
    assert sorted(diffs) == ["b.w", "c.w"]
    assert (diffs["c.w"].differing, diffs["c.w"].nan_mismatches, diffs["c.w"].first) == (1, 1, 0)
    assert (diffs["b.w"].differing, diffs["b.w"].nan_mismatches) == (2, 1)
    assert diffs["b.w"].max_abs_diff == abs(1.5 - tensors["b.w"][0].item())
    assert "1 of them with a NaN on one side or both" in diffs["b.w"].describe()


def test_missing_and_extra_files_and_other_files_differ(twins):
    a, b, _ = twins
    (b / "config.json").write_text("{}")
    (b / "extra.txt").write_text("x")
    shard = next(a.glob("*.safetensors"))
    (b / shard.name).unlink()
    found = {(d.file, d.what) for d in gpu_check.compare_outputs(a, b)}
    assert found == {(shard.name, f"only in {a}"), ("extra.txt", f"only in {b}"), ("config.json", "the bytes differ")}


def test_a_race_reported_by_the_sanitizer_fails_the_step():
    gpu_check.sanitizer_verdict(0, "threads started: merger-writer\n")
    race = "============================\nCSAN detected a possible data race on tensor with data pointer 1234\n"
    with pytest.raises(gpu_check.StepFailed, match="reported 1 possible data race"):
        gpu_check.sanitizer_verdict(0, race)
    with pytest.raises(gpu_check.StepFailed, match="exit code 1"):
        gpu_check.sanitizer_verdict(1, "Traceback ...\n")


def script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dir", str(tmp_path), "--report", str(tmp_path / "r.txt")]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_self_test_on_the_cpu_runs_the_sanitizer_merges_and_the_comparison(tmp_path):
    """The steps' plumbing on two CPU runs of a tiny family: both sanitizer merges (the sanitizer itself needs
    CUDA), two merges compared byte for byte, and a report holding all of it."""
    done = script(tmp_path, "--steps", "sanitizer,compare", "--shape", "tiny", "--devices", "cpu,cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "r.txt").read_text()
    assert report == done.stdout
    assert "sanitized merge (whole): no race reported" in report and "sanitized merge (pieces): no race" in report
    for method in ("ties", "dare_ties", "della"):  # the default --compare-methods
        assert f"{method}: the outputs on cpu and cpu are identical, byte for byte (8 files)" in report
    assert f"Send back {tmp_path / 'r.txt'}" in report.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt", "tiny"]  # scratch outputs removed


def test_without_cuda_the_check_stops_at_once(tmp_path):
    done = script(tmp_path)
    assert done.returncode == 1
    report = (tmp_path / "r.txt").read_text()
    assert "gpu check FAILED at environment: torch sees no CUDA device" in report
    assert "step 1" not in report and sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]


def test_the_tests_step_runs_exactly_the_modules_pytest_finds_cuda_tests_in():
    """The step hands pytest the modules its scan picks: those must be every module holding a test that
    `pytest -m cuda` collects, and no other (a module missed here would never run on the GPU)."""
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    modules = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert "tests/test_gpu.py" in modules and "tests/test_sparse.py" in modules
    assert [str(Path(f).relative_to(ROOT)) for f in gpu_check.cuda_test_files()] == sorted(modules)

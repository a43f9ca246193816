"""The benchmark script runs from a fresh machine: it generates its checkpoints and prints its table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def bench(tmp_path: Path, *args: str) -> str:
    """bench_merge.py's output with `args`, merger alone, its checkpoints in tmp_path."""
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_merge.py", "--no-mergekit", "--settle", "0", "--dir", str(tmp_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_benchmark_generates_checkpoints_and_prints_its_table(tmp_path):
    stdout = bench(tmp_path, "--shape", "small", "--repeat", "1", "--methods", "ties")
    rows = [line.split() for line in stdout.splitlines() if line.startswith("merger ")]
    assert [r[:2] for r in rows] == [["merger", "ties"]]
    assert float(rows[0][3]) > 0  # merge seconds
    limit = next(line.split() for line in stdout.splitlines() if line.startswith("I/O limit "))
    flushed = next(line.split() for line in stdout.splitlines() if line.startswith("+ flushed "))
    assert limit[2] == flushed[2] == "ties" and float(flushed[4]) >= float(limit[4]) > 0  # read + write (+ sync)
    merge_s, io_s = float(rows[0][3]), float(limit[4])  # x I/O: against the limit of its round (printed
    assert (
        merge_s / (io_s + 0.005) - 0.005 <= float(rows[0][5]) <= merge_s / max(io_s - 0.005, 1e-9) + 0.005
    )  # rounded)
    lines = stdout.splitlines()
    best = lines[next(i for i, x in enumerate(lines) if x.startswith("best of each:")) + 1].split()
    assert best[:3] == ["ties", rows[0][3], "1"]  # its one run's merge s
    assert best[5] == "1.00"  # x TIES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # the scratch run directory is gone

    models = tmp_path / "small"
    assert sorted(p.name for p in models.iterdir()) == ["base", "ft-1", "ft-2"]
    config = json.loads((models / "base" / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"]) == ("llama", 512)
    base, ft = ({k: v for f in sorted((models / m).glob("*.safetensors")) for k, v in load_file(f).items()}
                for m in ("base", "ft-1"))  # fmt: skip
    assert base.keys() == ft.keys() and all(t.dtype == torch.bfloat16 for t in base.values())
    w = "model.layers.0.mlp.up_proj.weight"
    assert base[w].shape == (1408, 512)
    assert abs(base[w].float().std().item() - 0.02) < 0.001  # base ~ N(0, 0.02)
    assert abs((ft[w].float() - base[w].float()).std().item() - 0.002) < 0.0002  # plus a task vector ~ N(0, 0.002)


def test_peak_rss_is_the_commands_own_not_the_benchmarks():
    """A child's ru_maxrss starts at the high-water mark of whatever forked it; the benchmark grows to
    GBs generating checkpoints, so it starts commands through a small timer process."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_merge import run_process
    finally:
        sys.path.pop(0)
    grown = bytearray(400 << 20)
    grown[::4096] = b"\1" * len(grown[::4096])  # touched: 400 MB resident in this process
    wall, rss, out = run_process([sys.executable, "-c", "print('ran')"])
    assert out == "ran\n" and wall > 0
    assert rss < 200 << 20, rss  # a bare Python, not this test process


def test_rounds_run_every_method_in_turn_and_pair_each_with_ties(tmp_path):
    """--repeat 2 runs ties, linear, ties, linear: each linear run's ratio to the TIES run of its own round."""
    stdout = bench(tmp_path, "--shape", "tiny", "--repeat", "2", "--methods", "ties,linear")
    rows = [line.split() for line in stdout.splitlines() if line.startswith("merger ")]
    assert [r[1] for r in rows] == ["ties", "linear", "ties", "linear"]
    lines = stdout.splitlines()
    paired = lines[next(i for i, x in enumerate(lines) if x.startswith("paired with TIES")) + 1].split()
    assert paired[0] == "linear" and paired[4] == "cpu"  # median, then the two rounds' ratios (the arithmetic:
    assert float(paired[1]) == pytest.approx(np.median([float(x) for x in paired[2:4]]), abs=0.006)  # below)
    limits = [line.split() for line in lines if line.startswith("I/O limit ")]
    assert [r[2] for r in limits] == ["ties", "linear", "ties", "linear"]  # each merger run's own, just before it


def test_paired_ratios_match_runs_by_round_and_device():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_merge import IO, paired_ratios
    finally:
        sys.path.pop(0)
    rows = [  # tool, method, device, wall, merge s, rss, gpu, round
        (IO, "ties", "-", 0, 1.0, 0, None, 0),
        ("merger", "ties", "cpu", 0, 2.0, 0, None, 0),
        (IO, "della", "-", 0, 1.5, 0, None, 0),
        ("merger", "della", "cpu", 0, 3.0, 0, None, 0),
        ("mergekit", "della", "cpu", 0, 30.0, 0, None, 0),
        (IO, "ties", "-", 0, 2.0, 0, None, 1),
        ("merger", "ties", "cpu", 0, 4.0, 0, None, 1),
        (IO, "della", "-", 0, 4.0, 0, None, 1),
        ("merger", "della", "cpu", 0, 5.0, 0, None, 1),
        ("merger", "della", "cuda", 0, 1.0, 0, None, 1),  # no TIES run on cuda: not paired with it
    ]
    assert paired_ratios(rows, "ties") == {("ties", "cpu"): [1.0, 1.0], ("della", "cpu"): [1.5, 1.25]}
    assert paired_ratios(rows, IO) == {  # each run over its method's limit in its round, whatever the device
        ("ties", "cpu"): [2.0, 2.0],
        ("della", "cpu"): [2.0, 1.25],
        ("della", "cuda"): [0.25],
    }


def test_one_thread_benchmark_prints_each_methods_figures():
    """benchmarks/one_thread.py: a row per method named, prepare, merge and total in ns per entry and per
    entry and model (one model for slerp, two for TIES, three for linear: the recipes' lists); a method
    without fused kernels is refused with its name."""

    def one_thread(methods: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "benchmarks/one_thread.py", "--rows", "8", "--repeat", "1", "--methods", methods],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    done = one_thread("slerp,ties,linear")
    assert done.returncode == 0, done.stderr
    cell = r"(\d+\.\d+) \((\d+\.\d+)\)"
    rows = {}
    for line in done.stdout.splitlines()[2:]:
        match = re.fullmatch(rf"(\w+)\s+{cell}\s+{cell}\s+{cell}", line)
        assert match, line
        rows[match[1]] = [float(v) for v in match.groups()[1:]]
    assert list(rows) == ["slerp", "ties", "linear"]
    for name, models in (("slerp", 1), ("ties", 2), ("linear", 3)):
        prepare, prepare_each, merge, merge_each, total, total_each = rows[name]
        assert merge > 0 and abs(total - prepare - merge) <= 0.002, (name, rows[name])
        for whole, each in ((prepare, prepare_each), (merge, merge_each), (total, total_each)):
            assert each == pytest.approx(whole / models, abs=0.002), (name, rows[name])
    refused = one_thread("tsv")
    assert refused.returncode == 2 and "no fused kernels for tsv" in refused.stderr

"""Each method's fused CPU kernels on one thread: the whole-tensor passes (prepare) and the merge of one
TinyLlama MLP matrix (5632 x 2048, bf16; --rows), in ns per entry and per entry and model (Method.cpu_ns's unit,
the models merged besides the base; cpu_ns adds the writer's copy, about 0.85 ns an entry).

    .venv/bin/python benchmarks/one_thread.py --methods slerp,nuslerp,ties

No files and no threads: what a change to a kernel does, apart from the engine and the VM's I/O. The recipes
are bench_merge.RECIPES' (their models: the base and fine-tunes of random weights, fine-tune = base + 10%
noise). The first call of each method compiles or loads its kernels and is left out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import RECIPES  # noqa: E402

from merger import budget  # noqa: E402
from merger.methods import TensorContext, get_method  # noqa: E402

COLS = 2048
SLOW = {"tsv", "iso_c", "iso_cts"}  # minutes of warm-up each: only when named


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 as stored bfloat16 (the kernels' int16 view), truncated."""
    return (a.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)


def _params(text: str) -> dict[str, float]:
    return {k.strip(): float(v) for k, v in (p.split(":") for p in text.split(",") if p.strip())}


def _inputs(roles: str, base: np.ndarray, fts: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(the method's ingredients, its base) for bench_merge's roles."""
    return {"all": ([base, *fts], None), "tasks": (fts, base), "pair": (fts[:1], base), "one": (fts[:1], None)}[roles]


def run(fn, n: int, size: int | None = None) -> list:
    """A Runner on this thread alone: fn over ranges of `size` (the engine's CHUNK) covering [0, n)."""
    size = size or budget.CHUNK
    return [fn(s, min(s + size, n)) for s in range(0, n, size)]


def measure(name: str, base: np.ndarray, fts: list[np.ndarray], repeat: int) -> tuple[float, float, int]:
    """Median seconds of prepare and of merge over `repeat` calls after one warm-up, and the models merged."""
    roles, per_model, params = RECIPES[name]
    method = get_method(name)
    xs, b = _inputs(roles, base, fts)
    b = b if method.reads_base else None
    models = [method.model_params(**_params(per_model)) for _ in xs]
    context = TensorContext("model.layers.0.mlp.up_proj.weight", seed=1, shape=(base.size // COLS, COLS))
    out = np.empty(base.size, np.int16)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        merge = method.fused(xs, b, models, method.params(**_params(params)), run, context=context)
        t1 = time.perf_counter()
        merge(0, base.size, out)
        times.append((t1 - t0, time.perf_counter() - t1))
    prepare, merged = (statistics.median(t[i] for t in times[1:]) for i in range(2))
    return prepare, merged, len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(m for m in RECIPES if m not in SLOW))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=5632, help="rows of 2048 entries (default 5632: an MLP matrix)")
    args = parser.parse_args()
    g = np.random.default_rng(0)
    base32 = g.standard_normal(args.rows * COLS, dtype=np.float32) * np.float32(0.02)
    base = _bf16(base32)
    fts = [_bf16(base32 + g.standard_normal(base32.size, dtype=np.float32) * np.float32(0.002)) for _ in range(2)]
    n = base.size
    print(f"one thread, {args.rows} x {COLS} bf16, median of {args.repeat}: ns per entry (per entry and model)")
    print(f"{'method':<18}{'prepare':>16}{'merge':>16}{'total':>16}")
    for name in args.methods.split(","):
        prepare, merged, models = measure(name, base, fts, args.repeat)
        cells = [f"{1e9 * t / n:.3f} ({1e9 * t / n / max(models, 1):.3f})" for t in (prepare, merged, prepare + merged)]
        print(f"{name:<18}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()

"""Each method's fused CPU kernels on one thread: the whole-tensor passes (prepare) and the merge of one
TinyLlama MLP matrix (5632 x 2048, bf16; --rows), in ns per entry and per entry and model (Method.cpu_ns's
unit: the models the recipe lists, as the plan counts them; cpu_ns adds the writer's copy, about 0.85 ns an
entry). The merge runs in the engine's pieces (budget.PIECE entries) into one reused buffer.

    .venv/bin/python benchmarks/one_thread.py --methods slerp,nuslerp,ties

No files and no threads: what a change to a kernel does, apart from the engine and the VM's I/O. The recipes
are bench_merge.RECIPES' (their models: the base and fine-tunes of random weights, fine-tune = base + 10%
noise). The first call of each method compiles or loads its kernels and is left out. Methods without fused
kernels (tsv, iso_c, iso_cts merge through torch) are refused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import RECIPES  # noqa: E402

from merger import budget  # noqa: E402
from merger.methods import TensorContext, get_method  # noqa: E402

COLS = 2048
FUSED = [m for m in RECIPES if get_method(m).fused is not None]


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 as stored bfloat16 (the kernels' int16 view), truncated."""
    return (a.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)


def _params(text: str) -> dict:
    """A recipe's parameters ("weight: 0.5, density: 0.5") as YAML reads them."""
    return yaml.safe_load("{" + text + "}")


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
    n = base.size
    out = np.empty(min(n, budget.PIECE), np.int16)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        merge = method.fused(xs, b, models, method.params(**_params(params)), run, context=context)
        t1 = time.perf_counter()
        for s in range(0, n, budget.PIECE):
            e = min(s + budget.PIECE, n)
            merge(s, e, out[: e - s])
        times.append((t1 - t0, time.perf_counter() - t1))
    prepare, merged = (statistics.median(t[i] for t in times[1:]) for i in range(2))
    return prepare, merged, len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(FUSED), help="default: every method with fused kernels")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls after the warm-up (1 or more)")
    parser.add_argument("--rows", type=int, default=5632, help="rows of 2048 entries (default 5632: an MLP matrix)")
    args = parser.parse_args()
    names = args.methods.split(",")
    unfused = [m for m in names if m not in FUSED]
    if unfused or args.repeat < 1:
        parser.error(f"no fused kernels for {', '.join(unfused)}" if unfused else "--repeat must be 1 or more")
    g = np.random.default_rng(0)
    base32 = g.standard_normal(args.rows * COLS, dtype=np.float32) * np.float32(0.02)
    base = _bf16(base32)
    fts = [_bf16(base32 + g.standard_normal(base32.size, dtype=np.float32) * np.float32(0.002)) for _ in range(2)]
    n = base.size
    print(f"one thread, {args.rows} x {COLS} bf16, median of {args.repeat}: ns per entry (per entry and model)")
    print(f"{'method':<18}{'prepare':>17}{'merge':>17}{'total':>17}")
    for name in names:
        prepare, merged, models = measure(name, base, fts, args.repeat)
        cells = [f"{1e9 * t / n:.3f} ({1e9 * t / n / models:.3f})" for t in (prepare, merged, prepare + merged)]
        print(f"{name:<18}" + "".join(f" {c:>16}" for c in cells))  # a space between cells, however wide


if __name__ == "__main__":
    main()

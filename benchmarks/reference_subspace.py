"""Compare merger's tsv, iso_c and iso_cts with the papers' own code on tiny random checkpoints.

    git clone https://github.com/AntoAndGar/task_singular_vectors /tmp/tsv
    git clone https://github.com/danielm1405/iso-merging /tmp/iso
    .venv/bin/python benchmarks/reference_subspace.py --tsv /tmp/tsv --iso /tmp/iso

The reference functions (TSV: src/utils/TSVM_utils.py, compute_and_sum_svd_mem_reduction; Iso:
src/utils/iso.py, iso_c and iso_cts) import only torch and math: they are read from the clones (a bare
git directory works too: its HEAD is read) and run here, on the CPU, over task vectors in float64; merger
merges the same checkpoints (float64 on disk, compute_dtype float64) through its CLI. Both sides scale
by alpha 1 (the reference picks alpha on validation data afterwards). The matrices are full-rank random
ones, where the reference is well defined (on exactly low-rank task vectors it keeps arbitrary singular
vectors of value 0, which merger leaves out: see merger/methods/subspace.py). Prints, per method and
number of models, the largest difference over every tensor relative to the largest merged delta entry.
Seconds on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from merger.cli import cli

# Shapes of a small transformer block's tensors: square, tall and wide matrices, and a norm vector.
# min(m, n) is a multiple of every number of models below, so that the reference's int(r * (1 / T))
# equals r // T (for T = 49, int(49 * (1 / 49)) is 0).
SHAPES = {"attn.q.weight": (48, 48), "mlp.up.weight": (96, 48), "mlp.down.weight": (48, 96), "norm.weight": (48,)}


def reference_source(repo: Path, path: str) -> str:
    """A file of a clone (its work tree, else its HEAD, for a bare git directory)."""
    if (repo / path).is_file():
        return (repo / path).read_text()
    git_dir = repo / ".git" if (repo / ".git").exists() else repo
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def load_reference(repo: Path, path: str) -> types.ModuleType:
    module = types.ModuleType(Path(path).stem)
    exec(compile(reference_source(repo, path), f"{repo}/{path}", "exec"), module.__dict__)  # noqa: S102
    return module


def checkpoints(root: Path, n: int, seed: int) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    fts = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()} for _ in range(n)
    ]
    for name, tensors in [("base", base)] + [(f"ft{i}", ft) for i, ft in enumerate(fts)]:
        (root / name).mkdir(parents=True)
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text('{"model_type": "toy", "torch_dtype": "float64"}')
    return base, fts


def merged_by_merger(root: Path, method: str, n: int, extra: str) -> dict:
    models = ", ".join(f"{{model: {root / f'ft{i}'}}}" for i in range(n))
    recipe = root / f"{method}.yaml"
    recipe.write_text(
        f"merge_method: {method}\nbase_model: {root / 'base'}\nmodels: [{models}]\n"
        f"dtype: float64\ncompute_dtype: float64\n{extra}"
    )
    result = CliRunner().invoke(cli, ["apply", str(recipe), "-o", str(root / f"out-{method}"), "-q"])
    if result.exit_code:
        sys.exit(f"merger {method}: {result.output}")
    out = {}
    for shard in (root / f"out-{method}").glob("*.safetensors"):
        out |= load_file(shard)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tsv", type=Path, required=True, help="a clone of AntoAndGar/task_singular_vectors")
    parser.add_argument("--iso", type=Path, required=True, help="a clone of danielm1405/iso-merging")
    parser.add_argument("--fraction", type=float, default=0.8, help="Iso-CTS's common_space_fraction")
    args = parser.parse_args()
    tsv = load_reference(args.tsv, "src/utils/TSVM_utils.py")
    iso = load_reference(args.iso, "src/utils/iso.py")
    iso.print = tsv.print = lambda *a, **k: None  # their progress lines

    print(f"{'method':8} {'models':>6} {'max |merger - reference| / max |delta|':>40}")
    for n in (1, 2, 3, 4, 6, 8):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            base, fts = checkpoints(root, n, seed=n)
            vectors = [types.SimpleNamespace(vector={k: ft[k] - base[k] for k in base}) for ft in fts]
            config = types.SimpleNamespace(
                device="cpu",
                DATASETS=[f"task{i}" for i in range(n)],
                num_tasks=n,
                method=types.SimpleNamespace(common_space_fraction=args.fraction),
            )
            references = {
                "tsv": tsv.compute_and_sum_svd_mem_reduction(vectors, config),
                "iso_c": iso.iso_c(vectors, config),
                "iso_cts": iso.iso_cts(vectors, config),
            }
            for method, reference in references.items():
                extra = f"parameters: {{common_space_fraction: {args.fraction}}}\n" if method == "iso_cts" else ""
                got = merged_by_merger(root, method, n, extra)
                worst = max(
                    ((got[k] - base[k]) - reference[k]).abs().max().item() / reference[k].abs().max().item()
                    for k in base
                )
                print(f"{method:8} {n:>6} {worst:>40.2e}")


if __name__ == "__main__":
    main()

"""Compare merger's sparse task-vector methods (DARE, Breadcrumbs, DELLA, SCE) with mergekit's on a tiny
float32 Llama family (benchmarks/mergekit_compare.py's).

    .venv/bin/python benchmarks/mergekit_sparse.py --mergekit /tmp/mk/bin/mergekit-yaml --root /tmp/mksparse

Deterministic methods (breadcrumbs, breadcrumbs_ties, sce): the max abs difference over every tensor.
Sampling ones (dare_*, della*) draw different entries in each tool, so their statistics are compared
instead: with one model, the fraction of entries kept (output != base) and the ratio of the task vector's L1
norm after to before (mergekit rescales to 1); with three, the mean |output - task arithmetic's output| in
each tool. Needs mergekit installed in its own environment; CPU only, about a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mergekit_compare import build_family, load_dir, run  # noqa: E402

WEIGHTS = (0.6, 0.3, 0.4)


def config(method: str, per_model: list[str], params: str = "", weights: bool = True) -> str:
    """A mergekit config over ft1.. (one per entry of per_model: its parameters besides the weight)."""
    lines = [f"merge_method: {method}", "base_model: ./base", "dtype: float32", "models:"]
    for i, extra in enumerate(per_model):
        lines.append(f"  - model: ./ft{i + 1}")
        items = ([f"weight: {WEIGHTS[i] if len(per_model) > 1 else 1.0}"] if weights else []) + (
            [extra] if extra else []
        )
        if items:
            lines.append(f"    parameters: {{{', '.join(items)}}}")
    if params:
        lines.append(f"parameters: {{{params}}}")
    return "\n".join(lines) + "\n"


DETERMINISTIC = {
    "breadcrumbs": config("breadcrumbs", ["density: 0.5, gamma: 0.05", "density: 0.7, gamma: 0.1", "density: 0.3"]),
    "breadcrumbs_rescale": config("breadcrumbs", ["density: 0.5, gamma: 0.05"] * 3, "rescale: true"),
    "breadcrumbs_ties": config(
        "breadcrumbs_ties", ["density: 0.5, gamma: 0.05", "density: 0.7, gamma: 0.1", "density: 0.3"], "normalize: true"
    ),
    "breadcrumbs_ties_sum": config("breadcrumbs_ties", ["density: 0.6, gamma: 0.02"] * 3),
    "breadcrumbs_one": config("breadcrumbs", ["density: 0.4, gamma: 0.1"]),
    "sce": config("sce", [""] * 3, "select_topk: 0.5", weights=False),
    "sce_all": config("sce", [""] * 3, weights=False),
}
SAMPLING = {
    "dare_linear": "density: 0.3",
    "dare_ties": "density: 0.3",
    "della": "density: 0.4, epsilon: 0.1",
    "della_linear": "density: 0.4, epsilon: 0.1",
}


def merge_both(root: Path, name: str, text: str, mergekit: str, merger: str) -> tuple[dict, dict]:
    recipe = root / f"{name}.yml"
    recipe.write_text(text)
    outs = {}
    for tool, cmd in (
        (
            "mergekit",
            [
                mergekit,
                str(recipe),
                str(root / "out" / "mergekit" / name),
                "--lazy-unpickle",
                "--allow-crimes",
                "--quiet",
                "--no-copy-tokenizer",
            ],
        ),  # fmt: skip
        (
            "merger",
            [
                merger,
                "apply",
                str(recipe),
                "-o",
                str(root / "out" / "merger" / name),
                "--force",
                "-q",
                "--device",
                "cpu",
            ],
        ),  # fmt: skip
    ):
        run(cmd, root)
        outs[tool] = load_dir(root / "out" / tool / name)
    return outs["mergekit"], outs["merger"]


def merged_tensors(sd: dict) -> list[str]:
    return [k for k in sorted(sd) if sd[k].is_floating_point() and sd[k].dim() >= 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    p.add_argument("--merger", default=str(Path(sys.executable).with_name("merger")))
    p.add_argument("--root", default="/tmp/mksparse", type=Path)
    args = p.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_family(root, torch.float32)
    base, ft1 = load_dir(root / "base"), load_dir(root / "ft1")

    print("deterministic methods: max abs difference, mergekit vs merger (float32)")
    for name, text in DETERMINISTIC.items():
        a, b = merge_both(root, name, text, args.mergekit, args.merger)
        assert sorted(a) == sorted(b), (name, set(a) ^ set(b))
        diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        scale = max(a[k].abs().max().item() for k in a)
        exact = sum(torch.equal(a[k], b[k]) for k in a)
        print(f"  {name:22s} max_abs {diff:.3g} (max |w| {scale:.3g}), {exact}/{len(a)} tensors bit-identical")

    print("sampling methods, one model: kept fraction and L1 norm after/before (mergekit | merger)")
    for method, params in SAMPLING.items():
        a, b = merge_both(root, f"{method}_one", config(method, [params]), args.mergekit, args.merger)
        row = []
        for out in (a, b):
            kept = total = 0
            l1_after = l1_before = 0.0
            for k in merged_tensors(out):
                d = out[k].double() - base[k].double()
                kept += int((d != 0).sum())
                total += d.numel()
                l1_after += d.abs().sum().item()
                l1_before += (ft1[k].double() - base[k].double()).abs().sum().item()
            row.append(f"kept {kept / total:.4f} L1 ratio {l1_after / l1_before:.4f}")
        print(f"  {method:14s} ({params}): {row[0]} | {row[1]}")

    print("sampling methods, three models: mean |output - task arithmetic| (mergekit | merger)")
    ta_a, ta_b = merge_both(root, "task_arithmetic", config("task_arithmetic", [""] * 3), args.mergekit, args.merger)
    for method, params in SAMPLING.items():
        a, b = merge_both(root, f"{method}_three", config(method, [params] * 3), args.mergekit, args.merger)
        row = []
        for out, ta in ((a, ta_a), (b, ta_b)):
            keys = merged_tensors(out)
            diff = sum((out[k].double() - ta[k].double()).abs().sum().item() for k in keys)
            row.append(diff / sum(out[k].numel() for k in keys))
        print(f"  {method:14s} ({params}): {row[0]:.4g} | {row[1]:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

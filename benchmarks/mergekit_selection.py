"""Compare merger with mergekit on model_stock, arcee_fusion, ram and ramplus_tl, over a tiny float32 Llama
family (benchmarks/mergekit_compare.py's: a base and three fine-tunes, base + noise).

    .venv/bin/python benchmarks/mergekit_selection.py --mergekit /tmp/mk/bin/mergekit-yaml --root /tmp/mksel

Each config runs unchanged through both tools (`dtype: float32`); prints per method the largest absolute
difference over every output tensor and how many entries differ by more than 1e-6. CPU only, a few seconds
a method.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mergekit_compare import build_family, load_dir, run  # noqa: E402

# RAM's epsilon: the fine-tunes change every entry by ~1e-4 to 1e-3, so mergekit's default 1e-5 would make
# RAM a plain mean; 3e-4 leaves each entry changed by some models and not others.
CONFIGS = {
    "model_stock": "models: [{model: ./ft1}, {model: ./ft2}, {model: ./ft3}]\n",
    "model_stock_filter_wise": "models: [{model: ./ft1}, {model: ./ft2}, {model: ./ft3}]\n"
    "parameters: {filter_wise: true}\n",
    "arcee_fusion": "models: [{model: ./ft1}]\n",
    "arcee_fusion_far": "models: [{model: ./far}]\n",
    "ram": "models: [{model: ./ft1}, {model: ./ft2}, {model: ./ft3}]\nparameters: {epsilon: 0.0003}\n",
    "ramplus_tl": "models: [{model: ./ft1}, {model: ./ft2}, {model: ./ft3}]\n"
    "parameters: {epsilon: 0.0003, r: 0.5, alpha: 0.8}\n",
}


def config(name: str) -> str:
    method = name.removesuffix("_filter_wise").removesuffix("_far")
    return f"merge_method: {method}\nbase_model: ./base\ndtype: float32\n" + CONFIGS[name]


def build_far(root: Path) -> None:
    """ft1's task vector times 30: a fine-tune far enough from the base that a row's KL divergence between
    their softmaxes (~1e-4) is well above float32's rounding of it (mergekit sums it in float32)."""
    import shutil

    from safetensors.torch import save_file

    if (root / "far").exists():
        return
    shutil.copytree(root / "ft1", root / "far")
    base, ft = load_dir(root / "base"), load_dir(root / "ft1")
    for f in (root / "far").glob("*.safetensors"):
        names = load_dir_file(f)
        save_file({k: base[k] + 30 * (ft[k] - base[k]) for k in names}, f, metadata={"format": "pt"})


def load_dir_file(f: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(f, "pt") as h:
        return list(h.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    ap.add_argument("--merger", default=str(Path(sys.executable).parent / "merger"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/mksel"))
    args = ap.parse_args()
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    build_family(root, torch.float32)
    build_far(root)
    print(f"{'method':<26}{'tensors':>8}{'max abs diff':>14}{'entries > 1e-6':>16}")
    for name in CONFIGS:
        (root / f"{name}.yml").write_text(config(name))
        for cmd in (
            [args.mergekit, f"{name}.yml", f"out/mergekit/{name}"],
            [args.merger, "apply", f"{name}.yml", "-o", f"out/merger/{name}", "-q", "--force"],
        ):
            run(cmd, root)
        a, b = load_dir(root / "out" / "mergekit" / name), load_dir(root / "out" / "merger" / name)
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
        worst, differ = 0.0, 0
        for k in a:
            d = (a[k].double() - b[k].double()).abs()
            worst = max(worst, d.max().item())
            differ += int((d > 1e-6).sum())
        print(f"{name:<26}{len(a):>8}{worst:>14.3g}{differ:>16}")
    print(
        textwrap.dedent("""
        arcee_fusion on near fine-tunes: mergekit sums each row's KL divergence (~1e-7 here) in float32, where
        rounding is as large as the divergence (some rows come out negative); merger sums it exactly in
        float64, so the rows' importances, and which entries reach the threshold, differ. With a fine-tune
        far from its base (arcee_fusion_far: KL ~1e-4) float32 holds the divergence better and few decisions differ.""")
    )


if __name__ == "__main__":
    main()

"""Compare merger's slerp, nuslerp, multislerp, karcher and nearswap with mergekit's, one mergekit-style
config per method (and variant), on the tiny float32 Llama family of benchmarks/mergekit_compare.py.

    .venv/bin/python benchmarks/mergekit_interpolation.py --mergekit /tmp/mk/bin/mergekit-yaml --root /tmp/mkinterp

Both tools read the same config unchanged (`dtype: float32`: mergekit computes in float32, merger's
coefficients come from float64 and its sums in float32), and every output tensor is compared: the
maximum absolute difference per config and relative to the tensor's largest entry. A few seconds a
config on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mergekit_compare as mc  # noqa: E402

TWO = """
models:
  - model: ./ft1
    parameters: {weight: 0.7}
  - model: ./ft2
    parameters: {weight: 0.3}
"""
THREE = (
    TWO
    + """  - model: ./ft3
    parameters: {weight: 0.5}
"""
)

CONFIGS: dict[str, str] = {
    "slerp": """
        merge_method: slerp
        base_model: ./base
        models: [{model: ./base}, {model: ./ft1}]
        parameters: {t: 0.35}
        dtype: float32
    """,
    "slerp_far": """
        merge_method: slerp
        base_model: ./base
        models: [{model: ./base}, {model: ./far}]
        parameters: {t: 0.35}
        dtype: float32
    """,
    # examples/gradient-slerp.yml's shape: t along the layers, per filter
    "slerp_gradient": """
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 6]
              - model: ./far
                layer_range: [0, 6]
        merge_method: slerp
        base_model: ./base
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """,
    "nuslerp": "merge_method: nuslerp\ndtype: float32\n" + TWO,
    "nuslerp_far": "merge_method: nuslerp\ndtype: float32\n" + TWO.replace("./ft2", "./far"),
    "nuslerp_base": "merge_method: nuslerp\nbase_model: ./base\ndtype: float32\n" + TWO,
    "nuslerp_rows": "merge_method: nuslerp\nbase_model: ./base\nparameters: {nuslerp_flatten: false}\n"
    "dtype: float32\n" + TWO,
    "nuslerp_row_wise": "merge_method: nuslerp\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n"
    "dtype: float32\n" + TWO,
    "multislerp": "merge_method: multislerp\ndtype: float32\n" + THREE,
    "multislerp_base": "merge_method: multislerp\nbase_model: ./base\nparameters: {normalize_weights: false}\n"
    "dtype: float32\n" + THREE,
    "karcher": """
        merge_method: karcher
        models: [{model: ./ft1}, {model: ./ft2}, {model: ./ft3}]
        parameters: {max_iter: 20, tol: 1.0e-7}
        dtype: float32
    """,
    # a named base_model is one more input of karcher's mean in mergekit
    "karcher_base": """
        merge_method: karcher
        base_model: ./base
        models: [{model: ./ft1}, {model: ./ft2}]
        dtype: float32
    """,
    "nearswap": """
        merge_method: nearswap
        base_model: ./base
        models: [{model: ./base}, {model: ./ft1}]
        parameters: {t: 0.0005}
        dtype: float32
    """,
}


def build_far(root: Path) -> None:
    """./far: the base plus noise as large as its weights (ft1..ft3 are within 2% of the base, where
    slerp's |cos| > 0.9995 falls back to linear interpolation), so that slerp takes its spherical branch."""
    import shutil

    from safetensors.torch import save_file

    if (root / "far" / "config.json").exists():
        return
    shutil.copytree(root / "base", root / "far")
    g = torch.Generator().manual_seed(7)
    for f in (root / "far").glob("*.safetensors"):
        sd = mc.load_file(f)
        far = {k: v + torch.randn(v.shape, generator=g) * v.float().std().clamp_min(1e-3) for k, v in sd.items()}
        save_file(far, f, metadata={"format": "pt"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml", help="mergekit-yaml of a mergekit install")
    p.add_argument("--merger", default=str(Path(sys.executable).with_name("merger")))
    p.add_argument("--root", default="/tmp/mkinterp", type=Path)
    p.add_argument("--rtol", default=1e-5, type=float, help="difference accepted, relative to the tensor's max")
    p.add_argument("configs", nargs="*", help="names of CONFIGS (default: all)")
    args = p.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mc.build_family(root, torch.float32)
    build_far(root)
    mc.RECIPES.update(CONFIGS)  # compare() reads its recipe by name from there
    ok_all = True
    for name in args.configs or CONFIGS:
        r = mc.compare(name, root, args.mergekit, args.merger)
        if "error" in r:
            ok_all = False
            print(f"{name}: ERROR {r['error']}")
            continue
        ok = not r["only_mergekit"] and not r["only_merger"] and not r["bad_shapes"] and r["max_rel"] <= args.rtol
        ok_all &= ok
        print(
            f"{name:18s} tensors {r['tensors']:3d} bit-equal {r['exact']:3d} max_abs {r['max_abs']:.3g} "
            f"max_rel {r['max_rel']:.3g} logits {r['logits_max_abs']:.3g}  {'AGREE' if ok else 'DIFFER'}"
        )
        if not ok:
            for d, k in r["worst"]:
                print(f"    {k}: max abs {d:.4g}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())

"""Compare merger with mergekit on recipes shaped like mergekit's own examples (slices, passthrough,
gradients, filters), on a tiny Llama family built here with random weights.

    .venv/bin/python benchmarks/mergekit_compare.py --mergekit /tmp/mk/bin/mergekit-yaml --root /tmp/mkcmp

Each recipe is run unchanged by both tools (paths are local, `dtype: float32` so that both compute and
write float32); every output tensor is compared (names, shapes, max abs difference), and the
config.json layer counts; merger's output is loaded with transformers and run forward. Needs mergekit
installed in its own environment (its CLI is passed with --mergekit); CPU only, a few seconds a recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

N_LAYERS = 6
ARCH = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

# Shapes of mergekit's examples (examples/*.yml in arcee-ai/mergekit), with local paths.
# slerp is not in merger: gradient-slerp.yml's shape (two models over the same layers, a t gradient
# per filter) is kept with linear, t becoming model a's weight and 1 - t model b's.
RECIPES: dict[str, str] = {
    # examples/orcamini-platy-44layer.yml: overlapping layer ranges of two models (6 + 6 -> 8 layers)
    "a_passthrough_frankenmerge": """
        slices:
          - sources:
            - model: ./ft1
              layer_range: [0, 4]
          - sources:
            - model: ./ft2
              layer_range: [2, 6]
        merge_method: passthrough
        dtype: float32
    """,
    # passthrough of one model with a per-slice scale (a layer repeated: 0-3 then 2-5 of the same model)
    "a2_passthrough_self_stack": """
        slices:
          - sources:
            - model: ./base
              layer_range: [0, 4]
          - sources:
            - model: ./base
              layer_range: [2, 6]
        merge_method: passthrough
        dtype: float32
    """,
    # per-slice linear merge over layer ranges, weights per source and per slice
    "b1_linear_slices": """
        slices:
          - sources:
              - model: ./ft1
                layer_range: [0, 3]
                parameters: {weight: 1.0}
              - model: ./ft2
                layer_range: [0, 3]
                parameters: {weight: 0.5}
          - sources:
              - model: ./ft1
                layer_range: [3, 6]
              - model: ./ft2
                layer_range: [3, 6]
            parameters:
              weight: 0.3
          - sources:
              - model: ./ft2
                layer_range: [4, 6]
              - model: ./ft3
                layer_range: [4, 6]
        merge_method: linear
        parameters:
          weight: 1.0
        dtype: float32
    """,
    # examples/bio-merge.yml's ties (density/weight, normalize: false), per slice, base among the sources
    "b2_ties_slices": """
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 3]
              - model: ./ft1
                layer_range: [0, 3]
                parameters: {density: 0.5, weight: 0.5}
              - model: ./ft2
                layer_range: [0, 3]
                parameters: {density: 0.5, weight: 0.5}
          - sources:
              - model: ./base
                layer_range: [3, 6]
              - model: ./ft1
                layer_range: [3, 6]
                parameters: {density: 0.3, weight: 1.0}
              - model: ./ft3
                layer_range: [3, 6]
                parameters: {density: 0.7, weight: 0.4}
        merge_method: ties
        base_model: ./base
        parameters:
          normalize: false
          int8_mask: true
        dtype: float32
    """,
    # task_arithmetic per slice
    "b3_task_arithmetic_slices": """
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 6]
              - model: ./ft1
                layer_range: [0, 6]
                parameters: {weight: 0.7}
              - model: ./ft2
                layer_range: [0, 6]
                parameters: {weight: -0.3}
        merge_method: task_arithmetic
        base_model: ./base
        dtype: float32
    """,
    # examples/ties.yml's per-model density and weight gradients (ranked_ties there; ties here)
    "c1_ties_gradients": """
        models:
          - model: ./ft1
            parameters:
              density: [0.8, 0.3, 0.1]
              weight: [1.0, 0.8, 0.5]
          - model: ./ft2
            parameters:
              density: [0.1, 0.4, 0.1]
              weight: [0.2, 0.8, 0.1]
          - model: ./ft3
            parameters:
              density: [0.1, 0.2, 0.6]
              weight: [0.5, 0.8, 1.0]
        merge_method: ties
        base_model: ./base
        dtype: float32
    """,
    # a weight gradient over the layers of one slice in linear (gradient-slerp's t without filters)
    "c2_linear_gradient_slice": """
        slices:
          - sources:
              - model: ./ft1
                layer_range: [0, 6]
                parameters:
                  weight: [0, 0.5, 1]
              - model: ./ft2
                layer_range: [0, 6]
                parameters:
                  weight: [1, 0.5, 0]
        merge_method: linear
        dtype: float32
    """,
    # gradients in two slices: t restarts at each slice
    "c3_task_arithmetic_gradient_two_slices": """
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 4]
              - model: ./ft1
                layer_range: [0, 4]
          - sources:
              - model: ./base
                layer_range: [2, 6]
              - model: ./ft1
                layer_range: [2, 6]
        merge_method: task_arithmetic
        base_model: ./base
        parameters:
          weight: [0.2, 1.0, 0.6]
        dtype: float32
    """,
    # examples/mega.yml's second document: density gradient, weight filter (mlp 0.5, else 0), ties
    "d1_ties_filter_mega": """
        models:
          - model: ./ft1
            parameters:
              density: [1, 0.7, 0.1]
              weight: 1.0
          - model: ./ft2
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: ./base
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32
    """,
    # scalar filters with a default, linear
    "d2_linear_filters": """
        models:
          - model: ./ft1
            parameters:
              weight:
                - filter: self_attn
                  value: 0.8
                - filter: mlp
                  value: 0.2
                - value: 0.5
          - model: ./ft2
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float32
    """,
    # examples/gradient-slerp.yml (mega.yml's first document): filters whose values are gradients;
    # slerp's t becomes a's linear weight, the same filters with 1 - t b's
    "e1_linear_gradient_filters": """
        slices:
          - sources:
              - model: ./ft1
                layer_range: [0, 6]
                parameters:
                  weight:
                    - filter: self_attn
                      value: [1, 0.5, 0.7, 0.3, 0]
                    - filter: mlp
                      value: [0, 0.5, 0.3, 0.7, 1]
                    - value: 0.5
              - model: ./ft2
                layer_range: [0, 6]
                parameters:
                  weight:
                    - filter: self_attn
                      value: [0, 0.5, 0.3, 0.7, 1]
                    - filter: mlp
                      value: [1, 0.5, 0.7, 0.3, 0]
                    - value: 0.5
        merge_method: linear
        base_model: ./ft1
        dtype: float32
    """,
    # the same at the top level with task_arithmetic, and the default itself a gradient
    "e2_task_arithmetic_gradient_filters": """
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 6]
              - model: ./ft1
                layer_range: [0, 6]
              - model: ./ft2
                layer_range: [0, 6]
        merge_method: task_arithmetic
        base_model: ./base
        parameters:
          weight:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: [0.1, 0.9]
        dtype: float32
    """,
    # edge cases: a one-layer slice (mergekit reads a gradient there at its end, t = 1)
    "f1_gradient_one_layer_slice": """
        slices:
          - sources:
              - model: ./ft1
                layer_range: [0, 3]
                parameters: &grad
                  weight:
                    - filter: embed_tokens
                      value: 0.5
                    - value: [0.2, 1.0]
              - model: ./ft2
                layer_range: [0, 3]
          - sources:
              - model: ./ft1
                layer_range: [3, 4]
                parameters: *grad
              - model: ./ft2
                layer_range: [3, 4]
          - sources:
              - model: ./ft1
                layer_range: [4, 6]
                parameters: *grad
              - model: ./ft2
                layer_range: [4, 6]
        merge_method: linear
        parameters:
          weight: 0.5
        dtype: float32
    """,
    # filters that match tensors outside the layers ("norm" is in model.norm.weight too), and "*"
    "f2_filters_outside_layers": """
        models:
          - model: ./ft1
            parameters:
              weight:
                - filter: norm
                  value: [0.9, 0.1]
                - filter: lm_head
                  value: 0.25
                - filter: "*"
                  value: 0.6
          - model: ./ft2
            parameters:
              weight: 0.4
        merge_method: linear
        dtype: float32
    """,
    # passthrough with scale (the depth-upscaling trick: a repeated block's o_proj/down_proj zeroed)
    "f3_passthrough_scale_filter": """
        slices:
          - sources:
            - model: ./ft1
              layer_range: [0, 4]
          - sources:
            - model: ./ft1
              layer_range: [2, 4]
            parameters:
              scale:
                - filter: o_proj
                  value: 0.0
                - filter: down_proj
                  value: 0.0
                - value: 1.0
          - sources:
            - model: ./ft1
              layer_range: [4, 6]
        merge_method: passthrough
        dtype: float32
    """,
}


def build_family(root: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """A base and three fine-tunes (base + noise), safetensors in `dtype` with a real Llama config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (root / "ft3" / "config.json").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(**ARCH)
    base = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from exactly 1 so that their merges are not trivial
        for name, p in base.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    base = base.to(dtype)
    base.save_pretrained(root / "base", safe_serialization=True)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(1, 4):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in base.state_dict().items():
                noise = torch.randn(p.shape, generator=g) * (0.02 * p.float().std().clamp_min(1e-3))
                p.copy_((base_sd[k].float() + noise).to(dtype))
        base.save_pretrained(root / f"ft{i}", safe_serialization=True)
        for k, p in base.state_dict().items():
            p.copy_(base_sd[k])


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(f)
    return out


def run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def compare(name: str, root: Path, mergekit: str, merger: str) -> dict:
    recipe = root / f"{name}.yml"
    recipe.write_text(textwrap.dedent(RECIPES[name]).lstrip())
    mk_out, mg_out = root / "out" / "mergekit" / name, root / "out" / "merger" / name
    row: dict = {"recipe": name}
    try:
        run(
            [mergekit, str(recipe), str(mk_out), "--lazy-unpickle", "--allow-crimes", "--quiet", "--no-copy-tokenizer"],
            root,
        )
    except RuntimeError as e:
        row["error"] = f"mergekit: {e}"
        return row
    try:
        run([merger, "apply", str(recipe), "-o", str(mg_out), "--force", "-q", "--device", "cpu"], root)
    except RuntimeError as e:
        row["error"] = f"merger: {e}"
        return row
    a, b = load_dir(mk_out), load_dir(mg_out)
    row["only_mergekit"] = sorted(set(a) - set(b))
    row["only_merger"] = sorted(set(b) - set(a))
    diffs = {}
    for k in sorted(set(a) & set(b)):
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
            diffs[k] = f"shape/dtype {tuple(a[k].shape)} {a[k].dtype} vs {tuple(b[k].shape)} {b[k].dtype}"
            continue
        x, y = a[k].double(), b[k].double()
        d = (x - y).abs().max().item()
        rel = d / max(x.abs().max().item(), 1e-30)
        diffs[k] = (d, rel, bool(torch.equal(a[k], b[k])))
    numeric = {k: v for k, v in diffs.items() if isinstance(v, tuple)}
    row["tensors"] = len(numeric)
    row["max_abs"] = max((v[0] for v in numeric.values()), default=0.0)
    row["max_rel"] = max((v[1] for v in numeric.values()), default=0.0)
    row["exact"] = sum(v[2] for v in numeric.values())
    row["bad_shapes"] = {k: v for k, v in diffs.items() if isinstance(v, str)}
    row["worst"] = sorted(((v[0], k) for k, v in numeric.items()), reverse=True)[:6]
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (mk_out, mg_out))
    row["layers"] = (ca.get("num_hidden_layers"), cb.get("num_hidden_layers"))
    # merger's output in transformers: load, forward, and the logits against mergekit's
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 33).unsqueeze(0) % ARCH["vocab_size"]
    with torch.no_grad():
        lb = AutoModelForCausalLM.from_pretrained(mg_out, dtype=torch.float32)(ids).logits
        la = AutoModelForCausalLM.from_pretrained(mk_out, dtype=torch.float32)(ids).logits
    row["forward_finite"] = bool(torch.isfinite(lb).all())
    row["logits_max_abs"] = (la - lb).abs().max().item()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml", help="mergekit-yaml of a mergekit install")
    p.add_argument("--merger", default=str(Path(sys.executable).with_name("merger")))
    p.add_argument("--root", default="/tmp/mkcmp", type=Path)
    p.add_argument("--rtol", default=1e-6, type=float, help="relative (to the tensor's max) difference accepted")
    p.add_argument(
        "--input-dtype",
        default="float32",
        choices=["bfloat16", "float32"],
        help="the family's dtype (default float32, where every recipe agrees); bfloat16 task vectors are coarse, "
        "so TIES meets equal magnitudes at its trim threshold and votes that cancel, which the two tools settle "
        "differently (README: details that differ on purpose): its TIES recipes then show DIFFER",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("recipes", nargs="*", help="names of RECIPES (default: all)")
    args = p.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_family(root, getattr(torch, args.input_dtype))
    rows = [compare(n, root, args.mergekit, args.merger) for n in (args.recipes or RECIPES)]
    ok_all = True
    for r in rows:
        if "error" in r:
            ok_all = False
            print(f"{r['recipe']}: ERROR {r['error']}")
            continue
        passthrough = r["recipe"].startswith("a")
        ok = (
            not r["only_mergekit"]
            and not r["only_merger"]
            and not r["bad_shapes"]
            and r["layers"][0] == r["layers"][1]
            and (r["exact"] == r["tensors"] if passthrough else r["max_rel"] <= args.rtol)
        )
        ok_all &= ok
        print(
            f"{r['recipe']:40s} tensors {r['tensors']:3d} exact {r['exact']:3d} max_abs {r['max_abs']:.3g} "
            f"max_rel {r['max_rel']:.3g} layers mk/merger {r['layers']} logits {r['logits_max_abs']:.3g} "
            f"forward {'ok' if r['forward_finite'] else 'NON-FINITE'}  {'AGREE' if ok else 'DIFFER'}"
        )
        if not ok:
            for k in ("only_mergekit", "only_merger", "bad_shapes"):
                if r[k]:
                    print(f"    {k}: {r[k]}")
            for d, k in r["worst"]:
                if d > 0:
                    print(f"    {k}: max abs {d:.4g}")
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())

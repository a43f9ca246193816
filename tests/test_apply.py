"""`merger apply` end to end on sharded checkpoints, compared with float64 references computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint

from merger.cli import cli


def apply(tmp_path: Path, recipe: str, *args: str) -> dict:
    (tmp_path / "recipe.yaml").write_text(recipe)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "recipe.yaml"), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ref_trim(tv: torch.Tensor, density: float) -> torch.Tensor:
    flat = tv.reshape(-1)
    k = max(1, math.floor(round(density * 1000) * flat.numel() / 1000))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(tv.shape)


def ref_ties(base, xs, weights, densities, lam):
    ds = torch.stack([ref_trim(x - base, d) * w for x, w, d in zip(xs, weights, densities)])
    elected = ds.sum(0).sign()
    agree = (ds.sign() == elected) & (ds != 0)
    w = torch.tensor(weights, dtype=torch.float64).abs().reshape(-1, *[1] * base.dim())
    total = (ds * agree).sum(0)
    count = (w * agree).sum(0)
    return base + lam * torch.where(count > 0, total / count.clamp(min=1e-300), torch.zeros_like(total))


def test_linear_soup_over_shards(tmp_path, family):
    paths, models = family
    summary = apply(
        tmp_path,
        f"""
merge_method: linear
models:
  - model: {paths["ft1"]}
    parameters: {{weight: 2}}
  - model: {paths["ft2"]}
    parameters: {{weight: 1}}
  - model: {paths["ft3"]}
    parameters: {{weight: 1}}
output: {{path: {tmp_path / "out"}, shard_size: 300B}}
""",
    )
    out = load_output(tmp_path / "out")
    assert summary["shards"] == len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 2
    for name, want in models["ft1"].items():
        if not want.is_floating_point():
            assert torch.equal(out[name], want)
            continue
        ref = (2 * models["ft1"][name].double() + models["ft2"][name].double() + models["ft3"][name].double()) / 4
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name].double(), ref, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_with_negation(tmp_path, family):
    paths, models = family
    apply(
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {paths["base"]}
models:
  - model: {paths["ft1"]}
    parameters: {{weight: 1.0}}
  - model: {paths["ft2"]}
    parameters: {{weight: -0.5}}
parameters: {{lambda: 0.8}}
""",
        "-o",
        str(tmp_path / "out"),
    )
    out = load_output(tmp_path / "out")
    for name, b in models["base"].items():
        if b.is_floating_point():
            b = b.double()
            tv = (models["ft1"][name].double() - b) - 0.5 * (models["ft2"][name].double() - b)
            torch.testing.assert_close(out[name].double(), b + 0.8 * tv, rtol=1e-6, atol=1e-6)


def test_ties_mergekit_style_recipe(tmp_path, family):
    """A mergekit TIES config (base listed among the models, top-level defaults) runs unchanged."""
    paths, models = family
    apply(
        tmp_path,
        f"""
models:
  - model: {paths["base"]}
  - model: {paths["ft1"]}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {paths["ft2"]}
    parameters:
      density: 0.3
  - model: {paths["ft3"]}
merge_method: ties
base_model: {paths["base"]}
parameters:
  normalize: true
  int8_mask: true
  weight: 0.25
  density: 0.7
dtype: float32
""",
        "-o",
        str(tmp_path / "out"),
    )
    out = load_output(tmp_path / "out")
    for name, b in models["base"].items():
        if b.is_floating_point():
            xs = [models[k][name].double() for k in ("ft1", "ft2", "ft3")]
            ref = ref_ties(b.double(), xs, [0.5, 0.25, 0.25], [0.5, 0.3, 0.7], 1.0)
            torch.testing.assert_close(out[name].double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 64, generator=g).to(dtype), "b": torch.randn(64, generator=g).to(dtype)}
    fts = [
        {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(3)
    ]
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    recipe = f"""
merge_method: task_arithmetic
base_model: {tmp_path / "base"}
models: [{", ".join(f"{{model: {tmp_path / f'ft{i}'}}}" for i in range(3))}]
"""
    apply(tmp_path, recipe, "-o", str(tmp_path / "half"))
    apply(tmp_path, recipe + "out_dtype: float32\n", "-o", str(tmp_path / "f32"))
    half, f32 = load_output(tmp_path / "half"), load_output(tmp_path / "f32")
    for name, b in base.items():
        ref = b.double() + sum(ft[name].double() - b.double() for ft in fts)
        assert half[name].dtype == dtype and f32[name].dtype == torch.float32
        torch.testing.assert_close(f32[name].double(), ref, rtol=1e-6, atol=1e-6)
        # rounding once, at the end: the half-precision output is the rounded float32 result
        torch.testing.assert_close(half[name], ref.float().to(dtype), rtol=0, atol=0)


def test_float16_output_and_config_dtype(tmp_path, family):
    paths, _ = family
    apply(
        tmp_path,
        f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\nout_dtype: float16\n",
        "-o",
        str(tmp_path / "out"),
    )
    out = load_output(tmp_path / "out")
    assert out["layers.0.w"].dtype == torch.float16
    assert out["position_ids"].dtype == torch.int64
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_config_comes_from_the_first_model_holding_one(tmp_path, family):
    """A base without config.json: the output's config (and generation files) come from the first model that
    holds them, and plan says so; where no model holds one, the output has none and apply says so."""
    paths, _ = family
    (paths["base"] / "config.json").unlink()
    for i in (1, 2):
        (paths[f"ft{i}"] / "config.json").write_text(
            json.dumps({"model_type": "toy", "torch_dtype": "float32", "n": i})
        )
    (paths["ft2"] / "generation_config.json").write_text('{"max_length": 7}')
    recipe = f"merge_method: task_arithmetic\nbase_model: {paths['base']}\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
    (tmp_path / "r.yaml").write_text(recipe)
    apply(tmp_path, recipe, "-o", str(tmp_path / "first"))  # in recipe order: ft1's, which holds no generation file
    assert json.loads((tmp_path / "first" / "config.json").read_text())["n"] == 1
    assert not (tmp_path / "first" / "generation_config.json").exists()
    (paths["ft1"] / "config.json").unlink()
    shown = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert shown.exit_code == 0, shown.output
    assert f"config:       from '{paths['ft2']}' ('{paths['base']}' holds none)" in shown.output
    apply(tmp_path, recipe, "-o", str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n"] == 2
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"max_length": 7}
    (paths["ft2"] / "config.json").unlink()
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert "note: none of the models holds a config.json: the output has none" in result.stderr
    assert not (tmp_path / "none" / "config.json").exists() and (tmp_path / "none" / "merger.lock.json").exists()


def test_output_layout_card_and_determinism(tmp_path, family):
    paths, _ = family
    (paths["base"] / "tokenizer.json").write_text("{}")
    (paths["base"] / "generation_config.json").write_text("{}")
    recipe = f"""
merge_method: ties
base_model: {paths["base"]}
models:
  - model: {paths["ft1"]}
    parameters: {{density: 0.5}}
  - model: {paths["ft2"]}
    parameters: {{density: 0.5}}
output: {{shard_size: 500B}}
"""
    s1 = apply(tmp_path, recipe, "-o", str(tmp_path / "a"))
    apply(tmp_path, recipe, "-o", str(tmp_path / "b"))
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        if f != "README.md":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == s1["bytes_written"] == sum(t.nbytes for t in load_output(a).values())
    assert {"tokenizer.json", "generation_config.json", "config.json", "README.md"} <= set(files)
    card = (a / "README.md").read_text()
    front = card.split("---")[1]
    assert "- merge\n- merger" in front and "library_name: transformers" in front
    assert "base_model" not in front  # local models: the Hub takes ids only (test_hub checks the ids)
    assert "**ties**" in card and "density: 0.5" in card and "merge_method: ties" in card
    # natural order: layers.1 before layers.10 in the output
    names = list(index["weight_map"])
    assert names.index("layers.1.w") < names.index("layers.10.w")
    assert s1["tensors"] == 6 and s1["bytes_read"] > 0 and s1["peak_rss_bytes"] > 0


def test_plan_reads_headers_and_shows_layout(tmp_path, family):
    paths, _ = family
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
        f"output: {{path: {tmp_path / 'out'}, shard_size: 300B}}\n"
    )
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["tensors"] == 6 and info["tensors_merged"] == 5 and info["tensors_copied"] == 1
    assert info["bytes_written"] == sum(s["bytes"] for s in info["shards"])
    assert info["bytes_read"] == 2 * info["bytes_written"]
    assert not (tmp_path / "out").exists()
    human = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert "model-00001-of-" in human.output and "peak memory" in human.output


def test_plan_on_cuda_names_the_tensors_merged_in_pieces(tmp_path, family, monkeypatch):
    """`merger plan --device cuda` reports which tensors are too large for the GPU budget to merge
    whole (CUDA stood in: this machine has none)."""
    import merger.budget
    import merger.plan
    import merger.recipe
    import merger.stream

    paths, _ = family
    monkeypatch.setattr(merger.plan, "cuda_available", lambda: True)
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}, {{model: {paths['ft2']}}}]\n"
    )
    probe = merger.plan.build_plan(merger.recipe.load_recipe(tmp_path / "r.yaml"), device="cpu")
    layer = next(t for t in probe.tensors if t.name == "layers.0.w")  # 64 entries; embed.weight has 96
    for budget, pieced in ((1 << 40, []), (probe.gpu_bytes(layer), ["embed.weight"])):
        monkeypatch.setattr(merger.budget, "gpu_budget", lambda budget=budget: budget)
        monkeypatch.setattr(merger.budget, "pinned_budget", lambda: 1 << 40)
        result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--device", "cuda", "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert info["device"] == "cuda" and info["gpu_tensors_in_pieces"] == pieced
        assert info["peak_gpu_memory_estimate"] > 0
        human = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--device", "cuda"]).output
        assert ("1 tensor(s) too large to merge whole go through the GPU in pieces" in human) == bool(pieced)


def test_force_replaces_an_earlier_output(tmp_path, family):
    """An earlier output of more shards is replaced whole: none of its shards stays behind."""
    paths, _ = family
    out = tmp_path / "out"
    recipe = f"merge_method: linear\nmodels: [{{model: {paths['ft1']}}}]\n"
    apply(tmp_path, recipe, "-o", str(out), "--shard-size", "200")
    assert len(list(out.glob("*.safetensors"))) > 2
    apply(tmp_path, recipe, "-o", str(out), "--force")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_methods_command_lists_parameters():
    result = CliRunner().invoke(cli, ["methods", "--json"])
    assert result.exit_code == 0
    methods = {m["name"]: m for m in json.loads(result.stdout)}
    assert {"linear", "task_arithmetic", "ties"} <= set(methods)
    ties = methods["ties"]
    assert ties["needs_base_model"] and "2306.01708" in ties["paper"]
    assert {p["name"]: p["default"] for p in ties["model_parameters"]} == {"weight": 1.0, "density": 1.0}
    assert {p["name"] for p in ties["parameters"]} >= {"lambda", "normalize", "consensus_method"}
    text = CliRunner().invoke(cli, ["methods"]).output
    assert "density" in text and "Model soups" in text


@pytest.mark.parametrize("n_shards", [1, 3])
def test_single_file_and_unindexed_inputs(tmp_path, n_shards):
    t = {"a": torch.ones(3), "b": torch.zeros(2)}
    write_checkpoint(tmp_path / "m1", t, n_shards=n_shards)
    write_checkpoint(tmp_path / "m2", {k: v + 1 for k, v in t.items()}, n_shards=n_shards)
    apply(
        tmp_path,
        f"merge_method: linear\nmodels: [{{model: {tmp_path / 'm1'}}}, {{model: {tmp_path / 'm2'}}}]\n",
        "-o",
        str(tmp_path / "o"),
    )
    out = load_output(tmp_path / "o")
    assert torch.equal(out["a"], torch.full((3,), 1.5)) and torch.equal(out["b"], torch.full((2,), 0.5))

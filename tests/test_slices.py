"""Recipes of slices: layer ranges stacked (passthrough frankenmerges) or merged layer by layer, with the
output's layers renumbered from 0 and its config rewritten; each checked against tensors built by hand
from the inputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, run_bad, write_checkpoint
from safetensors.torch import load_file

from merger.cli import cli

transformers = pytest.importorskip("transformers")


def tiny_llama(path, seed: int, layers: int = 4):
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, max_shard_size="20KB")  # several shards
    return {k: v.clone() for k, v in model.state_dict().items()}


def apply(tmp_path, recipe: str):
    (tmp_path / "r.yaml").write_text(recipe)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


def layer(state: dict, i: int) -> dict[str, torch.Tensor]:
    """Layer i's tensors, by their name within the layer."""
    prefix = f"model.layers.{i}."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def test_a_passthrough_frankenmerge_stacks_overlapping_layers_of_two_models(tmp_path):
    a = tiny_llama(tmp_path / "a", 0)
    b = tiny_llama(tmp_path / "b", 1)
    out = apply(
        tmp_path,
        f"""
merge_method: passthrough
dtype: float32
slices:
  - sources: [{{model: {tmp_path / "a"}, layer_range: [0, 3]}}]
  - sources: [{{model: {tmp_path / "b"}, layer_range: [1, 4]}}]
  - sources: [{{model: {tmp_path / "a"}, layer_range: [2, 4]}}]
""",
    )
    got = load_output(out)
    # the oracle: output layer k is this (model, layer), renumbered; embeddings from the first slice's
    # model, the final norm and head from the last slice's
    stacked = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (a, 2), (a, 3)]
    want = {f"model.layers.{k}.{n}": v for k, (m, i) in enumerate(stacked) for n, v in layer(m, i).items()}
    want |= {n: a[n] for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    assert "Layers and parameters per tensor: see the recipe below" in (out / "README.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    oracle = transformers.LlamaForCausalLM(model.config).eval()
    oracle.load_state_dict(want)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, oracle(ids).logits)


def test_a_passthrough_of_one_models_full_range_is_that_model_byte_for_byte(tmp_path):
    a = tiny_llama(tmp_path / "a", 0)
    out = apply(
        tmp_path,
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {tmp_path / 'a'}, layer_range: [0, 4]}}]\n",
    )
    got = load_output(out)
    assert got.keys() == a.keys()
    for name, value in a.items():
        assert got[name].dtype == value.dtype and got[name].view(torch.uint8).equal(value.view(torch.uint8))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_empty_parameters_and_torch_dtype_names_are_read_as_mergekit_reads_them(tmp_path):
    """`parameters:` left empty (YAML null) at any level is no parameters, `torch.float16` is float16, and
    a slice's `residual_weight` is taken and changes nothing, as mergekit 0.1.5 reads them: the same bytes
    as the config written out in full."""
    tiny_llama(tmp_path / "a", 0)
    tiny_llama(tmp_path / "b", 1)
    a, b = tmp_path / "a", tmp_path / "b"
    full = f"""merge_method: linear
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 4], parameters: {{}}}}
      - {{model: {b}, layer_range: [0, 4], parameters: {{}}}}
    parameters: {{}}
parameters: {{weight: 0.5}}
dtype: float16
"""
    bare = f"""merge_method: linear
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
        parameters:
      - model: {b}
        layer_range: [0, 4]
        parameters:
    parameters:
    residual_weight: 0.3
parameters:
  weight: 0.5
dtype: torch.float16
"""
    models = (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n  - model: {b}\n"
        "parameters: {weight: 0.5}\nout_dtype: torch.float16\n"
    )
    outs = []
    for name, text in (("full", full), ("bare", bare), ("models", models)):
        (tmp_path / name).mkdir()
        outs.append(apply(tmp_path / name, text))
    shards = sorted(f.name for f in outs[0].glob("*.safetensors"))
    assert load_output(outs[0])["lm_head.weight"].dtype == torch.float16
    for out in outs[1:]:
        assert sorted(f.name for f in out.glob("*.safetensors")) == shards
        assert all((out / f).read_bytes() == (outs[0] / f).read_bytes() for f in shards)


def test_slices_merge_their_sources_layer_by_layer_with_per_source_parameters(tmp_path):
    """Linear over two models whose layers are offset by one, each slice with its own weights; the
    tensors outside the layers from the first (embeddings) and last (norm, head) slice, with theirs."""
    a = tiny_llama(tmp_path / "a", 0)
    b = tiny_llama(tmp_path / "b", 1)
    out = apply(
        tmp_path,
        f"""
merge_method: linear
dtype: float32
slices:
  - sources:
      - {{model: {tmp_path / "a"}, layer_range: [0, 2], parameters: {{weight: 3}}}}
      - {{model: {tmp_path / "b"}, layer_range: [1, 3]}}
  - sources:
      - {{model: {tmp_path / "a"}, layer_range: [3, 4]}}
      - {{model: {tmp_path / "b"}, layer_range: [0, 1]}}
    parameters: {{weight: 2}}
""",
    )
    got = load_output(out)

    def mix(x, y, wx, wy):
        return ((wx * x.double() + wy * y.double()) / (wx + wy)).float()

    pairs = [(0, 1, 3, 1), (1, 2, 3, 1), (3, 0, 2, 2)]  # output layer k: a's layer, b's layer, weights
    for k, (i, j, wa, wb) in enumerate(pairs):
        for n, v in layer(a, i).items():
            torch.testing.assert_close(got[f"model.layers.{k}.{n}"], mix(v, layer(b, j)[n], wa, wb))
    torch.testing.assert_close(
        got["model.embed_tokens.weight"], mix(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"], 3, 1)
    )
    torch.testing.assert_close(got["lm_head.weight"], mix(a["lm_head.weight"], b["lm_head.weight"], 2, 2))
    assert len([n for n in got if n.endswith(".mlp.up_proj.weight")]) == 3
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_per_layer_config_lists_follow_the_layers(tmp_path):
    from merger.output import restack_config

    config = {"num_hidden_layers": 4, "layer_types": ["s", "f", "s", "f"], "text_config": {"num_hidden_layers": 4}}
    restack_config(config, 4, [0, 1, 2, 1, 2, 3])
    assert config == {
        "num_hidden_layers": 6,
        "layer_types": ["s", "f", "s", "f", "s", "f"],
        "text_config": {"num_hidden_layers": 6},
    }


@pytest.fixture
def toys(workdir):
    g = torch.Generator().manual_seed(0)
    for name, layers in (("four", 4), ("two", 2)):
        t = {f"layers.{i}.w": torch.randn(4, 4, generator=g) for i in range(layers)}
        write_checkpoint(workdir / name, t | {"embed.weight": torch.randn(4, 4, generator=g)})


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ("- sources: [{model: four, layer_range: [0, 2]}, {model: two, layer_range: [0, 1]}]",
         "recipe.yaml:3: slices[0].sources: the sources of a slice are merged layer by layer, so each covers as many layers; these cover 1, 2"),
        ("- sources: [{model: four, layer_range: [2, 2]}]",
         "recipe.yaml:3: slices[0].sources[0].layer_range: [2, 2] holds no layers; give [start, end] with 0 <= start < end (end not included)"),
        ("- sources: [{model: two, layer_range: [1, 3]}]",
         "recipe.yaml:3: slices[0].sources[0].layer_range: 'two' has 2 layers (0 to 1); [1, 3] goes past them"),
        ("- sources: [{model: four, layer_range: [0, 2], parameters: {weight: -1.0e+39}}]",
         "recipe.yaml:3: slices[0].sources[0].parameters.weight: -1e+39 is beyond float32's range (3.4e+38)"),
        ("- sources: [{model: four, layer_range: [0, 2], parameters: {normalize: false}}]",
         "recipe.yaml:3: slices[0].sources[0].parameters.normalize: 'normalize' applies to the whole merge; put it under the slice's or the top-level parameters"),
    ],
)  # fmt: skip
def test_bad_slices_are_refused_with_their_line(toys, slices, message):
    assert run_bad(f"merge_method: linear\nslices:\n{slices}\n") == f"error: {message}\n"


def test_passthrough_takes_one_source_per_slice_and_task_vectors_need_the_base_among_them(toys):
    two = "slices:\n- sources: [{model: four, layer_range: [0, 2]}, {model: two, layer_range: [0, 2]}]\n"
    assert run_bad("merge_method: passthrough\n" + two) == (
        "error: recipe.yaml:3: slices[0].sources: passthrough copies one model's tensors, not 2: give one model "
        "(in slices, one source each)\n"
    )
    assert run_bad("merge_method: task_arithmetic\nbase_model: four\n" + two.replace("four", "two", 1)) == (
        "error: recipe.yaml:4: slices[0].sources: task_arithmetic needs the base model 'four' among each slice's "
        "sources (with the layers whose task vectors are merged)\n"
    )
    assert run_bad("merge_method: linear\nmodels: [{model: four}]\n" + two) == (
        "error: recipe.yaml:3: slices: a recipe lists models: or slices:, not both\n"
    )


def test_task_arithmetic_over_slices_reads_the_base_layers_named_in_each_slice(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.w": torch.randn(3, 3, generator=g) for i in range(3)} | {
        "embed.weight": torch.randn(3, 3, generator=g)
    }
    ft = {k: v + torch.randn(3, 3, generator=g) for k, v in base.items()}
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "ft", ft)
    out = apply(
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {tmp_path / "base"}
slices:
  - sources:
      - {{model: {tmp_path / "base"}, layer_range: [1, 3]}}
      - {{model: {tmp_path / "ft"}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}
""",
    )
    got = load_file(next(out.glob("*.safetensors")))
    for k, (b, f) in enumerate([(1, 0), (2, 1)]):
        want = base[f"layers.{b}.w"].double() + 0.5 * (ft[f"layers.{f}.w"].double() - base[f"layers.{b}.w"].double())
        torch.testing.assert_close(got[f"layers.{k}.w"], want.float())
    assert set(got) == {"layers.0.w", "layers.1.w", "embed.weight"}


def test_a_slice_with_a_base_model_of_its_own_takes_task_vectors_from_it(tmp_path):
    """mergekit's per-slice `base_model`: that slice's task vectors are against it (it must be among the
    slice's sources, as the recipe's base must); the other slices keep the recipe's."""
    g = torch.Generator().manual_seed(4)
    a = {f"layers.{i}.w": torch.randn(3, 3, generator=g) for i in range(3)} | {"embed.weight": torch.randn(3, 3)}
    b = {k: v + torch.randn(3, 3, generator=g) for k, v in a.items()}
    ft = {k: v + torch.randn(3, 3, generator=g) for k, v in a.items()}
    for name, tensors in (("a", a), ("b", b), ("ft", ft)):
        write_checkpoint(tmp_path / name, tensors)
    recipe = f"""
merge_method: task_arithmetic
base_model: {tmp_path / "a"}
slices:
  - sources:
      - {{model: {tmp_path / "a"}, layer_range: [0, 1]}}
      - {{model: {tmp_path / "ft"}, layer_range: [0, 1], parameters: {{weight: 0.5}}}}
  - sources:
      - {{model: {tmp_path / "b"}, layer_range: [1, 3]}}
      - {{model: {tmp_path / "ft"}, layer_range: [1, 3], parameters: {{weight: 0.5}}}}
    base_model: {tmp_path / "b"}
"""
    out = apply(tmp_path, recipe)
    got = load_file(next(out.glob("*.safetensors")))
    merged = (out / "README.md").read_text().split("Models merged:")[1].split("##")[0]
    assert f"`{tmp_path / 'ft'}`" in merged and f"`{tmp_path / 'b'}`" not in merged  # b is a base, not merged
    shown = json.loads(CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml"), "--json"]).stdout)
    assert shown["models"] == [str(tmp_path / "ft")]
    lock = json.loads((out / "merger.lock.json").read_text())
    assert str(tmp_path / "b") in [ref for i in lock["inputs"] for ref in i["refs"]]  # read, so locked
    for k, base in ((0, a), (1, b), (2, b)):
        w = f"layers.{k}.w"
        want = base[w].double() + 0.5 * (ft[w].double() - base[w].double())
        torch.testing.assert_close(got[w], want.float())
    (tmp_path / "r.yaml").write_text(recipe.replace(f"base_model: {tmp_path / 'a'}\n", ""))
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert "r.yaml:4: slices[0]: task_arithmetic needs a base_model (the recipe's, or the slice's own)" in result.output
    (tmp_path / "r.yaml").write_text(recipe.replace(f"base_model: {tmp_path / 'b'}", f"base_model: {tmp_path / 'a'}"))
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2, result.output
    assert f"slices[1].sources: task_arithmetic needs the base model '{tmp_path / 'a'}' among" in result.output
    ignored = recipe.replace("task_arithmetic", "linear").replace(
        f"base_model: {tmp_path / 'b'}", "base_model: nowhere"
    )
    (tmp_path / "r.yaml").write_text(ignored)  # linear reads no base (as in mergekit), yet a missing one is named
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "r.yaml:11: slices[1].base_model: " in result.output, result.output


def test_plan_shows_each_output_layers_inputs_and_parameters(toys):
    from pathlib import Path

    Path("r.yaml").write_text(
        "merge_method: linear\nslices:\n"
        "  - sources:\n"
        "      - {model: four, layer_range: [1, 3], parameters: {weight: [1, 3]}}\n"
        "      - {model: two, layer_range: [0, 2]}\n"
        "  - sources: [{model: four, layer_range: [3, 4]}, {model: two, layer_range: [1, 2]}]\n"
        "    parameters: {normalize: false}\n"
    )
    text = CliRunner().invoke(cli, ["plan", "r.yaml"]).output
    assert text.split("  merged from:\n")[1] == (
        "    embed.weight  four + two        four: weight 1; two: weight 1; normalize true\n"
        "    layer 0       four[1] + two[0]  four: weight 1; two: weight 1; normalize true\n"
        "    layer 1       four[2] + two[1]  four: weight 3; two: weight 1; normalize true\n"
        "    layer 2       four[3] + two[1]  four: weight 1; two: weight 1; normalize false\n"
    )
    info = json.loads(CliRunner().invoke(cli, ["plan", "r.yaml", "--json"]).stdout)
    assert info["layers"] == 3 and len(info["tensor_sources"]) == info["tensors"] == 4
    assert info["tensor_sources"][2] == {
        "name": "layers.1.w",
        "layer": 1,
        "sources": [["four", "layers.2.w"], ["two", "layers.1.w"]],
        "base": None,
        "model_parameters": [{"weight": 3.0}, {"weight": 1.0}],
        "parameters": {"normalize": True},
    }


def test_a_model_named_two_ways_counts_once(toys):
    from pathlib import Path

    Path("r.yaml").write_text(
        "merge_method: linear\nslices:\n"
        "  - sources: [{model: four, layer_range: [0, 2]}, {model: two, layer_range: [0, 2]}]\n"
        "  - sources: [{model: ./four, layer_range: [2, 4]}, {model: two/, layer_range: [0, 2]}]\n"
    )
    text = CliRunner().invoke(cli, ["plan", "r.yaml"]).output
    assert text.splitlines()[0] == "r.yaml: linear of 2 model(s)"
    assert json.loads(CliRunner().invoke(cli, ["plan", "r.yaml", "--json"]).stdout)["models"] == ["four", "two"]


def test_the_plan_says_what_a_base_is_for(workdir):
    from pathlib import Path

    models = "models: [{model: ft1, parameters: {weight: 1}}, {model: ft2, parameters: {weight: 1}}]\n"
    for method, header in (
        ("linear", "linear of 2 model(s); config, tokenizer and tensor names from base 'base' (not merged)"),
        ("task_arithmetic", "task_arithmetic of 2 model(s) onto base 'base'"),
    ):
        Path("r.yaml").write_text(f"merge_method: {method}\nbase_model: base\n" + models)
        assert CliRunner().invoke(cli, ["plan", "r.yaml"]).output.splitlines()[0] == f"r.yaml: {header}"


@pytest.mark.parametrize("pieces", [False, True])
def test_one_model_twice_in_a_slice_on_the_fake_gpus_streams_is_the_cpus_bytes(tmp_path, monkeypatch, pieces):
    """A slice that averages each layer of a model with its next one reads two tensors of one model for
    one output tensor: staged (whole, or in pieces) by their place, the CPU's bytes on tests/fakecuda.py."""
    import fakecuda

    from merger.plan import build_plan
    from merger.recipe import parse_recipe

    g = torch.Generator().manual_seed(2)
    a = {f"layers.{i}.w": torch.randn(24, 24, generator=g).bfloat16() for i in range(3)}
    write_checkpoint(tmp_path / "a", a | {"embed.weight": torch.randn(5, 24, generator=g).bfloat16()})
    text = (
        f"merge_method: linear\nslices:\n  - sources: [{{model: {tmp_path / 'a'}, layer_range: [0, 2]}}, "
        f"{{model: {tmp_path / 'a'}, layer_range: [1, 3], parameters: {{weight: 3}}}}]\n"
    )
    plan = build_plan(parse_recipe(text), device="cpu")
    fakecuda.write_on_cpu_and_gpu(plan, tmp_path, monkeypatch, pieces, seed=1)
    for s in plan.shards:
        assert (tmp_path / "gpu" / s.filename).read_bytes() == (tmp_path / "cpu" / s.filename).read_bytes()
    (shard,) = plan.shards
    got = load_file(tmp_path / "gpu" / shard.filename)
    assert got.keys() == {"layers.0.w", "layers.1.w", "embed.weight"}
    want = ((a["layers.1.w"].double() + 3 * a["layers.2.w"].double()) / 4).bfloat16()
    torch.testing.assert_close(got["layers.1.w"], want, rtol=0.01, atol=0.01)

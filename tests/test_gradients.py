"""Parameters per tensor: gradients over the layers and filters on tensor names, at the top level, per
model and per slice source, as mergekit reads them; each checked against an oracle written here
(numpy's interp for the gradients, the tensor names for the filters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint

from merger import settings
from merger.cli import cli

NAMES = ["embed.weight", "final_norm.weight", "head.weight"]
NAMES += [f"model.layers.{i}.{w}.weight" for i in range(5) for w in ("self_attn.q", "mlp.up")]


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(7)
    out = {}
    for m in ("a", "b", "base"):
        out[m] = {n: torch.randn(6, 4, generator=g) for n in NAMES}
        write_checkpoint(tmp_path / m, out[m], n_shards=2)
    return out


def merged(tmp_path, recipe: str) -> dict[str, torch.Tensor]:
    (tmp_path / "r.yaml").write_text(recipe.replace("{root}", str(tmp_path)))
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q", "--force"])
    assert result.exit_code == 0, result.output
    return load_output(tmp_path / "out")


def gradient(points: list[float], t: float) -> float:
    """The oracle: points spread evenly over [0, 1], linearly in between."""
    return float(np.interp(t, np.linspace(0, 1, len(points)), points))


def place(name: str, layers: int = 5) -> float:
    """A tensor's place t over the layers of a models: recipe; outside them 0, before and after them
    alike, as mergekit 0.1.5 plans them (benchmarks/mergekit_compare.py checks it against mergekit)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) / (layers - 1)
    return 0.0


def test_gradient_reads_piecewise_linearly_and_filters_pick_the_first_match():
    assert [settings.at([0, 1, 0.5], "x", t) for t in (0, 0.25, 0.5, 0.75, 1)] == [0, 0.5, 1, 0.75, 0.5]
    filters = [{"filter": "mlp", "value": [0, 1]}, {"filter": "attn", "value": 3}, {"value": 2}]
    assert settings.at(filters, "layers.1.mlp.up", 0.5) == 0.5
    assert settings.at(filters, "layers.1.self_attn.q", 0.5) == 3
    assert settings.at(filters, "norm", 0.5) == 2
    assert settings.at(filters[:2], "norm", 0.5) is None  # unset here: the next level decides
    assert settings.at([{"filter": "*", "value": 4}], "anything", 0) == 4


@pytest.mark.parametrize("compute", ["float32", "float64"])  # the fused kernel, and torch
def test_a_top_level_gradient_weights_each_layer_by_its_place(tmp_path, models, compute):
    got = merged(
        tmp_path,
        f"merge_method: linear\ncompute_dtype: {compute}\ndtype: float32\n"
        "models: [{model: {root}/a, parameters: {weight: [0, 1, 0.25]}}, {model: {root}/b}]\n"
        "parameters: {normalize: false}\n",
    )
    a, b = models["a"], models["b"]
    for name in NAMES:
        w = gradient([0, 1, 0.25], place(name))
        torch.testing.assert_close(got[name], (w * a[name].double() + b[name].double()).float(), msg=name)


def test_points_in_scientific_notation_are_numbers_as_mergekit_reads_them(tmp_path, models):
    """PyYAML reads `1e-1` (no dot) as a string; mergekit takes it as the number, in a gradient too (its
    evaluate_setting), so a config that writes gradients so runs unchanged."""
    got = merged(
        tmp_path,
        "merge_method: linear\ndtype: float32\n"
        "models: [{model: {root}/a, parameters: {weight: [1e-1, 0.5, 2E+0]}},\n"
        "  {model: {root}/b, parameters: {weight: [{filter: mlp, value: [5e-1, 1e-1]}, {value: 1}]}}]\n"
        "parameters: {normalize: false}\n",
    )
    a, b = models["a"], models["b"]
    for name in NAMES:
        wa = gradient([0.1, 0.5, 2.0], place(name))
        wb = gradient([0.5, 0.1], place(name)) if "mlp" in name else 1.0
        want = (wa * a[name].double() + wb * b[name].double()).float()
        torch.testing.assert_close(got[name], want, msg=name)
    assert settings.problem(["1e-4", {"value": 1}]) == (
        "a list is either values (numbers: a gradient) or {filter, value} entries, not a mix"
    )


def test_a_list_of_other_values_steps_as_mergekit_reads_it(tmp_path, models):
    """`normalize: [true, false]`: not interpolated; layer t takes the value at int(t * (len - 1)), as
    mergekit 0.1.5's evaluate_setting does: true up to the last layer, false there."""
    got = merged(
        tmp_path,
        "merge_method: linear\ndtype: float32\n"
        "models: [{model: {root}/a, parameters: {weight: 0.5}}, {model: {root}/b, parameters: {weight: 1.0}}]\n"
        "parameters: {normalize: [true, false]}\n",
    )
    a, b = models["a"], models["b"]
    for name in NAMES:
        normalize = [True, False][int(place(name) * 1)]
        total = 0.5 * a[name].double() + b[name].double()
        torch.testing.assert_close(got[name], (total / 1.5 if normalize else total).float(), msg=name)
    assert [settings.at(["sum", "count", "sum"], "x", t) for t in (0, 0.49, 0.5, 0.99, 1)] == [
        "sum",
        "sum",
        "count",
        "count",
        "sum",
    ]


def test_filters_with_gradients_per_model_over_the_top_level(tmp_path, models):
    """Model a: mlp tensors along a gradient, attention ones 3, the others fall through to the top level
    (2); model b has none of its own: the top level's filters, and its default outside them."""
    got = merged(
        tmp_path,
        "merge_method: task_arithmetic\nbase_model: {root}/base\ndtype: float32\ncompute_dtype: float64\n"
        "models:\n"
        "  - model: {root}/a\n"
        "    parameters: {weight: [{filter: mlp, value: [1, 0]}, {filter: self_attn, value: 3}]}\n"
        "  - model: {root}/b\n"
        "parameters: {weight: [{filter: head, value: 2}, {filter: norm, value: [5, 6]}]}\n",
    )
    a, b, base = models["a"], models["b"], models["base"]
    for name in NAMES:
        t = place(name)
        wa = (
            gradient([1, 0], t)
            if "mlp" in name
            else 3
            if "self_attn" in name
            else 2
            if "head" in name
            else gradient([5, 6], t)
            if "norm" in name
            else 1
        )
        wb = 2 if "head" in name else gradient([5, 6], t) if "norm" in name else 1
        d = base[name].double()
        want = d + wa * (a[name].double() - d) + wb * (b[name].double() - d)
        torch.testing.assert_close(got[name], want.float(), msg=name)


def test_gradients_in_slices_run_over_each_slice_and_a_source_overrides_its_slice(tmp_path, models):
    got = merged(
        tmp_path,
        "merge_method: linear\ndtype: float32\ncompute_dtype: float64\n"
        "slices:\n"
        "  - sources:\n"
        "      - {model: {root}/a, layer_range: [0, 3], parameters: {weight: [0, 2]}}\n"
        "      - {model: {root}/b, layer_range: [2, 5]}\n"
        "    parameters: {weight: 5, normalize: false}\n"
        "  - sources:\n"
        "      - {model: {root}/a, layer_range: [4, 5]}\n"
        "      - {model: {root}/b, layer_range: [0, 1], parameters: {weight: [{filter: mlp, value: 0.5}]}}\n"
        "parameters: {weight: [1, 3]}\n",
    )
    a, b = models["a"], models["b"]

    def layer(state, i, w):
        return state[f"model.layers.{i}.{w}.weight"].double()

    # output layer k: (a's layer, b's layer, a's weight, b's weight, normalize)
    plan = [(0, 2, 0.0, 5, False), (1, 3, 1.0, 5, False), (2, 4, 2.0, 5, False)]
    plan += [(4, 0, 3.0, None, True)]  # one layer: t = 1, as mergekit; b: 0.5 on mlp, else the top level's 3
    for k, (i, j, wa, wb, normalize) in enumerate(plan):
        for w in ("self_attn.q", "mlp.up"):
            wb_here = wb if wb is not None else (0.5 if w == "mlp.up" else 3.0)
            want = wa * layer(a, i, w) + wb_here * layer(b, j, w)
            if normalize:
                want /= wa + wb_here
            torch.testing.assert_close(got[f"model.layers.{k}.{w}.weight"], want.float(), msg=f"{k} {w}")
    # the embedding from the first slice (a: 0, b: 5, not normalised), the head from the last (a and b
    # the top level's 1, normalised), both at t = 0 as mergekit
    torch.testing.assert_close(got["embed.weight"], (5 * b["embed.weight"]).float())
    torch.testing.assert_close(got["head.weight"], ((a["head.weight"].double() + b["head.weight"]) / 2).float())
    assert len([n for n in got if n.startswith("model.layers.")]) == 8


def test_a_gradient_that_makes_weights_sum_to_zero_somewhere_is_refused_before_merging(tmp_path, models):
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path}/a\n    parameters: {{weight: [1, -1]}}\n"
        f"  - model: {tmp_path}/b\n    parameters: {{weight: [-1, 1]}}\n"
    )
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {tmp_path / 'r.yaml'}:2: models: tensor 'model.layers.0.mlp.up.weight': the weights sum to 0, so they cannot "
        "be normalised; set normalize: false or change a weight\n"
    )
    assert not (tmp_path / "out").exists()


DELLA_TOO_WIDE = "density 0.4 and epsilon 0.45 put a keep probability outside (0, 1); choose epsilon below both density and 1 - density"


@pytest.mark.parametrize(
    ("recipe", "at"),
    [  # the parameter's line: a model's own, the recipe's, a slice's, a slice source's
        ("models:\n  - model: {root}/a\n    parameters: {density: 0.4, epsilon: [0.1, 0.45]}\n"
         "  - model: {root}/b\n    parameters: {density: 0.4}\n", "6: models[0].parameters.epsilon"),
        ("models:\n  - model: {root}/a\n  - model: {root}/b\n"
         "parameters:\n  density: 0.4\n  epsilon: [0.1, 0.45]\n", "9: parameters.epsilon"),
        ("slices:\n  - sources:\n      - {model: {root}/base, layer_range: [0, 5]}\n"
         "      - {model: {root}/a, layer_range: [0, 5]}\n    parameters: {density: 0.4, epsilon: [0.1, 0.45]}\n",
         "8: slices[0].parameters.epsilon"),
        ("slices:\n  - sources:\n      - {model: {root}/base, layer_range: [0, 5]}\n"
         "      - {model: {root}/a, layer_range: [0, 5], parameters: {epsilon: [0.1, 0.45]}}\n"
         "    parameters: {density: 0.4, epsilon: 0.1}\n", "7: slices[0].sources[1].parameters.epsilon"),
        # density a model's own, the epsilon gradient the recipe's: the line of what changes between layers
        ("models:\n  - model: {root}/a\n    parameters: {density: 0.4}\n  - model: {root}/b\n"
         "    parameters: {density: 0.4}\nparameters:\n  epsilon: [0.1, 0.45]\n", "10: parameters.epsilon"),
        # the other way round: epsilon a model's own (the first parameter the check names), density the gradient
        ("models:\n  - model: {root}/a\n    parameters: {epsilon: 0.45}\n  - model: {root}/b\n"
         "    parameters: {epsilon: 0.1}\nparameters:\n  density: [0.5, 0.5, 0.5, 0.5, 0.4]\n", "10: parameters.density"),
    ],
)  # fmt: skip
def test_a_gradient_that_fails_a_methods_check_somewhere_is_refused_at_its_own_line(tmp_path, models, recipe, at):
    """DELLA's keep probabilities leave (0, 1) where an epsilon gradient passes the density (t > 6/7: layer 4
    of 5): the error names the first such tensor and the line that gives that model's epsilon."""
    text = f"merge_method: della\nbase_model: {{root}}/base\ndtype: float32\n{recipe}".replace("{root}", str(tmp_path))
    (tmp_path / "r.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: {tmp_path / 'r.yaml'}:{at}: tensor 'model.layers.4.mlp.up.weight': {DELLA_TOO_WIDE}\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "given",
    [  # epsilon below density 0.1 at every layer; a check on its default (0.15) alone would refuse it
        "models:\n  - model: {root}/a\n    parameters: {density: 0.1, epsilon: [0.01, 0.05]}\n"
        "  - model: {root}/b\n    parameters: {density: 0.1, epsilon: 0.02}\n",
        "models:\n  - model: {root}/a\n  - model: {root}/b\nparameters: {density: 0.1, epsilon: [0.01, 0.05]}\n",
        "models:\n  - model: {root}/a\n  - model: {root}/b\n"
        "parameters: {density: 0.1, epsilon: [{filter: mlp, value: 0.05}, {value: 0.02}]}\n",
        "slices:\n  - sources:\n      - {model: {root}/base, layer_range: [0, 5]}\n"
        "      - {model: {root}/a, layer_range: [0, 5]}\n      - {model: {root}/b, layer_range: [0, 5]}\n"
        "    parameters: {density: 0.1, epsilon: [0.01, 0.05]}\n",
    ],
)
def test_a_gradient_valid_at_every_layer_merges_as_its_values_written_out_do(tmp_path, models, given):
    """The method's check sees each tensor's values, not a parameter's default where a gradient gives it: the
    recipe merges, byte for byte as the same one with density written as a gradient too (which a check of
    defaults let through)."""
    head = "merge_method: della\nbase_model: {root}/base\ndtype: float32\nrandom_seed: 3\n"
    got = merged(tmp_path, head + given)
    written_out = given.replace("density: 0.1", "density: [0.1, 0.1]")
    assert written_out != given
    assert got.keys() == (want := merged(tmp_path, head + written_out)).keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name


def test_a_weight_gradient_that_never_sums_to_zero_is_not_refused_for_its_default(tmp_path, models):
    """Weights [2, 3] and -1 sum to 1 + t, never 0 (a check of the default weight 1 would see 1 - 1)."""
    got = merged(
        tmp_path,
        "merge_method: linear\ndtype: float32\ncompute_dtype: float64\nmodels:\n"
        "  - model: {root}/a\n    parameters: {weight: [2, 3]}\n  - model: {root}/b\n    parameters: {weight: -1}\n",
    )
    for name in NAMES:
        wa = gradient([2, 3], place(name))
        want = (wa * models["a"][name].double() - models["b"][name].double()) / (wa - 1)
        torch.testing.assert_close(got[name], want.float(), msg=name)


# An encoder-decoder: two stacks of different depths (T5's names), an embedding shared by both, a head.
ENC_DEC = ["shared.weight", "lm_head.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]
ENC_DEC += [f"encoder.block.{i}.layer.0.SelfAttention.{w}.weight" for i in range(3) for w in "qk"]
ENC_DEC += [f"decoder.block.{i}.layer.{j}.DenseReluDense.wi.weight" for i in range(5) for j in (0, 2)]


@pytest.fixture
def enc_dec(tmp_path):
    g = torch.Generator().manual_seed(11)
    out = {}
    for m in ("a", "b"):
        out[m] = {n: torch.randn(4, 3, generator=g) for n in ENC_DEC}
        write_checkpoint(tmp_path / m, out[m], n_shards=2)
    return out


def test_a_gradient_runs_over_each_stack_of_an_encoder_decoder_on_its_own(tmp_path, enc_dec):
    """mergekit places each module's layers within that module: the encoder's 3 layers at 0, 0.5, 1 and
    the decoder's 5 at 0, 0.25, ..., 1; tensors outside both at 0."""
    got = merged(
        tmp_path,
        "merge_method: linear\ndtype: float32\ncompute_dtype: float64\n"
        "models: [{model: {root}/a, parameters: {weight: [0, 1]}}, {model: {root}/b, parameters: {weight: 1}}]\n"
        "parameters: {normalize: false}\n",
    )
    a, b = enc_dec["a"], enc_dec["b"]
    for name in ENC_DEC:
        parts = name.split(".")
        t = int(parts[2]) / {"encoder": 2, "decoder": 4}[parts[0]] if parts[1] == "block" else 0.0
        torch.testing.assert_close(got[name], (t * a[name].double() + b[name].double()).float(), msg=name)
    assert sorted(got) == sorted(ENC_DEC)


def test_plan_names_each_stacks_layers(tmp_path, enc_dec):
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {tmp_path}/a, parameters: {{weight: [0, 1]}}}}, {{model: {tmp_path}/b}}]\n"
    )
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    assert "encoder.block.2 " in result.output and "decoder.block.4 " in result.output
    assert "layer 2 " not in result.output  # two stacks: each row says which


def test_slices_over_an_encoder_decoder_are_refused_naming_the_second_stack(tmp_path, enc_dec):
    (tmp_path / "r.yaml").write_text(
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {tmp_path}/a, layer_range: [0, 2]}}]\n"
    )
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {tmp_path / 'r.yaml'}:3: slices[0].sources[0]: '{tmp_path}/a' has 2 stacks of layers "
        "('decoder.block.N', 'encoder.block.N'; 'encoder.block.0.layer.0.SelfAttention.k.weight' is in the second), "
        "and slices number one: mergekit's `modules:` form for such models is not read yet; merge them whole with "
        "`models:`\n"
    )
    assert not (tmp_path / "out").exists()

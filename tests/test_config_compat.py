"""mergekit configs as people publish them (found in model cards): keys mergekit reads nowhere are left
aside with a note, a model listed twice is merged once, and what merger cannot do yet says what it is,
every problem in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, run_bad, write_checkpoint

from merger.cli import cli


@pytest.fixture
def models(tmp_path, monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """Three stand-in models x, y, z in the working directory (tmp_path), by name."""
    monkeypatch.chdir(tmp_path)
    return _models(tmp_path)


def _models(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    models = {
        name: {"a.weight": torch.randn(4, 6, generator=g), "b.bias": torch.randn(6, generator=g)} for name in "xyz"
    }
    for name, tensors in models.items():
        write_checkpoint(root / name, tensors)
    return models


def test_a_model_listed_twice_is_merged_once_with_its_first_parameters(models):
    """Earlier mergekit versions gathered inputs by model (listed twice: one input) and took each parameter
    from the first entry that gives it; mergekit 0.1.5 refuses the config. Counting it twice, as merger
    did, gave neither: (2x + y) / 2 against (x + y) / 2 here."""
    Path("r.yaml").write_text(
        "merge_method: linear\nmodels:\n"
        "  - model: x\n    parameters: {weight: 1.0}\n"
        "  - model: y\n    parameters: {weight: 3.0}\n"
        "  - model: x\n    parameters: {weight: 5.0}\n"
        "dtype: float32\n"
    )
    result = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "out"])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "note: r.yaml:7: models[2].model: 'x' is listed again (models[0]): merged once, each parameter from the "
        "first entry that gives it, as earlier mergekit versions merged it (0.1.5 refuses such a config)\n"
    )
    out = load_output(Path("out"))
    for name, merged in out.items():  # weight 1 (the first entry's), normalize true (the top-level default)
        expected = (1.0 * models["x"][name].double() + 3.0 * models["y"][name].double()) / 4.0
        torch.testing.assert_close(merged.double(), expected, rtol=0, atol=1e-6)


def test_parameters_mergekit_reads_nowhere_are_noted_in_the_plan(models):
    Path("r.yaml").write_text(
        "name: soup-v2\nmerge_method: sce\nbase_model: x\n"
        "models:\n  - model: y\n    parameters: {weight: 0.5}\n  - model: z\n"
        "parameters: {select_topk: 0.5, normalize: true, density: 0.4}\n"
    )
    plan = CliRunner().invoke(cli, ["plan", "r.yaml", "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["notes"] == [
        "r.yaml:1: name: ignored: mergekit-multi's name of a merge in a multi-document config; one merge here",
        "r.yaml:8: parameters.normalize: ignored: sce takes no normalize, and mergekit ignores it too",
        "r.yaml:8: parameters.density: ignored: sce takes no density, and mergekit ignores it too",
    ]
    shown = CliRunner().invoke(cli, ["plan", "r.yaml"])
    assert shown.stderr.count("note: ") == 3  # sce takes (and ignores) a model's weight: no note for it


def test_mergers_own_methods_still_refuse_other_methods_parameters(models):
    err = run_bad("merge_method: tsv\nbase_model: x\nmodels: [{model: y}, {model: z}]\nparameters: {density: 0.5}\n")
    assert err == (
        "error: recipe.yaml:4: parameters.density: unknown key ('density' belongs to breadcrumbs, breadcrumbs_ties, "
        "dare_linear, dare_ties, della, della_linear, ties); tsv takes alpha\n"
    )


def test_every_problem_is_named_in_one_run(models):
    err = run_bad(
        "merge_method: slerp\nbase_model: x\nmodels: [{model: y}]\nparameters: {t: 0.5}\n"
        "tokenizer_source: w\nchat_template: chatm\nselect_topk: 0.3\n"
    )
    assert err == (
        "error: recipe.yaml:5: tokenizer_source: 'w' is not one of the recipe's models\n"
        "error: recipe.yaml:6: chat_template: 'chatm' is not a chat template: give auto, one of alpaca, chatml, "
        "exaone, llama3, mistral, or a Jinja template\n"
        "error: recipe.yaml:7: select_topk: unknown key; it is a parameter (sce): put it under parameters: "
        "(mergekit reads nothing here)\n"
    )


def test_a_mergekit_moe_config_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = run_bad(
        "base_model: x\ngate_mode: hidden\ndtype: bfloat16\n"
        "experts:\n  - source_model: y\n    positive_prompts: [code]\n"
    )
    assert err == (
        "error: recipe.yaml:4: experts: a mergekit-moe config (experts, gate_mode): merger does not build "
        "mixtures of experts yet\n"
    )


def test_keys_in_the_wrong_place_say_where_they_go(models):
    err = run_bad(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: y\n        revision: dpo-v0\n"
        "        layer_range: [0, 1]\ndensity: 0.5\n"
    )
    assert err == (
        "error: recipe.yaml:5: slices[0].sources[0].revision: unknown key; give a Hub model's revision in its "
        "reference: model: org/name@revision\n"
        "error: recipe.yaml:7: density: unknown key; it is a parameter (breadcrumbs, breadcrumbs_ties, dare_linear, "
        "dare_ties, della, della_linear, ties): put it under parameters: (mergekit reads nothing here)\n"
    )


def test_a_tokenizer_source_whose_vocabularies_cannot_be_read_copies_its_files_with_a_note(models):
    """A tokenizer source (base or a model) lays the vocabulary tensors out in its vocabulary, read from
    every model's tokenizer.json (tests/test_vocab.py). Where one cannot be read, the source's files are
    copied and the tensors merged as stored, as before merger read vocabularies; a union cannot be built."""
    for name in "xy":
        Path(name, "tokenizer.json").write_text(json.dumps({"model": name}))
    head = "merge_method: slerp\nbase_model: x\nmodels: [{model: y}]\nparameters: {t: 0.5}\n"
    Path("r.yaml").write_text(head + "tokenizer:\n  source: y\n")
    result = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "out"])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "note: r.yaml:5: tokenizer: vocabularies not compared ('x': tokenizer.json cannot be read: data did not match "
        "any variant of untagged enum ModelUntagged at line 1 column 14): the tensors' rows merged as stored\n"
    )
    assert json.loads(Path("out/tokenizer.json").read_text()) == {"model": "y"}
    for section in ("tokenizer: {}\n", "tokenizer:\n  source: base\n  pad_to_multiple_of: 64\n"):
        assert run_bad(head + section) == (
            "error: recipe.yaml:5: tokenizer: 'x': tokenizer.json cannot be read: data did not match any variant of "
            "untagged enum ModelUntagged at line 1 column 14\n"
        )


def test_one_default_module_is_the_recipe_it_holds(tmp_path, monkeypatch):
    """`modules: {default: {slices: ...}}` is mergekit's spelling of a recipe of one module: the same merge
    as top-level slices:, byte for byte, its errors at their lines; other modules are not supported yet."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(4)
    for name in "xy":
        write_checkpoint(Path(name), {f"model.layers.{i}.mlp.weight": torch.randn(3, 3, generator=g) for i in range(2)})
    slices = (
        "  - sources:\n      - model: x\n        layer_range: [0, 1]\n      - model: y\n        layer_range: [0, 1]\n"
    )
    top = "merge_method: linear\ndtype: float32\nslices:\n" + slices
    module = "merge_method: linear\ndtype: float32\nmodules:\n  default:\n    slices:\n" + slices.replace(
        "\n  ", "\n      "
    ).replace("  - ", "      - ", 1)
    Path("top.yaml").write_text(top)
    Path("module.yaml").write_text(module)
    a = CliRunner().invoke(cli, ["apply", "top.yaml", "-o", "a", "-q"])
    b = CliRunner().invoke(cli, ["apply", "module.yaml", "-o", "b"])
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    assert b.stderr == "note: module.yaml:4: modules.default: taken as the top-level slices: (one module)\n"
    shards = sorted(p.name for p in Path("a").glob("*.safetensors"))
    assert shards and all(Path("a", s).read_bytes() == Path("b", s).read_bytes() for s in shards)
    err = run_bad(module.replace("layer_range: [0, 1]", "layer_range: [1, 1]", 1))
    assert "\nerror: recipe.yaml:8: slices[0].sources[0].layer_range: [1, 1] holds no layers" in err  # its own line
    two = module + "  other:\n    models: [{model: y}]\n"
    assert run_bad(two) == (
        "error: recipe.yaml:3: modules: modules beyond one `default` module of slices: or models: (no parameters: of "
        "its own) are not supported yet\n"
    )


def test_a_parameter_mergekits_own_method_reads_is_refused_not_left_aside(models):
    """mergekit 0.1.5's ties reads rescale (the trimmed task vector scaled back to its L1 norm), which merger's
    ties does not do: leaving the key aside would merge differently from mergekit, so it is refused."""
    err = run_bad("merge_method: ties\nbase_model: x\nmodels: [{model: y}, {model: z}]\nparameters: {rescale: true}\n")
    assert err == (
        "error: recipe.yaml:4: parameters.rescale: ties with rescale (mergekit 0.1.5 then scales each trimmed task "
        "vector back to its L1 norm) is not supported yet; leave it out for TIES as the paper has it\n"
    )


def test_a_model_listed_twice_is_refused_where_one_set_of_parameters_cannot_say_it(models):
    """Both entries giving a parameter a gradient or filters (mergekit falls through to the later one tensor by
    tensor), a method of merger's own, or a later entry's bad value: each a located line."""
    layered = (
        "merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: [{filter: a, value: 1.0}]}\n"
        "  - model: y\n  - model: x\n    parameters: {weight: 3.0}\n"
    )
    assert run_bad(layered) == (
        "error: recipe.yaml:6: models[2].model: 'x' is listed again (models[0]): both entries give weight, with a "
        "gradient or filters; list it once\n"
    )
    bad = "merge_method: linear\nmodels: [{model: x}, {model: y}, {model: x, parameters: {weight: .inf}}]\n"
    assert run_bad(bad).startswith("error: recipe.yaml:2: models[2].parameters.weight: ")
    soup = "merge_method: greedy_soup\nmodels: [{model: x}, {model: y}, {model: ./x}]\n"
    assert (
        "error: recipe.yaml:2: models[2].model: 'x' is listed again (models[0]): greedy_soup takes a model once; "
        in (run_bad(soup, command="plan"))
    )


def test_tokenizer_source_and_a_tokenizer_section_together_are_refused(models):
    recipe = "merge_method: linear\nmodels: [{model: x}, {model: y}]\ntokenizer_source: base\ntokenizer: {source: x}\n"
    assert (
        run_bad(recipe) == "error: recipe.yaml:4: tokenizer: give tokenizer_source or a tokenizer: section, not both\n"
    )

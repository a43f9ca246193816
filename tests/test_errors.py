"""Bad input: the exact one-line message, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import GOOD, load_output, run_bad, write_checkpoint

from merger.cli import cli
from merger.errors import counted
from merger.sources import CONVERT


def test_good_recipe_runs(workdir):
    Path("recipe.yaml").write_text(GOOD)
    result = CliRunner().invoke(cli, ["apply", "--quiet", "recipe.yaml"])
    assert result.exit_code == 0, result.output
    assert Path("out/model.safetensors.index.json").exists()


def test_unknown_key_with_suggestion(workdir):
    err = run_bad(GOOD.replace("density: 0.5", "densty: 0.5"))
    assert err == "error: recipe.yaml:7: models[0].parameters.densty: unknown key (did you mean 'density'?)\n"


def test_unknown_top_level_key(workdir):
    err = run_bad(GOOD + "merge_methd: linear\n")
    assert err == "error: recipe.yaml:13: merge_methd: unknown key (did you mean 'merge_method'?)\n"


def test_unknown_output_key(workdir):
    err = run_bad(GOOD + "  shard_sise: 1GB\n")
    assert err == "error: recipe.yaml:13: output.shard_sise: unknown key (did you mean 'shard_size'?)\n"


def test_unknown_method(workdir):
    err = run_bad(GOOD.replace("merge_method: ties", "merge_method: tie"))
    assert err == (
        "error: recipe.yaml:1: merge_method: unknown merge method 'tie' (did you mean 'ties'?); "
        "available: arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, "
        "greedy_soup, iso_c, iso_cts, karcher, linear, model_stock, multislerp, nearswap, nuslerp, passthrough, ram, "
        "ramplus_tl, sce, slerp, task_arithmetic, ties, tsv\n"
    )


def test_parameter_of_another_method_is_left_aside_with_a_note(workdir):
    """mergekit reads only its method's parameters: a `density` left in a linear config merges as without
    it, and says so; a key no method takes is still a typo."""
    Path("recipe.yaml").write_text(GOOD.replace("merge_method: ties", "merge_method: linear"))
    noted = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-o", "noted"])
    Path("recipe.yaml").write_text(
        GOOD.replace("merge_method: ties", "merge_method: linear").replace("      density: 0.5\n", "")
    )
    plain = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-o", "plain", "-q"])
    assert noted.exit_code == 0 and plain.exit_code == 0, noted.output
    assert noted.stderr == (
        "note: recipe.yaml:7: models[0].parameters.density: ignored: linear takes no density, and mergekit ignores "
        "it too\n"
    )
    shards = sorted(p.name for p in Path("plain").glob("*.safetensors"))
    assert shards and all(Path("noted", s).read_bytes() == Path("plain", s).read_bytes() for s in shards)
    err = run_bad(GOOD.replace("merge_method: ties", "merge_method: linear").replace("density:", "densty:"))
    assert err == "error: recipe.yaml:7: models[0].parameters.densty: unknown key; linear takes weight, normalize\n"


@pytest.mark.parametrize(
    "old,new,message",
    [
        ("density: 0.5", "density: -0.1", "recipe.yaml:7: models[0].parameters.density: Input should be greater than or equal to 0, got -0.1"),
        ("density: 0.5", "density: 1.5", "recipe.yaml:7: models[0].parameters.density: Input should be less than or equal to 1, got 1.5"),
        ("weight: 0.5", "weight: .inf", "recipe.yaml:10: models[1].parameters.weight: must be a finite number"),
        ("weight: 0.5", "weight: heavy", "recipe.yaml:10: models[1].parameters.weight: Input should be a valid number, unable to parse string as a number, got 'heavy'"),
        ("weight: 0.5", "weight: [0, heavy]", "recipe.yaml:10: models[1].parameters.weight[1]: Input should be a valid number, unable to parse string as a number, got 'heavy'"),
        ("weight: 0.5", "weight: [0, {value: 1}]", "recipe.yaml:10: models[1].parameters.weight: a list is either values (numbers: a gradient) or {filter, value} entries, not a mix"),
        ("weight: 0.5", "weight: [0, .inf]", "recipe.yaml:10: models[1].parameters.weight[1]: must be a finite number"),
        ("weight: 0.5", "weight: [0, 1.0e+39]", "recipe.yaml:10: models[1].parameters.weight[1]: 1e+39 is beyond float32's range (3.4e+38)"),
        ("density: 0.5", "density: [{filter: mlp, value: [0.5, 2]}]", "recipe.yaml:7: models[0].parameters.density[0].value[1]: Input should be less than or equal to 1, got 2"),
        ("weight: 0.5", "normalize: false", "recipe.yaml:10: models[1].parameters.normalize: 'normalize' applies to the whole merge; put it under the top-level parameters"),
    ],
)  # fmt: skip
def test_parameter_values(workdir, old, new, message):
    assert run_bad(GOOD.replace(old, new)) == f"error: {message}\n"


def test_top_level_lambda_must_be_finite(workdir):
    err = run_bad(GOOD + "parameters:\n  lambda: .nan\n")
    assert err == "error: recipe.yaml:14: parameters.lambda: must be a finite number\n"


def test_several_problems_reported_together_in_line_order(workdir):
    err = run_bad(GOOD.replace("density: 0.5", "densty: 0.5").replace("weight: 0.5", "weight: .nan") + "dtype: bf17\n")
    lines = err.splitlines()
    assert [line.split(":")[2] for line in lines] == ["7", "10", "13"]


def test_missing_base_model(workdir):
    err = run_bad(GOOD.replace("base_model: base\n", ""))
    assert err == "error: recipe.yaml: base_model: ties needs a base_model\n"


def test_missing_models(workdir):
    err = run_bad("merge_method: linear\n")
    assert err == "error: recipe.yaml: models: required key is missing\n"


def test_only_the_base_model(workdir):
    err = run_bad("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: base\n")
    assert err == "error: recipe.yaml:3: models: task_arithmetic needs at least one model besides the base model\n"


def test_weights_summing_to_zero_with_normalize(workdir):
    err = run_bad("merge_method: linear\nmodels:\n  - model: ft1\n  - model: ft2\n    parameters: {weight: -1}\n")
    assert err == (
        "error: recipe.yaml:2: models: the weights sum to 0, so they cannot be normalised; "
        "set normalize: false or change a weight\n"
    )


def test_invalid_yaml(workdir):
    err = run_bad("merge_method: ties\nmodels: [\n")
    assert err.startswith("error: recipe.yaml:3: invalid YAML: ")


def test_invalid_yaml_names_the_line_that_opened_the_unclosed_part(workdir):
    err = run_bad(
        GOOD.replace("    parameters:\n      weight: 0.5\n", "    parameters: {weight: 0.5\n  - model: ft3\n")
    )
    assert err == (
        "error: recipe.yaml:10: invalid YAML: expected ',' or '}', but got ':' (parsing a flow mapping that line 9 opened)\n"
    )


def test_duplicate_key(workdir):
    err = run_bad(GOOD + "merge_method: linear\n")
    assert err == "error: recipe.yaml:13: duplicate key 'merge_method'\n"


def test_not_a_mapping(workdir):
    assert run_bad("- ties\n") == "error: recipe.yaml: a recipe is a YAML mapping with merge_method and models\n"


def test_models_and_slices_are_not_both_given(workdir):
    err = run_bad(
        "slices:\n  - sources: [{model: ft1, layer_range: [0, 1]}]\nmerge_method: linear\nmodels: [{model: ft1}]\n"
    )
    assert err == "error: recipe.yaml:1: slices: a recipe lists models: or slices:, not both\n"


def test_missing_model_directory(workdir):
    err = run_bad(GOOD.replace("model: ft2", "model: ft9"))
    assert (
        err == f"error: recipe.yaml:8: models[1].model: 'ft9': no such directory in the working directory ({workdir})\n"
    )


def test_a_bare_model_path_in_models_is_shown_how_to_write_it(workdir):
    """`- ft2` where `- model: ft2` goes: the keys it takes and the fix, not pydantic's class name."""
    err = run_bad(GOOD.replace("  - model: ft2\n    parameters:\n      weight: 0.5\n", "  - ft2\n"))
    assert err == (
        "error: recipe.yaml:8: models[1]: must be a mapping of keys (model, parameters), got 'ft2'; "
        "write it as `model: ft2`\n"
    )


def test_a_model_with_a_lora_is_refused_by_name(workdir):
    """mergekit's `model: base+adapter`: refused as what it is, not as a missing folder."""
    err = run_bad(GOOD.replace("model: ft2", "model: ft2+loras/ft2-adapter"))
    assert err == (
        "error: recipe.yaml:8: models[1].model: 'ft2+loras/ft2-adapter': mergekit's model+LoRA form; merger does "
        "not apply LoRA adapters yet: merge the adapter into its model first (peft's merge_and_unload) and name "
        "that folder\n"
    )


def test_pickled_checkpoint_is_refused(workdir):
    Path("pickled").mkdir()
    Path("pickled/pytorch_model.bin").write_bytes(b"\x80\x04")
    err = run_bad(GOOD.replace("model: ft2", "model: pickled"))
    assert err.startswith(
        "error: recipe.yaml:8: models[1].model: 'pickled' holds only pickled weights (pytorch_model.bin)"
    )
    assert err.endswith(f'cd pickled && python -c "{CONVERT}"\n')  # tests/test_hostile.py runs it


def test_not_safetensors(workdir):
    Path("junk").mkdir()
    Path("junk/model.safetensors").write_bytes(b"\xff" * 16)
    err = run_bad(GOOD.replace("model: ft2", "model: junk"))
    assert "models[1].model: " in err and "model.safetensors: not a safetensors file" in err


def test_truncated_shard(workdir):
    f = Path("ft2/model.safetensors")
    f.write_bytes(f.read_bytes()[:-8])
    err = run_bad(GOOD)
    assert err.endswith("ft2/model.safetensors: tensor 'b.bias': its data runs past the end of the file (truncated?)\n")


def test_broken_config_of_the_base(workdir):
    Path("base/config.json").write_text("{not json")
    err = run_bad(GOOD)
    assert err.startswith("error: recipe.yaml:2: base_model: 'base': config.json is not valid JSON (")


def test_shape_mismatch(workdir):
    write_checkpoint(Path("odd"), {"a.weight": torch.ones(4, 5), "b.bias": torch.zeros(4), "ids": torch.arange(3)})
    err = run_bad(GOOD.replace("model: ft2", "model: odd"))
    assert (
        err
        == "error: recipe.yaml:8: models[1].model: tensor 'a.weight' has shape [4, 5] in 'odd' but [4, 4] in 'base'\n"
    )


def test_missing_and_extra_tensors(workdir):
    write_checkpoint(Path("odd"), {"a.weight": torch.ones(4, 4), "c": torch.zeros(4), "ids": torch.arange(3)})
    err = run_bad(GOOD.replace("model: ft2", "model: odd"))
    assert err == (
        "error: recipe.yaml:8: models[1].model: 'odd' lacks tensor 'b.bias' (present in 'base')\n"
        "error: recipe.yaml:8: models[1].model: 'odd' has tensor 'c' that 'base' lacks\n"
    )


def test_integer_buffers_that_differ(workdir):
    write_checkpoint(Path("odd"), {"a.weight": torch.ones(4, 4), "b.bias": torch.zeros(4), "ids": torch.arange(1, 4)})
    err = run_bad(GOOD.replace("model: ft2", "model: odd"))
    assert err == (
        "error: tensor 'ids' (I64) differs between 'odd' and 'base'; non-float tensors are copied, "
        "not merged, so every input must hold the same values\n"
    )


def test_existing_output_needs_force(workdir):
    Path("out").mkdir()
    err = run_bad(GOOD)
    assert err == f"error: output {workdir / 'out'} already exists; pass --force to replace it\n"


def test_output_inside_an_input(workdir):
    err = run_bad(GOOD, "-o", "ft1/merged")
    assert err == f"error: output {workdir / 'ft1/merged'} is inside input model 'ft1'; choose another directory\n"


def test_force_output_containing_an_input_is_refused(workdir):
    err = run_bad(GOOD, "-o", ".", "--force")
    assert err == f"error: output {workdir} contains input model 'base'; choose another directory\n"


def test_no_output_directory(workdir):
    err = run_bad(GOOD.replace("output:\n  path: out\n", ""))
    assert err == "error: recipe.yaml: output: no output directory; give -o DIR or output.path\n"


def test_cuda_requested_without_cuda(workdir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = run_bad(GOOD, "--device", "cuda")
    assert err == "error: device cuda was asked for, but torch sees no CUDA device; use --device cpu\n"


def test_bad_shard_size_option(workdir):
    assert run_bad(GOOD, "--shard-size", "lots") == "error: --shard-size: 'lots' is not a size such as 2GB or 500MB\n"


def test_missing_recipe_file(workdir):
    result = CliRunner().invoke(cli, ["apply", "nope.yaml"])
    assert result.exit_code == 2
    assert result.stderr == "error: nope.yaml: cannot read recipe: No such file or directory\n"


def test_a_tied_models_embeddings_stand_in_for_the_head_another_stores(tmp_path):
    """Checkpoints whose configs tie the head to the embeddings, one storing a head anyway (some published
    ones are saved so): as mergekit, the input embeddings of a model without a head are its head, so both
    orders merge (linear: the mean); where no one tensor is named as input embeddings are, the refusal says
    why."""
    g = torch.Generator().manual_seed(0)
    emb = {m: torch.randn(8, 4, generator=g) for m in "ab"}
    head = torch.randn(8, 4, generator=g)
    config = {"model_type": "llama", "tie_word_embeddings": True}
    norm = {"model.norm.weight": torch.ones(4)}
    write_checkpoint(tmp_path / "a", {"model.embed_tokens.weight": emb["a"]} | norm, config=config)
    write_checkpoint(
        tmp_path / "b", {"model.embed_tokens.weight": emb["b"], "lm_head.weight": head} | norm, config=config
    )
    for order in ("ab", "ba"):
        models = ", ".join(f"{{model: {tmp_path / m}}}" for m in order)
        (tmp_path / "r.yaml").write_text(f"merge_method: linear\ndtype: float32\nmodels: [{models}]\n")
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / order), "-q"])
        assert result.exit_code == 0, result.output
        got = load_output(tmp_path / order)
        torch.testing.assert_close(got["lm_head.weight"], (emb["a"] + head) / 2)
        torch.testing.assert_close(got["model.embed_tokens.weight"], (emb["a"] + emb["b"]) / 2)
    write_checkpoint(
        tmp_path / "c", {"model.embed_tokens.weight": emb["a"], "wte.weight": emb["a"]} | norm, config=config
    )
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {tmp_path / 'c'}}}, {{model: {tmp_path / 'b'}}}]\n"
    )
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: '{tmp_path / 'c'}' stores no lm_head.weight: its config ties the head to the embeddings "
        "(tie_word_embeddings: true), while another model stores a head of its own; its input embeddings would "
        "stand in for the head, as in mergekit, but no one tensor outside its layers is named as input embeddings "
        "are (embed_tokens, wte, embed_in, word_embeddings, tok_embeddings)"
    )


def test_an_empty_list_says_so(workdir):
    Path("recipe.yaml").write_text("merge_method: linear\nmodels: []\n")
    result = CliRunner().invoke(cli, ["plan", "recipe.yaml"])
    assert (
        result.exit_code == 2
        and result.stderr == "error: recipe.yaml:2: models: an empty list: at least 1 entry is needed\n"
    )


def test_quiet_hushes_progress_not_notes(workdir):
    """A note can say the merge is not what the recipe seems to ask (a key ignored, a model listed twice and
    merged once): --quiet, for scripts, still prints it; --json lists it instead."""
    Path("recipe.yaml").write_text(GOOD.replace("merge_method: ties", "merge_method: task_arithmetic"))
    quiet = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"])
    assert quiet.exit_code == 0 and quiet.stdout == ""
    assert quiet.stderr == (
        "note: recipe.yaml:7: models[0].parameters.density: ignored: task_arithmetic takes no density, and "
        "mergekit ignores it too\n"
    )
    shown = CliRunner().invoke(cli, ["apply", "recipe.yaml", "--json", "-o", "out2"])
    assert shown.stderr == "" and json.loads(shown.stdout)["notes"] == [quiet.stderr[len("note: ") : -1]]


def test_plan_says_when_the_outputs_folder_cannot_be_written(workdir, monkeypatch):
    """A read-only folder (a read-only mount: root may write anywhere else, so access() is what tells):
    plan says apply would refuse, as apply does."""
    import merger.cli

    Path("recipe.yaml").write_text(GOOD)
    real = os.access
    monkeypatch.setattr(merger.cli.os, "access", lambda p, mode: Path(p) != workdir and real(p, mode))
    out = CliRunner().invoke(cli, ["plan", "recipe.yaml"]).stdout
    assert f"  output:       {workdir / 'out'} (its folder {workdir} cannot be written: apply would refuse)\n" in out


def test_failure_midway_leaves_no_temporary_directory(workdir, monkeypatch):
    """An error raised while writing (here a merge failure) removes the staging directory."""
    import merger.budget
    import merger.plan
    import merger.stream

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(merger.stream.Merger, "start", boom)
    Path("recipe.yaml").write_text(GOOD)
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml"])
    assert result.exit_code == 130
    assert result.stderr == "error: interrupted; nothing was written to the output\n"
    assert sorted(os.listdir(".")) == ["base", "ft1", "ft2", "recipe.yaml"]


@pytest.mark.parametrize("compute", ["float32", "float64"])  # the fused kernels, the torch path
def test_nan_weights_under_ties_name_the_tensor_and_model(workdir, compute):
    """A diverged fine-tune (NaN weights) cannot be trimmed by magnitude: one line naming the tensor and
    the model, exit 2, nothing written."""
    from safetensors.torch import save_file

    shard = next(Path("ft2").glob("*.safetensors"))
    t = {"a.weight": torch.zeros(4, 4) - 1, "b.bias": torch.full((4,), -1.0), "ids": torch.arange(3)}
    t["a.weight"][1, 2] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})
    Path("recipe.yaml").write_text(
        GOOD.replace("      weight: 0.5\n", "      weight: 0.5\n      density: 0.5\n") + f"compute_dtype: {compute}\n"
    )
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: tensor 'a.weight': 1 entry of the task vector of 'ft2' is NaN (a NaN or an infinity in that "
        "model or in the base); ties cannot rank NaN magnitudes. Is one of those checkpoints diverged?\n"
    )
    assert not Path("out").exists() and not [p for p in os.listdir(".") if "merger-tmp" in p]


def test_counted_messages_agree_with_their_count():
    """errors.counted: one entry is, several entries are (the engine's NaN and overflow messages)."""
    assert counted(1) == ("1 entry", "is")
    assert counted(0) == ("0 entries", "are")
    assert counted(3, "value", "values") == ("3 values", "are")
    assert counted(1, "value", "values") == ("1 value", "is")

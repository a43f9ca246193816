"""A vocabulary laid out by the engine (merger.vocab) on each of its paths: the fused CPU kernels, torch in
chunks, the fake GPU's streams whole and in pieces (tests/fakecuda.py), the TIES model-wide pass and
--workers; the same bytes on each. tests/test_vocab.py checks the values against mergekit's rules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_checkpoint
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models

import merger.budget
import merger.errors
import merger.plan
from merger.cli import cli
from merger.plan import build_plan
from merger.recipe import parse_recipe
from merger.stream import Merger, write_shards

WORDS = [f"w{i}" for i in range(10)]


def _model(path: Path, g: torch.Generator, added: list[str], words: list[str] = WORDS) -> dict[str, torch.Tensor]:
    """A toy bf16 checkpoint whose embedding and head have a row per token: `words`, then `added`."""
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    t.add_special_tokens([AddedToken(a, special=True) for a in added])
    rows = len(words) + len(added)
    tensors = {
        "embed.weight": torch.randn(rows, 64, generator=g).bfloat16(),
        "layers.0.w": torch.randn(64, 64, generator=g).bfloat16(),
        "layers.1.w": torch.randn(64, 64, generator=g).bfloat16(),
        "head.weight": torch.randn(rows, 64, generator=g).bfloat16(),
    }
    write_checkpoint(path, tensors, config={"model_type": "toy", "vocab_size": rows})
    t.save(str(path / "tokenizer.json"))
    return tensors


@pytest.fixture
def family(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    _model(tmp_path / "base", g, [])
    _model(tmp_path / "a", g, ["<a>", "<ab>"])
    _model(tmp_path / "b", g, ["<ab>", "<b>"])
    return tmp_path


def _recipe(root: Path, method: str = "task_arithmetic", extra: str = "") -> str:
    return (
        f"merge_method: {method}\nbase_model: {root / 'base'}\n"
        f"models:\n  - {{model: {root / 'a'}, parameters: {{weight: 0.7, density: 0.6}}}}\n"
        f"  - {{model: {root / 'b'}, parameters: {{weight: 0.5, density: 0.6}}}}\n"
        f"tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n{extra}"
    )


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `directory` (an output written by write_shards has no index)."""
    out = {}
    for f in directory.glob("*.safetensors"):
        out |= load_file(f)
    return out


def _bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "karcher"])
def test_the_fused_kernels_and_torch_lay_out_a_union_alike(family, monkeypatch, method):
    plan = build_plan(parse_recipe(_recipe(family, method)), device="cpu")
    (family / "fused").mkdir()
    write_shards(plan, family / "fused")
    with monkeypatch.context() as patch:
        patch.setattr(Merger, "_fusable", lambda self, t: False)
        (family / "torch").mkdir()
        write_shards(plan, family / "torch")
    assert _bytes(family / "fused") == _bytes(family / "torch")
    got = load_file(next((family / "fused").glob("*.safetensors")))
    assert got["embed.weight"].shape == got["head.weight"].shape == (16, 64)  # 10 + <a> <ab> <b>, padded to 16
    assert got["layers.0.w"].shape == (64, 64)


@pytest.mark.parametrize("pieces", [False, True])
def test_on_the_fake_gpus_streams_a_union_is_the_cpus_bytes(family, monkeypatch, pieces):
    """The laid-out inputs are larger than the stored ones (16 rows against 10-12): staged whole and in
    pieces, sized by the output's rows."""
    import fakecuda

    plan = build_plan(parse_recipe(_recipe(family)), device="cpu")
    fakecuda.write_on_cpu_and_gpu(plan, family, monkeypatch, pieces, seed=3)
    assert _bytes(family / "gpu") == _bytes(family / "cpu")
    blocks = plan.staging_blocks(next(t for t in plan.tensors if t.name == "embed.weight"))
    assert blocks[0] >= 16 * 64 * 2  # the base's 10 stored rows laid out in 16


def test_ties_model_wide_trim_and_workers_read_the_laid_out_rows(family, monkeypatch):
    """TIES' global trim reads every tensor before the merge (stream.model_pass) and --workers splits the
    shards between processes: both see the vocabulary tensors as laid out, and give apply's bytes."""
    monkeypatch.chdir(family)
    text = _recipe(family, "ties", "parameters: {trim_scope: model}\noutput: {shard_size: 20KB}\n")
    Path("r.yaml").write_text(text)
    one = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "one"])
    assert one.exit_code == 0, one.output
    two = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "two", "--workers", "2"])
    assert two.exit_code == 0, two.output
    assert len(_bytes(family / "one")) > 1
    assert _bytes(family / "one") == _bytes(family / "two")
    assert json.loads((family / "one" / "config.json").read_text())["vocab_size"] == 16
    tok = json.loads((family / "one" / "tokenizer.json").read_text())
    assert [(t["id"], t["content"]) for t in tok["added_tokens"]] == [(10, "<a>"), (11, "<ab>"), (12, "<b>")]


HELD_AFTER_RELEASE = """
import sys, weakref
import merger.stream, merger.vocab
assert "torch" not in sys.modules  # as in a merge of fused kernels: torch not imported at start-up
refs = []
lay_out = merger.vocab.Vocabulary.lay_out
def recorded(self, views):
    out = lay_out(self, views)
    refs.extend(weakref.ref(a) for a in out.values())
    return out
merger.vocab.Vocabulary.lay_out = recorded
release = merger.stream.Merger.release
def checked(self, t):
    release(self, t)
    if any(r() is not None for r in refs):
        sys.stderr.write(f"held after {t.name}\\n")
merger.stream.Merger.release = checked
"""


def test_the_laid_out_copies_are_freed_with_their_tensor(tmp_path):
    """A vocabulary's stand-in and padding rows go through torch: imported before the merge loop (which pauses
    the cyclic garbage collector), never inside it, where the import's traceback frames would hold the laid-out
    copies for the rest of the run (a 16k-row embedding and head: 300 MB more peak RSS, measured)."""
    import subprocess
    import sys

    from conftest import hooked

    g = torch.Generator().manual_seed(1)
    for name, added in (("base", []), ("a", ["<a>"]), ("b", ["<b>"])):
        _model(tmp_path / name, g, added)
    (tmp_path / "r.yaml").write_text(_recipe(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "merger", "apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"],
        env=hooked(tmp_path, HELD_AFTER_RELEASE), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert all(line.startswith("note: ") for line in done.stderr.splitlines()), done.stderr  # the recipe's notes


def test_peak_memory_counts_the_laid_out_copies(tmp_path):
    """With a vocabulary tensor the largest, the estimate holds its laid-out copies beside the mapped inputs."""
    g = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(4000)]
    for name, added in (("base", []), ("a", ["<a>"]), ("b", ["<b>"])):
        _model(tmp_path / name, g, added, words)
    plan = build_plan(parse_recipe(_recipe(tmp_path)), device="cpu")
    extra = plan.peak_memory - dataclasses.replace(plan, vocabulary=None).peak_memory
    assert extra == 3 * 4008 * 64 * 2  # three models' rows (4002 tokens, padded to 4008) in bf16


def test_a_union_of_hub_models_reads_their_tokenizers_at_plan_time_and_equals_the_local_merge(family, monkeypatch):
    """Hub models' vocabularies are read before any weight is downloaded (their tokenizer.json and
    config.json, small files), and the lock records those files."""
    from fakehub import FakeHub

    hub = FakeHub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(family / "hf"))
        for name in ("base", "a", "b"):
            (family / name / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
            hub.publish(f"org/{name}", {p.name: p.read_bytes() for p in (family / name).iterdir()})
        local = _recipe(family) + "chat_template: chatml\n"  # written into the base's tokenizer_config.json
        remote = local.replace(str(family) + "/", "org/")
        Path(family / "local.yaml").write_text(local)
        Path(family / "hub.yaml").write_text(remote)
        planned = CliRunner().invoke(cli, ["plan", str(family / "hub.yaml")])
        assert planned.exit_code == 0, planned.output
        fetched = {d.rsplit("/", 1)[1] for d in hub.downloads()}
        assert fetched == {"tokenizer.json", "config.json", "model.safetensors.index.json", "tokenizer_config.json"}
        for recipe, out in (("local.yaml", "lo"), ("hub.yaml", "hu")):
            done = CliRunner().invoke(cli, ["apply", str(family / recipe), "-o", str(family / out), "--quiet"])
            assert done.exit_code == 0, done.output
    finally:
        hub.close()
    for name in ["tokenizer.json", "tokenizer_config.json", "config.json", *_bytes(family / "lo")]:
        assert (family / "lo" / name).read_bytes() == (family / "hu" / name).read_bytes(), name
    lock = json.loads((family / "hu" / "merger.lock.json").read_text())
    assert all({"tokenizer.json", "config.json"} <= set(i["files"]) for i in lock["inputs"])


def test_a_one_dimensional_vocabulary_tensor_is_laid_out_too(family):
    """A head bias (one value per token): a token only `a` has keeps a's value in every model, so task
    arithmetic gives a's value; padding rows hold each model's mean value."""
    g = torch.Generator().manual_seed(9)
    bias = {}
    for name in ("base", "a", "b"):
        tensors = load_file(family / name / "model-00001-of-00002.safetensors")
        rows = json.loads((family / name / "config.json").read_text())["vocab_size"]
        bias[name] = torch.randn(rows, generator=g).bfloat16()
        tensors["head.bias"] = bias[name]
        save_file(tensors, family / name / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
        index = json.loads((family / name / "model.safetensors.index.json").read_text())
        index["weight_map"]["head.bias"] = "model-00001-of-00002.safetensors"
        (family / name / "model.safetensors.index.json").write_text(json.dumps(index))
    plan = build_plan(parse_recipe(_recipe(family)), device="cpu")
    assert "head.bias" in plan.vocabulary.tensors
    (family / "out").mkdir()
    write_shards(plan, family / "out")
    out = _tensors(family / "out")
    assert out["head.bias"].shape == (16,)
    assert out["head.bias"][10].item() == bias["a"][10].float().item()  # <a>
    assert out["head.bias"][12].item() == bias["b"][11].float().item()  # <b>: b's id 11
    assert out["head.bias"][13:].unique().numel() == 1  # one padding value in every padding row (its value:
    # tests/test_vocab.py)


def test_a_tokens_source_outside_a_tensors_inputs_is_refused(family):
    """linear reads no base: the base's rows cannot stand in for a token in its tensors."""
    text = _recipe(family, "linear").replace(
        "  pad_to_multiple_of: 8\n",
        f"  tokens: {{'<a>': {{source: {{kind: model_token, model: {family / 'base'}, token: w3}}}}}}\n",
    )
    with pytest.raises(merger.errors.RecipeError) as e:
        build_plan(parse_recipe(text), device="cpu")
    assert str(e.value).endswith(
        f"'{family / 'base'}' is not merged into tensor 'embed.weight', so no row of it can stand in for a token there"
    )


def test_a_vector_as_long_as_the_vocabulary_is_not_laid_out_unless_its_module_is(tmp_path, monkeypatch):
    """A norm whose hidden size equals vocab_size keeps its values; a head's bias beside the head is laid out."""
    monkeypatch.chdir(tmp_path)
    for name, words in (("base", ["a", "b", "c", "d"]), ("ft", ["d", "c", "b", "a"])):
        tensors = {
            "embed.weight": torch.arange(12.0).reshape(4, 3),
            "norm.weight": torch.tensor([1.0, 2.0, 3.0, 4.0]),
            "head.weight": torch.arange(12.0).reshape(4, 3),
            "head.bias": torch.tensor([1.0, 2.0, 3.0, 4.0]),
            "layers.0.w": torch.ones(3, 3),
            "layers.1.w": torch.ones(3, 3),
        }
        write_checkpoint(Path(name), tensors, config={"model_type": "toy", "vocab_size": 4, "torch_dtype": "float32"})
        Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a")).save(f"{name}/tokenizer.json")
    Path("r.yaml").write_text(
        "merge_method: linear\nmodels: [{model: base}, {model: ft}]\ntokenizer_source: base\nbase_model: base\n"
    )
    done = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "out"])
    assert done.exit_code == 0, done.output
    out = _tensors(Path("out"))
    assert out["norm.weight"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert out["head.bias"].tolist() == [2.5, 2.5, 2.5, 2.5]  # base's a b c d and ft's rows reversed, averaged
    assert out["embed.weight"][0].tolist() == [4.5, 5.5, 6.5]  # (row 0 + ft's row 3) / 2


def _family_recipe(root: Path, method: str, body: str) -> str:
    return f"merge_method: {method}\nbase_model: {root / 'base'}\n{body}"


def test_a_resumed_output_must_have_laid_out_its_vocabulary_alike(family):
    """The fingerprint that decides whether a partial output is resumed covers the layout of the rows."""
    from merger.staging import fingerprint

    zero = _recipe(family).replace(
        "  pad_to_multiple_of: 8\n", "  tokens: {'<a>': {source: {kind: zero}, force: true}}\n"
    )
    w5 = zero.replace("{kind: zero}", f"{{kind: model_token, model: {family / 'a'}, token: w5}}")
    plans = [build_plan(parse_recipe(text), device="cpu") for text in (zero, w5, zero)]
    prints = [fingerprint(p) for p in plans]
    assert prints[0] == prints[2] != prints[1]


def test_passthrough_lays_out_the_rows_it_would_copy(family):
    """passthrough copies a tensor's stored bytes, except where the vocabulary changes its rows."""
    text = (
        f"merge_method: passthrough\nmodels: [{{model: {family / 'a'}}}]\n"
        f"tokenizer:\n  source: {family / 'a'}\n  pad_to_multiple_of: 16\n"
        "  tokens: {'<a>': {source: {kind: zero}, force: true}}\n"
    )
    plan = build_plan(parse_recipe(text), device="cpu")
    (family / "out").mkdir()
    write_shards(plan, family / "out")
    out = _tensors(family / "out")
    a = _tensors(family / "a")
    assert out["embed.weight"].shape == (16, 64)
    assert torch.equal(out["embed.weight"][:10], a["embed.weight"][:10])
    assert not out["embed.weight"][10].any()  # <a>, forced to zero
    mean = torch.cat([a["embed.weight"][:10], torch.zeros(1, 64), a["embed.weight"][11:12]]).double().mean(0)
    torch.testing.assert_close(out["embed.weight"][12:], mean.bfloat16().expand(4, 64), rtol=0, atol=0)
    assert plan.verbatim(next(t for t in plan.tensors if t.name == "layers.0.w")) is not None


def test_greedy_soup_copies_its_tokenizer_sources_files_and_refuses_a_vocabulary(family, monkeypatch):
    """Each soup of a greedy search merges other models: one vocabulary for all of them is not built yet."""
    monkeypatch.chdir(family)
    (family / "score.py").write_text("def score(path):\n    return 1.0\n")
    head = (
        f"merge_method: greedy_soup\nmodels: [{{model: {family / 'base'}}}, {{model: {family / 'base'}2}}]\n"
        "evaluation: {evaluator: python, function: 'score:score', direction: higher}\n"
    )
    import shutil

    shutil.copytree(family / "base", family / "base2")
    Path("g.yaml").write_text(head + f"tokenizer_source: {family / 'base'}2\n")
    done = CliRunner().invoke(cli, ["apply", "g.yaml", "-o", "soup"])
    assert done.exit_code == 0, done.output
    assert (family / "soup" / "tokenizer.json").read_bytes() == (family / "base2" / "tokenizer.json").read_bytes()
    Path("u.yaml").write_text(head + "tokenizer_source: union\n")
    refused = CliRunner().invoke(cli, ["plan", "u.yaml"])
    assert refused.exit_code == 2
    assert refused.output == (
        "error: u.yaml:4: tokenizer_source: greedy_soup takes a tokenizer source's files only (base or a model), "
        "not a union, tokens: or pad_to_multiple_of: its soups of different models would each need a vocabulary "
        "of their own\n"
    )


def test_every_vocab_size_of_a_config_is_set():
    from merger.vocab import set_vocab_size

    config = {"vocab_size": 10, "text_config": {"vocab_size": 10}}
    set_vocab_size(config, 16)
    assert config == {"vocab_size": 16, "text_config": {"vocab_size": 16}}
    config = {"text_config": {"vocab_size": 10}}
    set_vocab_size(config, 16)
    assert config == {"text_config": {"vocab_size": 16}}


def test_a_source_tokenizer_that_cannot_take_the_added_tokens_stops_the_plan(family, monkeypatch):
    """Found before any tensor is read, at the recipe's line."""
    monkeypatch.chdir(family)
    (family / "base" / "tokenizer_config.json").write_text("[1]")
    Path("r.yaml").write_text(_recipe(family))
    refused = CliRunner().invoke(cli, ["plan", "r.yaml"])
    assert refused.exit_code == 2
    assert (
        refused.output
        == f"error: r.yaml:6: tokenizer: '{family / 'base'}': tokenizer_config.json is not a JSON object\n"
    )


def _gpt2_like(path: Path, g: torch.Generator, added: list[str]) -> None:
    """A GPT-2-shaped toy whose position embeddings have as many rows as its tokens (wpe beside wte)."""
    _model(path, g, added)
    rows = len(WORDS) + len(added)
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors |= load_file(f)
        f.unlink()
    tensors["transformer.wpe.weight"] = torch.randn(len(WORDS), 64, generator=g).bfloat16()
    write_checkpoint(path, tensors, config={"model_type": "toy", "vocab_size": rows, "n_positions": len(WORDS)})


def test_position_embeddings_as_long_as_the_vocabulary_keep_their_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(4)
    _gpt2_like(tmp_path / "base", g, [])
    _gpt2_like(tmp_path / "a", g, ["<a>"])
    Path("r.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: a}]\n"
        "tokenizer: {source: base, pad_to_multiple_of: 4}\n"
    )
    done = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "out"])
    assert done.exit_code == 0, done.output
    out = _tensors(Path("out"))
    assert out["transformer.wpe.weight"].shape == (10, 64)  # positions, not tokens: as stored
    assert out["embed.weight"].shape == out["head.weight"].shape == (12, 64)  # 10 tokens, padded to 12


def test_rows_that_differ_say_what_explains_them(family, monkeypatch):
    """Without a tokenizer source, fine-tunes that added tokens differ in rows: the error says what
    mergekit's configs give for them. A base source whose vocabulary cannot be read says so first."""
    monkeypatch.chdir(family)
    head = f"merge_method: task_arithmetic\nbase_model: {family / 'base'}\nmodels: [{{model: {family / 'a'}}}]\n"
    Path("r.yaml").write_text(head)
    err = CliRunner().invoke(cli, ["plan", "r.yaml"]).output.splitlines()
    assert err[-1] == (
        f"error: r.yaml: '{family / 'a'}' and '{family / 'base'}' differ in the rows of 'embed.weight', as models "
        "with different vocabularies do: give tokenizer_source: union (or base, or one model) to lay them out in "
        "one vocabulary, as mergekit does"
    )
    (family / "base" / "tokenizer.json").write_text("{")
    Path("r.yaml").write_text(head + "tokenizer_source: base\n")
    err = CliRunner().invoke(cli, ["plan", "r.yaml"]).output.splitlines()
    assert err[0].startswith(
        f"error: r.yaml:4: tokenizer_source: vocabularies not compared ('{family / 'base'}': tokenizer.json cannot "
        "be read: "
    )
    assert "has shape [12, 64]" in err[1]


def test_a_chat_template_that_is_not_jinja_is_refused_at_its_line(family, monkeypatch):
    monkeypatch.chdir(family)
    Path("r.yaml").write_text(_recipe(family) + 'chat_template: "{% for m in messages %}{{ m.content }{% endfor %}"\n')
    refused = CliRunner().invoke(cli, ["plan", "r.yaml"])
    assert refused.exit_code == 2
    assert refused.output == "error: r.yaml:9: chat_template: not a Jinja template: unexpected '}' (its line 1)\n"


def test_a_union_of_many_new_tokens_is_built_at_once(tmp_path):
    """An extension of thousands of tokens (a language's vocabulary added to a model): the tokenizer
    takes them in one call per run of plain or special ones, not one call each (seconds, not minutes)."""
    g = torch.Generator().manual_seed(6)
    _model(tmp_path / "base", g, [])
    _model(tmp_path / "a", g, [f"x{i}" for i in range(3000)] + ["<s1>"], WORDS)
    text = (
        f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'a'}}}]\n"
        "tokenizer_source: union\n"
    )
    plan = build_plan(parse_recipe(text), device="cpu")
    got = json.loads(plan.tokenizer_made["tokenizer.json"])["added_tokens"]
    assert [(t["id"], t["content"]) for t in got[:2]] == [(10, "x0"), (11, "x1")]
    assert (got[-1]["id"], got[-1]["content"], got[-1]["special"]) == (3010, "<s1>", True)

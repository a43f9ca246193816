"""Vocabularies (tokenizer_source, tokenizer:, chat_template) against an oracle written in this file: each
model's vocabulary tensors laid out by hand, token by token, then the method's formula in float64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, run_bad, write_checkpoint
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from merger.cli import cli

H = 16  # hidden size: no 1-D tensor's length is a vocab_size below
# model: (plain tokens by id, then added tokens by id as (token, special), config.json vocab_size = rows).
# <base_only> is in the base alone, dog in ft1 and ft2, bird in ft2 alone, <im> in ft2 (special) and ft3
# (not special), mat in all but ft3; ft2 has the shared tokens at other ids; ft3's <unused> lies beyond its
# vocab_size.
VOCABS = {
    "base": (["<unk>", "the", "cat", "sat", "on", "mat"], [("<s>", True), ("<base_only>", False)], 8),
    "ft1": (["<unk>", "the", "cat", "sat", "on", "mat", "dog"], [("<s>", True), ("<tool>", True)], 9),
    "ft2": (["<unk>", "mat", "on", "sat", "cat", "the", "dog", "bird"], [("<im>", True), ("<s>", True)], 10),
    "ft3": (["<unk>", "the", "cat", "sat", "on"], [("<s>", True), ("<im>", False), ("<unused>", True)], 7),
}
BASE_TOKENS = ["<unk>", "the", "cat", "sat", "on", "mat", "<s>", "<base_only>"]
# base's tokens at their ids; then the others' plain tokens (ft1's dog, ft2's bird); then their added tokens
UNION = [*BASE_TOKENS, "dog", "bird", "<tool>", "<im>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LAYER = {  # a llama layer's tensors, so that transformers' LlamaForCausalLM loads the output
    "self_attn.q_proj.weight": (H, H),
    "self_attn.k_proj.weight": (H, H),
    "self_attn.v_proj.weight": (H, H),
    "self_attn.o_proj.weight": (H, H),
    "mlp.gate_proj.weight": (32, H),
    "mlp.up_proj.weight": (32, H),
    "mlp.down_proj.weight": (H, 32),
    "input_layernorm.weight": (H,),
    "post_attention_layernorm.weight": (H,),
}
Models = dict[str, dict[str, torch.Tensor]]


def tokens(name: str) -> dict[str, int]:
    """A model's tokens with their ids, those below its vocab_size (the ones its tensors have rows for)."""
    plain, added, rows = VOCABS[name]
    return {t: i for i, t in enumerate([*plain, *(a for a, _ in added)]) if i < rows}


def write_model(directory: Path, name: str, g: torch.Generator, vocabs: dict = VOCABS, template: str | None = None):
    """A tiny two-layer llama (float32, two shards) and its tokenizer.json and tokenizer_config.json."""
    plain, added, rows = vocabs[name]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(plain)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    decoder = {}
    for content, special in added:
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(content, special=special)])
        decoder[str(tok.token_to_id(content))] = {"content": content, "special": special}
    tensors = {EMBED: torch.randn(rows, H, generator=g), HEAD: torch.randn(rows, H, generator=g)}
    tensors["model.norm.weight"] = torch.randn(H, generator=g)
    for i in range(2):
        tensors |= {f"model.layers.{i}.{k}": torch.randn(s, generator=g) for k, s in LAYER.items()}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": rows,
        "hidden_size": H,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    write_checkpoint(directory, tensors, config=config)
    tok.save(str(directory / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder}
    if template is not None:
        tok_config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return tensors


@pytest.fixture
def models(tmp_path, monkeypatch) -> Models:
    """The base and three fine-tunes of VOCABS in the working directory, by name."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(11)
    return {name: write_model(Path(name), name, g) for name in VOCABS}


def apply(recipe: str, *args: str) -> tuple[dict[str, torch.Tensor], str]:
    """Merge `recipe` into out/: its tensors and what merger said on stderr."""
    Path("r.yaml").write_text(recipe)
    result = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "out", *args])
    assert result.exit_code == 0, result.output
    return load_output(Path("out")), result.stderr


def out_tokens() -> dict[str, int]:
    """The output tokenizer.json's tokens and ids, as the tokenizers library reads them."""
    return Tokenizer.from_file("out/tokenizer.json").get_vocab(with_added_tokens=True)


# The oracle: each input's vocabulary tensor laid out in the output's vocabulary, by hand.


def own_row(models: Models, name: str, tensor: str, token: str) -> torch.Tensor:
    return models[name][tensor][tokens(name)[token]].double()


def lay_out(
    models: Models,
    tensor: str,
    inputs: list[str],
    vocab: list[str],
    base: str | None = None,
    settings: dict | None = None,
    rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Each of `inputs` (the models the method reads for this tensor) as a (rows, H) float64 tensor whose
    row i is token vocab[i]: its own row, else (or, forced, always) the setting's, else the one input's
    that has it, zero where none has it, the base's where it is an input that has it, the mean of the
    inputs' that have it. Stand-ins and padding (each model's mean row) rounded once to float32."""
    settings = settings or {}

    def stand_in(token: str) -> torch.Tensor:
        if token in settings:
            source = settings[token]["source"]
            if isinstance(source, str):
                return own_row(models, source, tensor, token)
            if source["kind"] == "zero":
                return torch.zeros(H, dtype=torch.float64)
            row = source["token_id"] if "token_id" in source else tokens(source["model"])[source["token"]]
            return models[source["model"]][tensor][row].double()
        holders = [m for m in inputs if token in tokens(m)]
        if not holders:
            return torch.zeros(H, dtype=torch.float64)
        if len(holders) == 1:
            return own_row(models, holders[0], tensor, token)
        if base in holders:
            return own_row(models, base, tensor, token)
        return torch.stack([own_row(models, m, tensor, token) for m in holders]).mean(0)

    out = {}
    for name in inputs:
        laid = torch.stack(
            [
                own_row(models, name, tensor, t)
                if t in tokens(name) and not settings.get(t, {}).get("force")
                else stand_in(t)
                for t in vocab
            ]
        )
        laid = laid.float().double()
        if rows is not None and rows > len(vocab):
            mean = laid.mean(0).float().double()
            laid = torch.cat([laid, mean.expand(rows - len(vocab), H)])
        out[name] = laid
    return out


def task_arithmetic(x: dict[str, torch.Tensor], base: str, weights: dict[str, float]) -> torch.Tensor:
    return x[base] + sum(w * (x[m] - x[base]) for m, w in weights.items())


def linear(x: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return sum(w * x[m] for m, w in weights.items()) / sum(weights.values())


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP of two whole tensors, linear where they are nearly parallel."""
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-6)


TA = "merge_method: task_arithmetic\nbase_model: base\ndtype: float32\nmodels:\n" + "".join(
    f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.2))
)
TA_WEIGHTS = {"ft1": 0.5, "ft2": 0.3, "ft3": 0.2}


def check_task_arithmetic(models: Models, out: dict[str, torch.Tensor], vocab: list[str], **layout) -> None:
    """Every output tensor against task arithmetic over the base and the three fine-tunes."""
    inputs = ["base", *TA_WEIGHTS]
    for name, merged in out.items():
        if name in (EMBED, HEAD):
            expected = task_arithmetic(lay_out(models, name, inputs, vocab, "base", **layout), "base", TA_WEIGHTS)
        else:
            expected = task_arithmetic({m: models[m][name].double() for m in inputs}, "base", TA_WEIGHTS)
        close(merged, expected)
    assert set(out) == set(models["base"])


def test_a_union_holds_every_models_tokens_each_row_laid_out_by_token(models):
    out, err = apply(TA + "tokenizer_source: union\n")
    assert err == ""
    assert out[EMBED].shape == out[HEAD].shape == (12, H)
    check_task_arithmetic(models, out, UNION)
    # a few rows by hand: a token one model has is that model's row in every model, so the merge keeps it
    for token, holder in (("<base_only>", "base"), ("bird", "ft2"), ("<tool>", "ft1")):
        close(out[EMBED][UNION.index(token)], own_row(models, holder, EMBED, token))
    # dog (ft1, ft2): the base and ft3 stand in with the mean of ft1's and ft2's rows
    dog = (own_row(models, "ft1", HEAD, "dog") + own_row(models, "ft2", HEAD, "dog")) / 2
    close(
        out[HEAD][8],
        dog + 0.5 * (own_row(models, "ft1", HEAD, "dog") - dog) + 0.3 * (own_row(models, "ft2", HEAD, "dog") - dog),
    )
    # mat (all but ft3): ft3 stands in with the base's row, not the holders' mean
    mat = {m: own_row(models, m, EMBED, "mat") for m in ("base", "ft1", "ft2")}
    close(out[EMBED][5], mat["base"] + 0.5 * (mat["ft1"] - mat["base"]) + 0.3 * (mat["ft2"] - mat["base"]))

    assert out_tokens() == {t: i for i, t in enumerate(UNION)}
    assert json.loads(Path("out/config.json").read_text())["vocab_size"] == 12
    added = {a["content"]: a for a in json.loads(Path("out/tokenizer.json").read_text())["added_tokens"]}
    assert "<unused>" not in added  # beyond ft3's vocab_size: no row of its own anywhere
    assert (added["<im>"]["id"], added["<im>"]["special"]) == (11, True)  # ft2's, the first to add it
    assert (added["<tool>"]["id"], added["<tool>"]["special"]) == (10, True)
    assert (added["dog"]["id"], added["bird"]["id"]) == (8, 9)
    decoder = json.loads(Path("out/tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {i: decoder[str(i)]["content"] for i in range(8, 12)} == dict(enumerate(UNION[8:], 8))
    assert decoder["11"]["special"] and not decoder["9"]["special"]


def test_transformers_loads_a_union_output(models):
    """AutoTokenizer encodes the new tokens to their new ids; LlamaForCausalLM loads the 12-row model."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out, _ = apply(TA + "tokenizer_source: union\n")
    tok = AutoTokenizer.from_pretrained("out")
    assert tok("the dog <tool> bird <im> <base_only> mat")["input_ids"] == [1, 8, 10, 9, 11, 7, 5]
    model = LlamaForCausalLM.from_pretrained("out")
    assert model.config.vocab_size == 12
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), out[EMBED], rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight.detach(), out[HEAD], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 8, 10, 9, 11]])).logits
    assert logits.shape == (1, 5, 12)


def test_linear_lays_out_over_the_models_it_reads_not_the_base(models):
    """linear reads its models alone: the base adds its tokens to the union but no rows. (mergekit always
    gathers the base: <base_only> would be the base's row there, not zero, and the base's rows would
    stand in for the fine-tunes' shared tokens.)"""
    recipe = (
        "merge_method: linear\nbase_model: base\ndtype: float32\ntokenizer_source: union\nmodels:\n"
        "  - {model: ft1, parameters: {weight: 1.0}}\n  - {model: ft2, parameters: {weight: 2.0}}\n"
        "  - {model: ft3, parameters: {weight: 3.0}}\n"
    )
    out, _ = apply(recipe)
    weights = {"ft1": 1.0, "ft2": 2.0, "ft3": 3.0}
    for name in (EMBED, HEAD):
        close(out[name], linear(lay_out(models, name, list(weights), UNION), weights))
    assert not out[EMBED][UNION.index("<base_only>")].any()
    # <im> (ft2, ft3): ft1 stands in with their mean
    im = [own_row(models, m, EMBED, "<im>") for m in ("ft2", "ft3")]
    close(out[EMBED][11], (1.0 * (im[0] + im[1]) / 2 + 2.0 * im[0] + 3.0 * im[1]) / 6)


def test_without_a_base_the_union_starts_from_the_first_model(models):
    recipe = "merge_method: linear\ndtype: float32\ntokenizer_source: union\nmodels: [{model: ft2}, {model: ft1}, {model: ft3}]\n"
    out, _ = apply(recipe)
    vocab = [*tokens("ft2"), "<tool>"]
    assert out_tokens() == {t: i for i, t in enumerate(vocab)}
    weights = {"ft2": 1.0, "ft1": 1.0, "ft3": 1.0}
    for name in (EMBED, HEAD):
        close(out[name], linear(lay_out(models, name, list(weights), vocab), weights))


def test_a_model_without_tokenizer_files_has_the_bases_vocabulary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(VOCABS, "ft3", VOCABS["base"])  # for the oracle too: ft3 has the base's tokens
    g = torch.Generator().manual_seed(7)
    models = {name: write_model(Path(name), name, g) for name in VOCABS}
    Path("ft3/tokenizer.json").unlink()
    Path("ft3/tokenizer_config.json").unlink()
    out, _ = apply(TA + "tokenizer_source: union\n")
    assert out_tokens() == {t: i for i, t in enumerate(UNION)}
    check_task_arithmetic(models, out, UNION)


def test_the_base_as_source_drops_the_fine_tunes_other_rows(models):
    out, _ = apply(TA + "tokenizer_source: base\n")
    assert out[EMBED].shape == (8, H)
    check_task_arithmetic(models, out, BASE_TOKENS)
    close(out[HEAD][7], own_row(models, "base", HEAD, "<base_only>"))  # the fine-tunes lack it: the base's row
    assert out_tokens() == tokens("base")
    assert json.loads(Path("out/config.json").read_text())["vocab_size"] == 8


def test_a_model_as_source_lays_out_every_model_in_its_order(models):
    out, _ = apply(TA + "tokenizer:\n  source: ft2\n")
    vocab = list(tokens("ft2"))
    assert out[EMBED].shape == (10, H)
    check_task_arithmetic(models, out, vocab)
    assert out_tokens() == tokens("ft2")
    assert json.loads(Path("out/config.json").read_text())["vocab_size"] == 10


def test_slerp_lays_out_and_pads_the_base_and_its_model_before_the_merge(models):
    """SLERP is not linear: padding the merged rows with their mean would give other rows, and angle."""
    recipe = "merge_method: slerp\nbase_model: base\nmodels: [{model: ft1}]\nparameters: {t: 0.3}\ndtype: float32\n"
    out, _ = apply(recipe + "tokenizer:\n  pad_to_multiple_of: 4\n")
    vocab = [*BASE_TOKENS, "dog", "<tool>"]  # the union of the models the recipe names
    assert out_tokens() == {t: i for i, t in enumerate(vocab)}
    for name in (EMBED, HEAD):
        x = lay_out(models, name, ["base", "ft1"], vocab, "base", rows=12)
        close(out[name], slerp(x["base"], x["ft1"], 0.3))


def test_slices_take_the_embeddings_from_the_first_slice_and_the_head_from_the_last(models):
    recipe = (
        "merge_method: passthrough\ndtype: float32\ntokenizer_source: union\nslices:\n"
        "  - sources: [{model: ft1, layer_range: [0, 1]}]\n  - sources: [{model: ft2, layer_range: [1, 2]}]\n"
    )
    out, _ = apply(recipe)
    vocab = [*tokens("ft1"), "bird", "<im>"]
    assert out_tokens() == {t: i for i, t in enumerate(vocab)}
    close(out[EMBED], lay_out(models, EMBED, ["ft1"], vocab)["ft1"])  # bird, <im>: no input has them, zero
    close(out[HEAD], lay_out(models, HEAD, ["ft2"], vocab)["ft2"])  # <tool>: zero
    assert not out[EMBED][9:].any() and not out[HEAD][8].any()
    close(out["model.layers.1.mlp.up_proj.weight"], models["ft2"]["model.layers.1.mlp.up_proj.weight"].double())


def test_padding_rows_hold_each_models_mean_row(models):
    out, _ = apply(TA + "tokenizer:\n  source: union\n  pad_to_multiple_of: 5\n")
    assert out[EMBED].shape == (15, H)
    check_task_arithmetic(models, out, UNION, rows=15)
    assert out_tokens() == {t: i for i, t in enumerate(UNION)}  # padding rows have no token
    assert json.loads(Path("out/config.json").read_text())["vocab_size"] == 15


SETTINGS = {
    "dog": {"source": "ft2"},  # the base and ft3 take ft2's dog, not the mean of ft1's and ft2's
    "<im>": {"source": {"kind": "model_token", "model": "base", "token": "<s>"}},
    "bird": {"source": {"kind": "model_token", "model": "ft1", "token_id": 2}},
    "<tool>": {"source": {"kind": "zero"}},
    "the": {"source": "ft3", "force": True},  # every model, even those with their own
    "cat": {"source": {"kind": "zero"}, "force": True},
    "<new>": {"source": {"kind": "model_token", "model": "ft3", "token": "on"}},  # no model has it
    "<zero>": {"source": {"kind": "zero"}},
}


def test_every_token_setting_gives_the_rows_it_names(models):
    out, _ = apply(TA + "tokenizer:\n  tokens: " + json.dumps(SETTINGS) + "\n")
    vocab = [*UNION, "<new>", "<zero>"]  # tokens no model has come last
    check_task_arithmetic(models, out, vocab, settings=SETTINGS)
    close(out[EMBED][vocab.index("the")], own_row(models, "ft3", EMBED, "the"))
    assert not out[EMBED][vocab.index("cat")].any() and not out[HEAD][vocab.index("<zero>")].any()
    close(out[HEAD][vocab.index("<new>")], own_row(models, "ft3", HEAD, "on"))
    close(
        out[EMBED][vocab.index("bird")],
        0.7 * models["ft1"][EMBED][2].double() + 0.3 * own_row(models, "ft2", EMBED, "bird"),
    )
    assert out_tokens() == {t: i for i, t in enumerate(vocab)}
    assert json.loads(Path("out/config.json").read_text())["vocab_size"] == 14


@pytest.mark.parametrize("source", ["union", "base"])
def test_models_that_agree_on_their_vocabulary_merge_as_without_a_tokenizer_source(tmp_path, monkeypatch, source):
    """Every model with the base's tokens at the same ids and that many rows: the same bytes as without."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(5)
    same = {name: VOCABS["base"] for name in VOCABS}
    for name in same:
        write_model(Path(name), name, g, vocabs=same)
    apply(TA)
    shards = sorted(p.name for p in Path("out").glob("*.safetensors"))
    before = {s: Path("out", s).read_bytes() for s in shards}
    Path("out").rename("plain")
    apply(TA + f"tokenizer_source: {source}\n")
    assert sorted(p.name for p in Path("out").glob("*.safetensors")) == shards
    assert all(Path("out", s).read_bytes() == before[s] for s in shards)
    assert out_tokens() == tokens("base")
    assert json.loads(Path("out/config.json").read_text())["vocab_size"] == 8


def test_rows_beyond_the_tokens_are_dropped(tmp_path, monkeypatch):
    """Models whose tensors have rows no token uses (padding) lose them, as in mergekit: the output has a
    row per token of its vocabulary (pad_to_multiple_of pads it again)."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(6)
    plain, added, _ = VOCABS["base"]
    padded = {name: (plain, added, 10) for name in VOCABS}
    models = {name: write_model(Path(name), name, g, vocabs=padded) for name in VOCABS}
    out, _ = apply(TA + "tokenizer_source: base\n")
    assert out[EMBED].shape == (8, H) and json.loads(Path("out/config.json").read_text())["vocab_size"] == 8
    for name in (EMBED, HEAD):
        x = {m: models[m][name][:8].double() for m in models}
        close(out[name], task_arithmetic(x, "base", TA_WEIGHTS))


# Errors: one line each, at the recipe's line, naming the model.


def test_a_union_needs_every_tokenizer_it_is_given_and_takes_a_model_without_one_to_have_the_bases(models):
    """A tokenizer merger cannot read (sentencepiece alone: mergekit reads it with sentencepiece installed)
    would leave its tokens out: refused, with the conversion. A model with no tokenizer files at all has the
    base's vocabulary, as in mergekit ("Unable to load tokenizer ... Assuming same as base"), with a note."""
    Path("ft2/tokenizer.json").unlink()
    Path("ft2/tokenizer.model").write_bytes(b"\x00sentencepiece")
    err = run_bad(TA + "tokenizer_source: union\n")
    ft2 = Path("ft2").resolve()
    assert err == (
        "error: recipe.yaml:11: tokenizer_source: 'ft2': holds tokenizer.model but no tokenizer.json, which merger "
        "reads vocabularies from (write one: python -c 'import sys; from transformers import AutoTokenizer as T; "
        f"T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])' {ft2})\n"
    )
    for name in ("tokenizer.model", "tokenizer_config.json"):
        Path("ft2", name).unlink()
    Path("recipe.yaml").write_text(TA + "tokenizer_source: union\n")
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-o", "out"])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "note: recipe.yaml:11: tokenizer_source: 'ft2' holds no tokenizer files: taken to have the vocabulary of "
        "'base', as mergekit does\n"
    )


def test_a_token_setting_from_a_model_the_recipe_does_not_merge_is_refused(models):
    err = run_bad(TA + "tokenizer:\n  tokens:\n    dog:\n      source: ft9\n")
    assert err == "error: recipe.yaml:14: tokenizer.tokens.dog.source: 'ft9' is not one of the recipe's models\n"
    err = run_bad(TA + "tokenizer:\n  tokens:\n    dog:\n      source: {kind: model_token, model: ft9, token: cat}\n")
    assert err == "error: recipe.yaml:14: tokenizer.tokens.dog.source.model: 'ft9' is not one of the recipe's models\n"


def test_a_model_token_or_model_that_lacks_the_token_is_refused(models):
    """Found once the vocabularies are read (plan and apply alike): one line at the setting, naming the model."""
    for source, why in (
        ("{kind: model_token, model: base, token: bird}", "'base' has no token 'bird'"),
        ("base", "'base' has no token 'dog'"),
        ("{kind: model_token, model: ft1, token_id: 9}", "token id 9 is past the vocab_size of 'ft1' (9)"),
    ):
        err = run_bad(TA + "tokenizer:\n  tokens:\n    dog:\n      source: " + source + "\n", command="plan")
        assert err == f"error: recipe.yaml:14: tokenizer.tokens.dog.source: {why}\n"


def test_a_token_setting_without_a_source_is_refused(models):
    """mergekit fails on one (NotImplementedError) once it merges; here the recipe is refused at its line."""
    err = run_bad(TA + "tokenizer:\n  tokens:\n    dog: {force: true}\n")
    assert err.startswith("error: recipe.yaml:13: tokenizer.tokens.dog.source: ") and err.count("\n") == 1, err


def test_a_token_setting_from_a_model_the_tensor_does_not_merge_is_refused(models):
    """linear does not read its base, so no row of the base can stand in there (mergekit 0.1.5 refuses a
    linear recipe whose base is not among its models altogether)."""
    recipe = "merge_method: linear\nbase_model: base\nmodels: [{model: ft1}, {model: ft2}]\n"
    err = run_bad(recipe + "tokenizer:\n  tokens: {the: {source: base, force: true}}\n")
    assert err == (
        "error: recipe.yaml:5: tokenizer.tokens.the.source: 'base' is not merged into tensor 'model.embed_tokens.weight', so "
        "no row of it can stand in for a token there\n"
    )


def test_a_union_after_tokens_past_the_sources_vocab_size_is_refused(tmp_path, monkeypatch):
    """The base's tokenizer holds a token at id 8, past its 8 rows: the union's first new token would need
    that id too."""
    monkeypatch.chdir(tmp_path)
    plain, added, rows = VOCABS["base"]
    vocabs = VOCABS | {"base": (plain, [*added, ("<extra>", True)], rows)}
    g = torch.Generator().manual_seed(1)
    for name in VOCABS:
        write_model(Path(name), name, g, vocabs=vocabs)
    assert run_bad(TA + "tokenizer_source: union\n") == (
        "error: recipe.yaml:11: tokenizer_source: 'base': its tokenizer holds 1 token(s) past its vocab_size 8; "
        "merger cannot add tokens after them\n"
    )


# Chat templates


CHATML_TURN = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_named_chat_template_replaces_the_sources(models):
    from transformers import AutoTokenizer

    Path("base/chat_template.jinja").write_text("{{ 'base template' }}")
    Path("base/chat_template.json").write_text(json.dumps({"chat_template": "{{ 'base template' }}"}))
    apply(TA + "tokenizer_source: union\nchat_template: chatml\n")
    assert not Path("out/chat_template.jinja").exists() and not Path("out/chat_template.json").exists()
    assert "<|im_start|>" in json.loads(Path("out/tokenizer_config.json").read_text())["chat_template"]
    tok = AutoTokenizer.from_pretrained("out")
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == CHATML_TURN
    )


A, B = "{{ 'template A' }}", "{{ 'template B' }}"


@pytest.mark.parametrize(
    "templates, chosen",
    [
        ({"base": A, "ft1": B, "ft2": B, "ft3": None}, B),  # the most common
        ({"base": None, "ft1": B, "ft2": A, "ft3": A + "\n"}, A),  # compared stripped
        ({"base": A, "ft1": B, "ft2": None, "ft3": None}, A),  # a tie: the first in the recipe
        ({"base": None, "ft1": None, "ft2": None, "ft3": None}, None),  # none: the files as they are
    ],
)
def test_auto_takes_the_most_common_template(tmp_path, monkeypatch, templates, chosen):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(2)
    for name, template in templates.items():
        write_model(Path(name), name, g, vocabs={m: VOCABS["base"] for m in VOCABS}, template=template)
    apply(TA + "chat_template: auto\n")
    config = json.loads(Path("out/tokenizer_config.json").read_text())
    assert config.get("chat_template", "").strip() == (chosen or "")
    assert (
        config["added_tokens_decoder"]
        == json.loads(Path("base/tokenizer_config.json").read_text())["added_tokens_decoder"]
    )


def test_auto_counts_templates_in_chat_template_jinja(tmp_path, monkeypatch):
    """Where transformers reads a tokenizer's template from (mergekit counts what AutoTokenizer loads)."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(3)
    for name, template in (("base", None), ("ft1", B), ("ft2", None), ("ft3", None)):
        write_model(Path(name), name, g, vocabs={m: VOCABS["base"] for m in VOCABS}, template=template)
    Path("ft2/chat_template.jinja").write_text(A)
    Path("ft3/chat_template.jinja").write_text(A)
    apply(TA + "chat_template: auto\n")
    assert json.loads(Path("out/tokenizer_config.json").read_text())["chat_template"].strip() == A


# merger plan


def test_the_plan_shows_the_vocabulary(models):
    Path("r.yaml").write_text(
        TA + "tokenizer:\n  pad_to_multiple_of: 8\n  tokens: {<new>: {source: {kind: zero}}}\nchat_template: chatml\n"
    )
    shown = CliRunner().invoke(cli, ["plan", "r.yaml"])
    assert shown.exit_code == 0, shown.output
    assert [line.split()[0] for line in shown.stdout.splitlines() if "vocabulary:" in line] == ["vocabulary:"]
    line = next(line for line in shown.stdout.splitlines() if "vocabulary:" in line)
    assert "13 tokens" in line and "16 rows" in line
    plan = CliRunner().invoke(cli, ["plan", "r.yaml", "--json"])
    data = json.loads(plan.stdout)
    assert data["vocabulary"] == {
        "source": "union",
        "tokens": 13,
        "rows": 16,
        "added": ["dog", "bird", "<tool>", "<im>", "<new>"],
        "tensors": [HEAD, EMBED],
    }
    assert "<|im_start|>" in data["chat_template"]
    assert not Path("out").exists()

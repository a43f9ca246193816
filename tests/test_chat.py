"""Chat templates: the built-in ones rendered by transformers against each format's text written out by
hand, the recipe value's resolution, and which template a model's files hold, against transformers' loader."""

from __future__ import annotations

import json

import pytest

from merger.chat import NAMED, model_template, resolve

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]

# (bos, eos) of each format's tokenizer: a template that should not use them shows them if it does
SPECIAL = {
    "alpaca": ("<s>", "</s>"),
    "chatml": ("<s>", "</s>"),
    "exaone": ("<s>", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
}

# Each format's text for TURNS, with and without SYSTEM first, as (no generation prompt, with it).
EXPECTED = {
    ("alpaca", False): (
        "### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nWhat is 2+2?",
        "### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n",
    ),
    ("alpaca", True): (
        "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nWhat is 2+2?",
        "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nWhat is 2+2?"
        "\n\n### Response:\n",
    ),
    ("chatml", False): (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    ("chatml", True): (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    ("exaone", False): (
        "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]What is 2+2?\n",
        "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]What is 2+2?\n"
        "[|assistant|]",
    ),
    ("exaone", True): (
        "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]What is 2+2?\n",
        "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]What is 2+2?\n"
        "[|assistant|]",
    ),
    ("llama3", False): (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    ("llama3", True): (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    # no generation prompt in this format: a prompt ends with [/INST]
    ("mistral", False): (
        "<s> [INST] Hi there [/INST] Hello!</s> [INST] What is 2+2? [/INST]",
        "<s> [INST] Hi there [/INST] Hello!</s> [INST] What is 2+2? [/INST]",
    ),
    ("mistral", True): (
        "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] What is 2+2? [/INST]",
        "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] What is 2+2? [/INST]",
    ),
}


def tokenizer(bos: str, eos: str):
    """A three-token tokenizer with this bos and eos, enough for transformers to render templates."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, bos: 1, eos: 2}, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="[UNK]"
    )


def render(name: str, messages: list[dict], generation_prompt: bool, special: tuple[str, str] | None = None) -> str:
    """The named template's text for these messages, rendered by transformers with the format's bos and eos."""
    return tokenizer(*(special or SPECIAL[name])).apply_chat_template(
        messages, chat_template=NAMED[name], tokenize=False, add_generation_prompt=generation_prompt
    )


def test_every_named_template_is_checked():
    assert sorted(NAMED) == sorted({name for name, _ in EXPECTED})


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize(("name", "system"), sorted(EXPECTED))
def test_named_template_renders_the_format(name, system, generation_prompt):
    messages = [SYSTEM, *TURNS] if system else TURNS
    assert render(name, messages, generation_prompt) == EXPECTED[name, system][generation_prompt]


def test_llama3_and_alpaca_strip_contents_chatml_keeps_them():
    messages = [{"role": "user", "content": "  Hi there\n"}]
    assert render("llama3", messages, False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    )
    assert render("alpaca", messages, False) == "### Instruction:\nHi there"
    assert render("chatml", messages, False) == "<|im_start|>user\n  Hi there\n<|im_end|>\n"


def test_alpaca_input_and_no_response_prompt_after_a_response():
    messages = [
        {"role": "user", "content": "Sum these."},
        {"role": "user_context", "content": "2 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert render("alpaca", messages, True) == "### Instruction:\nSum these.\n\n### Input:\n2 2\n\n### Response:\n4"


def test_llama3_and_mistral_take_bos_and_eos_from_the_tokenizer():
    special = ("<B>", "<E>")
    assert render("mistral", TURNS[:2], False, special) == "<B> [INST] Hi there [/INST] Hello!<E>"
    assert render("llama3", TURNS[:1], False, special) == (
        "<B><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    )


def test_mistral_refuses_roles_that_do_not_alternate():
    with pytest.raises(Exception, match="alternate"):
        render("mistral", [TURNS[0], TURNS[0]], False)


T1 = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
T2 = "{% for m in messages %}{{ m['role'] }}{% endfor %}"


@pytest.mark.parametrize(
    ("templates", "expected"),
    [
        ([T1, None, T2 + "\n", "  " + T2], T2),  # compared stripped: T2 twice
        ([None, T2, T1, T1, T2], T2),  # a tie: the first seen
        ([T1, T2], T1),
        ([None, None], None),
        ([], None),
        ([" \n", None], None),
    ],
)
def test_auto_takes_the_most_common_model_template(templates, expected):
    assert resolve("auto", templates) == expected


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_a_name_gives_its_template_whatever_the_models_hold(name):
    assert resolve(name, [T1, T1]) == NAMED[name]


def test_a_jinja_template_is_taken_as_written():
    assert resolve(T1 + "\n", [T2]) == T1 + "\n"
    assert resolve("{{ messages[0] }}xxx", []) == "{{ messages[0] }}xxx"  # 20 characters


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("foo", "'foo'"),
        ("Auto", "'Auto'"),
        ("{{ messages[0] }}xx", "'{{ messages[0] }}xx'"),  # 19 characters
        ("a long line of text that has no braces at all", "'a long line of text that has no braces a'..."),
        ("", "''"),
    ],
)
def test_anything_else_is_refused_in_one_line(value, shown):
    with pytest.raises(ValueError) as caught:
        resolve(value, [T1])
    names = "alpaca, chatml, exaone, llama3, mistral"
    assert str(caught.value) == f"{shown} is not a chat template: give auto, one of {names}, or a Jinja template"


def loaded_by_transformers(tmp_path, files: dict[str, object]) -> str | None:
    """The template mergekit's `auto` takes from a model with these files: its tokenizer's as transformers
    loads it, the default of several, None if there is none or the tokenizer does not load."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.save(str(tmp_path / "tokenizer.json"))
    for name, content in files.items():
        (tmp_path / name).write_text(content if name.endswith(".jinja") else json.dumps(content))
    try:
        template = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path).chat_template
    except Exception:
        return None
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def config(template: object) -> dict[str, object]:
    """Files whose tokenizer_config.json holds this chat_template."""
    return {"tokenizer_config.json": {"chat_template": template}}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"chat_template.jinja": T1, **config(T2)}, T1),
        (config(T2), T2),
        (config([{"name": "tools", "template": T1}, {"name": "default", "template": T2}]), T2),
        (config([{"name": "default", "template": T1}, {"name": "default", "template": T2}]), T2),
        (config({"default": T2}), T2),
        (config([{"name": "tool_use", "template": T1}]), None),
        (config([{"template": T1}]), None),
        (config([T1]), None),
        (config([{"name": "default", "template": 5}]), None),
        (config(5), None),
        (config(None), None),
        ({"tokenizer_config.json": []}, None),
        ({"chat_template.jinja": "", **config(T2)}, None),
        ({"tokenizer_config.json": {}}, None),
        ({}, None),
    ],
)
def test_model_template_is_the_one_transformers_loads(tmp_path, files, expected):
    assert loaded_by_transformers(tmp_path, files) == expected  # the oracle agrees with the case as written
    assert model_template(files) == expected


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"chat_template.json": {"chat_template": T1}}, T1),
        ({"chat_template.json": {"chat_template": T1}, "tokenizer_config.json": {"chat_template": T2}}, T2),
        ({"chat_template.json": {"chat_template": T1}, "chat_template.jinja": T2}, T2),
        ({"chat_template.json": {"chat_template": T1}, "tokenizer_config.json": {"chat_template": None}}, T1),
        ({"chat_template.json": {"template": T1}}, None),
        ({"chat_template.json": {"chat_template": [T1]}}, None),
        ({"chat_template.json": [T1]}, None),
    ],
)
def test_a_processors_chat_template_json_counts_only_when_the_tokenizer_has_none(files, expected):
    assert model_template(files) == expected


@pytest.mark.parametrize("content", [None, 5, " \n", b"{{ x }}"])
def test_a_chat_template_jinja_that_holds_no_template_gives_none(content):
    assert model_template({"chat_template.jinja": content, "tokenizer_config.json": {"chat_template": T2}}) is None

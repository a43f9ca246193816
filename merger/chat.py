"""Chat templates for the recipe's `chat_template:` key, as mergekit reads it.

The value is `auto` (the template most of the input models' tokenizers hold), the name of a built-in
template (NAMED), or a Jinja template itself. The built-in templates are our own, written from each
format's public description; on ordinary conversations they render what mergekit's do, except where
mergekit's leak whitespace (llama3, exaone) or drop a separator (alpaca).
"""

from __future__ import annotations

from collections import Counter

import jinja2

# Each renders under transformers' Jinja settings (trim_blocks, lstrip_blocks); the `-` markers keep the
# layout's whitespace out of the text even without them.
ALPACA = r"""
{%- for message in messages %}
    {%- if not loop.first %}{{- '\n\n' }}{% endif %}
    {%- if message['role'] == 'system' %}
        {{- message['content'] | trim }}
    {%- elif message['role'] == 'user' %}
        {{- '### Instruction:\n' + message['content'] | trim }}
    {%- elif message['role'] == 'user_context' %}
        {{- '### Input:\n' + message['content'] | trim }}
    {%- elif message['role'] == 'assistant' %}
        {{- '### Response:\n' + message['content'] | trim }}
    {%- else %}
        {{- raise_exception('alpaca: roles are system, user, user_context (### Input) and assistant') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}
    {{- '\n\n### Response:\n' }}
{%- endif %}
"""

CHATML = r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# EXAONE 3.0: a user turn ends with a newline only; every conversation opens with a system turn.
EXAONE = r"""
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '[|system|][|endofturn|]\n' }}
    {%- endif %}
    {{- '[|' + message['role'] + '|]' + message['content'] }}
    {{- '\n' if message['role'] == 'user' else '[|endofturn|]\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '[|assistant|]' }}
{%- endif %}
"""

LLAMA3 = r"""
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- (message['content'] | trim) + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Mistral's [INST] format has no generation prompt: a prompt ends with [/INST]. A system message goes
# into the first instruction.
MISTRAL = r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] + '\n\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in turns %}
    {%- if message['role'] != ('user' if loop.index0 is even else 'assistant') %}
        {{- raise_exception('mistral: after one optional system message, roles must alternate user, assistant, ...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- ' [INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

NAMED: dict[str, str] = {
    "alpaca": ALPACA.strip(),
    "chatml": CHATML.strip(),
    "exaone": EXAONE.strip(),
    "llama3": LLAMA3.strip(),
    "mistral": MISTRAL.strip(),
}


def resolve(value: str, model_templates: list[str | None]) -> str | None:
    """The template a recipe's `chat_template` value gives, `model_templates` being the input models'
    (in the recipe's order, None for a model without one). None when `auto` finds no template."""
    if value == "auto":
        return _most_common(model_templates)
    if value in NAMED:
        return NAMED[value]
    if len(value) >= 20 and "{" in value:  # mergekit's test for a Jinja template
        _parse(value)
        return value
    shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    names = ", ".join(NAMED)
    raise ValueError(f"{shown} is not a chat template: give auto, one of {names}, or a Jinja template")


def _parse(template: str) -> None:
    """ValueError where `template` is not Jinja that transformers can render (its environment has the loop
    controls extension); parsing runs nothing of it."""
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"not a Jinja template: {e.message} (its line {e.lineno})") from None


def _most_common(templates: list[str | None]) -> str | None:
    """The most common of these templates, compared stripped; among equally common ones the first seen."""
    stripped = [t.strip() for t in templates if t is not None and t.strip()]
    if not stripped:
        return None
    return Counter(stripped).most_common(1)[0][0]  # ties keep the order first seen


def model_template(files: dict[str, object]) -> str | None:
    """The chat template a model's tokenizer files hold, None if none (or none that transformers could load).

    `files` maps a file name to its content: "chat_template.jinja" to its text, "chat_template.json" and
    "tokenizer_config.json" to their parsed JSON. A tokenizer reads chat_template.jinja before the
    tokenizer config's "chat_template"; chat_template.json is a processor's legacy file, which only a
    processor reads, so it counts here only when the tokenizer has no template.
    """
    if "chat_template.jinja" in files:
        return _text(files["chat_template.jinja"])
    config = files.get("tokenizer_config.json", {})
    if not isinstance(config, dict):
        return None
    if config.get("chat_template") is not None:
        return _configured(config["chat_template"])
    legacy = files.get("chat_template.json")
    if isinstance(legacy, dict):
        return _text(legacy.get("chat_template"))
    return None


def _configured(value: object) -> str | None:
    """The default template of a tokenizer config's "chat_template": a template, a list of
    {"name", "template"} entries, or the {name: template} dict transformers makes of that list."""
    if isinstance(value, list):
        if not all(isinstance(e, dict) and isinstance(e.get("name"), str) and "template" in e for e in value):
            return None
        value = {e["name"]: e["template"] for e in value}  # as transformers does: a repeated name, the last
    if isinstance(value, dict):
        value = value.get("default")
    return _text(value)


def _text(value: object) -> str | None:
    """`value` if it is a template with something in it, else None."""
    return value if isinstance(value, str) and value.strip() else None

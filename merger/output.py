"""What an output holds besides its shards: the index, config (dtype updated), generation and
tokenizer files copied from the inputs (each read through its model's folder: merger.files), a model
card and the lock."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from merger import __version__
from merger.errors import ModelError, printable
from merger.lock import LockedInput, write_lock
from merger.methods.base import in_effect
from merger.plan import Plan
from merger.recipe import check_yaml
from merger.sources import (
    CARD_NAME,
    DTYPES,
    INDEX_NAME,
    MODEL_FILES,
    TOKENIZER_FILES,
    LocalModel,
    read_config,
    read_support,
)
from merger.vocab import set_vocab_size


def write_metadata(
    plan: Plan, directory: Path, title: str, inputs: list[LockedInput] | None, card: str | None = None
) -> None:
    """Everything but the shards. `inputs`: what the lock records (None: no lock, for a temporary model)."""
    write_index(plan, directory)
    copy_support_files(plan, directory)
    write_card(plan, directory, title, card)
    if inputs is not None:
        write_lock(plan, inputs, directory)


def write_index(plan: Plan, directory: Path) -> None:
    index = {
        "metadata": {"total_size": plan.bytes_written},
        "weight_map": {t.name: s.filename for s in plan.shards for t in s.tensors},
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def output_dtype_name(plan: Plan) -> str | None:
    """The float dtype holding most of the output's bytes, as config.json names it ('bfloat16')."""
    by_dtype: dict[str, int] = {}
    for t in plan.tensors:
        if t.merged:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    if not by_dtype:
        return None
    code = max(by_dtype, key=by_dtype.__getitem__)
    return DTYPES[code][0]


def copy_support_files(plan: Plan, directory: Path) -> None:
    """config.json with the output's dtype and the generation files from Plan.config_from, tokenizer files
    from the tokenizer source: the ones each holds, read through its folder and checked
    (sources.read_support)."""
    data = read_config(plan.config_from) if plan.config_from is not None else None
    if data is not None:
        dtype = output_dtype_name(plan)
        if dtype:
            keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype"]
            for k in keys:
                data[k] = dtype
        if plan.layers is not None and plan.layer_origins != list(range(plan.layers)):  # slices restacked them
            restack_config(data, plan.layers, plan.layer_origins)
        if plan.vocabulary is not None:
            set_vocab_size(data, plan.vocabulary.rows)
        (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    made, dropped = plan.tokenizer_made, plan.tokenizer_dropped
    for name, raw in made.items():
        (directory / name).write_bytes(raw)
    sources = [(plan.tokenizer_from, [n for n in TOKENIZER_FILES if n not in made and n not in dropped])]
    if plan.config_from is not None:
        sources.insert(0, (plan.config_from, MODEL_FILES))
    for model, names in sources:
        for name in names:
            if model.folder.stat(name) is not None:
                _copy(model, name, directory)


LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # what configs call the count


def restack_config(data: dict, layers: int, origins: list[int]) -> None:
    """A config of `layers` layers as one of len(origins): the counts rewritten, and lists of one value
    per layer (layer_types, ...) rebuilt from the layer each output layer was made from, in place; the
    text_config of a multimodal model the same (its layers are the ones found by name)."""
    for key, value in list(data.items()):
        if key in LAYER_COUNTS and value == layers:
            data[key] = len(origins)
        elif isinstance(value, list) and len(value) == layers and key.startswith("layer"):
            data[key] = [value[i] for i in origins]
        elif key == "text_config" and isinstance(value, dict):
            restack_config(value, layers, origins)


def _copy(model: LocalModel, name: str, directory: Path) -> None:
    """One support file, as its model holds it (JSON checked first: the bytes checked are the ones copied)."""
    (directory / name).write_bytes(read_support(model, name)[0])


def write_card(plan: Plan, directory: Path, title: str, extra: str | None = None) -> None:
    """README.md with the Hub's metadata for a merge: `base_model` (the inputs' Hub ids) with
    `base_model_relation: merge` where any input came from the Hub, and `license` if every input has the same.
    A local path is never a `base_model`: the Hub refuses a card naming one (it takes model ids only), so a
    merge of local models could not be pushed; the card's text names every input. `extra`: markdown added
    before the recipe (greedy soup's report)."""
    spec = plan.spec
    hub_ids = list(dict.fromkeys(m.remote.repo_id for m in plan.models if m.remote is not None))
    front = {"base_model": hub_ids, "base_model_relation": "merge"} if hub_ids else {}
    front |= {"tags": ["merge", "merger"], "library_name": "transformers"}
    licenses = [card_metadata(m).get("license") for m in plan.models]
    if isinstance(licenses[0], str) and all(lic == licenses[0] for lic in licenses):
        front["license"] = licenses[0]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {printable(title)}",  # the output folder's name: a newline in it would end the heading
        "",
        f"This model is a merge made with merger {__version__} using the **{spec.method.name}** method"
        + (f" ({spec.method.paper})." if spec.method.paper else "."),
        "",
    ]
    if spec.base:
        lines += [f"Base model: `{spec.base}`{_at_commit(plan.base)}", ""]
    lines += ["Models merged:", ""]
    for g, m in zip(spec.ingredients, plan.inputs):
        if not g.merged:
            continue
        shown = "" if spec.layered else ", ".join(f"{k} {v}" for k, v in in_effect(g.params).items())
        lines.append(f"- `{g.ref}`{_at_commit(m)}" + (f" ({shown})" if shown else ""))
    method_params = ", ".join(f"{k}: {v}" for k, v in in_effect(spec.params).items())
    if spec.layered:  # slices, gradients or filters: no one value per model
        lines += ["", "Layers and parameters per tensor: see the recipe below (`merger plan` shows each layer's)."]
    elif method_params:
        lines += ["", f"Method parameters: {method_params}."]
    lines += _seed_lines(spec.seed, spec.recipe.random_seed)
    if extra:
        lines += ["", extra.strip()]
    recipe = spec.source.text or yaml.safe_dump(spec.recipe.model_dump(exclude_defaults=True), sort_keys=False)
    lines += ["", "## Recipe", "", "```yaml", recipe.strip(), "```", ""]
    (directory / "README.md").write_text("\n".join(lines))


def _seed_lines(seed: int, recipe_seed: int) -> list[str]:
    """The card's word on the seed the merge used, where it is not the default 0 or not the recipe's own
    (--random-seed: the recipe shown below it names another)."""
    if seed != recipe_seed:
        where = f"set outside the recipe: `--random-seed`, or a lock file's; the recipe below says {recipe_seed}"
        return ["", f"Random seed: {seed} ({where})."]
    return ["", f"Random seed: {seed}."] if seed else []


def _at_commit(model: LocalModel | None) -> str:
    return f" at commit `{model.remote.commit[:12]}`" if model is not None and model.remote is not None else ""


def card_metadata(model: LocalModel) -> dict:
    """The YAML front matter of a model's README.md ({} if it has none, or none that parses)."""
    try:
        if model.folder.stat(CARD_NAME) is None:
            return {}
        text = model.folder.read_text(CARD_NAME)
    except ModelError:
        return {}
    if not text.startswith("---"):
        return {}
    front = text[3:].split("\n---", 1)[0]
    try:
        check_yaml(front)
        data = yaml.safe_load(front)
    except (ValueError, yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}

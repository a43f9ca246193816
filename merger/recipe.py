"""The recipe: YAML parsed into one pydantic model tree and validated in full, errors pointing at lines.

Key names follow mergekit where the concept is shared (merge_method, base_model, models[].model,
parameters.weight/density/lambda/normalize, dtype, out_dtype, tokenizer_source), so its configs for
linear, task_arithmetic and ties run unchanged. merger's own settings are new keys (output, device,
compute_dtype, and greedy_soup's evaluation).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from merger import chat, settings
from merger.errors import RecipeError, counted
from merger.files import JSON_DEPTH, read_user_file
from merger.methods import Method, Params, all_methods, get_method, greedy
from merger.methods.base import Misfit, effective_keys

_DTYPES = Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "float64", "fp64"]


def _torch_dtype_name(value: object) -> object:
    """mergekit reads `torch.bfloat16` as `bfloat16`; a name it does not know is reported as written."""
    if isinstance(value, str) and value.removeprefix("torch.") in typing.get_args(_DTYPES):
        return value.removeprefix("torch.")
    return value


DTypeName = Annotated[_DTYPES, BeforeValidator(_torch_dtype_name)]
DTYPE_CODE = {
    "float32": "F32", "fp32": "F32",
    "float16": "F16", "fp16": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}  # fmt: skip

# mergekit keys that merger does not implement yet: a clear message instead of "unknown key".
NOT_YET = {
    "modules": "modules beyond one `default` module of slices: or models: (no parameters: of its own) are not "
    "supported yet",
}
# A mergekit-moe config (another tool of mergekit's): its other keys mean nothing to a merge, so this alone
MOE_KEYS = ("experts", "gate_mode")
MOE = "a mergekit-moe config (experts, gate_mode): merger does not build mixtures of experts yet"
# Keys mergekit reads nowhere in a merge's config, taken and left aside here with a note
IGNORED = {"name": "mergekit-multi's name of a merge in a multi-document config; one merge here"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


Name = Annotated[str, AfterValidator(_no_nul)]  # a path or model reference: the OS takes no NUL in one
# A `parameters:` mapping; left empty (`parameters:` alone, YAML's null) it is none, as in mergekit
Parameters = Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v)]


class ModelEntry(Strict):
    model: Name = Field(min_length=1, description="a local model directory, or a Hub id: org/name[@revision]")
    parameters: Parameters = Field(default_factory=dict)


class SliceSource(Strict):
    model: Name = Field(min_length=1, description="a local model directory, or a Hub id: org/name[@revision]")
    layer_range: tuple[int, int] = Field(description="the model's layers [start, end) that this slice takes")
    parameters: Parameters = Field(default_factory=dict)


class SliceEntry(Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: Name | None = Field(None, min_length=1, description="this slice's base (default: the recipe's)")
    parameters: Parameters = Field(default_factory=dict)
    residual_weight: float | None = Field(
        None, description="accepted for mergekit configs; mergekit 0.1.5 reads it nowhere"
    )


class OutputSettings(Strict):
    path: Name | None = Field(None, min_length=1, description="output directory (the CLI's -o overrides it)")
    shard_size: ByteSize = Field(ByteSize(5_000_000_000), gt=0, description="bytes per output shard")


HUB_REPO_ID = r"[\w.-]+/[\w.-]+"


class HubSettings(Strict):
    """Where `merger apply` publishes the result once the merge has succeeded."""

    repo_id: str = Field(pattern=f"^{HUB_REPO_ID}$", description="the Hub repo: org/name")
    private: bool = Field(False, description="create the repo as private (when it does not exist yet)")
    revision: str | None = Field(None, min_length=1, description="branch to push to (created if missing); default main")
    commit_message: str | None = Field(None, min_length=1)


class EvaluationBase(Strict):
    """What every evaluator shares: how scores compare, and where they are cached."""

    accept: Literal[">=", ">"] = Field(
        ">=", description="keep an ingredient if the soup is not worse (>=, the paper's Recipe 1) or only if better (>)"
    )
    cache: bool | Name = Field(
        True, description="true: $XDG_CACHE_HOME/merger/greedy-soup.json; false: no cache; or a JSON file path"
    )


class PerplexityEvaluation(EvaluationBase):
    """Token-level perplexity of a causal LM (transformers) on held-out text."""

    evaluator: Literal["perplexity"]
    data: Name = Field(min_length=1, description="a text file (one document) or .jsonl (one document per line)")
    text_field: str = Field("text", min_length=1, description="the text's key in each JSONL record")
    max_length: int | None = Field(None, ge=2, description="tokens per window; default min(1024, the model's)")
    stride: int | None = Field(None, ge=1, description="tokens between window starts; default max_length // 2")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the model runs in")
    direction: Literal["lower"] = "lower"


class CommandEvaluation(EvaluationBase):
    """A shell command run on each candidate's directory; its score is a number it prints."""

    evaluator: Literal["command"]
    command: Name = Field(min_length=1, description="shell command; {model} is replaced by the candidate's directory")
    json_field: str | None = Field(None, description="read this (dotted) field of a JSON object on stdout")
    timeout: float | None = Field(None, gt=0, description="seconds before a run counts as failed")
    direction: Literal["lower", "higher"]


class PythonEvaluation(EvaluationBase):
    """A Python function called with each candidate, returning its score."""

    evaluator: Literal["python"]
    function: Name = Field(description="module:function, imported with the working directory on sys.path")
    direction: Literal["lower", "higher"]


Evaluation = Annotated[PerplexityEvaluation | CommandEvaluation | PythonEvaluation, Field(discriminator="evaluator")]


class ModelToken(Strict):
    """A token's embedding taken from a model's row of another token (`token`, or its id `token_id`)."""

    kind: Literal["model_token"]
    model: Name
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelToken:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give token or token_id, one of them")
        return self


class ZeroToken(Strict):
    """A token's embedding set to zero."""

    kind: Literal["zero"]


class ModelSource(Strict):
    """A token's embedding taken from a model's row of the same token (mergekit writes the model alone)."""

    kind: Literal["model"]
    model: Name


def _model_source(value: object) -> object:
    """A `tokens:` source written as a model's reference, as the mapping it means."""
    if isinstance(value, str):
        return {"kind": "model", "model": value}
    if not isinstance(value, dict | BaseModel):
        raise ValueError("give a model, {kind: model_token, model: ..., token: ...} or {kind: zero}")
    return value


TokenSource = Annotated[
    ModelSource | ModelToken | ZeroToken, Field(discriminator="kind"), BeforeValidator(_model_source)
]


class TokenSetting(Strict):
    """What a token's embedding is in the models that lack it (in every model: force): mergekit's names."""

    source: TokenSource
    force: bool = False


class TokenizerSection(Strict):
    """mergekit's tokenizer: section: the output's vocabulary (merger.vocab)."""

    @field_validator("tokens")
    @classmethod
    def _named(cls, tokens: dict | None) -> dict | None:
        if tokens is not None and "" in tokens:
            raise ValueError("a token's name cannot be empty")
        return tokens

    source: Name = "union"  # union, base, or a model
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1, le=1 << 16)


class Recipe(Strict):
    merge_method: str
    models: list[ModelEntry] | None = Field(None, min_length=1)
    slices: list[SliceEntry] | None = Field(None, min_length=1)  # the output's layers, slice after slice
    base_model: Name | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: DTypeName | None = None  # output dtype when out_dtype is not given
    out_dtype: DTypeName | None = None
    compute_dtype: Literal["float32", "float64"] = "float32"
    tokenizer_source: Name | None = None  # "union", "base", "model:REF" or REF; default: the base's files as they are
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None  # auto, a name (merger.chat.NAMED) or a Jinja template
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: OutputSettings = Field(default_factory=OutputSettings)
    hub: HubSettings | None = None
    evaluation: Evaluation | None = None  # greedy_soup's held-out evaluator
    # Methods that sample (DARE, DELLA...): every tensor's draws follow from it (methods.tensor_seed)
    random_seed: int = Field(0, ge=0, lt=1 << 63)


@dataclass
class RecipeSource:
    """Where a recipe came from, to point errors at lines: `lines` maps a key path to its line."""

    name: str = "<recipe>"
    text: str = ""
    lines: dict[tuple, int] = field(default_factory=dict)
    # What the recipe gives that merger takes and leaves aside, as mergekit does (`file:line: key: why`)
    notes: list[str] = field(default_factory=list)

    def where(self, *loc: str | int) -> str:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        line = None
        for n in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:n]))
            if line is not None:
                break
        prefix = f"{self.name}:{line}" if line is not None else self.name
        return f"{prefix}: {path}" if path else prefix


@dataclass(frozen=True)
class Ingredient:
    ref: str
    # The method's model_params: its own values over the top-level ones. A gradient or filters leave
    # their parameter's default here: the plan resolves them per tensor (merger.settings).
    params: Params
    index: int  # position in recipe.models, for error locations (-1: a model of slices)
    settings: dict[str, Any] = field(default_factory=dict)  # its own parameters as written
    merged: bool = True  # False: a slice's own base_model, read only as that slice's base


@dataclass(frozen=True)
class SliceInput:
    """One source of a slice: `ref`'s layers [start, end), and its own parameters as written."""

    ref: str
    start: int
    end: int
    settings: dict[str, Any]
    loc: tuple  # where the recipe gives it: ("slices", i, "sources", j)


@dataclass(frozen=True)
class Slice:
    """One slice of the output's layers: its sources merged layer by layer with the recipe's method
    (the base's entry apart, for methods that read the base), then renumbered after the slice before."""

    inputs: tuple[SliceInput, ...]
    base: SliceInput | None
    settings: dict[str, Any]  # the slice's parameters as written (per model and method-wide)
    loc: tuple  # ("slices", i)

    @property
    def count(self) -> int:
        return self.inputs[0].end - self.inputs[0].start


@dataclass(frozen=True)
class VocabularySpec:
    """The output's vocabulary as the recipe gives it (merger.vocab): tokenizer_source or tokenizer:."""

    source: str  # "union", "base", or a model reference as the recipe's models name it
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = None


@dataclass
class MergeSpec:
    """A validated recipe: the method resolved and every parameter checked, no file touched yet."""

    recipe: Recipe
    source: RecipeSource
    method: Method
    params: Params
    base: str | None
    ingredients: list[Ingredient]
    tokenizer_source: str | None  # a model reference, None for the base (or first model)
    vocabulary: VocabularySpec | None  # None: the tensors' rows as they are, the tokenizer files copied
    seed: int = 0  # of every tensor's own (methods.tensor_seed), for methods that draw random numbers
    slices: list[Slice] | None = None  # a recipe of slices; None for models:
    settings: dict[str, Any] = field(default_factory=dict)  # the top-level parameters as written

    def where(self, *loc: str | int) -> str:
        return self.source.where(*loc)

    @property
    def layered(self) -> bool:
        """Whether parameters differ between tensors (slices, gradients, filters): the plan resolves
        them per tensor, and what holds for the whole merge (Ingredient.params) is only their default."""
        given = [self.settings, *(g.settings for g in self.ingredients)]
        return self.slices is not None or any(isinstance(v, list) for d in given for v in d.values())

    def references(self) -> list[tuple[str, tuple]]:
        """Every model the recipe names, with where: (reference, location), the base first."""
        refs = [(self.base, ("base_model",))] if self.base else []
        if self.slices is None:
            return refs + [(g.ref, ("models", g.index, "model")) for g in self.ingredients]
        for s in self.slices:
            refs += [(e.ref, (*e.loc, "model")) for e in (*s.inputs, *([s.base] if s.base else []))]
        own = [(e.base_model, ("slices", i, "base_model")) for i, e in enumerate(self.recipe.slices or [])]
        return refs + [(ref, loc) for ref, loc in own if ref]  # opened even where the method reads no base


YAML_NODES = 100_000  # nodes a YAML document may hold once its aliases are expanded (a recipe has ~100)


class YAMLTooLarge(ValueError):
    """YAML that would expand past YAML_NODES nodes, nest deeper than JSON_DEPTH or refer to itself;
    `line` is where (1-based)."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def check_yaml(text: str) -> None:
    """Refuse YAML that is too large once built, from its event stream alone (before any object is built,
    so an alias bomb costs nothing): raises YAMLTooLarge, or yaml.YAMLError for YAML that does not parse."""
    sizes: dict[str, int] = {}  # anchor -> nodes of the anchored node, aliases inside it expanded
    open_nodes: list[tuple[str | None, int]] = []  # collections being read: (anchor, nodes before it)
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                holds = any(anchor == event.anchor for anchor, _ in open_nodes)
                what = "refers to the node that holds it" if holds else "names no anchor defined before it"
                raise YAMLTooLarge(f"the alias *{event.anchor} {what}", line)
            total += sizes[event.anchor]
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            open_nodes.append((event.anchor, total - 1))
            if len(open_nodes) > JSON_DEPTH:
                raise YAMLTooLarge(f"nests deeper than {JSON_DEPTH} levels", line)
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_nodes.pop()
            if anchor:
                sizes[anchor] = total - before
        if total > YAML_NODES:
            why = " (aliases of aliases?)" if sizes else ""
            raise YAMLTooLarge(f"expands to more than {YAML_NODES} values{why}", line)


RECIPE_LIMIT = 256 << 10  # bytes: a recipe is a page of YAML (mergekit's largest examples are ~10 KB)


def load_recipe(path: str | Path) -> MergeSpec:
    """Read and validate a recipe file. Raises RecipeError listing every problem found."""
    path = Path(path)
    try:
        raw = read_user_file(path, RECIPE_LIMIT)
    except OSError as e:
        raise RecipeError([f"{path}: cannot read recipe: {e.strerror}"]) from None
    except ValueError as e:
        raise RecipeError([f"{path}: cannot read recipe: it {e}"]) from None
    if len(raw) > RECIPE_LIMIT:
        raise RecipeError([f"{path}: more than {RECIPE_LIMIT} bytes; not a recipe"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError([f"{path}:{line}: not UTF-8 text"]) from None
    return parse_recipe(text, name=str(path))


def parse_recipe(text: str, name: str = "<recipe>") -> MergeSpec:
    source = RecipeSource(name, text)
    try:
        check_yaml(text)  # aliases and nesting bounded before anything is built
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except YAMLTooLarge as e:
        raise RecipeError([f"{name}:{e.line}: {e}; not a recipe merger reads"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        bad_line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        if re.match(r"\s*accept:\s*>", bad_line):
            problem += ' (a bare > starts a folded block in YAML: quote the rule, accept: ">=")'
        opened = getattr(e, "context_mark", None)  # where the unfinished part began (an unclosed { or [)
        context = getattr(e, "context", None)
        unclosed = context in (
            "while parsing a flow mapping",
            "while parsing a flow sequence",
            "while scanning a quoted scalar",
        )
        if unclosed and opened is not None and mark is not None and opened.line != mark.line:
            problem += f" ({context.removeprefix('while ')} that line {opened.line + 1} opened)"
        raise RecipeError([f"{name}{line}: invalid YAML: {problem}"]) from None
    problems: list[str] = []
    if root is not None:
        _map_lines(root, (), source.lines, problems, source)
    if not isinstance(data, dict):
        raise RecipeError([f"{name}: a recipe is a YAML mapping with merge_method and models"])
    if problems:
        raise RecipeError(problems)
    if moe := [k for k in MOE_KEYS if k in data]:
        raise RecipeError([f"{source.where(moe[0])}: {MOE}"])
    _one_tokenizer_key(data, source)
    data = _default_module(data, source)
    not_yet = [f"{source.where(k)}: {msg}" for k, msg in NOT_YET.items() if k in data]
    if "modules" in data:  # its models and slices are in there: nothing else to check without them
        raise RecipeError(not_yet)
    source.notes += [f"{source.where(k)}: ignored: {why}" for k, why in IGNORED.items() if k in data]
    data = {k: v for k, v in data.items() if k not in NOT_YET and k not in IGNORED}
    try:
        spec = validate(data, source)
    except RecipeError as e:  # every problem in one run, the not-yet keys' among them
        raise RecipeError(_by_line(not_yet + e.problems)) from None
    if not_yet:
        raise RecipeError(not_yet)
    source.notes[:] = _by_line(source.notes)
    return spec


def _one_tokenizer_key(data: dict, source: RecipeSource) -> None:
    """mergekit reads a `tokenizer:` section over tokenizer_source; giving both is refused here."""
    if data.get("tokenizer") is not None and "tokenizer_source" in data:
        raise RecipeError([f"{source.where('tokenizer')}: give tokenizer_source or a tokenizer: section, not both"])


def _default_module(data: dict, source: RecipeSource) -> dict:
    """`modules: {default: {slices: ...}}` (or models:), mergekit's spelling of a recipe of one module, as the
    top-level slices: (models:) it means; any other modules: is left for NOT_YET."""
    modules = data.get("modules")
    if not isinstance(modules, dict) or set(modules) != {"default"} or "slices" in data or "models" in data:
        return data
    module = modules["default"]
    if not isinstance(module, dict) or len(module) != 1 or set(module) - {"slices", "models"}:
        return data
    (key, value), inner = next(iter(module.items())), ("modules", "default")
    for loc, line in list(source.lines.items()):  # errors inside point at the lines they are on
        if loc[:3] == (*inner, key):
            source.lines[loc[2:]] = line
    source.notes.append(f"{source.where(*inner)}: taken as the top-level {key}: (one module)")
    return {k: v for k, v in data.items() if k != "modules"} | {key: value}


def validate(data: dict, source: RecipeSource | None = None) -> MergeSpec:
    """Validate recipe data (as loaded from YAML) into a MergeSpec, or raise RecipeError."""
    source = source or RecipeSource()
    problems: list[str] = []
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err, source, Recipe) for err in e.errors()]
        # Go on without the broken keys, to report the method's parameter problems in the same run.
        broken = {err["loc"][0] for err in e.errors() if err["loc"]} - {"merge_method", "models", "slices"}
        try:
            recipe = Recipe.model_validate({k: v for k, v in data.items() if k not in broken})
        except ValidationError:
            raise RecipeError(problems) from None

    method = get_method(recipe.merge_method)
    if method is None:
        names = sorted(all_methods())
        problems.append(
            f"{source.where('merge_method')}: unknown merge method '{recipe.merge_method}'"
            f"{_suggest(recipe.merge_method, names)}; available: {', '.join(names)}"
        )
        raise RecipeError(_by_line(problems))

    _leave_other_methods_parameters(recipe, method, source)
    defaults, method_values = _split(recipe.parameters, method, ("parameters",), source, problems, whole=True)
    params = _validate_params(method.params, method_values, ("parameters",), source, problems)
    _validate_params(method.model_params, defaults, ("parameters",), source, problems)

    if params is not None and method.model_wide is not None and method.model_wide(params) and recipe.slices:
        problems.append(
            f"{source.where('parameters')}: {method.name} with trim_scope: model ranks each model's whole task "
            "vector, which slices spread over several slices; use models: (or trim_scope: tensor)"
        )
    base = recipe.base_model
    problems += _missing_base(recipe, method, source)
    slices = None
    if recipe.models is not None and recipe.slices is not None:
        problems.append(f"{source.where('slices')}: a recipe lists models: or slices:, not both")
    elif recipe.models is None and recipe.slices is None:
        problems.append(f"{source.where('models')}: required key is missing")
    if recipe.slices is not None:
        slices = _slices(recipe, method, source, problems)
        ingredients = _slice_models(slices, method, defaults, base)
    else:
        ingredients = _ingredients(recipe, method, defaults, source, problems)
        if not problems and not ingredients:
            problems.append(f"{source.where('models')}: {method.name} needs at least one model besides the base model")
    if not problems and slices is None:
        problems += _beyond_range(recipe, ingredients, params, source)
    if not problems:
        problems += _listed_beyond_range(recipe, source)
    if not problems and method.check is not None and not _varying(recipe):  # else assemble checks each tensor's
        for models, loc in [(ingredients, ("models",))] if slices is None else _slice_checks(slices, method):
            found = method.check([g.params for g in models], params)
            if found:
                problems.append(_check_problem(found, models, loc, recipe.parameters, source))

    tokenizer_source, vocabulary = _vocabulary(recipe, method, source, problems)
    _check_chat_template(recipe, source, problems)
    _check_evaluation(recipe, "evaluation" in data, method, source, problems)
    if problems:
        raise RecipeError(_by_line(problems))
    return MergeSpec(
        recipe,
        source,
        method,
        params,
        base,
        ingredients,
        tokenizer_source,
        vocabulary,
        recipe.random_seed,
        slices,
        dict(recipe.parameters),
    )


def _leave_other_methods_parameters(recipe: Recipe, method: Method, source: RecipeSource) -> None:
    """Take out of every `parameters:` mapping the parameters that other methods take and this one does
    not (a `normalize` left in an sce config), each with a note: mergekit reads only its method's, so such a
    config runs unchanged. A key no method takes is still refused (a typo: `densty`)."""
    if not method.in_mergekit:
        return
    own, refused = set(_parameter_names(method)), dict(method.not_taken)
    known = {k for m in all_methods().values() for k in _parameter_names(m)}
    mappings = [(("parameters",), recipe.parameters)]
    mappings += [(("models", i, "parameters"), e.parameters) for i, e in enumerate(recipe.models or [])]
    for i, entry in enumerate(recipe.slices or []):
        mappings.append((("slices", i, "parameters"), entry.parameters))
        mappings += [(("slices", i, "sources", j, "parameters"), s.parameters) for j, s in enumerate(entry.sources)]
    for loc, values in mappings:
        for key in [k for k in values if k in known and k not in own and k not in refused]:
            del values[key]
            source.notes.append(
                f"{source.where(*loc, key)}: ignored: {method.name} takes no {key}, and mergekit ignores it too"
            )


def _split(
    values: dict[str, Any], method: Method, loc: tuple, source: RecipeSource, problems: list[str], whole: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `parameters:` mapping as (per-model keys, method-wide keys), unknown keys reported; method-wide
    ones only where `whole` (the top level and a slice's), else reported as such."""
    model_keys, method_keys = _keys(method.model_params), _keys(method.params)
    own: dict[str, Any] = {}
    wide: dict[str, Any] = {}
    for key, value in values.items():
        if key in model_keys:
            own[key] = value
        elif key in method_keys and whole:
            wide[key] = value
        elif key in method_keys:
            where = "the slice's or the top-level parameters" if loc[0] == "slices" else "the top-level parameters"
            problems.append(f"{source.where(*loc, key)}: '{key}' applies to the whole merge; put it under {where}")
        else:
            why = dict(method.not_taken).get(key) or _not_a_parameter(key, method)
            problems.append(f"{source.where(*loc, key)}: {why}")
    return own, wide


def _ingredients(
    recipe: Recipe, method: Method, defaults: dict[str, Any], source: RecipeSource, problems: list[str]
) -> list[Ingredient]:
    """The models: a recipe merges, each with its parameters over the top-level ones."""
    ingredients: list[Ingredient] = []
    for i, entry in enumerate(recipe.models or []):
        if method.reads_base and recipe.base_model is not None and _same_ref(entry.model, recipe.base_model):
            continue  # the base's own task vector is zero; mergekit configs often list it
        loc = ("models", i, "parameters")
        own, _ = _split(entry.parameters, method, loc, source, problems, whole=False)
        merged = {k: v for k, v in defaults.items() if k not in own} | own
        mp = _validate_params(method.model_params, merged, loc, source, problems, only=set(own))
        first = next((k for k, g in enumerate(ingredients) if _same_ref(g.ref, entry.model)), None)
        if mp is not None and first is None:
            ingredients.append(Ingredient(entry.model, mp, i, own))
        elif mp is not None and (
            again := _listed_again(ingredients[first], i, own, defaults, method, source, problems)
        ):
            ingredients[first] = again
    return ingredients


def _listed_again(
    earlier: Ingredient, i: int, own: dict, defaults: dict, method: Method, source: RecipeSource, problems: list[str]
) -> Ingredient | None:
    """models[i], a model listed before (`earlier`), its own parameters `own` already checked: one input, each
    parameter from the first entry that gives it, as earlier mergekit versions resolved it (0.1.5 refuses the
    config). Refused for merger's own methods, and where both entries give a parameter and one of them gives
    it a gradient or filters (mergekit then falls through to the later entry tensor by tensor)."""
    where, listed = source.where("models", i, "model"), f"'{earlier.ref}' is listed again (models[{earlier.index}])"
    both = [
        k
        for k in own.keys() & earlier.settings.keys()
        if isinstance(own[k], list) or isinstance(earlier.settings[k], list)
    ]
    if not method.in_mergekit or both:
        why = (
            f"both entries give {sorted(both)[0]}, with a gradient or filters"
            if both
            else f"{method.name} takes a model once"
        )
        problems.append(f"{where}: {listed}: {why}; list it once")
        return None
    source.notes.append(
        f"{where}: {listed}: merged once, each parameter from the first entry that gives it, as earlier mergekit "
        "versions merged it (0.1.5 refuses such a config)"
    )
    combined = own | earlier.settings
    merged = {k: v for k, v in defaults.items() if k not in combined} | combined
    mp = _validate_params(method.model_params, merged, ("models", i, "parameters"), source, problems, only=set())
    return Ingredient(earlier.ref, mp, earlier.index, combined) if mp is not None else None


def _missing_base(recipe: Recipe, method: Method, source: RecipeSource) -> list[str]:
    """A method that needs a base without one: none in the recipe, and (slices) none of a slice's own."""
    bare = [("slices", i) for i, e in enumerate(recipe.slices or []) if not e.base_model]
    if not method.needs_base or recipe.base_model is not None or (recipe.slices is not None and not bare):
        return []
    where, own = (bare[0], " (the recipe's, or the slice's own)") if bare else (("base_model",), "")
    return [f"{source.where(*where)}: {method.name} needs a base_model{own}"]


def _slices(recipe: Recipe, method: Method, source: RecipeSource, problems: list[str]) -> list[Slice]:
    """The slices of a recipe, each source's layer range and parameters checked (the layers each model
    has are checked by the plan, which reads the headers)."""
    out = []
    for i, entry in enumerate(recipe.slices or []):
        loc = ("slices", i)
        base = (entry.base_model or recipe.base_model) if method.reads_base else None  # mergekit: the slice's first
        own, wide = _split(entry.parameters, method, (*loc, "parameters"), source, problems, whole=True)
        _validate_params(method.params, wide, (*loc, "parameters"), source, problems)
        _validate_params(method.model_params, own, (*loc, "parameters"), source, problems)
        inputs, base_input = [], None
        for j, src in enumerate(entry.sources):
            given = _slice_input(src, (*loc, "sources", j), method, source, problems)
            if base is not None and _same_ref(src.model, base):
                base_input = given
            else:
                inputs.append(given)
        counts = sorted({s.layer_range[1] - s.layer_range[0] for s in entry.sources})
        if len(counts) > 1:
            problems.append(
                f"{source.where(*loc, 'sources')}: the sources of a slice are merged layer by layer, so each "
                f"covers as many layers; these cover {', '.join(map(str, counts))}"
            )
        if base is not None and base_input is None:
            problems.append(
                f"{source.where(*loc, 'sources')}: {method.name} needs the base model '{base}' among each "
                "slice's sources (with the layers whose task vectors are merged)"
            )
        if not inputs:
            problems.append(f"{source.where(*loc, 'sources')}: {method.name} needs a model besides the base model")
        out.append(Slice(tuple(inputs), base_input, dict(entry.parameters), loc))
    return out


def _slice_input(src: SliceSource, loc: tuple, method: Method, source: RecipeSource, problems: list[str]) -> SliceInput:
    start, end = src.layer_range
    if not 0 <= start < end:
        problems.append(
            f"{source.where(*loc, 'layer_range')}: [{start}, {end}] holds no layers; "
            "give [start, end] with 0 <= start < end (end not included)"
        )
    own, _ = _split(src.parameters, method, (*loc, "parameters"), source, problems, whole=False)
    _validate_params(method.model_params, own, (*loc, "parameters"), source, problems)
    return SliceInput(src.model, start, end, own, loc)


def _slice_models(slices: list[Slice], method: Method, defaults: dict[str, Any], base: str | None) -> list[Ingredient]:
    """The distinct models merged by slices, in order, with the top-level parameters' scalar values; then
    the bases slices have of their own (read, hashed and locked as the merged ones are)."""
    params = _scalar(method.model_params, defaults)
    merged: list[Ingredient] = []
    for ref in (e.ref for s in slices for e in s.inputs):  # one model however it is spelled (`m`, `./m`)
        if not any(_same_ref(ref, g.ref) for g in merged):
            merged.append(Ingredient(ref, params, -1))
    bases: list[Ingredient] = []
    for ref in (s.base.ref for s in slices if s.base):
        if not any(_same_ref(ref, other) for other in [*([base] if base else []), *(g.ref for g in merged + bases)]):
            bases.append(Ingredient(ref, params, -1, merged=False))
    return merged + bases


def _scalar(model: type[Params], values: dict[str, Any]) -> Params:
    """The parameter object of `values`' single values (gradients and filters left at their defaults)."""
    keys = _keys(model)
    try:
        return model.model_validate({k: v for k, v in values.items() if k in keys and not isinstance(v, list)})
    except ValidationError:  # reported where the values are given
        return model.model_validate({})


def _varying(recipe: Recipe) -> bool:
    """Whether the recipe gives any parameter as a gradient or filters (a list): its values then differ between
    tensors, and Method.check runs on each tensor's as the plan is made (assemble), not here on the one value
    a check could see (the parameter's default, where the recipe gives none but the gradient)."""
    given = [recipe.parameters, *(m.parameters for m in recipe.models or [])]
    for s in recipe.slices or []:
        given += [s.parameters, *(src.parameters for src in s.sources)]
    return any(isinstance(v, list) for d in given for v in d.values())


def _check_problem(
    found: str | Misfit, models: list[Ingredient], loc: tuple, given: dict[str, Any], source: RecipeSource
) -> str:
    """Method.check's problem at its recipe line: a Misfit where misfit_at finds its parameters (the model's entry,
    then the recipe's parameters, `given`), else at the model's entry; a slice's models, and any other problem, at
    `loc`."""
    if isinstance(found, str) or models[found.model].index < 0:
        return f"{source.where(*loc)}: {found}"
    model = models[found.model]
    entry = ("models", model.index)
    return f"{source.where(*misfit_at(found, ((model.settings, entry), (given, ())), entry))}: {found.message}"


def misfit_at(found: Misfit, levels: Sequence[tuple[dict[str, Any], tuple]], fallback: tuple) -> tuple:
    """Where the recipe gives the parameters a Misfit names, for its model. `levels`: where that model's parameters
    come from, the most specific first (its own entry's as written and where, a slice's, the recipe's). Of those
    the recipe gives: the first given as a gradient or filters (what changes between tensors), then the one of
    the most specific level, then the first the check names; `fallback` where it gives none (defaults)."""
    places = []
    for order, key in enumerate(found.keys):
        level = next((i for i, (given, _) in enumerate(levels) if key in given), None)
        if level is not None:
            given, where = levels[level]
            places.append((not isinstance(given[key], list), level, order, (*where, "parameters", key)))
    return min(places)[-1] if places else fallback


def _slice_checks(slices: list[Slice], method: Method) -> Iterator[tuple[list[Ingredient], tuple]]:
    """For Method.check at validation, each slice's inputs with their single-valued parameters (the
    plan checks every tensor's resolved ones again), and where the slice's sources are."""
    for s in slices:
        models = [Ingredient(e.ref, _scalar(method.model_params, s.settings | e.settings), -1) for e in s.inputs]
        yield models, (*s.loc, "sources")


def _vocabulary(
    recipe: Recipe, method: Method, source: RecipeSource, problems: list[str]
) -> tuple[str | None, VocabularySpec | None]:
    """(the model whose tokenizer files the output starts from, as a reference, None for the base or the
    first model; the output's vocabulary, None where the recipe gives no tokenizer source, or for
    greedy_soup, whose tokenizer source names the files its soups get, their tensors' rows as stored)."""
    section = recipe.tokenizer
    given = section.source if section is not None else recipe.tokenizer_source
    loc = ("tokenizer", "source") if section is not None else ("tokenizer_source",)
    if given is None:
        return None, None
    refs = [m.model for m in recipe.models or []] + ([recipe.base_model] if recipe.base_model else [])
    refs += [src.model for s in recipe.slices or [] for src in s.sources]

    def model(ref: str, *at: str | int) -> str:
        ref = ref.removeprefix("model:")
        same = next((r for r in refs if _same_ref(ref, r)), None)
        if same is None:
            problems.append(f"{source.where(*at)}: '{ref}' is not one of the recipe's models")
        return same or ref

    if given == "base" and recipe.base_model is None:
        problems.append(f"{source.where(*loc)}: 'base' needs a base_model")
    files = None if given in ("union", "base") else model(given, *loc)
    tokens = dict(section.tokens or {}) if section is not None else None
    for token, s in (tokens or {}).items():
        if isinstance(s.source, ModelSource | ModelToken):  # the model as the recipe's models name it
            at = ("tokenizer", "tokens", token, "source", *(("model",) if isinstance(s.source, ModelToken) else ()))
            named = s.source.model_copy(update={"model": model(s.source.model, *at)})
            tokens[token] = s.model_copy(update={"source": named})
    pad = section.pad_to_multiple_of if section is not None else None
    if method is greedy.METHOD:
        if given == "union" or tokens or pad:
            problems.append(
                f"{source.where(*loc[:1])}: greedy_soup takes a tokenizer source's files only (base or a model), "
                "not a union, tokens: or pad_to_multiple_of: its soups of different models would each need a "
                "vocabulary of their own"
            )
        return files, None
    return files, VocabularySpec(files or given, tokens, pad)


def _check_chat_template(recipe: Recipe, source: RecipeSource, problems: list[str]) -> None:
    if recipe.chat_template is not None and recipe.chat_template != "auto":  # auto: the models', read by the plan
        try:
            chat.resolve(recipe.chat_template, [])
        except ValueError as e:
            problems.append(f"{source.where('chat_template')}: {e}")


def _check_evaluation(recipe: Recipe, given: bool, method: Method, source: RecipeSource, problems: list[str]) -> None:
    """greedy_soup needs two models and an evaluation section whose files and names exist; no other
    method takes one. `given`: the recipe has the key (it may have been dropped for its own errors)."""
    where = source.where
    if method is not greedy.METHOD:
        if given:
            problems.append(f"{where('evaluation')}: only greedy_soup uses an evaluation section; remove it")
        return
    if recipe.slices is not None:
        problems.append(f"{where('slices')}: greedy_soup chooses among whole models: list them under models:")
    elif len(recipe.models or []) < 2:
        problems.append(f"{where('models')}: greedy_soup chooses among models: list two or more")
    if not given:
        problems.append(
            f"{where('evaluation')}: greedy_soup needs an evaluation section (evaluator: perplexity, command or python)"
        )
    ev = recipe.evaluation
    if isinstance(ev, PerplexityEvaluation):
        data = Path(ev.data).expanduser()
        if not data.is_file():
            what = "is not a file" if data.exists() else "no such file"
            problems.append(f"{where('evaluation', 'data')}: {what} '{ev.data}'")
        if ev.stride is not None and ev.max_length is not None and ev.stride >= ev.max_length:
            problems.append(
                f"{where('evaluation', 'stride')}: must be less than max_length ({ev.max_length}), "
                "so that every token is scored with some context"
            )
    elif isinstance(ev, CommandEvaluation) and "{model}" not in ev.command:
        problems.append(f"{where('evaluation', 'command')}: must contain {{model}}, the candidate's directory")
    elif isinstance(ev, PythonEvaluation):
        module, _, function = ev.function.partition(":")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", module) or not function.isidentifier():
            problems.append(f"{where('evaluation', 'function')}: '{ev.function}' is not module:function")
        elif not _module_exists(module.split(".")[0]):
            problems.append(
                f"{where('evaluation', 'function')}: no module named '{module.split('.')[0]}' "
                "(looked in the working directory and on sys.path)"
            )


def _module_exists(name: str) -> bool:
    """Whether a top-level module can be imported, without running it; the working directory counts,
    as it does for `python -m`."""
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.util.find_spec(name) is not None
    finally:
        sys.path.remove(os.getcwd())


def _numbers(p: BaseModel) -> dict[str, float]:
    """A parameter object's numbers, by the key the recipe spells."""
    out = {}
    for name, f in type(p).model_fields.items():
        value = getattr(p, name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f.alias or name] = float(value)
    return out


def _beyond_range(recipe: Recipe, ingredients: list[Ingredient], params: Params, source: RecipeSource) -> list[str]:
    """Parameters no merge can keep finite in the compute dtype: a number past its range, a model's weight
    times the method's lambda past it, or normalising by weights that sum to so little that dividing by
    the sum is. Checked before anything is read: float32 would turn them into inf, and the output into
    inf and NaN."""
    dtype = recipe.compute_dtype
    largest = float(np.finfo(dtype).max)
    problems = []

    def beyond(value: float, *loc: str | int) -> bool:
        if abs(value) > largest:
            problems.append(f"{source.where(*loc)}: {value:g} is beyond {dtype}'s range ({largest:.3g})")
        return abs(value) > largest

    method = _numbers(params)
    if any([beyond(v, "parameters", k) for k, v in method.items()]):
        return problems
    scale = abs(method.get("lambda", 1.0))
    weights = []
    for g in ingredients:
        numbers = _numbers(g.params)
        if any([beyond(v, "models", g.index, "parameters", k) for k, v in numbers.items()]) or "weight" not in numbers:
            continue
        weights.append(numbers["weight"])
        if abs(numbers["weight"]) * scale > largest:
            problems.append(
                f"{source.where('models', g.index, 'parameters', 'weight')}: {numbers['weight']:g} times lambda "
                f"{method['lambda']:g} is beyond {dtype}'s range ({largest:.3g})"
            )
    total = math.fsum(weights)
    if not problems and abs(total) * scale > largest:
        problems.append(
            f"{source.where('models')}: the weights sum to {total:g}, which times lambda {scale:g} is beyond "
            f"{dtype}'s range ({largest:.3g}): lower them"
        )
    elif not problems and getattr(params, "normalize", False) and weights and total and scale / abs(total) > largest:
        problems.append(
            f"{source.where('parameters', 'normalize')}: the weights sum to {total:g}; normalising divides by it, "
            f"which is beyond {dtype}'s range: set normalize: false or change a weight"
        )
    return problems


def _listed_beyond_range(recipe: Recipe, source: RecipeSource) -> list[str]:
    """The values of gradients and filters past the compute dtype's range, wherever parameters are given;
    with slices single values too (in a models: recipe _beyond_range checks those, with the weights
    they multiply)."""
    largest = float(np.finfo(recipe.compute_dtype).max)
    given: list[tuple[dict, tuple]] = [(recipe.parameters, ("parameters",))]
    given += [(m.parameters, ("models", i, "parameters")) for i, m in enumerate(recipe.models or [])]
    for i, s in enumerate(recipe.slices or []):
        given += [(s.parameters, ("slices", i, "parameters"))]
        given += [(src.parameters, ("slices", i, "sources", j, "parameters")) for j, src in enumerate(s.sources)]
    problems = []
    for values, loc in given:
        for key, value in values.items():
            for leaf, where in settings.leaves(value) if isinstance(value, list) or recipe.slices else []:
                if isinstance(leaf, int | float) and not isinstance(leaf, bool) and abs(leaf) > largest:
                    problems.append(
                        f"{source.where(*loc, key, *where)}: {leaf:g} is beyond {recipe.compute_dtype}'s range "
                        f"({largest:.3g})"
                    )
    return problems


def _by_line(problems: list[str]) -> list[str]:
    """Order problems as they appear in the file (those without a line first)."""

    def line(p: str) -> int:
        m = re.match(r"[^:]*:(\d+):", p)
        return int(m.group(1)) if m else 0

    return sorted(dict.fromkeys(problems), key=line)


def _same_ref(a: str, b: str) -> bool:
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _parameter_names(method: Method) -> list[str]:
    """Every parameter key a method takes: per model, then method-wide (aliases, as recipes spell them)."""
    return _keys(method.model_params) + _keys(method.params)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _not_a_parameter(key: str, method: Method) -> str:
    known = _parameter_names(method)
    hint = _suggest(key, known)
    if hint:
        return f"unknown key{hint}"
    others = {
        m.name for m in all_methods().values() if key in effective_keys(m.model_params) + effective_keys(m.params)
    }
    belongs = f" ('{key}' belongs to {', '.join(sorted(others))})" if others else ""
    takes = f"takes {', '.join(known)}" if known else "takes no parameters"
    return f"unknown key{belongs}; {method.name} {takes}"


def _validate_params(
    model: type[Params],
    values: dict[str, Any],
    loc: tuple,
    source: RecipeSource,
    problems: list[str],
    only: set[str] | None = None,
) -> Params | None:
    """Validate `values` into `model`; report errors at `loc` (only those for keys in `only`, if given,
    since errors in top-level defaults are reported once, at the top level)."""
    scalars = {}
    for key, value in values.items():
        if not isinstance(value, list | dict):
            scalars[key] = value
        elif only is None or key in only:  # a gradient or filters: each value they give is checked
            shape = settings.problem(value)
            if shape:
                problems.append(f"{source.where(*loc, key)}: {shape}")
            for leaf, where in [] if shape else settings.leaves(value):
                _check_leaf(model, key, leaf, where, loc, source, problems)
    values = scalars
    try:
        return model.model_validate(values)
    except ValidationError as e:
        for err in e.errors():
            key = err["loc"][0] if err["loc"] else None
            if only is not None and key not in only:
                continue
            problems.append(_describe(err, source, model, prefix=loc))
        return None


def _check_leaf(
    model: type[Params], key: str, leaf: Any, where: tuple, loc: tuple, source: RecipeSource, problems: list[str]
) -> None:
    """One value of a gradient or of filters (at `where` under the key), validated as that parameter."""
    try:
        model.model_validate({key: leaf})
    except ValidationError as e:
        for err in e.errors():
            if tuple(err["loc"][:1]) == (key,):
                problems.append(_describe({**err, "loc": (key, *where)}, source, model, prefix=loc))


def _describe(err: dict, source: RecipeSource, model: type[BaseModel], prefix: tuple = ()) -> str:
    """One pydantic error as `file:line: key.path: message`."""
    loc = prefix + _walk(model, tuple(err["loc"]))[0]
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _walk(model, tuple(err["loc"])[:-1])[1]
        msg = f"unknown key{_suggest(str(loc[-1]), _keys(parent) if parent else [])}{_placement(loc)}"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):  # the discriminator key: evaluation.evaluator
        ctx = err["ctx"]
        key = ctx["discriminator"].strip("'")
        tags = _union_tags(model, tuple(err["loc"]), key)
        loc += (key,)
        if kind == "union_tag_not_found":
            msg = f"required key is missing (one of {', '.join(tags)})"
        else:
            msg = f"unknown {loc[-1]} '{ctx['tag']}'{_suggest(ctx['tag'], tags)}; available: {', '.join(tags)}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "value_error":  # a validator's own message, without pydantic's "Value error, "
        msg = str(err["ctx"]["error"])
        if "input" in err and not isinstance(err["input"], dict | list | BaseModel):
            msg += f", got {err['input']!r}"
    elif kind in ("finite_number",):
        msg = "must be a finite number"
    elif kind == "too_short" and isinstance(err.get("input"), list):  # an empty list: `models: []`, `sources: []`
        msg = "an empty list: at least {} {} needed".format(*counted(err["ctx"]["min_length"]))
    elif kind == "model_type":  # a plain value where keys go; pydantic's text names the class
        target = _walk(model, tuple(err["loc"]))[1]
        given = err.get("input")
        msg = f"must be a mapping of keys ({', '.join(_keys(target))})" if target else "must be a mapping of keys"
        if not isinstance(given, dict | list):
            msg += f", got {given!r}"
        if isinstance(given, str) and target is not None and "model" in _keys(target):
            msg += f"; write it as `model: {given}`"
    else:
        msg = err["msg"]
        if "input" in err and not isinstance(err["input"], dict | list):
            msg += f", got {err['input']!r}"
    return f"{source.where(*loc)}: {msg}"


def _placement(loc: tuple) -> str:
    """Where an unknown key belongs, for keys that mergekit configs put where mergekit reads nothing."""
    key = loc[-1]
    if key == "revision" and ("models" in loc or "sources" in loc):
        return "; give a Hub model's revision in its reference: model: org/name@revision"
    methods = [m.name for m in all_methods().values() if key in _parameter_names(m)]
    if len(loc) == 1 and methods:  # a parameter at the top level, where mergekit ignores it
        return f"; it is a parameter ({', '.join(sorted(methods))}): put it under parameters: (mergekit reads nothing here)"
    return ""


def _walk(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """Follow a pydantic error location through the model tree. Returns the location as the recipe
    spells it (pydantic inserts the tag of a discriminated union: evaluation.perplexity.data) and the
    model found at its end (None past a plain value)."""
    shown: list = []
    current: type[BaseModel] | None = model
    parts = iter(loc)
    for part in parts:
        shown.append(part)
        if isinstance(part, int) or current is None:
            continue
        f = current.model_fields.get(part)
        members = _models_in(f.annotation) if f else []
        key = (f.discriminator if isinstance(f.discriminator, str) else _discriminator(f.annotation)) if f else None
        if f is not None and _is_mapping(f.annotation):  # the next part is a key of it (tokens: its token)
            shown += [p for p in [next(parts, None)] if p is not None]
            current = members[0] if members else None
        elif key is not None:  # the next part is the tag, which names the member
            tag = next(parts, None)
            current = next((m for m in members if tag in typing.get_args(m.model_fields[key].annotation)), None)
        else:
            current = members[0] if members else None
    return tuple(shown), current


def _union_tags(model: type[BaseModel], loc: tuple, key: str) -> list[str]:
    """The tags a discriminated union at `loc` accepts under `key`, in declaration order."""
    parent = _walk(model, loc[:-1])[1]
    f = parent.model_fields.get(loc[-1]) if parent else None
    members = _models_in(f.annotation) if f else []
    return [tag for m in members for tag in typing.get_args(m.model_fields[key].annotation)]


def _is_mapping(annotation: Any) -> bool:
    """Whether a field holds a mapping of the user's keys (`dict[str, X] | None`)."""
    return any(typing.get_origin(arg) is dict for arg in (annotation, *typing.get_args(annotation)))


def _discriminator(annotation: Any) -> str | None:
    """The key that picks the member of a discriminated union (`Evaluation | None`: 'evaluator')."""
    for arg in (annotation, *typing.get_args(annotation)):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(getattr(meta, "discriminator", None), str):
                return meta.discriminator
    return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _map_lines(node: yaml.Node, loc: tuple, lines: dict[tuple, int], problems: list[str], source: RecipeSource) -> None:
    if loc:  # the root has no line worth naming: a missing top-level key points at the file
        lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(f"{source.name}:{key_node.start_mark.line + 1}: duplicate key '{key}'")
            seen.add(key)
            lines.setdefault(loc + (key,), key_node.start_mark.line + 1)
            _map_lines(value_node, loc + (key,), lines, problems, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _map_lines(item, loc + (i,), lines, problems, source)

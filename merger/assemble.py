"""Which input tensors, and which parameter values, make each output tensor: the recipe's shape laid
over the inputs' headers.

A recipe of slices stacks layers: slice after slice, each output layer merges one layer of every source
of its slice (their layers in step), renumbered from 0. A `models:` recipe is the one slice of every
model's layers. Tensors outside the layers come, as in mergekit, from the first slice's sources when
they come before the layers (the embeddings), else from the last slice's (final norm, head).
Parameters are resolved per tensor (merger.settings): a source's own over its slice's over the top
level's, a gradient read at the layer's place in its slice (0 to 1), and at 0 outside the layers, before
and after them alike, as mergekit reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from merger import settings
from merger.errors import ModelError, RecipeError
from merger.layers import LayerStack, find_stacks, natural_key, numbered, stack_of
from merger.methods import Params, TensorContext, tensor_seed
from merger.methods.base import Misfit
from merger.recipe import DTYPE_CODE, MergeSpec, Slice, SliceInput, misfit_at
from merger.sources import DTYPES, LocalModel, TensorInfo, read_config
from merger.vocab import Vocabulary, fits

Key = tuple[Path, str]  # an input tensor: its model's path, and its name there (Source.key)

# Tensors outside the layers that come before them (token and position embeddings): from the first
# slice. Every other one (final norm, head) comes after them: from the last.
BEFORE_LAYERS = re.compile(r"embed|(^|\.)(wte|wpe|tok_embeddings)\.")
HEAD = "lm_head.weight"  # transformers' name of a causal LM's output embeddings (its _tied_weights_keys)
INPUT_EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings|tok_embeddings)\.weight$")


def ties_head(model: LocalModel) -> bool:
    """Whether `model` stores no head and its config ties it to the input embeddings (tie_word_embeddings: true,
    at the top or in text_config)."""
    if HEAD in model.tensors:
        return False
    try:
        config = read_config(model) or {}
    except ModelError:
        return False
    text = config.get("text_config")
    return config.get("tie_word_embeddings") is True or (
        isinstance(text, dict) and text.get("tie_word_embeddings") is True
    )


def tied_head(model: LocalModel) -> str | None:
    """The tensor that stands in for the head `model` does not store: its input embeddings, where its config ties
    the two (ties_head) and one tensor outside its layers is named as input embeddings are (as mergekit's
    architecture tables pair them); None otherwise."""
    if not ties_head(model):
        return None
    stacks = find_stacks(model.tensors)
    found = [n for n in model.tensors if INPUT_EMBEDDINGS.search(n) and stack_of(stacks, n) is None]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True, eq=False)
class Source:
    """One input tensor of an output tensor: a model, and the tensor's name there."""

    model: LocalModel
    name: str

    @property
    def key(self) -> Key:
        """What the engine keys its views by: a model may supply two tensors to one output tensor."""
        return self.model.path, self.name

    @property
    def info(self) -> TensorInfo:
        return self.model.tensors[self.name]


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the output
    merged: bool  # float: merged by the method; otherwise copied after checking all inputs agree
    nbytes: int
    # What the plan resolved for this tensor; the engine reads these and looks no name up itself.
    # Merged: one source per ingredient, in ingredient order, and the base's where the method reads it;
    # copied: every model's, the first the one copied, the others checked against it.
    sources: tuple[Source, ...] = field(default=(), compare=False, repr=False)
    base: Source | None = field(default=None, compare=False, repr=False)
    models: tuple[Params, ...] = field(default=(), compare=False, repr=False)  # per ingredient
    params: Params | None = field(default=None, compare=False, repr=False)  # method-wide
    layer: int | None = None  # in the output (merger.layers); None outside the layers
    seed: int = field(default=0, compare=False, repr=False)  # methods.tensor_seed

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def readers(self) -> tuple[Source, ...]:
        """The input tensors read for this one, in order: the sources, then the base (a model listed
        twice is read twice here; `distinct` reads it once)."""
        return self.sources + ((self.base,) if self.base is not None else ())

    @property
    def distinct(self) -> tuple[Source, ...]:
        """readers, each input tensor once (the engine's views, and its staging roles by place)."""
        first: dict[Key, Source] = {}
        for s in self.readers:
            first.setdefault(s.key, s)
        return tuple(first.values())

    @property
    def context(self) -> TensorContext:
        return TensorContext(self.name, self.layer, self.seed, self.shape)


@dataclass
class Assembly:
    """The output tensors (unsorted), and what the output's config needs of its layers."""

    tensors: list[OutTensor]
    stack: LayerStack | None  # the reference's (main) layers
    origins: list[int]  # per output layer, the reference-like model's layer it was made from


class Assembler:
    """Builds the output tensors of a spec over opened models (`models`: by reference)."""

    def __init__(
        self,
        spec: MergeSpec,
        models: dict[str, LocalModel],
        reference: LocalModel,
        vocabulary: Vocabulary | None = None,
    ):
        self.spec, self.models, self.reference, self.vocabulary = spec, models, reference, vocabulary
        self.stacks = {m.path: find_stacks(m.tensors) for m in [*models.values(), reference]}
        self._params: dict[tuple, Params] = {}  # resolved values -> their (validated) parameter object
        self._checked: set[tuple] = set()
        self._failed: set[tuple] = set()  # slices whose parameters failed the method's check
        self._by_layer: dict[tuple[Path, str], dict[int, list[str]]] = {}  # _names
        self.problems: list[str] = []

    def main(self, model: LocalModel) -> LayerStack | None:
        stacks = self.stacks[model.path]
        return stacks[0] if stacks else None

    def assemble(self) -> Assembly:
        """Every output tensor, or RecipeError listing each range or tensor the models lack."""
        stacks = self.stacks[self.reference.path]
        made: list[OutTensor | None] = []
        origins: list[int] = []
        if self.spec.slices is None:  # each stack whole, its layers placed (gradients) within it
            parts = [self._whole(stack) for stack in stacks] or [self._whole(None)]
            for part, stack in zip(parts, stacks):
                made += self._layers(part, 0, stack)
            origins = list(range(stacks[0].count)) if stacks else []
        else:
            parts = self.spec.slices
            self._check_stacks(parts)
            self._check_ranges(parts)
            for part in parts:
                made += self._layers(part, len(origins))
                origins += [self._anchor(part).start + i for i in range(part.count)]
        names = list(self.reference.tensors)
        if HEAD not in names and tied_head(self.reference) and any(HEAD in m.tensors for m in self.models.values()):
            names.append(HEAD)  # another model stores a head: the reference's embeddings stand in for its own
        for name in names:
            if stack_of(stacks, name) is None:
                before = BEFORE_LAYERS.search(name) is not None
                # a gradient's first value for every tensor outside the layers, after them too, as mergekit
                # plans them (t = 0 both sides), so that its configs give its results
                made.append(self._tensor(parts[0] if before else parts[-1], name, name, 0.0))
        if self.problems:
            raise RecipeError(list(dict.fromkeys(self.problems)))
        return Assembly([t for t in made if t is not None], stacks[0] if stacks else None, origins)

    def _whole(self, stack: LayerStack | None) -> Slice:
        """A models: recipe as its one slice: every model's layers."""
        spec, count = self.spec, stack.count if stack else 0
        inputs = tuple(SliceInput(g.ref, 0, count, g.settings, ("models", g.index)) for g in spec.ingredients)
        base = SliceInput(spec.base, 0, count, {}, ("base_model",)) if spec.base and spec.method.reads_base else None
        return Slice(inputs, base, {}, ("models",))

    def _anchor(self, part: Slice) -> SliceInput:
        """The source whose tensors give an output tensor's shape and dtype and are copied where not
        merged: the reference where the slice reads it (a models: recipe), else the base, else the
        first source."""
        for e in (part.base, *part.inputs):
            if e is not None and self.models[e.ref].path == self.reference.path:
                return e
        if self.spec.slices is None and self.spec.base:  # the base of a method that does not merge it
            return SliceInput(self.spec.base, 0, part.count, {}, ("base_model",))
        return part.base or part.inputs[0]

    def _check_stacks(self, parts: list[Slice]) -> None:
        """Slices number one stack of layers: a model with two (encoder and decoder, a vision tower beside
        a language model) is refused, as mergekit refuses it outside its `modules:` form."""
        for part in parts:
            for e in (*part.inputs, *([part.base] if part.base else [])):
                model = self.models[e.ref]
                stacks = self.stacks[model.path]
                if len(stacks) > 1:
                    first = min((n for n in model.tensors if stacks[1].index(n) is not None), key=natural_key)
                    names = ", ".join(f"'{s.prefix}.N'" for s in stacks)
                    self.problems.append(
                        f"{self.spec.where(*e.loc)}: '{e.ref}' has {len(stacks)} stacks of layers ({names}; "
                        f"'{first}' is in the second), and slices number one: mergekit's `modules:` form for "
                        "such models is not read yet; merge them whole with `models:`"
                    )
        if self.problems:
            raise RecipeError(list(dict.fromkeys(self.problems)))

    def _check_ranges(self, parts: list[Slice]) -> None:
        for part in parts:
            for e in (*part.inputs, *([part.base] if part.base else [])):
                stack = self.main(self.models[e.ref])
                count = stack.count if stack else 0
                if e.end > count:
                    self.problems.append(
                        f"{self.spec.where(*e.loc, 'layer_range')}: '{e.ref}' has {count} layers (0 to "
                        f"{count - 1}); [{e.start}, {e.end}] goes past them"
                    )
        if self.problems:
            raise RecipeError(self.problems)

    def _layers(self, part: Slice, first: int, stack: LayerStack | None = None) -> list[OutTensor | None]:
        """The output layers [first, first + part.count) of one slice, of `stack` (default: the main one)."""
        anchor = self._anchor(part)
        model = self.models[anchor.ref]
        stack = stack or self.main(model)
        if stack is None or not part.count:
            return []
        out = []
        for i in range(part.count):
            t = i / (part.count - 1) if part.count > 1 else 1.0  # mergekit's place of a layer in its slice
            for name in self._names(model, stack).get(anchor.start + i, []):
                out_name = stack.renamed(name, first + i)
                out.append(self._tensor(part, out_name, name, t, layer=(i, stack)))
        return out

    def _names(self, model: LocalModel, stack: LayerStack) -> dict[int, list[str]]:
        """model's layer tensors by layer, each layer's in natural order (read once per model)."""
        key = (model.path, stack.prefix)
        if key not in self._by_layer:
            by_layer: dict[int, list[str]] = {}
            for name in sorted(model.tensors, key=natural_key):
                i = stack.index(name)
                if i is not None:
                    by_layer.setdefault(i, []).append(name)
            self._by_layer[key] = by_layer
        return self._by_layer[key]

    def _tensor(
        self, part: Slice, out_name: str, name: str, t: float, layer: tuple[int, LayerStack] | None = None
    ) -> OutTensor | None:
        """Output tensor `out_name` made of tensor `name` of the anchor's layer (and the same tensor of
        each source's layer in step with it: `layer` is (the layer's place in the slice, the stack)), or
        of every source's `name` outside the layers. None, with a problem noted, where one lacks it."""
        spec, anchor = self.spec, self._anchor(part)

        def source(e: SliceInput) -> Source:
            model = self.models[e.ref]
            if name == HEAD and not layer and HEAD not in model.tensors:  # a tied head: its input embeddings
                return Source(model, tied_head(model) or HEAD)
            return Source(model, layer[1].renamed(name, e.start + layer[0]) if layer else name)

        first = source(anchor)
        like = first.model.tensors.get(first.name)
        if like is None:
            self.problems.append(f"{spec.where(*part.loc)}: '{first.model.ref}' lacks tensor '{first.name}'")
            return None
        sources, base = self._sources(part, anchor, source, like.is_float)
        if not all([self._check(s, like, part) for s in (*sources, *([base] if base else []))]):
            return None
        models = (
            tuple(self._model_params(part, e, s.name, t) for e, s in zip(part.inputs, sources)) if like.is_float else ()
        )
        params = self._method_params(part, out_name, t) if like.is_float else None
        if like.is_float and spec.layered:
            self._check_params(part, out_name, models, params)
        code = like.dtype
        if like.is_float:
            code = DTYPE_CODE.get(spec.recipe.out_dtype or spec.recipe.dtype or "") or code
        out_layer = layer_of(self.stacks[self.reference.path], out_name)  # in its own stack
        shape = self.vocabulary.shape(name, like.shape) if self.vocabulary else like.shape
        return OutTensor(
            out_name, shape, code, like.is_float, math.prod(shape) * DTYPES[code][1], sources, base, models, params,
            out_layer, tensor_seed(spec.seed, out_name),
        )  # fmt: skip

    def _sources(
        self, part: Slice, anchor: SliceInput, source: Callable[[SliceInput], Source], merged: bool
    ) -> tuple[tuple[Source, ...], Source | None]:
        """(sources, base) of a tensor: merged, the slice's inputs in order and its base; else every model
        of the slice, the anchor first, from which the tensor is copied once every one agrees with it."""
        if merged:
            return tuple(map(source, part.inputs)), source(part.base) if part.base is not None else None
        everyone = [anchor, *([part.base] if part.base else []), *part.inputs]
        if self.spec.slices is None and self.spec.base:  # a models: recipe checks the base too, whatever the method
            everyone.insert(1, SliceInput(self.spec.base, anchor.start, anchor.end, {}, ("base_model",)))
        return tuple({s.key: s for s in map(source, everyone)}.values()), None

    def _check(self, s: Source, like: TensorInfo, part: Slice) -> bool:
        """Whether source s holds its tensor, of like's shape (and float, or of like's dtype); else a problem."""
        info = s.model.tensors.get(s.name)
        where = self.spec.where(*part.loc)
        if info is None:
            self.problems.append(f"{where}: '{s.model.ref}' lacks tensor '{s.name}'")
            return False
        if (
            not fits(self.vocabulary, s.name, info.shape, like.shape)
            or info.is_float != like.is_float
            or (not like.is_float and info.dtype != like.dtype)
        ):
            self.problems.append(
                f"{where}: tensor '{s.name}' of '{s.model.ref}' is {info.dtype} {list(info.shape)}, "
                f"not {like.dtype} {list(like.shape)} as the tensor it is merged with"
            )
            return False
        return True

    def _check_params(self, part: Slice, name: str, models: tuple[Params, ...], params: Params | None) -> None:
        """Method.check over parameters resolved per tensor, once for each combination; a slice's first
        problem only (a gradient that fails at one layer likely fails at many)."""
        check = self.spec.method.check
        if check is not None and (models, params) not in self._checked and part.loc not in self._failed:
            self._checked.add((models, params))
            msg = check(models, params)
            if msg:
                self._failed.add(part.loc)
                at, text = (self._misfit_at(part, msg), msg.message) if isinstance(msg, Misfit) else (part.loc, msg)
                self.problems.append(f"{self.spec.where(*at)}: tensor '{name}': {text}")

    def _misfit_at(self, part: Slice, found: Misfit) -> tuple:
        """Where the recipe gives the parameters a Misfit names (recipe.misfit_at), for this slice's model: its
        own entry's (or slice source's), the slice's, the recipe's, as _model_params resolves them."""
        entry = part.inputs[found.model]
        levels = ((entry.settings, entry.loc), (part.settings, part.loc), (self.spec.settings, ()))
        return misfit_at(found, levels, entry.loc)

    def _model_params(self, part: Slice, e: SliceInput, name: str, t: float) -> Params:
        """Ingredient e's parameters for its tensor `name`: its own, over its slice's, over the top level's."""
        return self._resolve(
            self.spec.method.model_params, [e.settings, part.settings, self.spec.settings], name, t, part
        )

    def _method_params(self, part: Slice, name: str, t: float) -> Params:
        return self._resolve(self.spec.method.params, [part.settings, self.spec.settings], name, t, part)

    def _resolve(self, model: type[Params], levels: list[dict], name: str, t: float, part: Slice) -> Params:
        values = {}
        for key in [f.alias or k for k, f in model.model_fields.items()]:
            for level in levels:  # the first level that sets it for this tensor
                value = settings.at(level[key], name, t) if key in level else None
                if value is not None:
                    values[key] = value
                    break
        cached = (model, tuple(sorted(values.items())))
        if cached not in self._params:
            try:
                self._params[cached] = model.model_validate(values)
            except ValidationError as e:
                raise RecipeError([f"{self.spec.where(*part.loc)}: tensor '{name}': {e.errors()[0]['msg']}"]) from None
        return self._params[cached]


def layer_of(stacks: list[LayerStack], name: str) -> int | None:
    found = stack_of(stacks, name)
    return found[1] if found else None


def tensor_record(t: OutTensor) -> dict:
    """What `merger plan --json` says of one output tensor: where it comes from, with which parameters."""
    return {
        "name": t.name,
        "layer": t.layer,
        "sources": [[s.model.ref, s.name] for s in t.sources],
        "base": [t.base.model.ref, t.base.name] if t.base else None,
        "model_parameters": [m.model_dump(mode="json", by_alias=True) for m in t.models],
        "parameters": t.params.model_dump(mode="json", by_alias=True) if t.params else None,
    }


def layer_rows(tensors: list[OutTensor]) -> list[tuple[str, str, str]]:
    """`merger plan`'s table of a recipe with slices, gradients or filters: per output layer (then per
    tensor outside the layers), (what, its inputs, its parameters). Inputs as model[layer]; a parameter
    that differs between the layer's tensors (filters) as its range."""
    stacks: dict[Path, list[LayerStack]] = {}

    def where(s: Source) -> str:
        if s.model.path not in stacks:
            stacks[s.model.path] = find_stacks(s.model.tensors)
        layer = layer_of(stacks[s.model.path], s.name)
        return f"{s.model.ref}[{layer}]" if layer is not None else f"{s.model.ref}"

    groups: dict[object, list[OutTensor]] = {}
    for t in tensors:
        if t.merged:
            place = numbered(t.name) if t.layer is not None else None
            groups.setdefault(place or t.name, []).append(t)
    several = len({key[0] for key in groups if isinstance(key, tuple)}) > 1  # an encoder and a decoder
    rows = []
    for key, members in groups.items():
        first = members[0]
        inputs = " + ".join(where(s) for s in first.sources) + (f" onto {where(first.base)}" if first.base else "")
        values: list[str] = []
        for i, s in enumerate(first.sources):
            shown = _values([t.models[i] for t in members])
            values += [f"{s.model.ref}: {shown}"] if shown else []
        wide = _values([t.params for t in members if t.params is not None])
        rows.append((_row_name(key, several), inputs, "; ".join(values + [wide] * bool(wide))))
    return rows


def _row_name(key: object, several: bool) -> str:
    """'layer 3'; 'model.decoder.layers.3' where the output has several stacks; a tensor's name outside them."""
    if not isinstance(key, tuple):
        return str(key)
    return f"{key[0]}.{key[1]}" if several else f"layer {key[1]}"


def _values(params: list[Params]) -> str:
    """Parameter objects' values, key by key: one value, or the range the objects span."""
    out = []
    for key in params[0].model_dump(by_alias=True) if params else []:
        seen = sorted({p.model_dump(by_alias=True)[key] for p in params}, key=str)
        if len(seen) == 1:
            out.append(f"{key} {_number(seen[0])}")
        elif all(isinstance(v, int | float) for v in seen):
            out.append(f"{key} {_number(min(seen))}..{_number(max(seen))}")
        else:
            out.append(f"{key} {'/'.join(map(str, seen))}")
    return ", ".join(out)


def _number(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)

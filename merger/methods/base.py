"""What a merge method is: a pure function over float tensors plus the pydantic models of its parameters."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # torch is imported where a method runs, not where the registry loads
    import numpy as np
    from torch import Tensor


class Params(BaseModel):
    """Base of every parameter model: unknown keys and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True)


NO_EFFECT = "no_effect"  # a field's json_schema_extra key: kept for mergekit configs, changes nothing


def kept_for_mergekit(default: Any, why: str) -> Any:
    """A parameter that mergekit configs give and that changes nothing here (nor in mergekit 0.1.5, for
    the methods that accept it): taken, listed by `merger methods`, left out of what the output's card
    says the merge used (in_effect)."""
    return Field(
        default, description=f"accepted for mergekit configs; no effect{why}", json_schema_extra={NO_EFFECT: True}
    )


def effective_keys(model: type[Params]) -> list[str]:
    """The keys (aliases) of a parameter model that change a merge: kept_for_mergekit's left out."""
    fields = model.model_fields.items()
    return [
        f.alias or name
        for name, f in fields
        if not (isinstance(f.json_schema_extra, dict) and NO_EFFECT in f.json_schema_extra)
    ]


def in_effect(params: Params) -> dict[str, Any]:
    """params as written out (by alias), less what changes nothing (kept_for_mergekit)."""
    keys = set(effective_keys(type(params)))
    return {k: v for k, v in params.model_dump(by_alias=True).items() if k in keys}


@dataclass(frozen=True)
class TensorContext:
    """What a method knows of the output tensor it merges besides its inputs: its name, its layer in
    the output (merger.layers; None outside the layers), a seed of its own for methods that draw
    random numbers (tensor_seed: the same for a tensor in every run, on every device and worker), and
    its shape (the chunks fn and prepare see are flat: row r of a matrix is entries [r * cols, (r + 1) * cols))."""

    name: str
    layer: int | None = None
    seed: int = 0
    shape: tuple[int, ...] = ()
    model_state: Any = None  # what the method's model_prepare found for this tensor (None without one)


def tensor_seed(recipe_seed: int, name: str) -> int:
    """A 63-bit seed for output tensor `name`: from sha256, so it does not change between processes as
    Python's hash() of a string does."""
    digest = hashlib.sha256(f"{recipe_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class MergeFn(Protocol):
    """fn(tensors, base, models, params, state=None, offset=0, *, context) -> the merged tensor.

    tensors: one float tensor per ingredient (the plan's sources of this output tensor, in ingredient
    order), all the same shape, in the compute dtype and device; never modified. base: the base's
    tensor, or None for methods that need no base. models: one per-model parameter object
    (Method.model_params) per ingredient, resolved for this tensor; params: the method-wide one
    (Method.params). state: what `prepare` computed for this tensor (None without prepare); offset:
    with state, the flat index where these (chunk) tensors start in the whole tensor.

    Called on whole tensors it is the method. The streaming engine may instead call it on slices of the
    flattened tensors, in any order and from several threads at once (to keep temporaries in cache and
    use every core): so fn must be elementwise given (state, offset), must not modify state, and
    anything that needs the whole tensor belongs in `prepare`. Only methods with prepare get
    state/offset."""

    def __call__(
        self,
        tensors: Sequence[Tensor],
        base: Tensor | None,
        models: Sequence[Any],
        params: Any,
        state: Any = None,
        offset: int = 0,
        *,
        context: TensorContext | None = None,
    ) -> Tensor: ...


# Every ingredient's next flat chunk and the base's (None without one), as stored, in the compute dtype.
InputChunks = Callable[[], Iterable[tuple[list["Tensor"], "Tensor | None"]]]


class Prepare(Protocol):
    """prepare(task_vectors, numel, models, params, *, context, inputs) -> state: what needs every entry
    of the tensor (TIES: trim thresholds), before fn merges it chunk by chunk.

    task_vectors() yields consecutive flat chunks, each a list of every ingredient's x_i - base there
    (the base read once per chunk); inputs() the same chunks of the tensors as they are (InputChunks),
    for methods that do not work on task vectors. Each call is a fresh iterator, so prepare may make
    several passes; the chunks are fresh tensors prepare may modify in place. On a GPU, prepare should
    not synchronise with the host per chunk (ties_prepare synchronises once)."""

    def __call__(
        self,
        task_vectors: Callable[[], Iterable[list[Tensor]]],
        numel: int,
        models: Sequence[Any],
        params: Any,
        *,
        context: TensorContext | None = None,
        inputs: InputChunks | None = None,
    ) -> Any: ...


# Each merged tensor of the model in plan order: (name, numel, per-ingredient parameters, task_vectors as
# Prepare gets them), from a fresh iterator per call.
ModelTensors = Callable[[], Iterable[tuple[str, int, Sequence[Any], Callable[[], Iterable[list["Tensor"]]]]]]


class ModelPrepare(Protocol):
    """model_prepare(tensors, params) -> {tensor name: state}: what needs every tensor of the model before
    any is merged (TIES' global trim: one threshold per model over its whole task vector), in as many
    streaming passes over tensors() as it takes. Each tensor's state reaches prepare, fn and fused as
    context.model_state. Run only where Method.model_wide(params) says the recipe asks for it."""

    def __call__(self, tensors: ModelTensors, params: Any) -> dict[str, Any]: ...


# merge_range(start, end, out): merges flat entries [start, end) into `out` (end - start entries of
# the output dtype); called for consecutive ranges, so that the output is written in pieces.
MergeRange = Callable[[int, int, "np.ndarray"], None]


class Fused(Protocol):
    """fused(tensors, base, models, params, run, *, context) -> merge_range: an optional fast path for
    CPU merges in float32, on the stored bytes: tensors and base are whole flat numpy views in
    merger.sources.DTYPES' form (what merger.kernels reads), all of one dtype, and run(fn, n[, size])
    maps fn(start, end) over ranges covering [0, n) on the engine's threads, returning the results in
    order. The call does what needs the whole tensor (TIES: the trim thresholds). It must agree with
    fn to float32 rounding (TIES: bit for bit); tests hold both to the same oracles. The engine uses it
    when numba and the dtypes allow, and then never imports torch."""

    def __call__(
        self,
        tensors: Sequence[np.ndarray],
        base: np.ndarray | None,
        models: Sequence[Any],
        params: Any,
        run: Callable[..., list],
        *,
        context: TensorContext | None = None,
    ) -> MergeRange: ...


@dataclass(frozen=True)
class GpuFootprint:
    """The GPU memory a method holds at its peak beyond its inputs (tensors and base in the compute
    dtype), in buffers the size of the tensor merged: fn's `words` of the compute dtype, `per_model`
    more per model, and `masks` of one byte an entry (bool); before that, prepare's `prepare_words` and
    `prepare_masks` beside the task vectors it is given and `fixed_per_model` bytes per model whatever
    the tensor's size (TIES: a pass's radix histogram), and between its passes `settle_per_model` bytes
    per model beside the task vectors alone (TIES: picking a digit from the histogram takes three).
    Plan.gpu_bytes adds the engine's own buffers; the tests (tests/test_gpu_memory.py) hold each
    built-in method's figures to what its functions hold. On the CPU the same functions run on chunks (the
    torch path, where there are no fused kernels), and Plan.peak_memory counts what they hold of the whole
    tensor whatever the chunk: held_whole, prepare_whole, held_whole_masks_per_model and fixed_per_model."""

    words: int
    per_model: int = 0
    masks: int = 0
    prepare_words: int = 0
    prepare_masks: int = 0
    fixed_per_model: int = 0
    settle_per_model: int = 0
    # words of the compute dtype per entry of the WHOLE tensor that prepare and fn hold however small the
    # pieces (methods that gather whole matrices: the SVDs of tsv, iso_c): in pieces, a fixed cost
    held_whole: int = 0
    held_whole_masks_per_model: int = 0  # bytes per entry of the whole tensor per model, so held (DELLA's keep masks)
    prepare_whole: int = 0  # words per entry of the whole tensor prepare alone holds so (DELLA: a model's magnitudes)
    # bytes per row of the whole tensor (an entry of its last dimension's), given the models, that prepare and
    # fn hold whatever the pieces: per-row statistics (model_stock's exact sums, arcee_fusion's KL divergences)
    per_row: Callable[[int], int] | None = None

    # bytes prepare holds throughout given the tensor's shape, whatever the pieces and the models: DELLA ranks a
    # block of fibers (whose size follows from the fibers'), one model at a time; SCE selects among one vector
    prepare_block: Callable[[tuple[int, ...]], int] | None = None

    def block_bytes(self, shape: tuple[int, ...]) -> int:
        """What prepare_block comes to for a tensor of this shape."""
        return self.prepare_block(shape) if self.prepare_block is not None else 0

    def row_bytes(self, models: int, rows: int) -> int:
        """What per_row comes to for a tensor of `rows` rows."""
        return self.per_row(models) * rows if self.per_row is not None else 0

    def bytes_per_entry(self, models: int, itemsize: int) -> int:
        """fn's bytes per entry of the tensor."""
        return (self.words + self.per_model * models) * itemsize + self.masks

    def prepare_bytes_per_entry(self, itemsize: int) -> int:
        """prepare's bytes per entry beside its task vectors."""
        return self.prepare_words * itemsize + self.prepare_masks

    def buffers(self, models: int) -> int:
        """How many tensor-sized buffers fn and prepare hold (each rounded up to the allocator's block)."""
        return self.words + self.per_model * models + self.masks + self.prepare_words + self.prepare_masks


@dataclass(frozen=True)
class Method:
    name: str
    fn: MergeFn
    model_params: type[Params]  # per model: models[i].parameters (defaults from top-level parameters)
    params: type[Params]  # method-wide: top-level parameters
    needs_base: bool
    summary: str
    paper: str = ""
    # Optional check over the validated parameters, run before any tensor is read; returns a problem (a Misfit
    # where one model's parameters are at fault: the recipe points at them) or None.
    check: Callable[[Sequence[BaseModel], BaseModel], str | Misfit | None] | None = None
    # Optional per-tensor statistics over whole task vectors (TIES: trim thresholds). Needs a base.
    prepare: Prepare | None = None
    fused: Fused | None = None
    # The threshold bands prepare's fused kernels gather (merger.kernels.select_in_bands), per model and per
    # tensor: Plan.peak_memory counts up to budget.gathered_most entries each (TIES: a trim a model).
    bands: tuple[int, int] = (1, 0)
    # CPU nanoseconds per entry per model merged (the base aside) on one core through the fused kernel,
    # the writer's copy included: what `device: auto` weighs against reading and writing (merger.device).
    # Each built-in method's figure comes from its TinyLlama benchmark (README, Performance).
    cpu_ns: float = 1.0
    # GPU memory its fn and prepare take (Plan.gpu_bytes); a plugin that states none is assumed to hold,
    # like TIES, a task vector per model and four more buffers.
    gpu: GpuFootprint = GpuFootprint(words=4, per_model=1, masks=1, prepare_words=4, prepare_masks=1)
    # Reads the base where the recipe names one, and works without (nuslerp, multislerp): fn's base is
    # then None. needs_base methods refuse a recipe without one.
    takes_base: bool = False
    # mergekit has the method: a config of it that gives another method's parameters runs, those left aside
    # as mergekit leaves them (recipe._leave_other_methods_parameters); merger's own refuse them
    in_mergekit: bool = True
    # Parameters mergekit 0.1.5's method of this name reads that merger's does not take, each with why it
    # is refused rather than left aside: leaving it would merge differently from mergekit (ties: rescale).
    # (key, why) pairs: a method stays hashable.
    not_taken: tuple[tuple[str, str], ...] = ()
    # A pass over the whole model before the merge, where model_wide(params) (see ModelPrepare).
    model_prepare: ModelPrepare | None = None
    model_wide: Callable[[Any], bool] | None = None
    # verbatim(models, params) -> the ingredient whose stored bytes the method leaves as they are (passthrough
    # at scale 1), or None: where the output keeps that input's dtype, the engine copies the bytes file to
    # file (no merge; NaN payloads too) on every device.
    verbatim: Callable[[Sequence[Any], Any], int | None] | None = None

    @property
    def reads_base(self) -> bool:
        return self.needs_base or self.takes_base

    def __reduce__(self):
        # --workers processes get the plan pickled: a method travels as its registered name (its functions
        # may be closures or lambdas, which do not pickle), and the worker takes the registry's
        return _registered, (self.name,)


# Set by merger.methods (the registry) when it loads: how a pickled method is found again by name.
lookup: Callable[[str], Method | None] = lambda name: None  # noqa: E731


def _registered(name: str) -> Method:
    method = lookup(name)
    if method is None:
        raise LookupError(f"merge method '{name}' is not registered in this process")
    return method


class Misfit(NamedTuple):
    """A Method.check's complaint about one model's parameters: the model (an index into the models check was
    given), the parameters at fault (the recipe's error points at one of them where the recipe gives it:
    recipe.misfit_at), and what is wrong."""

    model: int
    keys: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"models[{self.model}]: {self.message}"


def normalizable(models: Sequence[BaseModel], params: BaseModel) -> str | None:
    """The check of methods that divide by the sum of the weights when `normalize` is set."""
    if getattr(params, "normalize", False) and sum(m.weight for m in models) == 0:
        return "the weights sum to 0, so they cannot be normalised; set normalize: false or change a weight"
    return None

"""What a merge method is: a pure function over float tensors plus the pydantic models of its parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # torch is imported where a method runs, not where the registry loads
    import numpy as np
    from torch import Tensor


class Params(BaseModel):
    """Base of every parameter model: unknown keys and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True)


# fn(tensors, base, models, params, state=None, offset=0) -> merged tensor.
#   tensors: one float tensor per ingredient, all the same shape, in the compute dtype and device;
#            never modified
#   base:    the base model's tensor, or None for methods that need no base
#   models:  one per-model parameter object (Method.model_params) per ingredient
#   params:  the method-wide parameter object (Method.params)
#   state:   what `prepare` computed for this tensor (None for methods without prepare)
#   offset:  with state, the flat index where these (chunk) tensors start in the whole tensor
# Called on whole tensors it is the method. The streaming engine may instead call it on slices of the
# flattened tensors, in any order and from several threads at once (to keep temporaries in cache and
# use every core): so fn must be elementwise given (state, offset), must not modify state, and
# anything that needs the whole tensor belongs in `prepare`. Only methods with prepare get state/offset.
MergeFn = Callable[..., "Tensor"]

# prepare(task_vectors, numel, models, params) -> state
#   task_vectors(i) yields the i-th ingredient's x_i - base as consecutive flat chunks (a fresh
#   iterator each call, so prepare may make several passes).
Prepare = Callable[[Callable[[int], Iterable["Tensor"]], int, Sequence[BaseModel], BaseModel], Any]

# fused(tensors, base, models, params, run) -> merge_range: an optional fast path for CPU merges in
# float32, on the stored bytes: tensors and base are whole flat numpy views in merger.sources.DTYPES'
# form (what merger.kernels reads), all of one dtype, and run(fn, n[, size]) maps fn(start, end) over
# ranges covering [0, n) on the engine's threads, returning the results in order. The call does what
# needs the whole tensor (TIES: the trim thresholds); merge_range(start, end, out) then merges flat
# entries [start, end) into `out` (end - start entries, the output dtype), called for consecutive
# ranges so that the output is written in pieces. It must agree with fn to float32 rounding (TIES:
# bit for bit); tests hold both to the same oracles. The engine uses it when numba and the dtypes
# allow, and then never imports torch.
MergeRange = Callable[[int, int, "np.ndarray"], None]
Fused = Callable[..., MergeRange]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MergeFn
    model_params: type[Params]  # per model: models[i].parameters (defaults from top-level parameters)
    params: type[Params]  # method-wide: top-level parameters
    needs_base: bool
    summary: str
    paper: str = ""
    # Optional check over the validated parameters, run before any tensor is read; returns a problem or None.
    check: Callable[[Sequence[BaseModel], BaseModel], str | None] | None = None
    # Optional per-tensor statistics over whole task vectors (TIES: trim thresholds). Needs a base.
    prepare: Prepare | None = None
    fused: Fused | None = None


def normalizable(models: Sequence[BaseModel], params: BaseModel) -> str | None:
    """The check of methods that divide by the sum of the weights when `normalize` is set."""
    if getattr(params, "normalize", False) and sum(m.weight for m in models) == 0:
        return "the weights sum to 0, so they cannot be normalised; set normalize: false or change a weight"
    return None

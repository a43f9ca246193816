"""What a merge method is: a pure function over float tensors plus the pydantic models of its parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from torch import Tensor


class Params(BaseModel):
    """Base of every parameter model: unknown keys and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True)


# fn(tensors, base, models, params) -> merged tensor.
#   tensors: one float tensor per ingredient, all the same shape, in the compute dtype and device
#   base: the base model's tensor, or None for methods that need no base
#   models: one per-model parameter object (Method.model_params) per ingredient
#   params: the method-wide parameter object (Method.params)
MergeFn = Callable[[Sequence[Tensor], "Tensor | None", Sequence[BaseModel], BaseModel], Tensor]


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

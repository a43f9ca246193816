"""Passthrough: one model's tensors as they are (scaled if asked): what stacks layers in slices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from merger.methods.base import GpuFootprint, MergeRange, Method, Params, TensorContext
from merger.methods.linear import LinearModelParams, LinearParams, linear_fused

if TYPE_CHECKING:
    from torch import Tensor


class PassthroughModelParams(Params):
    scale: float = Field(1.0, description="multiply the tensor by this (0 drops a layer's contribution)")


class NoParams(Params):
    """Passthrough takes no method-wide parameters."""


_SUM = LinearParams(normalize=False)


def passthrough(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    models: Sequence[PassthroughModelParams],
    params: NoParams,
    *,
    context: TensorContext | None = None,
) -> Tensor:
    return tensors[0] * models[0].scale  # x * 1.0 is x, -0.0 included: scale 1 keeps every value


def passthrough_fused(
    tensors, base, models: Sequence[PassthroughModelParams], params: NoParams, run, *, context=None
) -> MergeRange:
    """The stored bytes copied where the output keeps the input's dtype and scale is 1; else linear's
    kernel (a sum from +0.0, which turns -0.0 into +0.0)."""
    x, scale = tensors[0], models[0].scale

    def copy(start: int, end: int, out) -> None:
        if out.dtype != x.dtype or scale != 1.0:
            return scaled(start, end, out)
        run(lambda s, e: np.copyto(out[s:e], x[start + s : start + e]), end - start)

    scaled = linear_fused(tensors, None, [LinearModelParams(weight=scale)], _SUM, run)
    return copy


def unscaled(models: Sequence[PassthroughModelParams], params: NoParams) -> int | None:
    """The model copied as it is (scale 1), for Method.verbatim."""
    return 0 if models[0].scale == 1.0 else None


def one_model(models: Sequence[BaseModel], params: BaseModel) -> str | None:
    if len(models) != 1:
        return f"passthrough copies one model's tensors, not {len(models)}: give one model (in slices, one source each)"
    return None


METHOD = Method(
    name="passthrough",
    fn=passthrough,
    model_params=PassthroughModelParams,
    params=NoParams,
    needs_base=False,
    summary="One model's tensors as they are, times scale: with slices, stacks layers of models (frankenmerges).",
    check=one_model,
    fused=passthrough_fused,
    verbatim=unscaled,
    cpu_ns=0.3,
    gpu=GpuFootprint(words=1),  # linear's sum
)

"""Uniform / weighted soup: the (normalised) weighted average of the models' tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from merger.methods.base import Method, Params, normalizable


class LinearModelParams(Params):
    weight: float = Field(1.0, description="weight of this model in the sum")


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of the weights")


def linear(
    tensors: Sequence[Tensor], base: Tensor | None, models: Sequence[LinearModelParams], params: LinearParams
) -> Tensor:
    out = torch.zeros_like(tensors[0])
    for x, m in zip(tensors, models):
        out.add_(x, alpha=m.weight)
    if params.normalize:
        out.div_(sum(m.weight for m in models))
    return out


METHOD = Method(
    name="linear",
    fn=linear,
    model_params=LinearModelParams,
    params=LinearParams,
    needs_base=False,
    summary="Weighted average (model soup): sum(w_i * x_i) / sum(w_i), or the plain sum without normalize.",
    paper="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
    check=normalizable,
)

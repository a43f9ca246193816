"""Kernel launches on the CUDA path, counted on the CPU. Merger.gpu_merge merges a tensor on the GPU with one
call of its method's torch function on the whole tensor, so each torch op that call runs is at least one
kernel launch. A count that grows with the tensor's rows (a Python loop over small blocks) leaves the GPU
waiting on launches: with DELLA ranking 16K entries a block, a TinyLlama-shape merge took 66 s on an H100
and 12 s on that machine's CPU."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import RECIPES
from torch.utils._python_dispatch import TorchDispatchMode

from merger.methods import get_method
from merger.methods.base import TensorContext


class OpCount(TorchDispatchMode):
    """The torch ops run while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops(method: str, rows: int, cols: int = 1024) -> int:
    """The torch ops of `method`'s function on (rows, cols) tensors, with its RECIPES parameters."""
    spec = yaml.safe_load(RECIPES[method].format(base="base", ft1="ft1", ft2="ft2"))
    m = get_method(method)
    models = [m.model_params(**(entry.get("parameters") or {})) for entry in spec["models"]]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g) * 0.02
    xs = [base + torch.randn(rows, cols, generator=g) * 0.002 for _ in models]
    context = TensorContext(name="model.layers.0.mlp.up_proj.weight", shape=(rows, cols))
    with OpCount() as count:
        m.fn(
            xs,
            base if "base_model" in spec else None,
            models,
            m.params(**(spec.get("parameters") or {})),
            context=context,
        )
    return count.ops


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_the_cuda_paths_launches_do_not_grow_with_rows(method):
    few, many = ops(method, 4), ops(method, 1024)
    assert many <= 1.1 * few + 16, (few, many)

"""Where a checkpoint's layers are, from its tensor names alone, for any architecture.

A transformer's blocks are one stack of numbered names: `model.layers.12.mlp.up_proj.weight`,
`transformer.h.3.attn.c_attn.weight`, `encoder.layer.5.output.dense.weight`. The stack is the prefix
before a numeric component that the most tensors share (`model.layers`), so no per-architecture table
is needed; a name outside it (embeddings, final norm, head) has no layer. Slices renumber layers by
rewriting that component (LayerStack.renamed).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# the first numeric component that follows at least one other: (prefix, index, the rest)
_NUMBERED = re.compile(r"^(.+?)\.(\d+)(?=\.|$)(.*)$")


@dataclass(frozen=True)
class LayerStack:
    """The numbered stack of a checkpoint's layers: names `{prefix}.{index}{rest}`."""

    prefix: str
    count: int  # layers: one more than the highest index

    def index(self, name: str) -> int | None:
        """The layer of tensor `name`, or None outside the stack."""
        m = _NUMBERED.match(name)
        return int(m.group(2)) if m and m.group(1) == self.prefix else None

    def renamed(self, name: str, index: int) -> str:
        """`name` (a tensor of the stack) as the same tensor of layer `index`."""
        m = _NUMBERED.match(name)
        if not m or m.group(1) != self.prefix:
            raise ValueError(f"'{name}' is not a tensor of the layers '{self.prefix}.N'")
        return f"{self.prefix}.{index}{m.group(3)}"


def natural_key(name: str) -> list:
    """'layers.10' after 'layers.9': output shards then follow the model's layer order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def numbered(name: str) -> tuple[str, int] | None:
    """(prefix, index) of a name's first numeric component: ('model.layers', 3) for
    'model.layers.3.mlp.up_proj.weight'; None for a name without one."""
    m = _NUMBERED.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def find_stacks(names: Iterable[str]) -> list[LayerStack]:
    """Every layer stack of a checkpoint with these tensor names, the main one first (find_stack), then
    any other prefix numbered 0, 1, ..., n-1 with n >= 2 and at least two tensors a layer, in name order: an
    encoder-decoder's second stack, a vision tower's blocks beside a language model's layers (not a small
    numbered extra such as `patch.0.weight`, `patch.1.weight`). Empty without numbered tensors."""
    indices: dict[str, set[int]] = {}
    tensors: Counter[str] = Counter()
    for name in sorted(names):
        if found := numbered(name):
            indices.setdefault(found[0], set()).add(found[1])
            tensors[found[0]] += 1
    if not indices:
        return []
    main = max(indices, key=lambda p: (len(indices[p]), tensors[p]))
    others = [
        p for p in indices
        if p != main and len(indices[p]) >= 2 and indices[p] == set(range(len(indices[p])))
        and tensors[p] >= 2 * len(indices[p])
    ]  # fmt: skip
    return [LayerStack(p, max(indices[p]) + 1) for p in [main, *sorted(others, key=natural_key)]]


def find_stack(names: Iterable[str]) -> LayerStack | None:
    """The main layer stack of a checkpoint with these tensor names: the prefix of a first numeric
    component with the most distinct indices (ties: the most tensors, then the first name in order);
    None for a checkpoint without numbered tensors."""
    stacks = find_stacks(names)
    return stacks[0] if stacks else None


def stack_of(stacks: Iterable[LayerStack], name: str) -> tuple[LayerStack, int] | None:
    """The stack that holds tensor `name`, and its layer there; None outside every stack."""
    for stack in stacks:
        if (i := stack.index(name)) is not None:
            return stack, i
    return None

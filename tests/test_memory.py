"""Peak memory is a few tensors, whatever the number of layers: each size is merged in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import write_checkpoint

LAYER = (1024, 1024)  # 4 MiB per float32 tensor


def peak_rss(tmp_path, layers: int) -> int:
    root = tmp_path / f"L{layers}"
    for i, name in enumerate(("base", "ft1", "ft2")):
        g = torch.Generator().manual_seed(i)
        tensors = {f"layers.{j}.w": torch.randn(LAYER, generator=g) for j in range(layers)}
        write_checkpoint(root / name, tensors, n_shards=2)
    (root / "r.yaml").write_text(
        f"merge_method: ties\nbase_model: {root / 'base'}\n"
        f"models: [{{model: {root / 'ft1'}, parameters: {{density: 0.5}}}}, {{model: {root / 'ft2'}}}]\n"
        f"output: {{path: {root / 'out'}, shard_size: 16MB}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "merger.cli", "apply", str(root / "r.yaml"), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout)["peak_rss_bytes"]


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    small = peak_rss(tmp_path, 2)  # 3 x 8 MiB of inputs
    large = peak_rss(tmp_path, 32)  # 3 x 128 MiB of inputs
    # 30 more layers are 360 MiB more input; allow the noise of a few tensors (4 MiB each)
    assert large - small < 48 * 2**20, (small, large)

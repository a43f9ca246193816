"""Several processes writing one model: byte-identical to a single process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from conftest import write_checkpoint

from merger.parallel import assign
from merger.plan import OutTensor, layout


def _family(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(64, 64, generator=g).bfloat16() for i in range(12)}
    base["ids"] = torch.arange(10)
    write_checkpoint(tmp_path / "base", base)
    for m in (1, 2):
        ft = {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() if v.is_floating_point() else v
            for k, v in base.items()
        }
        write_checkpoint(tmp_path / f"ft{m}", ft, n_shards=3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {tmp_path / 'base'}\n"
        f"models: [{{model: {tmp_path / 'ft1'}, parameters: {{density: 0.3}}}}, {{model: {tmp_path / 'ft2'}}}]\n"
        "output: {shard_size: 20KB}\n"
    )
    return recipe


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _merger(*args, env=None):
    return subprocess.run([sys.executable, "-m", "merger", *args], capture_output=True, text=True, env=env)


def test_assign_balances_and_covers_every_shard():
    shards = layout([OutTensor(f"t{i}", (n,), "U8", False, n) for i, n in enumerate([9, 1, 5, 5, 3, 8, 2])], 1)
    parts = assign(shards, 3)
    assert sorted(i for p in parts for i in p) == list(range(7))
    loads = [sum(shards[i].nbytes for i in p) for p in parts]
    assert max(loads) - min(loads) <= 2
    assert assign(shards, 3) == parts  # deterministic


def test_workers_output_is_byte_identical(tmp_path):
    recipe = _family(tmp_path)
    one = _merger("apply", str(recipe), "-o", str(tmp_path / "one" / "out"), "-q")
    assert one.returncode == 0, one.stderr
    two = _merger("apply", str(recipe), "-o", str(tmp_path / "two" / "out"), "--workers", "3", "--json")
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["processes"] == 3
    a, b = _files(tmp_path / "one" / "out"), _files(tmp_path / "two" / "out")
    assert len([f for f in a if f.endswith(".safetensors")]) > 3
    assert a == b


def test_distributed_gloo_launch_is_byte_identical(tmp_path):
    """Two ranks as a launcher (accelerate launch, torchrun) starts them: WORLD_SIZE, RANK, MASTER_*."""
    recipe = _family(tmp_path)
    one = _merger("apply", str(recipe), "-o", str(tmp_path / "one" / "out"), "-q")
    assert one.returncode == 0, one.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = os.environ | {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "merger", "apply", str(recipe), "-o", str(tmp_path / "dist" / "out"), "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.loads(outs[0][0])["processes"] == 2 and outs[1][0] == ""
    assert _files(tmp_path / "one" / "out") == _files(tmp_path / "dist" / "out")
    assert [p.name for p in (tmp_path / "dist").iterdir()] == ["out"]

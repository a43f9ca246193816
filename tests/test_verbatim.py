"""Tensors a method leaves as they are (passthrough at scale 1, in slices or whole) are copied file to file:
copy_file_range, or reads and writes where the file systems refuse it. Their bytes are the input's, NaN
payloads included, on the CPU and the GPU and in every write mode; a scaled slice beside them still merges;
a source that shrinks mid-copy is one line; a merge of copies alone imports neither numba nor torch."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint
from safetensors.torch import load_file
from test_gpu_memory import cuda_on_cpu  # noqa: F401  (a fixture: CUDA's streams and uploads on the CPU)

from merger.cli import cli


def _model(path: Path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(48, 32, generator=g).to(torch.bfloat16) for i in range(4)
    }
    tensors["model.embed_tokens.weight"] = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    tensors["model.norm.weight"] = torch.randn(32, generator=g)  # float32 beside bfloat16
    tensors["model.layers.0.mlp.up_proj.weight"].view(torch.int16).reshape(-1)[[3, 70, 500]] = torch.tensor(
        [0x7FC1, -0x3F, 0x7F81], dtype=torch.int16
    )  # NaN payloads no arithmetic keeps: a quiet one, one with the sign set (0xFFC1), a signalling one
    write_checkpoint(path, tensors, n_shards=2)
    return tensors


def _apply(tmp_path: Path, recipe: str, out: str = "out", *args: str):
    (tmp_path / "r.yaml").write_text(recipe)
    return CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "-q", *args])


def _same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.view(torch.uint8).equal(want.view(torch.uint8))


@pytest.mark.parametrize("mode", ["kernel", "refused", "absent", "drop_behind"])
def test_passthrough_writes_each_inputs_bytes(tmp_path, monkeypatch, mode):
    a = _model(tmp_path / "a", 0)
    if mode == "refused":  # another file system, say: read and written instead

        def refuse(*_args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif mode == "absent":  # not Linux
        monkeypatch.delattr(os, "copy_file_range")
    elif mode == "drop_behind":  # O_DIRECT where the file system takes it, else the page cache handed back
        monkeypatch.setenv("MERGER_DROP_BEHIND", "1")
    else:  # the kernel's copy: every tensor's bytes through copy_file_range
        real, copied = os.copy_file_range, []
        monkeypatch.setattr(os, "copy_file_range", lambda *args: copied.append(real(*args)) or copied[-1])
    result = _apply(tmp_path, f"merge_method: passthrough\nmodels: [{{model: {tmp_path / 'a'}}}]\n")
    assert result.exit_code == 0, result.output
    got = load_output(tmp_path / "out")
    assert got.keys() == a.keys()
    assert all(_same_bytes(got[name], value) for name, value in a.items())
    if mode == "kernel":
        assert sum(copied) == sum(v.numel() * v.element_size() for v in a.values())


@pytest.mark.usefixtures("cuda_on_cpu")
def test_on_the_gpu_too_copies_are_the_inputs_bytes(tmp_path):
    """A GPU merge copies as the CPU does (its arithmetic would quiet the signalling NaN): the output's bytes
    do not depend on the device. A scaled slice beside them merges on the GPU."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import write_shards

    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    plan = build_plan(parse_recipe(_SLICES.format(a=tmp_path / "a", b=tmp_path / "b")), device="cpu")
    plan.device = "cuda"
    (tmp_path / "out").mkdir()
    read = write_shards(plan, tmp_path / "out")  # the shards alone: no index
    assert read == sum(plan.stored_bytes(t) for t in plan.tensors)  # copies read once, not staged as well
    got = {k: v for shard in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(shard).items()}
    _check_slices(got, a, b)


_SLICES = """merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [2, 4], parameters: {{scale: 0.5}}}}]
"""


def _check_slices(got: dict, a: dict, b: dict) -> None:
    """Layers 0 and 1 a's bytes, 2 and 3 b's times 0.5."""
    for i in range(2):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        assert _same_bytes(got[name], a[name])
    for i in range(2, 4):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.equal(got[name], (b[name].float() * 0.5).to(torch.bfloat16))


def test_a_scaled_slice_merges_beside_copied_ones(tmp_path):
    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    result = _apply(tmp_path, _SLICES.format(a=tmp_path / "a", b=tmp_path / "b"))
    assert result.exit_code == 0, result.output
    _check_slices(load_output(tmp_path / "out"), a, b)


def test_a_source_that_shrinks_while_it_is_copied_is_one_line_naming_it(tmp_path, monkeypatch):
    """Truncated by another process after merger opened it, while its last tensor is copied: the copy finds
    it short, and says which file; nothing is left of the output."""
    _model(tmp_path / "a", 0)
    real, calls = os.copy_file_range, []

    def shrink(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) == 6:  # the last tensor's copy: no later open to find the change first
            os.truncate(os.readlink(f"/proc/self/fd/{src}"), 100)
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", shrink)
    result = _apply(tmp_path, f"merge_method: passthrough\nmodels: [{{model: {tmp_path / 'a'}}}]\n")
    assert result.exit_code == 2, result.output
    shards = sorted((tmp_path / "a").glob("*.safetensors"))
    assert any(
        result.output == f"error: {shard}: the file shrank while merger was reading it (another process truncated "
        "or rewrote it)\n"
        for shard in shards
    ), result.output
    assert not (tmp_path / "out").exists()


def test_a_copy_refused_part_way_goes_on_by_reads_and_writes(tmp_path, monkeypatch):
    a = _model(tmp_path / "a", 0)
    real = os.copy_file_range

    def part_way(src, dst, count, offset_src=None, offset_dst=None):
        if count > 4097:
            return real(src, dst, 4097, offset_src, offset_dst)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "copy_file_range", part_way)
    result = _apply(tmp_path, f"merge_method: passthrough\nmodels: [{{model: {tmp_path / 'a'}}}]\n")
    assert result.exit_code == 0, result.output
    got = load_output(tmp_path / "out")
    assert all(_same_bytes(got[name], value) for name, value in a.items())


def test_in_memory_merges_give_the_written_bytes(tmp_path):
    """merge_tensors (what greedy soup's evaluators load) copies as write_shards does, NaN payloads too."""
    from merger.plan import build_plan
    from merger.recipe import parse_recipe
    from merger.stream import merge_tensors

    a = _model(tmp_path / "a", 0)
    plan = build_plan(parse_recipe(f"merge_method: passthrough\nmodels: [{{model: {tmp_path / 'a'}}}]\n"))
    got = dict(merge_tensors(plan))
    assert all(_same_bytes(got[name], value) for name, value in a.items())


def test_a_merge_of_copies_alone_imports_neither_numba_nor_torch(tmp_path):
    """numba's import and kernel loading take about 0.3 s, torch's more: a passthrough needs neither."""
    _model(tmp_path / "a", 0)
    (tmp_path / "r.yaml").write_text(f"merge_method: passthrough\nmodels: [{{model: {tmp_path / 'a'}}}]\n")
    code = (
        "import sys\nfrom merger.cli import main\n"
        f"sys.argv = ['merger', 'apply', {str(tmp_path / 'r.yaml')!r}, '-o', {str(tmp_path / 'out')!r}, '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('numba', 'torch') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (0, "[]\n"), run.stderr


def test_a_copy_past_the_end_of_its_source_is_a_model_error_naming_the_file(tmp_path):
    from merger.errors import ModelError
    from merger.plan import OutTensor
    from merger.stream import ShardWriter

    (tmp_path / "src").write_bytes(b"x" * 100)
    t = OutTensor("w", (64,), "BF16", True, 128)
    w = ShardWriter(tmp_path / "out.safetensors", [t])
    with open(tmp_path / "src", "rb") as src, pytest.raises(ModelError, match=f"^{tmp_path / 'src'}: the file shrank"):
        w.copy(t, src, 0, tmp_path / "src")
    w.abort()

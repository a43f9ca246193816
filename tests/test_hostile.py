"""Files from strangers: every hostile input gets one line naming the file (or recipe line) and the problem,
exit code 2, nothing written, within seconds; merger reads nothing outside a model's folder and writes
nothing the user did not ask for. Each file here is built by hand in the test."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import GOOD, KILL_IN, hooked, load_output, run_bad, write_checkpoint
from fakehub import FakeHub

import merger.budget
from merger.cli import cli

SECRET = "hf_secret_token_that_must_never_be_copied"


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file written by hand: the 8-byte length, the header (a dict, or raw bytes), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def ft2_header(**changes) -> dict:
    """ft2's real header (a.weight 4x4, b.bias 4 float32; ids 3 int64), with entries replaced."""
    header = {
        "a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "b.bias": {"dtype": "F32", "shape": [4], "data_offsets": [64, 80]},
        "ids": {"dtype": "I64", "shape": [3], "data_offsets": [80, 104]},
    }
    for name, entry in changes.items():
        header[name] = entry if not isinstance(entry, dict) else header.get(name, {}) | entry
    return header


def put_ft2(content: bytes) -> Path:
    shard = Path("ft2/model.safetensors")
    shard.write_bytes(content)
    return shard


HEADERS = {
    "negative dims": (ft2_header(**{"b.bias": {"shape": [-4]}}), "shape [-4] is not a list of non-negative integers"),
    "float dims": (ft2_header(**{"b.bias": {"shape": [4.0]}}), "shape [4.0] is not a list of non-negative integers"),
    "string dims": (ft2_header(**{"b.bias": {"shape": ["4"]}}), "shape ['4'] is not a list of non-negative integers"),
    "bool dims": (ft2_header(**{"b.bias": {"shape": [True, 4]}}), "is not a list of non-negative integers"),
    "shape a dict": (ft2_header(**{"b.bias": {"shape": {"n": 4}}}), "shape {'n': 4} is not a list"),
    "huge dims": (
        ft2_header(**{"b.bias": {"shape": [2**62, 2**62]}}),
        "shape [4611686018427387904, 4611686018427387904] is larger than any tensor merger can hold",
    ),
    "huge dims, no entries": (
        ft2_header(
            **{"b.bias": {"shape": [2**40, 2**40, 0], "data_offsets": [64, 64]}, "ids": {"data_offsets": [64, 88]}}
        ),
        "shape [1099511627776, 1099511627776, 0] is larger than any tensor merger can hold",
        88,
    ),
    "a 5000-digit dim": (
        b'{"b.bias": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
        "is not valid JSON (Exceeds the limit (4300 digits)",
    ),
    "dtype a list": (ft2_header(**{"b.bias": {"dtype": ["F32"]}}), "unsupported dtype ['F32']"),
    "dtype a number": (ft2_header(**{"b.bias": {"dtype": 5}}), "unsupported dtype 5"),
    "dtype null": (ft2_header(**{"b.bias": {"dtype": None}}), "unsupported dtype None"),
    "dtype unknown": (ft2_header(**{"b.bias": {"dtype": "F33"}}), "unsupported dtype 'F33'"),
    "offsets backwards": (ft2_header(**{"b.bias": {"data_offsets": [80, 64]}}), "data_offsets [80, 64] hold -16 bytes"),
    "offsets negative": (
        ft2_header(**{"b.bias": {"data_offsets": [-16, 0]}}),
        "data_offsets [-16, 0] is not a pair of non-negative integers",
    ),
    "offsets floats": (
        ft2_header(**{"b.bias": {"data_offsets": [64.0, 80]}}),
        "is not a pair of non-negative integers",
    ),
    "offsets past the end": (
        ft2_header(ids={"data_offsets": [80, 10_000], "shape": [1240]}),
        "tensor 'ids': its data runs past the end of the file",
    ),
    "overlapping tensors": (
        ft2_header(**{"b.bias": {"data_offsets": [60, 76]}, "ids": {"data_offsets": [76, 100]}}),
        "overlaps the tensor before it",
    ),
    "a gap": (
        ft2_header(**{"b.bias": {"data_offsets": [68, 84]}, "ids": {"data_offsets": [84, 108]}}),
        "leaves 4 bytes unused before it",
        108,
    ),
    "metadata a list": (ft2_header(__metadata__=[1]), "__metadata__ is not a map of strings"),
    "metadata numbers": (ft2_header(__metadata__={"format": 1}), "__metadata__ is not a map of strings"),
    "entry a list": (ft2_header(**{"b.bias": [1, 2]}), "tensor 'b.bias': its header entry is not an object"),
    "header a list": (b"[1, 2, 3]", "not a safetensors file (header is not a JSON object)"),
    "header not UTF-8": (b"\xff\xfe{}", "is not UTF-8 JSON"),
    "header nested deep": (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),
    "duplicate names": (
        b'{"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, '
        b'"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
        "gives the key 'a.weight' twice",
    ),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_hostile_safetensors_headers(workdir, case):
    header, problem, *size = HEADERS[case]
    shard = put_ft2(safetensors_bytes(header, bytes(size[0] if size else 104)))
    err = run_bad(GOOD)
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: recipe.yaml:8: models[1].model: {workdir / shard}") and problem in err, err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (struct.pack("<Q", 0), "header length 0 is implausible"),
        (safetensors_bytes(b"{}", length=10_000), "its header of 10000 bytes runs past its end"),
        (safetensors_bytes(ft2_header(), bytes(112)), "8 bytes follow the last tensor's data"),
        (b"\x01\x02", "shorter than 8 bytes"),
    ],
)
def test_hostile_file_framing(workdir, content, problem):
    put_ft2(content)
    err = run_bad(GOOD)
    assert len(err.splitlines()) == 1 and problem in err, err


def test_a_tensor_name_with_control_characters_is_shown_escaped(workdir):
    put_ft2(
        safetensors_bytes(
            ft2_header(**{"a.weight\x1b[2J": {"dtype": "F32", "shape": [0], "data_offsets": [104, 104]}}), bytes(104)
        )
    )
    err = run_bad(GOOD)
    assert "\x1b" not in err and "a.weight\\x1b[2J" in err


INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize(
    ("weight_map", "problem"),
    [
        (
            {"a.weight": "../ft1/model-00001-of-00002.safetensors"},
            "which is not a plain file name inside the model's folder",
        ),
        ({"a.weight": "/etc/passwd"}, "names '/etc/passwd', which is not a plain file name inside the model's folder"),
        ({"a.weight": "config.json"}, "names 'config.json', which is not a .safetensors file"),
        ({"a.weight": 5}, "names 5, which is not a file name"),
        ({"a.weight": "sub.safetensors"}, "sub.safetensors is a directory; merger reads regular files only"),
        ({"a.weight": "fifo.safetensors"}, "fifo.safetensors is a FIFO; merger reads regular files only"),
        ([1, 2], "is not a valid index (no weight_map)"),
    ],
)
def test_hostile_index_entries(workdir, weight_map, problem):
    Path("ft1/sub.safetensors").mkdir()
    os.mkfifo("ft1/fifo.safetensors")
    Path(f"ft1/{INDEX}").write_text(json.dumps({"weight_map": weight_map}))
    err = run_bad(GOOD)
    assert len(err.splitlines()) == 1 and err.startswith("error: recipe.yaml:4: models[0].model: 'ft1': "), err
    assert problem in err, err


def test_hostile_index_files(workdir):
    Path(f"ft1/{INDEX}").write_text("[" * 50_000)
    assert "nests deeper than 64 levels" in run_bad(GOOD)
    Path(f"ft1/{INDEX}").write_bytes(b"\xff\xfe")
    assert "is not UTF-8 JSON" in run_bad(GOOD)
    os.truncate(f"ft1/{INDEX}", 200 << 20)  # 200 MB, sparse: refused by its size, unread
    started = time.monotonic()
    err = run_bad(GOOD)
    assert f"{INDEX} is 209715200 bytes, more than the 134217728 merger reads of such a file" in err
    assert time.monotonic() - started < 5


# a.weight named twice, the second time in the shard that holds it: JSON keeps the last, which works
DUPLICATE_INDEX = (
    '{"metadata": {}, "weight_map": {"a.weight": "model-00002-of-00002.safetensors", '
    '"ids": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors", '
    '"a.weight": "model-00001-of-00002.safetensors"}}'
)


def test_an_index_that_names_a_tensor_twice_is_refused(workdir):
    Path(f"ft1/{INDEX}").write_text(DUPLICATE_INDEX)
    assert run_bad(GOOD) == f"error: recipe.yaml:4: models[0].model: 'ft1': {INDEX} gives the key 'a.weight' twice\n"


def test_a_hub_index_that_names_a_tensor_twice_is_refused(workdir, monkeypatch):
    hub = FakeHub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        files = {p.name: p.read_bytes() for p in Path("ft1").iterdir()} | {INDEX: DUPLICATE_INDEX.encode()}
        hub.publish("org/ft1", files)
        err = run_bad(GOOD.replace("model: ft1", "model: org/ft1"))
    finally:
        hub.close()
    assert err == f"error: recipe.yaml:4: models[0].model: 'org/ft1': {INDEX} gives the key 'a.weight' twice\n"


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "README.md"]
)
def test_support_files_that_lead_outside_the_folder_are_refused(workdir, name):
    secret = workdir.parent / f"{workdir.name}-secret.txt"
    secret.write_text(SECRET)
    Path(f"base/{name}").unlink(missing_ok=True)
    Path(f"base/{name}").symlink_to(secret)
    err = run_bad(GOOD)
    assert err == (
        f"error: recipe.yaml:2: base_model: 'base': {name} leads outside the model's folder (to {secret}); "
        "refusing to read it\n"
    )


def test_a_symlinked_shard_and_device_files_are_refused(workdir):
    Path("ft2/model.safetensors").unlink()
    Path("ft2/model.safetensors").symlink_to("/dev/zero")
    assert "model.safetensors leads outside the model's folder (to /dev/zero)" in run_bad(GOOD)
    Path("ft2/model.safetensors").unlink()
    secret = workdir.parent / f"{workdir.name}-weights.safetensors"
    secret.write_bytes(Path("ft1/model-00001-of-00002.safetensors").read_bytes())
    Path("ft2/model.safetensors").symlink_to(secret)
    assert "leads outside the model's folder" in run_bad(GOOD)


def test_links_inside_the_folder_and_hugging_face_snapshots_are_fine(workdir):
    """A link that stays inside the folder is read; so is a Hugging Face cache snapshot given as a local
    path, whose files link into the repo's blobs beside it."""
    Path("ft2/real.bin.safetensors").write_bytes(Path("ft2/model.safetensors").read_bytes())
    Path("ft2/model.safetensors").unlink()
    Path("ft2/model.safetensors").symlink_to("real.bin.safetensors")
    snap = Path("models--org--ft1/snapshots/0123")
    snap.mkdir(parents=True)
    Path("models--org--ft1/blobs").mkdir()
    for f in Path("ft1").iterdir():
        (Path("models--org--ft1/blobs") / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    Path("recipe.yaml").write_text(GOOD.replace("model: ft1", f"model: {snap}"))
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[" * 10_000 + "]" * 10_000, "config.json nests deeper than 64 levels"),
        ("[1, 2]", "config.json is not a JSON object"),
        ('{"model_type": "llama", "vocab_file": "/home/you/.ssh/id_rsa"}', "config.json gives vocab_file: '/home/you/.ssh/id_rsa', a file outside the model's folder"),
    ],
)  # fmt: skip
def test_hostile_configs(workdir, content, problem):
    Path("base/config.json").write_text(content)
    err = run_bad(GOOD)
    assert (
        len(err.splitlines()) == 1 and err.startswith("error: recipe.yaml:2: base_model: 'base': ") and problem in err
    )


def test_tokenizer_config_naming_a_file_elsewhere_is_refused(workdir):
    Path("base/tokenizer_config.json").write_text(json.dumps({"vocab_file": "../../etc/passwd", "model_max_length": 8}))
    err = run_bad(GOOD)
    assert "tokenizer_config.json gives vocab_file: '../../etc/passwd', a file outside the model's folder" in err


def test_a_huge_support_file_is_refused_unread(workdir):
    Path("base/tokenizer.json").touch()
    os.truncate("base/tokenizer.json", 1 << 30)
    started = time.monotonic()
    assert "tokenizer.json is 1073741824 bytes, more than the 134217728 merger reads" in run_bad(GOOD)
    assert time.monotonic() - started < 5


def test_a_config_far_larger_than_any_published_is_refused_unparsed(workdir):
    """config.json is a few KB as published: one of 5 MB (here of many small values, which Python parses into
    about 70 bytes each: an 80 MB one took 5.8 GB and minutes) is refused before it is parsed."""
    config = json.loads(Path("base/config.json").read_text()) if Path("base/config.json").exists() else {}
    config["padding"] = [[0]] * (1 << 20)
    Path("base/config.json").write_text(json.dumps(config, separators=(",", ":")))
    size = Path("base/config.json").stat().st_size
    assert size > 4 << 20
    started = time.monotonic()
    assert f"config.json is {size} bytes, more than the 4194304 merger reads of such a file" in run_bad(GOOD)
    assert time.monotonic() - started < 5


def run_merger(*args: str, cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "merger", *args], capture_output=True, text=True, cwd=cwd, env=os.environ | (env or {}),
        timeout=timeout,
    )  # fmt: skip


def test_a_fifo_shard_does_not_hang(workdir):
    Path("ft2/model.safetensors").unlink()
    os.mkfifo("ft2/model.safetensors")
    Path("recipe.yaml").write_text(GOOD)
    started = time.monotonic()
    done = run_merger("apply", "recipe.yaml", cwd=workdir, timeout=30)
    assert done.returncode == 2 and time.monotonic() - started < 20
    assert done.stderr == (
        "error: recipe.yaml:8: models[1].model: 'ft2': model.safetensors is a FIFO; merger reads regular files only\n"
    )


# The merge maps ft2's shard, then another process truncates it: reading the lost pages raises SIGBUS.
TRUNCATE_WHILE_MAPPED = """
import os
import merger.sources as sources

_map = sources.MappedReader._map

def _truncated(self, file):
    mm = _map(self, file)
    if file.parent.name == "ft2":
        os.truncate(file, 8)
    return mm

sources.MappedReader._map = _truncated
"""


def test_a_shard_truncated_while_mapped_is_one_line_not_a_crash(workdir):
    big = {"a.weight": torch.ones(256, 256), "b.bias": torch.zeros(4), "ids": torch.arange(3)}  # pages past the cut
    write_checkpoint(Path("base"), big)
    write_checkpoint(Path("ft1"), big)
    write_checkpoint(Path("ft2"), big, n_shards=1)
    Path("recipe.yaml").write_text(GOOD)
    done = run_merger("apply", "recipe.yaml", "-q", cwd=workdir, env=hooked(workdir.parent, TRUNCATE_WHILE_MAPPED))
    assert done.returncode == 2, done.stderr
    shard = workdir / "ft2" / "model.safetensors"
    assert done.stderr == (
        f"error: {shard}: the file shrank while merger was reading it (it is 8 bytes now; another process "
        "truncated or rewrote it); nothing was written to the output\n"
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["base", "ft1", "ft2", "recipe.yaml"]


def test_a_relative_path_that_is_neither_local_nor_on_the_hub_says_both(workdir):
    err = run_bad(GOOD.replace("model: ft2", "model: models/ft2"))
    assert err == (
        f"error: recipe.yaml:8: models[1].model: 'models/ft2': no such directory in the working directory ({workdir}), "
        "and the Hub at http://127.0.0.1:9 cannot be reached to look for a model of that name; check the path, or "
        "the network (--offline uses the Hugging Face cache alone)\n"
    )


BOMB = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}' if p else 'x'] * 9)}]\n" for p, c in zip(["", *"abcdefgh"], "abcdefghi")
)


@pytest.mark.parametrize(
    ("recipe", "problem"),
    [
        (BOMB, "recipe.yaml:6: expands to more than 100000 values (aliases of aliases?); not a recipe merger reads"),
        ("a: &a [*a]\n", "recipe.yaml:1: the alias *a refers to the node that holds it; not a recipe merger reads"),
        ("merge_method: " + "[" * 5000 + "]" * 5000 + "\n", "recipe.yaml:1: nests deeper than 64 levels; not a recipe merger reads"),
        ("merge_method: !!python/object/apply:os.system [echo pwned]\n", "recipe.yaml:1: invalid YAML: could not determine a constructor"),
    ],
)  # fmt: skip
def test_hostile_yaml(workdir, recipe, problem):
    started = time.monotonic()
    assert run_bad(recipe).startswith(f"error: {problem}")
    assert time.monotonic() - started < 5


def test_a_recipe_too_large_or_not_text(workdir):
    assert run_bad("# " + "x" * (2 << 20)) == "error: recipe.yaml: more than 262144 bytes; not a recipe\n"
    Path("recipe.yaml").write_bytes(b"merge_method: ties\nmodels: \xff\n")
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml"])
    assert result.exit_code == 2 and result.stderr == "error: recipe.yaml:2: not UTF-8 text\n"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("weight: 0.5", "weight: 1e300", "recipe.yaml:10: models[1].parameters.weight: 1e+300 is beyond float32's range (3.4e+38)"),
        ("output:", "parameters: {lambda: 1e39}\noutput:", "recipe.yaml:11: parameters.lambda: 1e+39 is beyond float32's range (3.4e+38)"),
        ("weight: 0.5", "weight: 1e30", None),  # fine alone
        ("output:", "parameters: {lambda: 1e10}\noutput:", None),
    ],
)  # fmt: skip
def test_parameters_no_merge_can_keep_finite_are_refused(workdir, old, new, message):
    if message is None:
        Path("recipe.yaml").write_text(GOOD.replace(old, new))
        assert CliRunner().invoke(cli, ["plan", "recipe.yaml"]).exit_code == 0
        return
    assert run_bad(GOOD.replace(old, new), command="plan") == f"error: {message}\n"


def test_weight_times_lambda_and_normalising_by_a_tiny_sum_are_refused(workdir):
    err = run_bad(GOOD.replace("weight: 0.5", "weight: 1e30").replace("output:", "parameters: {lambda: 1e10}\noutput:"))
    assert err == (
        "error: recipe.yaml:10: models[1].parameters.weight: 1e+30 times lambda 1e+10 is beyond float32's range "
        "(3.4e+38)\n"
    )
    tiny = "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1e-40}\n  - model: ft2\n    parameters: {weight: 1e-40}\n"
    assert run_bad(tiny) == (
        "error: recipe.yaml: parameters.normalize: the weights sum to 2e-40; normalising divides by it, which is "
        "beyond float32's range: set normalize: false or change a weight\n"
    )


def test_finite_inputs_that_overflow_the_output_stop_the_merge_naming_the_tensor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    big = {"w": torch.full((8,), 60000.0), "v": torch.ones(8)}
    write_checkpoint(Path("a"), big)
    write_checkpoint(Path("b"), big)
    recipe = "merge_method: linear\nmodels: [{model: a}, {model: b}]\nparameters: {normalize: false}\ndtype: float16\n"
    err = run_bad(recipe + "output: {path: out}\n")
    assert err == (
        "error: tensor 'w': the merge gives 8 values that are inf or NaN in float16 although every input is finite "
        "there: the weights or scales take them past float16's range (about 6.55e+04); lower them, or write a wider "
        "dtype (dtype: float32)\n"
    )


def test_an_overflow_past_float32s_range_says_what_helps(tmp_path, monkeypatch):
    """Past float32's (or bfloat16's) range no wider output dtype helps: the weights do, or a float64
    computation where only the arithmetic overflowed (a task vector 3e38 - -3e38, whose merge fits)."""
    monkeypatch.chdir(tmp_path)
    write_checkpoint(Path("a"), {"w": torch.full((8,), 3e38), "v": torch.ones(8)})
    write_checkpoint(Path("b"), {"w": torch.full((8,), -3e38), "v": torch.ones(8)})
    for dtype, compute in (("float32", "float32"), ("bfloat16", "float32"), ("float32", "float64")):
        recipe = (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 2.0}}]\nparameters: {normalize: false}\n"
        )
        err = run_bad(recipe + f"dtype: {dtype}\ncompute_dtype: {compute}\noutput: {{path: out}}\n")
        largest = {"float32": "3.4e+38", "bfloat16": "3.39e+38"}[dtype]
        advice = (
            ", or the inputs lie near float32's; lower the weights, or compute in float64 (compute_dtype: float64)"
            if compute == "float32"
            else "; lower them"
        )
        assert err == (
            f"error: tensor 'w': the merge gives 8 values that are inf or NaN in {dtype} although every input is "
            f"finite there: the weights or scales take them past {dtype}'s range (about {largest}){advice}\n"
        )
    recipe = "merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a, parameters: {weight: 0.1}}]\n"
    run_bad(recipe + "dtype: float32\noutput: {path: out}\n")
    Path("f64.yaml").write_text(recipe + "compute_dtype: float64\ndtype: float32\n")
    result = CliRunner().invoke(cli, ["apply", "f64.yaml", "-o", "out", "-q"])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(load_output(Path("out"))["w"], torch.full((8,), -2.4e38))


def test_non_finite_inputs_may_give_non_finite_outputs(tmp_path, monkeypatch):
    """A buffer that holds -inf in every input (an attention mask) merges to -inf: that is not an error."""
    monkeypatch.chdir(tmp_path)
    masked = {"mask": torch.tensor([0.0, float("-inf")]), "v": torch.ones(8)}
    write_checkpoint(Path("a"), masked)
    write_checkpoint(Path("b"), masked)
    Path("r.yaml").write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\n")
    result = CliRunner().invoke(cli, ["apply", "r.yaml", "-o", "out", "-q"])
    assert result.exit_code == 0, result.output
    assert load_output(Path("out"))["mask"].tolist() == [0.0, float("-inf")]


def test_an_inf_or_nan_that_the_method_spreads_over_the_tensor_is_named(tmp_path, monkeypatch):
    """One NaN in a model: slerp's and Model Stock's norms and dot products take it in, and every entry of the
    output is NaN. Each output entry is checked against its own inputs, so the piece holding the NaN does not
    pass for an input's NaN: the error names the model that holds it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(merger.budget, "PIECE", 64)  # the NaN in the first of several pieces
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 32, generator=g), "v": torch.ones(8)}
    write_checkpoint(Path("base"), base)
    for name in ("a", "b"):
        write_checkpoint(Path(name), {"w": base["w"] + 0.1 * torch.randn(16, 32, generator=g), "v": torch.ones(8)})
    tensors = load_output(Path("b"))
    tensors["w"][0, 5] = float("nan")
    write_checkpoint(Path("b"), tensors)
    spread = (
        "error: tensor 'w': 1 entry of 'b' is inf or NaN, and {} spreads it over the tensor through what it takes "
        "of all its entries (a norm, a dot product or a sum): the merge gives inf or NaN where every input is "
        "finite. Is that checkpoint diverged?\n"
    )
    assert run_bad("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}\n"
                   "output: {path: out}\n") == spread.format("slerp")  # fmt: skip
    stock = "merge_method: model_stock\nbase_model: base\nmodels: [{model: a}, {model: b}]\noutput: {path: out}\n"
    assert run_bad(stock) == spread.format("model_stock")


@pytest.mark.parametrize("method", ["della", "dare_ties", "dare_linear", "breadcrumbs", "sce"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_task_vector_with_inf_or_nan_is_refused_where_its_sums_scale_every_entry(
    tmp_path, monkeypatch, method, value
):
    """DARE's and DELLA's rescale divides by each task vector's L1 norm, and SCE weighs each by its sum of
    squares: one inf or NaN makes that whole task vector inf or NaN (where signs are elected, none of its entries
    then agrees, and the output was silently the base). Refused, naming the model; with rescale: false the NaN
    stays at its own entry, and the merge goes on."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(16, 32, generator=g), "v": torch.ones(8)}
    write_checkpoint(Path("base"), base)
    for name in ("a", "b"):
        tensors = {"w": base["w"] + 0.1 * torch.randn(16, 32, generator=g), "v": torch.ones(8)}
        if name == "b":
            tensors["w"][3, 7] = value
        write_checkpoint(Path(name), tensors)
    per_model = "{weight: 0.5}" if method == "sce" else "{weight: 0.5, density: 0.5}"
    extra = "rescale: true" if method == "breadcrumbs" else ""
    recipe = (
        f"merge_method: {method}\nbase_model: base\nmodels: [{{model: a, parameters: {per_model}}}, "
        f"{{model: b, parameters: {per_model}}}]\nparameters: {{{extra}}}\nrandom_seed: 3\noutput: {{path: out}}\n"
    )
    what = (
        "SCE's weights, from the sums of the kept entries' squares, need"
        if method == "sce"
        else "rescaling the kept entries to the task vector's L1 norm (rescale: true) needs"
    )
    why = (
        "NaN (a NaN or an infinity in that model or in the base); breadcrumbs cannot rank NaN magnitudes"
        if method == "breadcrumbs" and value != value  # its trim ranks the magnitudes first
        else f"NaN or infinite (a NaN or an infinity in that model or in the base): {what} every entry finite"
    )
    assert run_bad(recipe) == (
        f"error: tensor 'w': 1 entry of the task vector of 'b' is {why}. Is one of those checkpoints diverged?\n"
    )
    if method == "sce" or "cannot rank" in why:
        return
    Path("recipe.yaml").write_text(recipe.replace("parameters: {" + extra + "}", "parameters: {rescale: false}"))
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"])
    assert result.exit_code == 0, result.output
    merged = load_output(Path("out"))["w"]
    assert not merged.isfinite().reshape(-1)[torch.arange(512) != 3 * 32 + 7].logical_not().any()


def _disk_fills_in_the_second_shard(monkeypatch) -> Callable:
    """ShardWriter.write fails with ENOSPC from the second shard on; returns the real one, to put back."""
    import errno

    import merger.stream

    write = merger.stream.ShardWriter.write
    calls = []

    def full(self, t, data):
        calls.append(self.path.name)
        if len(set(calls)) > 1:  # the first shard went through; the disk fills in the second
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, t, data)

    monkeypatch.setattr(merger.stream.ShardWriter, "write", full)
    return write


def test_a_full_disk_names_the_output_and_keeps_what_is_done(workdir, monkeypatch):
    import merger.stream

    write = _disk_fills_in_the_second_shard(monkeypatch)
    Path("recipe.yaml").write_text(GOOD)
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "--shard-size", "50"])
    assert result.exit_code == 2, result.output
    partial = workdir / ".out.merger-partial"
    assert result.stderr == (
        f"error: output {workdir / 'out'}: no space left on the device; 1 of 2 shards are done and kept in "
        f"{partial}: run the same command again to resume (or delete it)\n"
    )
    monkeypatch.setattr(merger.stream.ShardWriter, "write", write)
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "--shard-size", "50", "-q"])
    assert result.exit_code == 0, result.output
    assert not partial.exists()


def _free(monkeypatch, free: int, total: int = 10**12) -> None:
    """Every filesystem reports `free` bytes available (merger.fetch asks shutil.disk_usage)."""
    import collections
    import shutil

    import merger.fetch

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(merger.fetch.shutil, "disk_usage", lambda path: usage(total, 0, free))
    assert shutil.disk_usage is merger.fetch.shutil.disk_usage  # the one module: patched for this test only


def test_an_output_too_large_for_its_disk_is_refused_before_anything_is_written(workdir, monkeypatch):
    Path("recipe.yaml").write_text(GOOD)
    planned = json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--json"]).output)
    need = planned["disk"]["output_bytes"]
    assert planned["disk_short"] == []
    _free(monkeypatch, need - 1)
    short = (
        f"output {workdir / 'out'}: the output needs {need} B, and {workdir} has {need - 1} B free: free some "
        "space there or write the output elsewhere"
    )
    assert json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--json"]).output)["disk_short"] == [short]
    said = CliRunner().invoke(cli, ["plan", "recipe.yaml"])
    assert said.exit_code == 0 and f"  no room:      {short} (`merger apply` refuses to start)\n" in said.output
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"])
    assert (result.exit_code, result.stderr) == (2, f"error: {short}\n")
    assert sorted(p.name for p in workdir.iterdir()) == ["base", "ft1", "ft2", "recipe.yaml"]  # nothing written
    _free(monkeypatch, need)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"]).exit_code == 0


def test_a_disk_with_no_room_left_at_all_is_refused_with_what_the_output_needs(workdir, monkeypatch):
    """At 0 bytes free the output's first record (the partial folder's state) cannot be written either: the
    refusal still says what the output needs and what is free, not the write's errno."""
    import errno

    import merger.staging
    from merger.errors import sized

    Path("recipe.yaml").write_text(GOOD)
    need = json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--json"]).output)["disk"]["output_bytes"]
    _free(monkeypatch, 0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(merger.staging, "write_json", full)
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"])
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: output {workdir / 'out'}: the output needs {sized(need)}, and {workdir} has 0 B free: free some space "
        "there or write the output elsewhere\n",
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["base", "ft1", "ft2", "recipe.yaml"]  # nothing written


def test_the_room_asked_for_covers_every_file_of_the_output(workdir):
    """What plan says the output needs holds all it writes, not only the tensors' bytes: the shards'
    headers, the tokenizer files copied from the base (a large tokenizer.json here), config, index, card,
    lock and the partial output's records, each file on whole blocks; and not much more."""
    Path("base/tokenizer.json").write_text(
        '{"model": {"vocab": {' + ",".join(f'"t{i}": {i}' for i in range(30000)) + "}}}"
    )
    Path("recipe.yaml").write_text(GOOD)
    need = json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--shard-size", "50", "--json"]).output)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "--shard-size", "50", "-q"]).exit_code == 0
    files = list(Path("out").iterdir())
    assert "tokenizer.json" in {f.name for f in files}
    taken = sum(-(-f.stat().st_size // 4096) * 4096 for f in files)  # on whole blocks, as a file system keeps them
    assert taken <= need["disk"]["output_bytes"] <= taken + (96 << 10)
    assert need["disk"]["output_bytes"] > Path("base/tokenizer.json").stat().st_size + sum(
        s["bytes"] for s in need["shards"]
    )


def test_a_filesystem_that_tells_no_size_is_not_held_to_its_free_space(workdir, monkeypatch):
    """Some FUSE and network filesystems report a total and free space of 0: unknown, not full."""
    Path("recipe.yaml").write_text(GOOD)
    _free(monkeypatch, 0, total=0)
    assert json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--json"]).output)["disk_short"] == []
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"]).exit_code == 0


def test_a_resumed_merge_needs_room_for_the_shards_left(workdir, monkeypatch):
    """The shards an interrupted run finished are on disk already: the room asked for is the rest's."""
    import merger.stream

    write = _disk_fills_in_the_second_shard(monkeypatch)
    Path("recipe.yaml").write_text(GOOD)
    whole = json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--shard-size", "50", "--json"]).output)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "--shard-size", "50"]).exit_code == 2
    monkeypatch.setattr(merger.stream.ShardWriter, "write", write)
    planned = json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--shard-size", "50", "--json"]).output)
    left = planned["disk"]["output_bytes"]
    # the first shard's data is on disk: the rest is left, with the files written whatever is (index, card, lock)
    assert left == whole["disk"]["output_bytes"] - planned["shards"][0]["bytes"] > planned["shards"][1]["bytes"]
    _free(monkeypatch, left - 1)
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "--shard-size", "50", "-q"])
    assert result.exit_code == 2
    assert result.stderr.endswith(
        f"has {left - 1} B free: free some space there or write the output elsewhere; 1 of 2 shards are done and "
        f"kept in {workdir / '.out.merger-partial'}: run the same command again to resume (or delete it)\n"
    )
    _free(monkeypatch, left)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "--shard-size", "50", "-q"]).exit_code == 0


# --- outputs --------------------------------------------------------------------------------------------


def test_force_never_replaces_a_directory_merger_did_not_write(workdir):
    Path("mine").mkdir()
    Path("mine/thesis.tex").write_text("years of work")
    err = run_bad(GOOD, "-o", "mine", "--force")
    assert err == (
        f"error: output {workdir / 'mine'} is not a merger output (it holds no merger.lock.json); --force replaces "
        "only an earlier merger output or an empty directory\n"
    )
    Path("notes.txt").write_text("mine")
    assert run_bad(GOOD, "-o", "notes.txt", "--force") == (
        f"error: output {workdir / 'notes.txt'} is a file, not a directory; --force replaces only an earlier merger "
        "output or an empty directory\n"
    )
    assert run_bad(GOOD, "-o", ".", "--force").startswith(f"error: output {workdir} contains input model")
    # without --force: the same, never "pass --force to replace it", which --force would then refuse
    assert run_bad(GOOD, "-o", "mine") == err
    assert run_bad(GOOD, "-o", "notes.txt").endswith(" is a file, not a directory; --force replaces only an earlier "
                                                    "merger output or an empty directory\n")  # fmt: skip
    assert Path("mine/thesis.tex").read_text() == "years of work"


def test_force_replaces_an_earlier_output_or_an_empty_directory_only(workdir):
    Path("recipe.yaml").write_text(GOOD)
    Path("empty").mkdir()
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-o", "empty", "--force", "-q"]).exit_code == 0
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "--force", "-q"]).exit_code == 0
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "--force", "-q"]).exit_code == 0  # its own output
    Path("out/eval-results.json").write_text("{}")
    err = run_bad(GOOD, "--force")
    assert err == (
        f"error: output {workdir / 'out'} holds 'eval-results.json', which merger did not write; --force replaces "
        "only an earlier merger output or an empty directory: move it away first\n"
    )
    assert Path("out/eval-results.json").exists()


def test_replacing_uses_one_atomic_exchange(workdir, monkeypatch):
    """--force swaps the new output with the old one in one rename (RENAME_EXCHANGE), so no signal can
    find the destination missing; where the file system cannot, the old output is moved aside with the
    signals held, and a run killed between the two renames puts it back the next time."""
    import merger.staging

    Path("recipe.yaml").write_text(GOOD)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"]).exit_code == 0
    calls = []
    real = merger.staging._renameat2
    monkeypatch.setattr(merger.staging, "_renameat2", lambda a, b, flags: calls.append(flags) or real(a, b, flags))
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "--force", "-q"]).exit_code == 0
    assert merger.staging._RENAME_EXCHANGE in calls
    before = sorted(p.name for p in Path("out").iterdir())

    # no exchange here, and killed between the two renames: the old output is set aside, not lost, and the
    # next run puts it back before anything else
    no_exchange = hooked(workdir.parent, NO_EXCHANGE + KILL_IN) | {"KILL_IN": "os:rename", "KILL_AT": "2"}
    assert run_merger("apply", "recipe.yaml", "--force", "-q", cwd=workdir, env=no_exchange).returncode == -9
    assert not Path("out").exists() and sorted(p.name for p in Path(".out.merger-partial/old").iterdir()) == before
    plan = run_merger("plan", "recipe.yaml", cwd=workdir)
    assert plan.returncode == 0, plan.stderr
    again = run_merger("apply", "recipe.yaml", "-q", cwd=workdir)  # without --force: the old output is back first
    assert (
        again.returncode == 2
        and again.stderr == f"error: output {workdir / 'out'} already exists; pass --force to replace it\n"
    )
    assert sorted(p.name for p in Path("out").iterdir()) == before
    again = run_merger("apply", "recipe.yaml", "--force", "-q", cwd=workdir, env=hooked(workdir.parent, NO_EXCHANGE))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in Path("out").iterdir()) == before
    assert not Path(".out.merger-partial").exists()


NO_EXCHANGE = """
import merger.staging
merger.staging._renameat2 = lambda *a: False
"""


def test_leftovers_of_killed_runs_are_removed_by_the_next(workdir):
    """Staging directories of earlier merger versions and candidates of a killed greedy soup, beside the
    output, go at the next run into that output; a candidate a live process holds stays."""
    import merger.staging

    for name in (".out.123.merger-tmp", ".out.4242.merger-old", ".merger-candidate-abc"):
        Path(name).mkdir()
        (Path(name) / "model-00001-of-00001.safetensors").write_bytes(bytes(100))
    held, fd = merger.staging.temporary(workdir)
    try:
        Path("recipe.yaml").write_text(GOOD)
        assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"]).exit_code == 0
        assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".")) == [held.name]
    finally:
        os.close(fd)


def test_every_shard_and_the_directory_are_on_disk_before_the_rename(workdir, monkeypatch):
    import merger.files
    import merger.staging
    import merger.stream

    events = []
    fsync = os.fsync

    def spy(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    rename = merger.staging._rename_new
    monkeypatch.setattr(merger.staging, "_rename_new", lambda a, b: events.append(("rename", str(b))) or rename(a, b))
    Path("recipe.yaml").write_text(GOOD)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q", "--shard-size", "50"]).exit_code == 0
    synced = [p for kind, p in events if kind == "fsync"]
    at = events.index(("rename", str(workdir / "out")))
    for f in Path("out").iterdir():
        staged = str(workdir / ".out.merger-partial" / "model" / f.name)
        assert staged in synced[:at], f.name  # each file before the rename
    assert str(workdir / ".out.merger-partial" / "model") in synced[:at]
    assert events[at + 1] == ("fsync", str(workdir))  # the rename itself, after
    for shard in Path("out").glob("*.safetensors"):  # a shard's marker only once the shard is on disk
        marker = str(workdir / ".out.merger-partial" / "done" / f".{shard.name}.json")
        on_disk = synced.index(str(workdir / ".out.merger-partial" / "model" / shard.name))
        assert any(p.startswith(marker) for p in synced[on_disk:]), shard.name


# --- locks ----------------------------------------------------------------------------------------------


def test_locked_refuses_a_shard_rewritten_with_the_same_size_and_mtime(workdir):
    import hashlib

    Path("recipe.yaml").write_text(GOOD)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"]).exit_code == 0
    shard = Path("ft2/model.safetensors")
    st = shard.stat()
    old = hashlib.sha256(shard.read_bytes()).hexdigest()
    data = bytearray(shard.read_bytes())
    data[-9] ^= 1  # a float of ids' neighbour a bit off
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = hashlib.sha256(bytes(data)).hexdigest()
    result = CliRunner().invoke(cli, ["apply", "--locked", "out/merger.lock.json", "-o", "again"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: out/merger.lock.json: 'ft2': model.safetensors has changed since the lock (sha256 {old[:12]}, "
        f"{len(data)} bytes then, sha256 {new[:12]}, {len(data)} bytes now)\n"
    )
    assert not Path("again").exists()
    # the lock a run writes holds the hash of what it read, not what a cache remembered
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q", "--force"]).exit_code == 0
    lock = json.loads(Path("out/merger.lock.json").read_text())
    ft2 = next(i for i in lock["inputs"] if i["refs"] == ["ft2"])
    assert ft2["files"]["model.safetensors"]["sha256"] == new


# --- no pickle, no stray processes --------------------------------------------------------------------


def test_the_command_for_pickled_weights_converts_them_for_merging_with_safetensors_fine_tunes(workdir):
    """The conversion the message gives keeps every tensor's name (no architecture's class that renames
    them), saves a tied head once, as transformers' safetensors do, and reads sharded checkpoints; its
    result merges with a safetensors fine-tune. Pickles as transformers 4 wrote them: shards, an index."""
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.norm.weight"]  # fmt: skip
    state = {n: torch.randn(6, 4, generator=g) for n in names}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: one storage, pickled once
    square = torch.randn(4, 4, generator=g)
    views = {"model.layers.1.self_attn.q_proj.weight": square, "model.layers.1.self_attn.k_proj.weight": square.t()}
    state |= views  # one storage, two distinct tensors (same pointer and shape, other strides): both kept
    Path("pickled").mkdir()
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:2] + ["lm_head.weight"],
        "pytorch_model-00002-of-00002.bin": names[2:] + list(views),
    }
    for fname, keys in shards.items():
        torch.save({k: state[k] for k in keys}, f"pickled/{fname}")
    index = {"weight_map": {k: fname for fname, keys in shards.items() for k in keys}}
    Path("pickled/pytorch_model.bin.index.json").write_text(json.dumps(index))
    Path("pickled/training_args.bin").write_bytes(b"\x80\x04not weights")
    Path("pickled/config.json").write_text('{"model_type": "llama", "tie_word_embeddings": true}')
    tuned = {n: v + 1 for n, v in state.items() if n != "lm_head.weight"}  # as transformers saves a tied model
    write_checkpoint(Path("st"), tuned)
    recipe = "merge_method: linear\nmodels: [{model: pickled}, {model: st}]\noutput: {path: out}\n"
    err = run_bad(recipe)
    intro = (
        "error: recipe.yaml:2: models[0].model: 'pickled' holds only pickled weights (pytorch_model-00001-of-00002.bin, "
        "pytorch_model-00002-of-00002.bin, training_args.bin); merger reads safetensors only, since pickles can run "
        "code. Convert them once, each tensor kept under its name: "
    )
    assert err.startswith(intro) and len(err.splitlines()) == 1, err
    command = err.removeprefix(intro).strip()
    assert command.startswith("cd pickled && python -c ")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])  # `python`: this one
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=os.environ | {"PATH": path})
    assert done.returncode == 0, done.stderr
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"])
    assert result.exit_code == 0, result.output
    out = load_output(Path("out"))
    assert sorted(out) == sorted(tuned)
    for name, merged in out.items():
        torch.testing.assert_close(merged, state[name] + 0.5, rtol=0, atol=1e-6)


def test_the_advice_for_pickled_weights_never_quotes_a_strangers_file_name():
    """A file name is the input's to choose (`$(...)` would run when the line is pasted): the command is
    only given for transformers' names, and never holds one."""
    from merger.sources import CONVERT, no_weights

    names = ["pytorch_model.bin", "x$(touch pwned).bin"]
    assert str(no_weights("ft", names)).endswith(f'name: cd ft && python -c "{CONVERT}"')
    assert str(no_weights("org/ft@v1", names)).endswith(
        f"name: test ! -e ft-safetensors && hf download org/ft --revision v1 --local-dir ft-safetensors && "
        f'cd ft-safetensors && python -c "{CONVERT}", then name '
        "that folder in the recipe"
    )
    assert str(no_weights("odd dir", ["model.pt"])) == (
        "'odd dir' holds only pickled weights (model.pt); merger reads safetensors only, since pickles can run "
        "code. Convert them once, each tensor kept under its name: load each weight file with "
        "torch.load(f, weights_only=True) and write its tensors with safetensors' save_file (a tensor that "
        "shares another's memory, as tied embeddings do, once)"
    )
    assert "pwned" not in str(no_weights("ft", ["x$(touch pwned).bin"])).split("; ", 1)[1]


def test_compiled_kernels_are_cached_only_in_a_private_directory(tmp_path):
    probe = "import merger.kernels as k; print(k.CACHE, getattr(k.count_masked._cache, '_cache_path', None))"
    private = tmp_path / "private"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=os.environ | {"MERGER_CACHE_DIR": str(private), "NUMBA_CACHE_DIR": str(tmp_path / "elsewhere")})  # fmt: skip
    assert done.stdout.split()[0] == "True" and done.stdout.split()[1].startswith(str(private / "numba")), done
    assert oct(private.stat().st_mode & 0o777) == "0o700" and oct((private / "numba").stat().st_mode & 0o777) == "0o700"
    shared = tmp_path / "shared"
    (shared / "numba").mkdir(parents=True)
    (shared / "numba").chmod(0o777)  # others may write there: its pickles are not to be trusted
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=os.environ | {"MERGER_CACHE_DIR": str(shared)})  # fmt: skip
    assert done.stdout.split()[0] == "False", done


class _Where:
    """What CommandEvaluator asks of a plan: where its recipe names the command."""

    class spec:
        @staticmethod
        def where(*loc):
            return "recipe.yaml:9: evaluation.command"


class _Candidate:
    label = "a + b"

    def __init__(self, path: Path):
        self.path = path


def _started_in_background(tmp_path: Path, timeout: float | None = None):
    """A command evaluator whose command leaves a child running in the background (its pid in a file)."""
    from merger.evaluate import CommandEvaluator
    from merger.recipe import CommandEvaluation

    pid_file = tmp_path / "pid"
    command = f"sleep 60 & echo $! > {pid_file}; wait # {{model}}"
    ev = CommandEvaluation(evaluator="command", command=command, direction="lower", timeout=timeout)
    return CommandEvaluator(ev, _Where()), pid_file


def _gone(pid_file: Path) -> bool:
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(f"/proc/{child}")


def test_an_evaluator_command_that_times_out_is_ended_with_everything_it_started(tmp_path):
    from merger.errors import EvaluationError

    evaluator, pid_file = _started_in_background(tmp_path, timeout=1)
    started = time.monotonic()
    with pytest.raises(EvaluationError, match="timed out after 1 s on a \\+ b"):
        evaluator.score(_Candidate(tmp_path))
    assert time.monotonic() - started < 5
    assert _gone(pid_file), "the command's background child outlived the timeout"


def test_an_interrupted_evaluator_command_is_ended_with_everything_it_started(tmp_path):
    import signal
    import threading

    evaluator, pid_file = _started_in_background(tmp_path)
    main = threading.main_thread().ident
    # Ctrl-C as Python handles it by default: a run that a non-interactive shell started in the background
    # (nohup make test &) inherits SIGINT ignored, and Python then installs no handler for it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(1.0, lambda: signal.pthread_kill(main, signal.SIGINT)).start()  # Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            evaluator.score(_Candidate(tmp_path))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _gone(pid_file), "the command's background child outlived the interrupt"


def test_a_recipe_or_lock_from_a_pipe_is_read_and_one_nothing_writes_to_is_refused(workdir):
    """`merger apply <(make-recipe)` works; a FIFO that nothing writes to is refused instead of waiting."""
    os.mkfifo("fifo.yaml")
    started = time.monotonic()
    done = run_merger("plan", "fifo.yaml", cwd=workdir, timeout=30)
    assert done.returncode == 2 and time.monotonic() - started < 10
    assert done.stderr == "error: fifo.yaml: cannot read recipe: it is a pipe that nothing wrote to\n"
    done = run_merger("plan", "--locked", "fifo.yaml", cwd=workdir, timeout=30)
    assert done.stderr == "error: fifo.yaml: cannot read lock file: it is a pipe that nothing wrote to\n"
    piped = subprocess.run(
        f"{sys.executable} -m merger plan <(cat <<'EOF'\n{GOOD}EOF\n)", shell=True, executable="/bin/bash",
        cwd=workdir, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert (
        run_merger("plan", "/dev/null", cwd=workdir).stderr
        == "error: /dev/null: cannot read recipe: it is a character device, not a file\n"
    )


def test_odd_output_paths_are_one_line_before_anything_is_written(workdir):
    assert run_bad(GOOD.replace("path: out", 'path: "o\\0ut"'), command="plan") == (
        "error: recipe.yaml:12: output.path: must not contain a NUL character, got 'o\\x00ut'\n"
    )
    Path("notes.txt").write_text("mine")
    for command in ("plan", "apply"):
        assert run_bad(GOOD.replace("path: out", "path: notes.txt/out"), command=command) == (
            f"error: output {workdir / 'notes.txt' / 'out'}: {workdir / 'notes.txt'} is a file, not a directory to hold it\n"
        )
        assert run_bad(GOOD.replace("path: out", "path: base"), command=command) == (
            f"error: output {workdir / 'base'} is inside input model 'base'; choose another directory\n"
        )
    assert run_bad(GOOD.replace("path: out", "path: /proc/merger-out")).startswith(
        "error: output /proc/merger-out: cannot create /proc/.merger-out.merger-partial: "
    )


def test_a_failed_merge_removes_the_directories_it_made_for_the_output(workdir):
    """A merge that fails (here on the weights' sum, checked late by the engine's finiteness test)
    leaves no trace: not even the parent directories it created to hold the output."""
    big = {"a.weight": torch.full((4, 4), 3e38), "b.bias": torch.zeros(4), "ids": torch.arange(3)}
    write_checkpoint(Path("ft1"), big)
    write_checkpoint(Path("ft2"), big, n_shards=1)
    recipe = "merge_method: linear\nmodels: [{model: ft1}, {model: ft2}]\nparameters: {normalize: false}\noutput: {path: new/deep/out}\n"
    err = run_bad(recipe)
    assert (
        err.startswith("error: tensor 'a.weight': the merge gives 16 values that are inf or NaN in float32")
        and err[-1] == "\n"
    )
    assert not Path("new").exists()


def test_weights_that_sum_past_the_range_are_refused(workdir):
    recipe = "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 3e38}\n  - model: ft2\n    parameters: {weight: 3e38}\n"
    assert run_bad(recipe) == (
        "error: recipe.yaml:2: models: the weights sum to 6e+38, which times lambda 1 is beyond float32's range "
        "(3.4e+38): lower them\n"
    )


def test_plan_checks_a_lock_as_far_as_it_can_without_reading(workdir):
    Path("recipe.yaml").write_text(GOOD)
    assert CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q"]).exit_code == 0
    assert CliRunner().invoke(cli, ["plan", "--locked", "out/merger.lock.json"]).exit_code == 0
    lock = json.loads(Path("out/merger.lock.json").read_text())
    Path("bad.json").write_text(json.dumps(lock | {"shard_size": -1}))
    result = CliRunner().invoke(cli, ["plan", "--locked", "bad.json"])
    assert result.exit_code == 2 and result.stderr.startswith("error: bad.json: not a merger lock file (shard_size: ")
    Path("ft2/model.safetensors").write_bytes(Path("ft2/model.safetensors").read_bytes() + bytes(8))
    result = CliRunner().invoke(cli, ["plan", "--locked", "out/merger.lock.json"])
    assert result.exit_code == 2
    assert "'ft2': model.safetensors has changed since the lock" in result.stderr or "bytes follow" in result.stderr


def test_a_damaged_kernel_cache_is_compiled_again(tmp_path):
    """A crash or a full disk can leave numba's cache files cut short; numba itself raises on them. The
    merge compiles those kernels again instead."""
    probe = "import numpy as np, merger.kernels as k; print(k.count_masked(np.zeros(4, np.uint16), np.uint16(0x7c00)))"
    env = os.environ | {"MERGER_CACHE_DIR": str(tmp_path / "cache")}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout == "0\n"
    cached = list((tmp_path / "cache" / "numba").rglob("*.nb*"))
    assert cached
    for f in cached:
        f.write_bytes(f.read_bytes()[:20])
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "0\n", done.stderr


def test_a_partial_output_that_is_a_link_is_never_followed(workdir, tmp_path_factory):
    """Someone else's link in place of the partial directory (in a shared /tmp, say) must not make merger
    clear out the directory it points to."""
    elsewhere = tmp_path_factory.mktemp("important")
    (elsewhere / "thesis.tex").write_text("years of work")
    Path(".out.merger-partial").symlink_to(elsewhere)
    err = run_bad(GOOD)
    assert err == (
        f"error: output {workdir / 'out'}: {workdir / '.out.merger-partial'} is in the way (not a merger partial "
        "output); remove it\n"
    )
    assert (elsewhere / "thesis.tex").read_text() == "years of work"


def test_interrupts_wait_for_the_end_of_a_held_section():
    """The two renames that put an output in place (where the file system cannot exchange) and the
    clearing up after them are one step for Ctrl-C: an interrupt meanwhile is raised when they end."""
    from merger import system

    steps = []
    with pytest.raises(KeyboardInterrupt), system.interrupts_held():
        system.interrupt()  # what the CLI's signal handler does
        steps.append("first rename")
        steps.append("second rename")
    assert steps == ["first rename", "second rename"] and system.INTERRUPTED.is_set()
    system.INTERRUPTED.clear()

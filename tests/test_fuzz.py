"""Fuzzing the two readers of untrusted text: the recipe loader and the safetensors header reader. Whatever
they are given, they either accept it or raise their one-line domain error: never another exception (a
traceback), never a hang. Derandomized, so CI sees the same inputs every run."""

from __future__ import annotations

import json
import math
import struct

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merger.errors import ModelError, RecipeError
from merger.files import Folder
from merger.recipe import parse_recipe
from merger.sources import describe, scan_file

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip

KEYS = ["merge_method", "models", "model", "base_model", "parameters", "weight", "density", "lambda", "normalize",
        "dtype", "out_dtype", "compute_dtype", "tokenizer_source", "device", "output", "path", "shard_size", "hub",
        "repo_id", "evaluation", "evaluator", "data", "command", "function", "direction", "accept", "cache",
        "consensus_method", "slices", "x"]  # fmt: skip
METHODS = ["linear", "ties", "task_arithmetic", "greedy_soup", "slerp", ""]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e300, -1e39, 5e-324, 0.5, 1, 0, -1])
    | st.sampled_from(METHODS + ["ft1", "org/name", "../x", "/dev/zero", "bfloat16", "cuda", "5GB", "-1GB", ">="])
    | st.text(max_size=8)
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=25,
)  # fmt: skip
RECIPES = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(METHODS)},
    optional={
        "models": st.lists(
            st.fixed_dictionaries({"model": SCALARS}, optional={"parameters": st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3)}),
            max_size=3,
        ),
        "base_model": SCALARS,
        "parameters": st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4),
        "dtype": SCALARS,
        "output": VALUES,
        "evaluation": VALUES,
        "hub": VALUES,
    },
).map(lambda d: d | {"extra": None} if len(d) > 6 else d)  # fmt: skip


def parses_or_refuses(text: str) -> None:
    try:
        parse_recipe(text, name="fuzz.yaml")
    except RecipeError as e:
        assert all(line.startswith("fuzz.yaml") for line in e.problems), e.problems


@FUZZ
@given(RECIPES)
def test_recipes_shaped_like_recipes(data):
    parses_or_refuses(yaml.safe_dump(data, sort_keys=False))


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_as_a_recipe(text):
    parses_or_refuses(text)


YAML_BITS = st.sampled_from(
    ["&a ", "*a", "&b [", "*b", "[", "]", "{", "}", ": ", "- ", "\n", "  ", "!!python/object ", "!!binary ", "? ",
     "merge_method", "models", "|", ">", "'", '"', "%YAML 1.1\n", "---\n", "...\n", "<<: *a\n", "x", "1e400"]
)  # fmt: skip


@FUZZ
@given(st.lists(YAML_BITS, max_size=60).map("".join))
def test_yaml_made_of_its_sharp_edges(text):
    parses_or_refuses(text)


ENTRY_VALUES = (
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=6)
    | st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "F8_E4M3", "U64", "F33"])
)  # fmt: skip
ENTRIES = st.dictionaries(
    st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
    ENTRY_VALUES | st.lists(ENTRY_VALUES, max_size=4) | st.dictionaries(st.text(max_size=3), ENTRY_VALUES, max_size=2),
    max_size=4,
)  # fmt: skip
HEADERS = st.dictionaries(
    st.text(max_size=6) | st.just("__metadata__"),
    ENTRIES | ENTRY_VALUES | st.lists(ENTRY_VALUES, max_size=3),
    max_size=5,
)


@FUZZ
@given(HEADERS, st.integers(min_value=0, max_value=4096), st.integers(min_value=-10, max_value=10**6))
def test_any_header_is_described_or_refused(header, data_start, size):
    from pathlib import Path

    try:
        tensors = describe(header, data_start, size, Path("x.safetensors"))
    except ModelError as e:
        assert str(e).startswith("x.safetensors: ") and "\n" not in str(e)
        return
    for t in tensors.values():  # what it accepts is consistent
        assert t.nbytes >= 0 and data_start <= t.start and t.start + t.nbytes <= size
        assert t.numel == math.prod(t.shape)


@FUZZ
@given(st.binary(max_size=400) | HEADERS.map(lambda h: _framed(json.dumps(h).encode(), 16)))
def test_any_file_is_scanned_or_refused(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("scan")
    (folder / "model.safetensors").write_bytes(raw)
    try:
        scan_file(Folder.of(folder, "fuzz"), "model.safetensors")
    except ModelError as e:
        assert "\n" not in str(e)


def _framed(header: bytes, data: int) -> bytes:
    return struct.pack("<Q", len(header)) + header + bytes(data)

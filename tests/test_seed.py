"""The seed of methods that sample: the recipe's random_seed, or --random-seed, reaches every tensor's
TensorContext as tensor_seed(seed, name), is recorded in the lock and used again by --locked."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint

from merger import methods
from merger.cli import cli
from merger.methods import Method, Params, TensorContext

NAMES = ["embed.weight", "layers.0.w", "layers.1.w"]


def probe(tensors, base, models, params, *, context: TensorContext | None = None):
    """Writes each tensor's seed mod 1000 (exact in float32): what a sampling method would be given."""
    return torch.full_like(tensors[0], float(context.seed % 1000))


PROBE = Method("seed_probe", probe, Params, Params, needs_base=False, summary="test: the tensor's seed")


def oracle(seed: int, name: str) -> float:
    """sha256 of "seed:name", first 8 bytes little-endian, the top bit dropped: written here, not imported."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return float((int.from_bytes(digest[:8], "little") >> 1) % 1000)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    methods.all_methods()  # the built-ins first; the probe registered for this test only
    monkeypatch.setitem(methods._registry, "seed_probe", PROBE)
    g = torch.Generator().manual_seed(0)
    write_checkpoint(tmp_path / "a", {n: torch.randn(3, 2, generator=g) for n in NAMES}, n_shards=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def apply(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, ["apply", *args, "-q"])
    assert result.exit_code == code, result.output
    return result


def seeds(out) -> dict[str, float]:
    return {name: float(t[0, 0]) for name, t in load_output(out).items()}


def test_the_recipes_seed_reaches_every_tensor_and_the_lock(workdir):
    (workdir / "r.yaml").write_text("merge_method: seed_probe\nrandom_seed: 5\nmodels: [{model: a}]\n")
    apply("r.yaml", "-o", "out")
    assert seeds(workdir / "out") == {n: oracle(5, n) for n in NAMES}
    assert json.loads((workdir / "out" / "merger.lock.json").read_text())["random_seed"] == 5
    assert "\nRandom seed: 5.\n" in (workdir / "out" / "README.md").read_text()  # the model card


def test_random_seed_option_overrides_the_recipe_and_locked_reruns_use_it(workdir):
    (workdir / "r.yaml").write_text("merge_method: seed_probe\nmodels: [{model: a}]\n")
    apply("r.yaml", "-o", "default")
    assert seeds(workdir / "default") == {n: oracle(0, n) for n in NAMES}  # no random_seed: 0
    apply("r.yaml", "-o", "nine", "--random-seed", "9")
    assert seeds(workdir / "nine") == {n: oracle(9, n) for n in NAMES}
    assert json.loads((workdir / "nine" / "merger.lock.json").read_text())["random_seed"] == 9
    card = (workdir / "nine" / "README.md").read_text()
    assert "Random seed: 9 (set outside the recipe: `--random-seed`, or a lock file's; the recipe below says 0)" in card
    assert "Random seed" not in (workdir / "default" / "README.md").read_text()  # the default, as the recipe says
    apply("--locked", "nine/merger.lock.json", "-o", "again")
    assert seeds(workdir / "again") == seeds(workdir / "nine")
    assert "Random seed: 9 (set outside the recipe" in (workdir / "again" / "README.md").read_text()
    apply("--locked", "nine/merger.lock.json", "-o", "other", "--random-seed", "3")  # the option still wins
    assert seeds(workdir / "other") == {n: oracle(3, n) for n in NAMES}


def test_a_changed_seed_does_not_resume_an_output_of_another(workdir):
    from merger.cli import _plan
    from merger.staging import fingerprint

    (workdir / "r.yaml").write_text("merge_method: seed_probe\nmodels: [{model: a}]\n")
    one, _ = _plan("r.yaml", None, None, None, False, 1)
    two, _ = _plan("r.yaml", None, None, None, False, 2)
    assert fingerprint(one) != fingerprint(two)


def test_a_seed_out_of_range_is_refused_at_its_line(workdir):
    (workdir / "r.yaml").write_text("merge_method: seed_probe\nmodels: [{model: a}]\nrandom_seed: -1\n")
    result = apply("r.yaml", "-o", "out", code=2)
    assert result.stderr == "error: r.yaml:3: random_seed: Input should be greater than or equal to 0, got -1\n"
    result = apply("r.yaml", "-o", "out", "--random-seed", "x", code=2)
    assert "'x' is not a valid integer" in result.stderr
    assert not (workdir / "out").exists()


def test_plan_shows_the_seed(workdir):
    (workdir / "r.yaml").write_text("merge_method: seed_probe\nmodels: [{model: a}]\nrandom_seed: 11\n")
    shown = CliRunner().invoke(cli, ["plan", "r.yaml"])
    assert shown.exit_code == 0 and "random seed:  11 (each tensor's draws follow from it)" in shown.output
    as_json = CliRunner().invoke(cli, ["plan", "r.yaml", "--json", "--random-seed", "4"])
    assert json.loads(as_json.stdout)["random_seed"] == 4

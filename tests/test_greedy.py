"""Greedy soup: the selection worked by hand, command and python evaluators end to end, the score cache,
and failures that stop with one clear message and leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output, write_checkpoint

from merger import hashes
from merger.cli import cli
from merger.evaluate import parse_score
from merger.soup import search

# --- the greedy loop on known scores -----------------------------------------------------------------

A, B, C, D = range(4)
# Lower is better. Alone, the order is B (1.0), C (2.0), A (3.0), D (4.0).
LOWER = {
    (A,): 3.0, (B,): 1.0, (C,): 2.0, (D,): 4.0,
    (B, C): 1.0,  # no worse than B: kept under >=, not under >
    (A, B, C): 0.9,  # >=: better, kept
    (A, B, C, D): 0.95,  # >=: worse, rejected; also the uniform soup
    (A, B): 0.8,  # >: better than B alone, kept
    (A, B, D): 0.8,  # >: only equal, rejected
}  # fmt: skip


def run_search(scores: dict, *, higher: bool, strict: bool):
    calls: list[tuple] = []

    def score(subset: tuple[int, ...]) -> float:
        calls.append(subset)
        return scores[subset]

    return search(4, score, higher=higher, strict=strict), calls


@pytest.mark.parametrize("higher", [False, True])
def test_known_scores_not_worse(higher):
    scores = {k: -v for k, v in LOWER.items()} if higher else LOWER  # the same problem, mirrored
    result, calls = run_search(scores, higher=higher, strict=False)
    assert result.order == [B, C, A, D]
    assert [(i, ok) for i, _, _, ok in result.steps] == [(C, True), (A, True), (D, False)]
    assert [soup for _, soup, _, _ in result.steps] == [[B, C], [B, C, A], [B, C, A, D]]
    assert result.selected == [B, C, A]
    assert result.score == scores[(A, B, C)]
    assert result.uniform == scores[(A, B, C, D)]
    assert calls == [(A,), (B,), (C,), (D,), (B, C), (A, B, C), (A, B, C, D), (A, B, C, D)]


@pytest.mark.parametrize("higher", [False, True])
def test_known_scores_strictly_better(higher):
    scores = {k: -v for k, v in LOWER.items()} if higher else LOWER
    result, _ = run_search(scores, higher=higher, strict=True)
    assert result.order == [B, C, A, D]
    assert [(i, ok) for i, _, _, ok in result.steps] == [(C, False), (A, True), (D, False)]
    assert result.selected == [B, A]
    assert result.score == scores[(A, B)]
    assert result.uniform == scores[(A, B, C, D)]


def test_nan_scores_sort_last_and_never_join():
    scores = dict(LOWER) | {(C,): math.nan, (A, B): math.nan, (B, D): 1.5}
    result, _ = run_search(scores, higher=False, strict=False)
    assert result.order == [B, A, D, C]
    assert [(i, ok) for i, _, _, ok in result.steps] == [(A, False), (D, False), (C, True)]  # (B, C) = 1.0 ties B
    assert result.selected == [B, C]


def test_parse_score():
    assert parse_score("loading\n0.25\n\n", None) == 0.25
    assert parse_score("-1e-3", None) == -0.001
    assert parse_score('{"metrics": {"acc": 0.75}}', "metrics.acc") == 0.75
    assert parse_score('log line\n{"acc": 1}\nbye\n', "acc") == 1.0
    assert parse_score(json.dumps({"results": {"acc": 0.5}}, indent=2), "results.acc") == 0.5
    with pytest.raises(ValueError, match=r"^printed no number on its last line \('done'\)"):
        parse_score("0.5\ndone\n", None)
    with pytest.raises(ValueError, match="^printed nothing"):
        parse_score("\n", None)
    with pytest.raises(ValueError, match="^printed JSON whose field 'acc' is None, not a number"):
        parse_score('{"f1": 0.5}', "acc")
    with pytest.raises(ValueError, match="^printed no JSON object"):
        parse_score("0.5", "acc")


# --- end to end, on toy models whose score is worked by hand ------------------------------------------

# Each model holds w = VALUE everywhere; a candidate's score is |mean(w) - 2| (lower is better).
VALUES = {"ft1": 1.0, "ft2": 3.0, "ft3": 2.5, "ft4": 10.0}
# Alone: ft3 0.5, ft1 1.0, ft2 1.0 (a tie: recipe order), ft4 8.0.
# ft3 + ft1: mean 1.75 -> 0.25, kept; + ft2: 6.5/3 -> 0.1667, kept; + ft4: 16.5/4 -> 2.125, rejected.
SCRIPT = """\
import json, struct, sys
from pathlib import Path
model = Path(sys.argv[1])
with open("calls.log", "a") as f:
    f.write(model.name + "\\n")
index = json.loads((model / "model.safetensors.index.json").read_text())
with open(model / index["weight_map"]["w"], "rb") as f:  # safetensors by hand: no torch import, fast
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    begin, end = header["w"]["data_offsets"]
    f.seek(begin, 1)
    w = struct.unpack(f"<{(end - begin) // 4}f", f.read(end - begin))
mean = sum(w) / len(w)
print("scoring", model)  # a noisy evaluator: the score is the last line
print(abs(mean - 2.0))
"""


@pytest.fixture
def toys(tmp_path, monkeypatch):
    """Four one-value models and the scoring script in the working directory, as users run them."""
    monkeypatch.chdir(tmp_path)
    for name, value in VALUES.items():
        write_toy(name, value)
    Path("score.py").write_text(SCRIPT)
    return tmp_path


def write_toy(name: str, value: float) -> None:
    t = {"w": torch.full((4, 4), value), "b": torch.full((4,), value), "ids": torch.arange(3)}
    write_checkpoint(Path(name), t)


def recipe(evaluation: str, models=("ft1", "ft2", "ft3", "ft4"), extra: str = "") -> str:
    listed = "".join(f"  - model: {m}\n" for m in models)
    return f"merge_method: greedy_soup\nmodels:\n{listed}evaluation:\n{evaluation}output:\n  path: out\n{extra}"


COMMAND = f"""\
  evaluator: command
  command: {sys.executable} score.py {{model}}
  direction: lower
"""


def apply(text: str, *args: str):
    Path("recipe.yaml").write_text(text)
    return CliRunner().invoke(cli, ["apply", "recipe.yaml", *args])


def calls() -> list[str]:
    return Path("calls.log").read_text().splitlines() if Path("calls.log").exists() else []


def test_command_evaluator_end_to_end(toys):
    result = apply(recipe(COMMAND), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["greedy_soup"]
    assert [(r["model"], r["score"]) for r in report["ingredients"]] == [
        ("ft3", 0.5), ("ft1", 1.0), ("ft2", 1.0), ("ft4", 8.0)
    ]  # fmt: skip
    assert [(c["added"], c["models"], c["accepted"]) for c in report["candidates"]] == [
        ("ft1", ["ft3", "ft1"], True),
        ("ft2", ["ft3", "ft1", "ft2"], True),
        ("ft4", ["ft3", "ft1", "ft2", "ft4"], False),
    ]
    scores = [c["score"] for c in report["candidates"]]
    assert scores == pytest.approx([0.25, 1 / 6, 2.125], abs=1e-6)
    assert report["selected"] == ["ft3", "ft1", "ft2"]
    assert report["score"] == scores[1]
    assert report["uniform_soup"] == {"models": ["ft1", "ft2", "ft3", "ft4"], "score": scores[2]}
    assert (report["evaluations"], report["cached"]) == (7, 1)  # the uniform soup was the last candidate
    assert len(calls()) == 7

    # The output is the linear soup of the chosen models, bit for bit; candidates are gone.
    soup = load_output(Path("out"))
    linear = "merge_method: linear\nmodels:\n  - model: ft1\n  - model: ft2\n  - model: ft3\n"
    Path("linear.yaml").write_text(linear)
    assert CliRunner().invoke(cli, ["apply", "linear.yaml", "-o", "linear", "-q"]).exit_code == 0
    reference = load_output(Path("linear"))
    assert soup.keys() == reference.keys()
    assert all(torch.equal(soup[k], reference[k]) for k in soup)
    assert sorted(os.listdir(".")) == sorted(
        [*VALUES, "score.py", "calls.log", "recipe.yaml", "out", "linear.yaml", "linear"]
    )

    card = Path("out/README.md").read_text()
    assert "**greedy_soup**" in card and "## Greedy soup" in card
    assert "| 4 | `ft4` | 8 | 2.125 | rejected |" in card
    assert "greedy soup of 3 of 4 ingredients (`ft3`, `ft1`, `ft2`)" in card


def test_every_candidate_and_the_soup_take_the_recipes_config(toys):
    """The config comes from the first model holding one (ft1 holds none): the same for every candidate soup
    as for the whole recipe, which is what the score cache's key and the lock record."""
    Path("ft1/config.json").unlink()
    for name in ("ft2", "ft3", "ft4"):
        Path(f"{name}/config.json").write_text(
            json.dumps({"model_type": "toy", "torch_dtype": "float32", "from": name})
        )
    Path("score.py").write_text(
        SCRIPT.replace("mean = ", 'assert json.loads((model / "config.json").read_text())["from"] == "ft2"\nmean = ')
    )
    result = apply(recipe(COMMAND), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(Path("out/config.json").read_text())["from"] == "ft2"
    assert len(calls()) == 7  # every candidate scored, each seeing ft2's config


def test_terminal_table(toys):
    result = apply(recipe(COMMAND))
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert out[:9] == [
        "greedy soup by `" + COMMAND.split("command: ")[1].split("\n")[0] + "`: lower is better; "
        "an ingredient is kept if the soup does not get worse (>=)",
        "  step  model  alone      soup  result",
        "     1  ft3      0.5       0.5  start",
        "     2  ft1        1      0.25  accepted",
        "     3  ft2        1  0.166667  accepted",
        "     4  ft4        8     2.125  rejected",
        "  greedy soup of 3 of 4 (ft3, ft1, ft2): 0.166667",
        "  uniform soup of all 4: 2.125",
        "  best single model (ft3): 0.5",
    ]
    assert out[9].startswith("merged 3 tensors with greedy_soup into ")
    assert "  ft1 alone: 1 (" in result.stderr  # progress, one line per evaluation


def test_cache_avoids_reevaluation(toys):
    assert apply(recipe(COMMAND), "-q").exit_code == 0
    assert len(calls()) == 7
    result = apply(recipe(COMMAND), "--json", "--force")
    report = json.loads(result.stdout)["greedy_soup"]
    assert (report["evaluations"], report["cached"]) == (0, 8)
    assert len(calls()) == 7
    assert report["cache"] == str(Path(os.environ["MERGER_CACHE_DIR"]) / "greedy-soup.json")

    # The rule is not part of a score: a strict rerun evaluates nothing either.
    strict = recipe(COMMAND + '  accept: ">"\n')
    assert json.loads(apply(strict, "--json", "--force").stdout)["greedy_soup"]["evaluations"] == 0
    # New weights in ft4 (same paths, same sizes): only the candidates holding ft4 are scored again.
    write_toy("ft4", 9.0)
    report = json.loads(apply(strict, "--json", "--force").stdout)["greedy_soup"]
    assert (report["evaluations"], report["cached"]) == (2, 6)
    assert report["uniform_soup"]["score"] == pytest.approx(abs(15.5 / 4 - 2), abs=1e-6)


def test_an_edited_scoring_script_or_function_is_scored_again(toys):
    assert apply(recipe(COMMAND), "-q").exit_code == 0
    assert json.loads(apply(recipe(COMMAND), "--json", "--force").stdout)["greedy_soup"]["evaluations"] == 0
    Path("score.py").write_text(SCRIPT.replace("abs(mean - 2.0)", "abs(mean - 2.5)"))  # a new target
    report = json.loads(apply(recipe(COMMAND), "--json", "--force").stdout)["greedy_soup"]
    # Alone ft3 scores 0 and nothing joins it: 4 models, 3 rejected steps, the uniform soup.
    assert (report["evaluations"], report["cached"]) == (8, 0)
    assert report["selected"] == ["ft3"] and report["score"] == pytest.approx(0, abs=1e-6)

    python = "  evaluator: python\n  function: myeval:score\n  direction: lower\n"
    try:
        Path("myeval.py").write_text(PYTHON_EVAL)
        assert json.loads(apply(recipe(python), "--json", "--force").stdout)["greedy_soup"]["evaluations"] == 7
        del sys.modules["myeval"]  # a new process would import the edited module afresh
        assert json.loads(apply(recipe(python), "--json", "--force").stdout)["greedy_soup"]["evaluations"] == 0
        del sys.modules["myeval"]
        Path("myeval.py").write_text(PYTHON_EVAL.replace("- 2.0", "- 2.5"))
        report = json.loads(apply(recipe(python), "--json", "--force").stdout)["greedy_soup"]
        assert (report["evaluations"], report["cached"]) == (8, 0)
        assert report["selected"] == ["ft3"]
    finally:
        sys.modules.pop("myeval", None)


def test_locked_rerun_repeats_the_search_on_the_same_inputs(toys):
    first = apply(recipe(COMMAND), "--json")
    assert first.exit_code == 0, first.output
    lock = json.loads(Path("out/merger.lock.json").read_text())
    assert sorted(r for i in lock["inputs"] for r in i["refs"]) == ["ft1", "ft2", "ft3", "ft4"]  # ft4 was tried too
    again = CliRunner().invoke(cli, ["apply", "--locked", "out/merger.lock.json", "-o", "again", "--json"])
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)["greedy_soup"]
    assert report["selected"] == ["ft3", "ft1", "ft2"] and report["evaluations"] == 0  # all from the cache
    files = {p.name for p in Path("out").iterdir()} - {"README.md"}  # the card names the directory, counts evaluations
    assert {n: Path("again", n).read_bytes() for n in files} == {n: Path("out", n).read_bytes() for n in files}

    write_toy("ft4", 9.0)  # a rejected ingredient changed: the lock no longer holds, nothing is scored
    before = calls()
    bad = CliRunner().invoke(cli, ["apply", "--locked", "out/merger.lock.json", "-o", "third"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert bad.stderr.startswith("error: out/merger.lock.json: 'ft4': model-00001-of-00002.safetensors has changed")
    assert calls() == before and not Path("third").exists()


def test_low_disk_is_refused_with_the_reason(toys):
    err = run_bad(recipe(COMMAND), "--low-disk")
    assert err == (
        "error: greedy_soup reads every model once per candidate soup: --low-disk would download each Hub "
        "model again for every evaluation; leave it out\n"
    )


def test_cache_file_and_no_cache(toys, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    first = apply(recipe(COMMAND + "  cache: scores.json\n"), "-q")
    assert first.exit_code == 0, first.output
    data = json.loads(Path("scores.json").read_text())
    assert len(data["scores"]) == 7
    # every file hashed once into merger's hash cache, by its stamp: the weights for the scores' keys and
    # for the lock, the other files for the lock
    remembered = {e.read_text().strip() for e in (Path(os.environ["MERGER_CACHE_DIR"]) / "sha256").iterdir()}
    weights = {hashlib.sha256(f.read_bytes()).hexdigest() for f in Path().glob("ft*/*.safetensors")}
    assert len(weights) == 4 * 2 and weights <= remembered
    assert apply(recipe(COMMAND + "  cache: false\n"), "-q", "--force").exit_code == 0
    assert len(calls()) == 14  # nothing reused, and still no score computed twice within the run


PYTHON_EVAL = """\
from pathlib import Path

seen = []


def score(candidate):
    seen.append(candidate.path)  # written on first access
    assert (candidate.path / "config.json").is_file()
    w = candidate.state_dict()["w"]
    return abs(float(w.mean()) - 2.0)


def crash(candidate):
    raise ValueError("no GPU here")


def words(candidate):
    return "high"
"""


def test_python_evaluator(toys):
    Path("myeval.py").write_text(PYTHON_EVAL)
    result = apply(recipe("  evaluator: python\n  function: myeval:score\n  direction: lower\n"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["greedy_soup"]
    assert report["selected"] == ["ft3", "ft1", "ft2"]
    assert report["score"] == pytest.approx(1 / 6, abs=1e-6)
    seen = sys.modules["myeval"].seen
    assert len(seen) == 7 and not any(p.exists() for p in seen)  # each candidate removed after scoring
    assert not [p for p in os.listdir(".") if p.startswith(".")]
    del sys.modules["myeval"]


# --- failures: one message, exit 2, nothing left behind -----------------------------------------------


def run_bad(text: str, *args: str) -> str:
    """The error lines (progress lines aside) of a run that must fail and leave nothing behind."""
    before = sorted(os.listdir("."))
    result = apply(text, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    after = set(os.listdir(".")) - {"calls.log"}  # the scoring script's own record
    assert sorted(after) == sorted({*before, "recipe.yaml"} - {"calls.log"}), "something was left behind"
    return "".join(line for line in result.stderr.splitlines(True) if line.startswith("error:"))


def test_command_crash_stops_the_run(toys):
    Path("score.py").write_text(SCRIPT.replace("print(abs", "sys.exit('boom: no GPU') if mean > 9 else print(abs"))
    err = run_bad(recipe(COMMAND))
    assert err == "error: recipe.yaml:9: evaluation.command: failed (exit status 1) on ft4:\nerror: boom: no GPU\n"
    assert calls() == ["model"] * 4  # three scored, then ft4 failed


def test_command_prints_no_number(toys):
    Path("score.py").write_text(SCRIPT.replace("print(abs(mean - 2.0))", 'print("done")'))
    err = run_bad(recipe(COMMAND))
    assert err == (
        "error: recipe.yaml:9: evaluation.command: on ft1, it printed no number on its last line ('done'); "
        "print the score last, or set json_field\n"
    )


def test_python_evaluator_failures(toys):
    Path("myeval.py").write_text(PYTHON_EVAL)
    err = run_bad(recipe("  evaluator: python\n  function: myeval:crash\n  direction: higher\n"))
    assert err == "error: recipe.yaml:9: evaluation.function: myeval:crash raised ValueError: no GPU here (on ft1)\n"
    err = run_bad(recipe("  evaluator: python\n  function: myeval:words\n  direction: higher\n"))
    assert err == "error: recipe.yaml:9: evaluation.function: myeval:words returned 'high', not a number\n"
    err = run_bad(recipe("  evaluator: python\n  function: myeval:nothing\n  direction: higher\n"))
    assert err == "error: recipe.yaml:9: evaluation.function: module myeval has no function 'nothing'\n"
    sys.modules.pop("myeval", None)


@pytest.mark.parametrize(
    ("evaluation", "models", "message"),
    [
        (
            "  evaluator: perplexity\n  data: missing.txt\n",
            None,
            "recipe.yaml:9: evaluation.data: no such file 'missing.txt'",
        ),
        (
            COMMAND,
            ("ft1",),
            "recipe.yaml:2: models: greedy_soup chooses among models: list two or more",
        ),
        (
            "  evaluator: perplexty\n",
            None,
            "recipe.yaml:8: evaluation.evaluator: unknown evaluator 'perplexty' (did you mean 'perplexity'?); "
            "available: perplexity, command, python",
        ),
        (
            "  command: run {model}\n  direction: lower\n",
            None,
            "recipe.yaml:7: evaluation.evaluator: required key is missing (one of perplexity, command, python)",
        ),
        (
            "  evaluator: command\n  command: run\n  direction: lower\n",
            None,
            "recipe.yaml:9: evaluation.command: must contain {model}, the candidate's directory",
        ),
        (
            "  evaluator: command\n  command: run {model}\n",
            None,
            "recipe.yaml:7: evaluation.direction: required key is missing",
        ),
        (
            COMMAND + "  acept: '>'\n",
            None,
            "recipe.yaml:11: evaluation.acept: unknown key (did you mean 'accept'?)",
        ),
        (
            COMMAND + "  accept: >=\n",
            None,
            "recipe.yaml:11: invalid YAML: expected chomping or indentation indicators, but found '=' "
            '(a bare > starts a folded block in YAML: quote the rule, accept: ">=")',
        ),
        (
            "  evaluator: perplexity\n  data: score.py\n  direction: higher\n",
            None,
            "recipe.yaml:10: evaluation.direction: Input should be 'lower', got 'higher'",
        ),
        (
            "  evaluator: perplexity\n  data: score.py\n  max_length: 8\n  stride: 8\n",
            None,
            "recipe.yaml:11: evaluation.stride: must be less than max_length (8), "
            "so that every token is scored with some context",
        ),
        (
            "  evaluator: python\n  function: myeval.score\n  direction: lower\n",
            None,
            "recipe.yaml:9: evaluation.function: 'myeval.score' is not module:function",
        ),
        (
            "  evaluator: python\n  function: no_such_module_here:score\n  direction: lower\n",
            None,
            "recipe.yaml:9: evaluation.function: no module named 'no_such_module_here' "
            "(looked in the working directory and on sys.path)",
        ),
    ],
)
def test_recipe_errors(toys, evaluation, models, message):
    text = recipe(evaluation, models=models) if models else recipe(evaluation)
    assert run_bad(text) == f"error: {message}\n"


def test_evaluation_belongs_to_greedy_soup(toys):
    no_section = "merge_method: greedy_soup\nmodels:\n  - model: ft1\n  - model: ft2\noutput:\n  path: out\n"
    assert run_bad(no_section) == (
        "error: recipe.yaml: evaluation: greedy_soup needs an evaluation section "
        "(evaluator: perplexity, command or python)\n"
    )
    linear = recipe(COMMAND).replace("greedy_soup", "linear")
    assert (
        run_bad(linear) == "error: recipe.yaml:7: evaluation: only greedy_soup uses an evaluation section; remove it\n"
    )
    weighted = recipe(COMMAND, extra="parameters:\n  weight: 2\n")
    assert run_bad(weighted) == (
        "error: recipe.yaml:14: parameters.weight: unknown key ('weight' belongs to breadcrumbs, breadcrumbs_ties, "
        "dare_linear, dare_ties, della, della_linear, linear, multislerp, nuslerp, task_arithmetic, ties); "
        "greedy_soup takes no parameters\n"
    )


def test_existing_output_is_refused_before_evaluating(toys):
    Path("out").mkdir()
    err = run_bad(recipe(COMMAND))
    assert err.startswith("error: output ") and err.endswith("already exists; pass --force to replace it\n")
    assert calls() == []


def test_plan_shows_the_search(toys):
    Path("recipe.yaml").write_text(recipe(COMMAND))
    result = CliRunner().invoke(cli, ["plan", "recipe.yaml"])
    assert result.exit_code == 0, result.output
    assert "greedy_soup of 4 model(s)" in result.stdout
    assert "evaluation:   command, lower is better, accept >=; up to 8 evaluations" in result.stdout
    assert calls() == []

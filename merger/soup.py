"""Greedy soup (Wortsman et al. 2022, Recipe 1): score each model alone, then add them best first to a
uniform soup, keeping each only if the soup's held-out score does not get worse.

Each candidate is the uniform linear soup of a subset of the recipe's models, built by the streaming
engine (evaluate.Candidate). Scores are cached in a JSON file keyed by the content of the weights and
the evaluator's settings, so a rerun evaluates nothing twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from merger import hashes
from merger.apply import apply
from merger.errors import MergerError, ModelError
from merger.evaluate import Candidate, Evaluator, make_evaluator
from merger.fetch import fetch_inputs
from merger.files import cache_dir, parse_json, write_json
from merger.lock import Lock, checked_inputs
from merger.plan import Plan, build_plan
from merger.recipe import DTYPE_CODE
from merger.sources import TOKENIZER_FILES, LocalModel
from merger.staging import check_destination, remove_leftovers


@dataclass
class Search:
    """The greedy loop's trace, over ingredient indices (positions in the recipe's models)."""

    order: list[int]  # every ingredient, best alone first
    alone: dict[int, float]
    steps: list[tuple[int, list[int], float, bool]]  # for order[1:]: (ingredient, soup + it, its score, accepted)
    selected: list[int]  # in the order they joined the soup
    score: float  # the final soup's
    uniform: float  # the uniform soup of every ingredient's


def search(n: int, score: Callable[[tuple[int, ...]], float], *, higher: bool, strict: bool) -> Search:
    """Greedy soup over ingredients 0..n-1. `score(subset)` scores the uniform soup of a sorted subset.

    Ingredients are sorted by their own score (ties keep recipe order; NaN last). An ingredient joins
    when the soup with it is not worse than the soup without (strict: only when it is better). NaN is
    never better than anything.
    """

    def goodness(s: float) -> float:  # larger is better, whatever the direction
        return -math.inf if math.isnan(s) else s if higher else -s

    alone = {i: score((i,)) for i in range(n)}
    order = sorted(range(n), key=lambda i: -goodness(alone[i]))
    soup, best = [order[0]], alone[order[0]]
    steps = []
    for i in order[1:]:
        s = score(tuple(sorted([*soup, i])))
        g, b = goodness(s), goodness(best)
        accepted = not math.isnan(s) and (g > b if strict else g >= b)
        steps.append((i, [*soup, i], s, accepted))
        if accepted:
            soup, best = [*soup, i], s
    return Search(order, alone, steps, soup, best, score(tuple(range(n))))


def default_cache_path() -> Path:
    return cache_dir() / "greedy-soup.json"


class ScoreCache:
    """Scores by key, in one JSON file (None: memory only), keyed by the weights' hashes (remembered
    between runs by merger.hashes)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.scores: dict[str, dict] = {}
        if path is not None and path.exists():
            self.scores = self._read()

    def _read(self) -> dict:
        try:
            return dict(parse_json(self.path.read_bytes(), str(self.path))["scores"])
        except (OSError, ModelError, KeyError, TypeError, ValueError):
            raise MergerError(
                f"score cache {self.path} is unreadable; delete it, or set evaluation.cache: false"
            ) from None

    def model_hash(self, model: LocalModel) -> str:
        """The content of a model's safetensors files (names and bytes)."""
        lines = [f"{f.name} {hashes.hashed(model.folder, model.name_of(f))[0]}\n" for f in sorted(model.files)]
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def get(self, key: str) -> float | None:
        entry = self.scores.get(key)
        return None if entry is None else float(entry["score"])

    def put(self, key: str, score: float, about: dict) -> None:
        self.scores[key] = {"score": score, **about}
        self.save()

    def save(self) -> None:
        """Merge with what other runs wrote meanwhile, then replace the file atomically."""
        if self.path is None:
            return
        if self.path.exists():
            self.scores = self._read() | self.scores
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"version": 1, "scores": self.scores})


def subset_plan(plan: Plan, subset: tuple[int, ...]) -> Plan:
    """The plan of the uniform soup of some of `plan`'s ingredients (the same method, device and shards)."""
    spec = dataclasses.replace(plan.spec, ingredients=[plan.spec.ingredients[i] for i in subset])
    opened = {m.ref: m for m in [plan.base, *plan.inputs, plan.tokenizer_from] if m is not None}
    sub = build_plan(spec, device=plan.device, shard_size=plan.shard_size, opened=opened)
    return dataclasses.replace(sub, config_from=plan.config_from)  # every candidate the soup's config (its key's)


def greedy_soup(
    plan: Plan,
    dest: Path,
    *,
    force: bool = False,
    progress: bool = False,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
    lock: Lock | None = None,
    lock_name: str = "lock",
) -> dict:
    """Search, then write the chosen soup to `dest` like any merge. Returns apply's summary with
    the search report under 'greedy_soup'. Temporary candidates live beside `dest` and are removed.
    The output's lock records every ingredient (the search read them all); with `lock`, every
    ingredient must match it before anything is evaluated."""
    start = time.perf_counter()
    log = log or (lambda _msg: None)
    spec, ev = plan.spec, plan.spec.recipe.evaluation
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MergerError("greedy_soup runs in one process; use --workers to write the final soup in parallel")
    dest = dest.expanduser().resolve()
    check_destination(dest, plan, force)
    remove_leftovers(dest)  # candidates of a killed search
    if lock is not None:
        checked_inputs(lock, plan, lock_name)
    fetch_inputs(plan, weights=True)  # Hub inputs: every candidate reads them
    refs = [g.ref for g in spec.ingredients]
    cache = ScoreCache(None if ev.cache is False else default_cache_path() if ev.cache is True else Path(ev.cache))
    workdir = dest.parent if dest.parent.is_dir() else None
    counts = {"evaluations": 0, "cached": 0}

    evaluator = make_evaluator(plan, workdir)
    try:
        log(
            f"greedy soup over {len(refs)} models by {evaluator.describe()}"
            + (f" (cache: {cache.path}; hashing weights not seen before)" if cache.path else "")
        )
        key_of = _keys(plan, cache, evaluator)

        def score(subset: tuple[int, ...]) -> float:
            key = key_of(subset)
            what = (
                f"{refs[subset[0]]} alone"
                if len(subset) == 1
                else f"soup of {len(subset)} ({', '.join(refs[i] for i in subset)})"
            )
            cached = cache.get(key)
            if cached is not None:
                counts["cached"] += 1
                log(f"  {what}: {cached:.6g} (cached)")
                return cached
            began = time.perf_counter()
            with Candidate(subset_plan(plan, subset), workdir) as candidate:
                s = evaluator.score(candidate)
            counts["evaluations"] += 1
            cache.put(key, s, {"models": [refs[i] for i in subset], "evaluator": evaluator.settings()["evaluator"]})
            log(f"  {what}: {s:.6g} ({time.perf_counter() - began:.1f} s)")
            return s

        result = search(len(refs), score, higher=ev.direction == "higher", strict=ev.accept == ">")
    finally:
        evaluator.close()

    report = _report(refs, ev, evaluator.describe(), result, counts, cache)
    final = subset_plan(plan, tuple(sorted(result.selected)))
    summary = apply(
        final, dest, force=force, progress=progress, workers=workers, card=format_markdown(report), provenance=plan
    )
    summary["seconds"] = round(time.perf_counter() - start, 3)  # the search included
    summary["greedy_soup"] = report
    return summary


def _report(refs: list[str], ev, described: str, result, counts: dict, cache: ScoreCache) -> dict:
    """The search as the summary, the model card and --json tell it."""
    return {
        "evaluator": described,
        "direction": ev.direction,
        "accept": ev.accept,
        "ingredients": [{"model": refs[i], "score": result.alone[i]} for i in result.order],
        "candidates": [
            {"added": refs[i], "models": [refs[j] for j in soup], "score": s, "accepted": ok}
            for i, soup, s, ok in result.steps
        ],
        "selected": [refs[i] for i in result.selected],
        "score": result.score,
        "uniform_soup": {"models": refs, "score": result.uniform},
        **counts,
        "cache": str(cache.path) if cache.path else None,
    }


def _keys(plan: Plan, cache: ScoreCache, evaluator: Evaluator) -> Callable[[tuple[int, ...]], str]:
    """subset -> cache key: sha256 over the ingredients' content hashes (as a sorted list, so the same
    set under other paths or in another order hits), what else shapes the candidate's files (output and
    compute dtype, config and tokenizer), and the evaluator's settings. Accept rule and direction are
    left out: they do not change a score."""
    recipe = plan.spec.recipe
    # Without a cache file, paths are identity enough within one run.
    idents = [cache.model_hash(m) if cache.path else str(m.path) for m in plan.inputs]
    support = [(plan.config_from, "config.json")] if plan.config_from is not None else []
    support += [(plan.tokenizer_from, n) for n in TOKENIZER_FILES]
    common = {
        "dtype": DTYPE_CODE.get(recipe.out_dtype or recipe.dtype or ""),
        "compute_dtype": recipe.compute_dtype,
        "support": {n: m.folder.sha256(n) for m, n in support if m.folder.has(n)},
        "evaluator": evaluator.settings(),
    }

    def key(subset: tuple[int, ...]) -> str:
        data = {"models": sorted(idents[i] for i in subset), **common}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    return key


def _rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """(step, model, alone, soup, result) per ingredient in the order tried."""
    first = report["ingredients"][0]
    rows = [("1", first["model"], _num(first["score"]), _num(first["score"]), "start")]
    for n, (ing, c) in enumerate(zip(report["ingredients"][1:], report["candidates"]), 2):
        rows.append(
            (str(n), ing["model"], _num(ing["score"]), _num(c["score"]), "accepted" if c["accepted"] else "rejected")
        )
    return rows


def _num(x: float) -> str:
    return f"{x:.6g}"


def _rule(report: dict) -> str:
    better = "lower" if report["direction"] == "lower" else "higher"
    rule = "if the soup does not get worse" if report["accept"] == ">=" else "only if the soup gets better"
    return f"{better} is better; an ingredient is kept {rule} ({report['accept']})"


def format_table(report: dict) -> str:
    """The report for the terminal: one row per ingredient, then the final and the uniform soup."""
    header = ("step", "model", "alone", "soup", "result")
    rows = [header, *_rows(report)]
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    align = [">", "<", ">", ">", "<"]
    lines = [f"greedy soup by {report['evaluator']}: {_rule(report)}"]
    for r in rows:
        lines.append("  " + "  ".join(f"{v:{a}{w}}" for v, a, w in zip(r, align, widths)).rstrip())
    n, k = len(report["ingredients"]), len(report["selected"])
    lines.append(f"  greedy soup of {k} of {n} ({', '.join(report['selected'])}): {_num(report['score'])}")
    lines.append(f"  uniform soup of all {n}: {_num(report['uniform_soup']['score'])}")
    lines.append(
        f"  best single model ({report['ingredients'][0]['model']}): {_num(report['ingredients'][0]['score'])}"
    )
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The report for the model card."""
    lines = [
        "## Greedy soup",
        "",
        f"Ingredients were scored by {report['evaluator']} ({_rule(report)}), sorted best first and added "
        "one at a time to a uniform soup. *alone*: the ingredient's own score; *soup*: the score of the "
        "soup with it.",
        "",
        "| step | model | alone | soup | result |",
        "| ---: | --- | ---: | ---: | --- |",
    ]
    lines += [f"| {s} | `{m}` | {a} | {p} | {r} |" for s, m, a, p, r in _rows(report)]
    n, k = len(report["ingredients"]), len(report["selected"])
    lines += [
        "",
        f"This model is the greedy soup of {k} of {n} ingredients ({', '.join(f'`{m}`' for m in report['selected'])}): "
        f"score {_num(report['score'])}. The uniform soup of all {n} scores {_num(report['uniform_soup']['score'])}; "
        f"the best single model, {_num(report['ingredients'][0]['score'])}.",
    ]
    return "\n".join(lines)

"""Provenance: every output holds merger.lock.json with merger's version, the recipe, and each input's files
and hashes (for a Hub input also its commit), so `merger apply --locked` re-runs exactly those inputs and
refuses any that changed. Nothing in it depends on when or where the merge ran."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merger import __version__, hashes, system
from merger.errors import InputChanged, MergerError, ModelError
from merger.files import SUPPORT_LIMIT, parse_json, read_user_file
from merger.hub import short_hash
from merger.plan import Plan
from merger.sources import LocalModel, same_file, stamp

LOCK_NAME = "merger.lock.json"


class LockedInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refs: list[str]  # every way the recipe names this model
    repo_id: str | None = None  # Hub inputs
    commit: str | None = None
    files: dict[str, dict[str, str | int]]  # name -> {"sha256" or "git_sha1": hex, "size": bytes}


class Lock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merger_version: str
    recipe: str
    shard_size: int = Field(gt=0)
    random_seed: int = Field(0, ge=0, lt=1 << 63)  # the run's (the recipe's, or --random-seed's)
    inputs: list[LockedInput]

    @property
    def pins(self) -> dict[str, str]:
        """Hub reference -> commit."""
        return {ref: i.commit for i in self.inputs if i.commit for ref in i.refs}

    def verify(self, inputs: list[LockedInput], name: str) -> None:
        """Raise ModelError naming every file that differs from the lock."""
        locked = {ref: i for i in self.inputs for ref in i.refs}
        problems = []
        for now in inputs:
            ref = now.refs[0]
            was = locked.get(ref)
            if was is None:
                problems.append(f"'{ref}' is not in the lock")
                continue
            if was.commit != now.commit:
                problems.append(
                    f"'{ref}' is at {now.commit or 'a local path'}, the lock has {was.commit or 'a local path'}"
                )
            for file in sorted(was.files.keys() | now.files.keys()):
                a, b = was.files.get(file), now.files.get(file)
                if a is None:
                    problems.append(f"'{ref}': {file} is used now but is not in the lock")
                elif b is None:
                    problems.append(f"'{ref}': {file} is in the lock but not there now")
                elif a != b if len(b) > 1 else a.get("size") != b.get("size"):  # b: the size alone (plan)
                    problems.append(
                        f"'{ref}': {file} has changed since the lock ({short_hash(a)} then, {short_hash(b)} now)"
                    )
        if problems:
            raise ModelError(*(f"{name}: {p}" for p in problems))


def inputs_of(
    plan: Plan,
    *,
    hub_weights: bool = True,
    threads: int | None = None,
    stop: threading.Event | None = None,
    priority: system.Background | None = None,
) -> list[LockedInput]:
    """The lock's record of what the merge reads: local files by sha256; Hub files fetched into the
    cache by the hash the Hub lists for them (LFS sha256, or git blob id), after checking that the bytes
    there have that hash. A file is read to hash it unless an earlier run hashed it as it is now
    (merger.hashes). Hub weights not fetched yet
    (--low-disk) are checked as they arrive (fetch.JustInTime). Files are hashed `threads` at a time
    (default: one per core); beside a merge, at the `priority` it sets (system.Background). `stop`, once
    set, ends the hashing at the next block."""
    refs: dict[Path, list[str]] = {}
    for m in [plan.base, *plan.inputs, plan.tokenizer_from]:
        if m is not None and m.ref not in refs.setdefault(m.path, []):
            refs[m.path].append(m.ref)
    used = plan.files_used()
    jobs = [(model, name) for model, names in used for name in names]
    workers = threads or system.default_threads()
    stop = stop or threading.Event()
    initializer = priority.enter if priority else None
    with ThreadPoolExecutor(workers, thread_name_prefix="merger-hash", initializer=initializer) as pool:
        try:
            hashed = list(pool.map(lambda job: record(*job, hub_weights, stop), jobs))
        except BaseException:  # an interrupt: files being hashed stop at their next block, the rest never start
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise
    records = dict(zip(((m.path, n) for m, n in jobs), hashed))
    out = []
    for model, names in used:
        files = {n: records[model.path, n] for n in sorted(names)}
        remote = model.remote
        out.append(
            LockedInput(
                refs=refs[model.path],
                repo_id=remote.repo_id if remote else None,
                commit=remote.commit if remote else None,
                files=files,
            )
        )
    return out


def checked_inputs(lock: Lock, plan: Plan, name: str, hub_weights: bool = True) -> list[LockedInput]:
    """The inputs as hashed now (inputs_of), checked against `lock` (named `name`). Where a file differs
    from the lock by a remembered hash, every file is read again before the difference counts: a wrong
    entry in merger's cache never refuses a rerun."""
    inputs = inputs_of(plan, hub_weights=hub_weights)
    try:
        lock.verify(inputs, name)
    except ModelError:
        if not hashes.remembering():
            raise
        with hashes.afresh():
            inputs = inputs_of(plan, hub_weights=hub_weights)
        lock.verify(inputs, name)
    return inputs


def to_hash(plan: Plan) -> tuple[int, int, int, list[str]]:
    """What a merge of `plan` reads to hash for its lock: (bytes, files), how many files' hashes are
    remembered from an earlier run (merger.hashes), and why those read now would not be remembered for
    the next one (each reason once). A Hub file not fetched yet is hashed when it is."""
    nbytes = files = known = 0
    why: list[str] = []
    for model, names in plan.files_used():
        for name in names:
            if hashes.remembered(model.folder, name):
                known += 1
                continue
            st = model.folder.stat(name)
            nbytes += st.st_size if st is not None else model.remote.files[name].size if model.remote else 0
            files += 1
            reason = hashes.forgotten(model.folder, name)
            if reason is not None and reason not in why:
                why.append(reason)
    return nbytes, files, known, why


def listed(plan: Plan, local: bool = False) -> list[LockedInput]:
    """The Hub inputs as the Hub lists them (commit, files and their hashes), nothing read: what a lock
    can be checked against before anything is downloaded. With `local`, the local inputs too, by their
    files' sizes alone (what `merger plan --locked` checks without reading any file)."""
    out = []
    for m, names in plan.files_used():
        if m.remote is not None:
            files = {n: m.remote.files[n].record() for n in names}
            out.append(LockedInput(refs=[m.ref], repo_id=m.remote.repo_id, commit=m.remote.commit, files=files))
        elif local:
            out.append(LockedInput(refs=[m.ref], files={n: {"size": m.folder.stat(n).st_size} for n in names}))
    return out


def record(
    model: LocalModel, name: str, hub_weights: bool = True, stop: threading.Event | None = None
) -> dict[str, str | int]:
    """How the lock records one file of a model, its bytes hashed (merger.hashes). A Hub file fetched into the cache
    is checked against the hash the Hub lists (remote.verify); with `hub_weights` False its weights are
    not (--low-disk: fetch.JustInTime checks each as it arrives)."""
    remote = model.remote
    if remote is None:
        digest, st = hashes.hashed(model.folder, name, stop)
        seen = model.stamps.get(model.path / name)  # a weight file: the one the merge maps
        if seen is not None and not same_file(seen, stamp(st)):
            raise InputChanged(f"'{model.ref}': {name} changed after merger read its header; run the command again")
        return {"sha256": digest, "size": st.st_size}
    weight = any(model.name_of(f) == name for f in model.files)
    if (model.path / name).exists() and (hub_weights or not weight):
        return remote.verify(name, stop)
    return remote.files[name].record()


def write_lock(plan: Plan, inputs: list[LockedInput], directory: Path) -> None:
    spec = plan.spec
    recipe = spec.source.text or yaml.safe_dump(spec.recipe.model_dump(exclude_defaults=True), sort_keys=False)
    lock = Lock(
        merger_version=__version__, recipe=recipe, shard_size=plan.shard_size, random_seed=spec.seed, inputs=inputs
    )
    (directory / LOCK_NAME).write_text(json.dumps(lock.model_dump(exclude_none=True), indent=2) + "\n")


def read_lock(path: str | Path) -> Lock:
    try:
        raw = read_user_file(path, SUPPORT_LIMIT)
    except OSError as e:
        raise MergerError(f"{path}: cannot read lock file: {e.strerror}") from None
    except ValueError as e:
        raise MergerError(f"{path}: cannot read lock file: it {e}") from None
    try:
        data = parse_json(raw, str(path))
    except ModelError as e:
        raise MergerError(f"{e}: not a merger lock file") from None
    try:
        return Lock.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise MergerError(f"{path}: not a merger lock file ({where}: {err['msg']})") from None

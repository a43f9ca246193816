"""Provenance: every output holds merger.lock.json with merger's version, the recipe, and each input's files
and hashes (for a Hub input also its commit), so `merger apply --locked` re-runs exactly those inputs and
refuses any that changed. Nothing in it depends on when or where the merge ran."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from merger import __version__
from merger.errors import MergerError, ModelError
from merger.plan import Plan
from merger.sources import sha256_file

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
    shard_size: int
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
                elif a != b:
                    problems.append(f"'{ref}': {file} has changed since the lock ({_short(a)} then, {_short(b)} now)")
        if problems:
            raise ModelError("\n".join(f"{name}: {p}" for p in problems))


def inputs_of(plan: Plan) -> list[LockedInput]:
    """The lock's record of what the merge reads. Local files are hashed here (read once, in full); Hub
    files carry the hashes the Hub lists for them (LFS sha256, or git blob id)."""
    refs: dict[Path, list[str]] = {}
    for m in [plan.base, *plan.inputs, plan.tokenizer_from]:
        if m is not None and m.ref not in refs.setdefault(m.path, []):
            refs[m.path].append(m.ref)
    out = []
    for model, names in plan.files_used():
        if model.remote is not None:
            files = {n: model.remote.files[n].record() for n in names}
            repo_id, commit = model.remote.repo_id, model.remote.commit
        else:
            files = {n: {"sha256": sha256_file(model.path / n), "size": (model.path / n).stat().st_size} for n in names}
            repo_id = commit = None
        out.append(
            LockedInput(refs=refs[model.path], repo_id=repo_id, commit=commit, files=dict(sorted(files.items())))
        )
    return out


def write_lock(plan: Plan, inputs: list[LockedInput], directory: Path) -> None:
    spec = plan.spec
    recipe = spec.source.text or yaml.safe_dump(spec.recipe.model_dump(exclude_defaults=True), sort_keys=False)
    lock = Lock(merger_version=__version__, recipe=recipe, shard_size=plan.shard_size, inputs=inputs)
    (directory / LOCK_NAME).write_text(json.dumps(lock.model_dump(exclude_none=True), indent=2) + "\n")


def read_lock(path: str | Path) -> Lock:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise MergerError(f"{path}: cannot read lock file: {e.strerror}") from None
    except ValueError:
        raise MergerError(f"{path}: not a lock file (not JSON)") from None
    try:
        return Lock.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise MergerError(f"{path}: not a merger lock file ({where}: {err['msg']})") from None


def _short(entry: dict) -> str:
    kind = "sha256" if "sha256" in entry else "git_sha1"
    return f"{kind} {str(entry.get(kind))[:12]}, {entry.get('size')} bytes"

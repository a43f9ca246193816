"""The output directory's life: written as a partial output beside the destination, resumed after an
interruption, and swapped into place in one step.

For the output `dir/out` merger writes into `dir/.out.merger-partial/`:

    model/           the output as it will be, shard by shard, then its index, config, card and lock
    state.json       what the shards are merged from: a fingerprint of the plan and its inputs
    done/NAME.json   one per finished shard, written once the shard is on disk

A merge holds a lock on that directory (flock: it goes with the process, however it dies), so a second
merger into the same output stops at once. A later run with the same fingerprint keeps every finished
shard that is still as it was written (its size, header and file) and writes the rest; a changed
recipe or input starts over. At the end every file and the directory are flushed to disk, and
`model/` is exchanged with the destination in one rename (RENAME_EXCHANGE): at every instant the
destination holds the complete old output or the complete new one.

`--force` replaces only an earlier merger output or an empty directory; anything else is refused
with the name of a file merger did not write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from merger import __version__, system
from merger.errors import DiskFull, OutputError, describe
from merger.files import fsync_dir, fsync_file, write_json
from merger.lock import LOCK_NAME, LockedInput
from merger.plan import Plan, Shard
from merger.sources import CARD_NAME, INDEX_NAME, MODEL_FILES, SINGLE_NAME, TOKENIZER_FILES, on_fatal

PARTIAL = ".merger-partial"
CANDIDATE = ".merger-candidate-"  # greedy soup's temporary candidates, beside the output
LEGACY = (".merger-tmp", ".merger-old")  # staging of merger before resume existed: never resumable
SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
OUTPUT_NAMES = {INDEX_NAME, SINGLE_NAME, "config.json", CARD_NAME, LOCK_NAME, *MODEL_FILES, *TOKENIZER_FILES}


def partial_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{PARTIAL}"


def fingerprint(plan: Plan) -> str:
    """What the output's bytes depend on: merger's version, the method and every parameter, the device
    and compute dtype, the layout of every shard, and each input file as it is now (a local file's
    stamp, a Hub file's hash)."""
    spec = plan.spec

    def identity(model) -> dict:
        files = {}
        for f in model.files:
            name = model.name_of(f)
            # size, times, inode (not the device: a number that may change at the next boot or mount)
            files[name] = model.remote.files[name].etag if model.remote else list(model.stamps[f][:4])
        return {"path": str(model.path), "commit": model.remote.commit if model.remote else None, "files": files}

    data = {
        "merger": __version__,
        "libraries": {name: _version(name) for name in ("numpy", "numba", "torch")},  # they compute the bits
        "method": spec.method.name,
        "seed": spec.seed,
        "params": spec.params.model_dump(mode="json"),
        "models": [g.params.model_dump(mode="json") for g in spec.ingredients],
        "inputs": [identity(m) for m in plan.inputs],
        "base": identity(plan.base) if plan.base else None,
        "device": plan.device,
        "compute_dtype": plan.compute_dtype,
        "shards": [[s.filename, [[t.name, t.dtype, list(t.shape)] for t in s.tensors]] for s in plan.shards],
        # tensors copied as stored (NaN payloads kept): a partial output written before merger did so, whose
        # shards made them canonical, is started again rather than resumed beside shards that keep them
        "copied": sorted(t.name for t in plan.tensors if plan.verbatim(t)),
    }
    if plan.vocabulary is not None:  # how the vocabulary tensors' rows were laid out (merger.vocab)
        data["vocabulary"] = plan.vocabulary.digest()
    if spec.layered:  # parameters per tensor, and which layers go where: as written
        slices = [
            [[[e.ref, e.start, e.end, e.settings] for e in (*sl.inputs, sl.base) if e], sl.settings]
            for sl in spec.slices or []
        ]
        data["layered"] = {
            "parameters": spec.settings,
            "models": [g.settings for g in spec.ingredients],
            "slices": slices,
        }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _record(st: os.stat_result) -> dict[str, int]:
    """What the record of a finished shard says of its file, and what a later run checks it against: the
    change time too, which a write that puts the size and mtime back (os.utime) cannot put back."""
    return {"size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Finished:
    """Records that a shard is done, once it is on disk: called on the syncer thread of whichever
    process wrote it (a --workers process or a launched rank too, so it pickles)."""

    partial: Path
    durable: bool = True

    def __call__(self, shard: Shard, path: Path) -> None:
        if self.durable:
            fsync_dir(path.parent)  # the shard's name, as well as its bytes (fsynced before this is called)
        write_json(self.partial / "done" / f"{shard.filename}.json", _record(path.stat()), durable=self.durable)


@dataclass
class Resume:
    """What a partial output of `dest` holds, as `merger plan` reports it."""

    path: Path
    state: str  # "resumable", "stale" (another recipe or changed inputs: apply starts over), "busy", "in the way"
    done: list[str]  # finished shards that would be kept
    done_bytes: int


def inspect(plan: Plan, dest: Path) -> Resume | None:
    """The partial output of `dest`, if there is one (reads it, locks nothing for longer than a look)."""
    path = partial_path(dest)
    if not os.path.lexists(path):
        return None
    try:
        fd = _lock(path)
    except BlockingIOError:
        return Resume(path, "busy", [], 0)
    except OSError:  # a link, a file: not a directory merger made
        return Resume(path, "in the way", [], 0)
    try:
        if not _made_by_merger(path):  # what Partial refuses to use: somebody's folder of that name
            return Resume(path, "in the way", [], 0)
        if _state(path).get("fingerprint") != fingerprint(plan):
            return Resume(path, "stale", [], 0)
        done = [plan.shards[i] for i in _verified(path, plan)]
        return Resume(path, "resumable", [s.filename for s in done], sum(s.file_size for s in done))
    finally:
        os.close(fd)


class Partial:
    """The partial output of `dest` this process writes: locked, checked against the plan, and holding
    the shards an earlier run finished (`done`, indices into plan.shards) when it was the same merge.
    Without `force`, an output that another run put in place while this one waited for its hold is
    refused now, before anything is merged."""

    def __init__(self, dest: Path, plan: Plan, *, force: bool = False, durable: bool = True):
        self.dest = dest
        self.plan = plan
        self.path = partial_path(dest)
        self.model = self.path / "model"
        self.durable = durable
        self.committed = False
        self.created = _make_parents(dest)
        remove_leftovers(dest)
        self._fd = _claim(self.path, dest)
        if not _made_by_merger(self.path):
            os.close(self._fd)
            raise OutputError(f"output {dest}: {self.path} is in the way (not a merger partial output); remove it")
        self._cancel = on_fatal(self.discard)  # an input that shrinks under the merge (SIGBUS)
        try:
            _restore(self.path / "old", dest)
            if not force and os.path.lexists(dest):
                raise OutputError(already_exists(dest))
            self.done = self._set_up()
            self.recorded = _state(self.path).get("inputs")  # the inputs' hashes an earlier run read
        except BaseException:  # an interrupt as it starts: nothing of an earlier run is lost by it
            if not any((self.path / "done").glob("*.json")):
                self.discard()
            self.close()
            raise

    @property
    def todo(self) -> list[int]:
        return [i for i in range(len(self.plan.shards)) if i not in self.done]

    @property
    def finished(self) -> Finished:
        return Finished(self.path, self.durable)

    @property
    def fetched(self) -> Path:
        """Where --low-disk notes the Hub shards it fetched for this output (fetch.JustInTime), so that
        a run that resumes it drops those too once they are used."""
        return self.path / "fetched.json"

    def _set_up(self) -> set[int]:
        try:
            return self._resume()
        except OSError as e:  # a full disk (or out of inodes) as it starts
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise (DiskFull if full else OutputError)(f"output {self.dest}: {describe(e)}") from None

    def _resume(self) -> set[int]:
        fp = fingerprint(self.plan)
        state = _state(self.path)
        if state.get("fingerprint") != fp:
            for entry in self.path.iterdir():
                _remove(entry)
            state = {"fingerprint": fp, "merger": __version__}
            write_json(self.path / "state.json", state, durable=self.durable)
        self.model.mkdir(exist_ok=True)
        (self.path / "done").mkdir(exist_ok=True)
        if self.durable:  # the directories the records and shards are in, and where those are
            for d in (self.path, self.path.parent):
                fsync_dir(d)
        done = _verified(self.path, self.plan)
        keep = {self.plan.shards[i].filename for i in done}
        for entry in self.model.iterdir():  # a shard cut short, metadata of the run that was interrupted
            if entry.name not in keep:
                _remove(entry)
        for entry in (self.path / "done").iterdir():
            if entry.name.removesuffix(".json") not in keep:
                _remove(entry)
        return done

    def record_inputs(self, inputs: list[LockedInput]) -> None:
        """Record the inputs' hashes as this run read them, as soon as they are known (a later run that
        resumes this one compares its own with them)."""
        write_json(
            self.path / "state.json", _state(self.path) | {"inputs": [i.files for i in inputs]}, durable=self.durable
        )

    def check_inputs(self, inputs: list[LockedInput]) -> list[int]:
        """The shards kept from an earlier run that must be written again: all of them if that run
        recorded other hashes for the inputs (one rewritten in a way its stamp did not show), else none.
        Records this run's."""
        now = [i.files for i in inputs]
        redo = sorted(self.done) if self.recorded not in (None, now) else []
        for i in redo:
            (self.path / "done" / f"{self.plan.shards[i].filename}.json").unlink(missing_ok=True)
        self.record_inputs(inputs)
        return redo

    def commit(self, force: bool) -> None:
        """Put the finished output at the destination: flushed to disk, then renamed into place in one
        step (an earlier output, which --force allows to replace, is exchanged with it and removed)."""
        if self.durable:
            for entry in self.model.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    fsync_file(entry)
            fsync_dir(self.model)
        dest = self.dest
        system.raise_if_interrupted()
        with system.interrupts_held():  # the swap and what it leaves behind, as one step
            if os.path.lexists(dest):
                if not force:
                    raise OutputError(already_exists(dest))
                check_replaceable(dest)
                _exchange(self.model, dest, self.path / "old")
            else:
                _rename_new(self.model, dest)
            self.committed = True
            if self.durable:
                fsync_dir(dest.parent)
            self.discard()

    def discard(self) -> None:
        """Remove the partial output (after a commit it holds the old output, if any). An old output set
        aside and not replaced goes back first; directories made to hold the output go if nothing else
        is in them."""
        aside = self.path / "old"
        with contextlib.suppress(OSError):
            _restore(aside, self.dest)
        if aside.is_dir():  # it could not go back: the one copy of the old output is never removed
            for entry in self.path.iterdir():
                if entry != aside:
                    _remove(entry)
            return
        for _ in range(3):  # a thread still at work beside (recording the inputs' hashes) may add a file meanwhile
            shutil.rmtree(self.path, ignore_errors=True)
            if not os.path.lexists(self.path):
                break
        if not os.path.lexists(self.dest):
            for d in self.created:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def share(self) -> None:
        """Let the other ranks of a launch hold the partial output too (staging.join): from now on it is
        busy for a new run until every rank has let go of it."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        """Let go of the partial output, keeping it for a later run to resume."""
        self._cancel()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def recover(dest: Path) -> None:
    """Put back an earlier output that a replacement killed between its two renames left aside (where
    the file system cannot exchange directories), before anything else looks at the destination."""
    path = partial_path(dest)
    if not (path / "old").is_dir() or os.path.lexists(dest):
        return
    try:
        fd = _lock(path)
    except OSError:  # a run that holds it does this itself
        return
    try:
        _restore(path / "old", dest)
    finally:
        os.close(fd)


def check_destination(dest: Path, plan: Plan, force: bool) -> None:
    """Refuse outputs that would clobber an input, or an existing directory (without --force, or with it
    one that is not an earlier merger output)."""
    check_path(dest, plan)
    if os.path.lexists(dest):
        check_replaceable(dest)  # what --force would refuse too is said as such: never a hint that cannot help
        if not force:
            raise OutputError(already_exists(dest))


def already_exists(dest: Path) -> str:
    return f"output {dest} already exists; pass --force to replace it"


def check_path(dest: Path, plan: Plan) -> None:
    """Refuse an output that is or holds an input, the working directory, or that cannot be made
    where it is (under a file)."""
    for m in plan.models + [plan.tokenizer_from]:
        if dest == m.path or m.path in dest.parents:
            raise OutputError(f"output {dest} is inside input model '{m.ref}'; choose another directory")
        if dest in m.path.parents:
            raise OutputError(f"output {dest} contains input model '{m.ref}'; choose another directory")
    if dest == Path.cwd() or dest in Path.cwd().parents:
        raise OutputError(f"output {dest} is the working directory or holds it; choose another directory")
    if system.is_mount_point(dest):  # a volume: the finished output is renamed into place, which a mount point cannot
        raise OutputError(
            f"output {dest} is a mount point, which merger cannot replace (it writes beside the output and renames "
            f"the result into place); write into a folder inside it, such as {dest / 'model'}"
        )
    for parent in dest.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise OutputError(f"output {dest}: {parent} is a file, not a directory to hold it")
            break


def check_replaceable(dest: Path) -> None:
    """--force replaces an earlier merger output (a merger.lock.json and only files merger writes) or
    an empty directory: never a directory that holds anything else."""
    how = "; --force replaces only an earlier merger output or an empty directory"
    if dest.is_symlink() or not dest.is_dir():
        raise OutputError(f"output {dest} is {'a link' if dest.is_symlink() else 'a file'}, not a directory{how}")
    entries = sorted(dest.iterdir())
    if not entries:
        return
    if not _is_lock(dest / LOCK_NAME):
        raise OutputError(f"output {dest} is not a merger output (it holds no {LOCK_NAME}){how}")
    strangers = [
        e.name
        for e in entries
        if e.is_symlink() or not e.is_file() or not (e.name in OUTPUT_NAMES or SHARD_NAME.fullmatch(e.name))
    ]
    if strangers:
        more = f" (and {len(strangers) - 1} more)" if len(strangers) > 1 else ""
        raise OutputError(
            f"output {dest} holds '{strangers[0]}'{more}, which merger did not write{how}: move it away first"
        )


def _is_lock(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("merger_version"), str)


def remove_leftovers(dest: Path) -> None:
    """Remove what killed runs left beside `dest`: staging directories of earlier merger versions and
    greedy-soup candidates that no live process holds. (The partial output itself is resumed or
    cleared by Partial.)"""
    parent = dest.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        name = entry.name
        legacy = name.startswith(f".{dest.name}.") and name.endswith(LEGACY)
        being_made = name.startswith(NEW) and _older_than(entry, 60)  # killed between its mkdir and rename
        if not (legacy or being_made or name.startswith(CANDIDATE)) or entry.is_symlink():
            continue
        if not entry.is_dir():
            entry.unlink(missing_ok=True)
            continue
        try:
            fd = _lock(entry)
        except OSError:  # held by a live process (a candidate being evaluated), or gone
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)


NEW = ".merger-new-"  # a temporary directory being made (temporary)


def temporary(parent: Path | None) -> tuple[Path, int]:
    """A new directory for greedy soup's candidates and the evaluator's copies, beside the output (or in
    the system's temporary directory): held by this process (the descriptor returned; close it when
    done), so that remove_leftovers leaves it alone, and found and removed by a later run into that
    output if this process is killed. Made under another name and renamed once held, so that no other
    run can take it in between."""
    made = Path(tempfile.mkdtemp(prefix=NEW, dir=parent))
    fd = _lock(made)
    final = made.with_name(CANDIDATE + made.name.removeprefix(NEW))
    os.rename(made, final)
    return final, fd


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False


def _claim(path: Path, dest: Path) -> int:
    """The locked partial directory of `dest`, created if need be."""
    deadline = time.monotonic() + 2  # a `merger plan` looking at it holds it for a moment
    while True:
        _mkdir(path, dest)
        try:
            fd = _lock(path)
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise OutputError(
                f"output {dest}: another merger is writing it now (it holds {path}); wait for it to finish"
            ) from None
        except FileNotFoundError:  # removed meanwhile by the run that held it
            continue
        except OSError:  # a link, a file: not a directory merger made
            raise OutputError(f"output {dest}: {path} is in the way (not a merger partial output); remove it") from None
        st = os.lstat(path) if os.path.lexists(path) else None
        if st is not None and os.path.samestat(os.fstat(fd), st):
            return fd
        os.close(fd)  # committed or removed by its holder between our mkdir and the lock: again
        if time.monotonic() > deadline + 10:
            raise OutputError(f"output {dest}: could not take hold of {path}")


def join(path: Path) -> int:
    """Share the partial output `path` with the rank of a launch that holds it (Partial.share): a new
    run into the output then sees it busy until every rank is gone."""
    fd = _open_dir(path)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _make_parents(dest: Path) -> list[Path]:
    """Create the directories that will hold `dest`; returns those created, deepest first (removed again
    if the merge fails before anything is kept)."""
    missing = []
    for parent in [dest.parent, *dest.parent.parents]:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    for d in reversed(missing):
        _mkdir(d, dest)
    return missing


def _mkdir(d: Path, dest: Path) -> None:
    """Create directory `d` (there already is fine) on the way to the output `dest`."""
    try:
        d.mkdir()
    except FileExistsError:
        pass
    except OSError as e:
        raise OutputError(f"output {dest}: cannot create {d}: {describe(e)}") from None


def _open_dir(directory: Path) -> int:
    """A directory opened as itself: never through a link that another user put in its place."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    return os.open(directory, flags)


def _lock(directory: Path) -> int:
    fd = _open_dir(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _restore(aside: Path, dest: Path) -> None:
    """An earlier output left aside by a replacement that was killed between its two renames (where the
    file system cannot exchange directories) goes back to the destination."""
    if aside.is_dir() and not os.path.lexists(dest):
        os.rename(aside, dest)
    elif aside.is_dir():
        shutil.rmtree(aside)  # the new output made it into place: this is the old one


PARTIAL_NAMES = frozenset({"state.json", "model", "done", "old", "fetched.json"})  # what Partial writes there
_WRITING = re.compile(r"\.(state|fetched)\.json\.\d+\.\d+\.tmp")  # files.write_atomic's, killed as it wrote


def _made_by_merger(path: Path) -> bool:
    """Whether the partial output `path` is merger's: it records its fingerprint first, and a run killed
    before that, or as it cleared a stale one, leaves nothing there but what merger writes."""
    if "fingerprint" in _state(path):
        return True
    return all(e.name in PARTIAL_NAMES or _WRITING.fullmatch(e.name) for e in path.iterdir())


def _state(path: Path) -> dict:
    try:
        with open(path / "state.json", "rb") as f:
            data = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _verified(path: Path, plan: Plan) -> set[int]:
    """The shards recorded as finished whose file is still the one recorded, of the planned size and
    with the planned header."""
    done = set()
    for i, shard in enumerate(plan.shards):
        try:
            with open(path / "done" / f"{shard.filename}.json", "rb") as f:
                record = json.loads(f.read(4096))
            file = path / "model" / shard.filename
            st = file.stat()
            header = shard.header
            with open(file, "rb") as f:
                ok = f.read(len(header)) == header
        except (OSError, ValueError, RecursionError):
            continue
        if ok and record == _record(st) and st.st_size == shard.file_size:
            done.add(i)
    return done


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) where the system has it: True when done, False when unsupported here (the
    caller falls back); any other failure raises OSError."""
    call = getattr(system.libc(), "renameat2", None)
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _exchange(new: Path, dest: Path, aside: Path) -> None:
    """Swap the directory `new` with the existing `dest` in one step, the old output ending at `new`.
    Where the file system cannot exchange, the old output is renamed to `aside` and the new one into
    place (the caller holds interrupts back meanwhile; a run killed between the two leaves the old output
    at `aside`, which the next run puts back first)."""
    if _renameat2(new, dest, _RENAME_EXCHANGE):
        return
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)  # the old output goes back
        raise


def _rename_new(new: Path, dest: Path) -> None:
    """Rename `new` to `dest`, which must not exist (never silently over an empty directory that
    appeared meanwhile)."""
    try:
        if _renameat2(new, dest, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputError(already_exists(dest)) from None
    if os.path.lexists(dest):
        raise OutputError(already_exists(dest))
    os.rename(new, dest)

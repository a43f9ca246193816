"""Which of a plan's Hub files are downloaded, and when: all before the merge, or the weights shard by
shard as the merge reads them (--low-disk), and how much disk either way takes."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import BinaryIO

from merger.errors import ModelError, sized
from merger.files import parse_json, write_json
from merger.plan import Plan, check_support_files
from merger.sources import TensorInfo


def fetch_inputs(plan: Plan, *, weights: bool = True, shards: list[int] | None = None) -> None:
    """Download every file the merge uses from the Hub, weights too unless they are fetched as needed
    (of the weights, those the given shards read). Small files first, so that a missing or malformed
    one is found before gigabytes of weights are downloaded."""
    uses = plan.file_uses(shards)
    todo = []
    for model, names in plan.files_used():
        if model.remote is None:
            continue
        shard_names = {model.name_of(f): f for f in model.files}
        for name in names:
            if name not in shard_names:
                todo.append((False, model, name))
            elif weights and shard_names[name] in uses:
                todo.append((True, model, name))
    for _, model, name in sorted(todo, key=lambda item: item[0]):
        model.remote.fetch(name)
    for model, _ in plan.files_used():
        if model.remote is not None:
            check_support_files(plan, model, fetched=True)


class JustInTime:
    """The engine's FileSource for --low-disk: a Hub shard is fetched when the engine first maps it,
    checked against the hash the Hub lists, and deleted once the engine is done with every tensor the
    given shards need from it, so the disk holds the shards in use rather than whole models. Shards
    that were already cached stay (checked all the same). `ledger` (a JSON file) remembers what was
    fetched, so that after an interruption the run that resumes drops those shards as well: the ones
    it still needs once it is done with them, the others at once."""

    def __init__(self, plan: Plan, shards: list[int] | None = None, ledger: Path | None = None):
        uses = plan.file_uses(shards)
        self._owner = {f: m for m in plan.models for f in m.files}
        self._ledger = ledger
        earlier = {Path(p) for p in _read_ledger(ledger)} & set(self._owner)
        for f in earlier - set(uses):  # fetched by an interrupted run, and no longer needed
            self._drop(f)
        fetched = {f for f, m in self._owner.items() if m.remote is not None and f in uses and not f.exists()}
        self._fetched = fetched | (earlier & set(uses))  # deleted after their last use
        self._left = {f: dict(uses[f].reads) for f in self._fetched}  # reads still to come, by tensor
        self._checked: set[Path] = set()
        self._lock = threading.Lock()
        self._note()

    def open(self, file: Path) -> BinaryIO:
        model = self._owner[file]
        with self._lock:
            if model.remote is not None and file not in self._checked:
                name = model.name_of(file)
                if not file.exists():
                    model.remote.fetch(name)
                model.remote.verify(name)
                self._checked.add(file)
        return model.open_weights(file)

    def done(self, info: TensorInfo) -> bool:
        with self._lock:
            left = self._left.get(info.file)
            if not left or info.name not in left:
                return False  # not ours, or told more often than planned
            left[info.name] -= 1
            if not left[info.name]:
                del left[info.name]
            return not left

    def release(self, file: Path) -> None:
        with self._lock:
            self._drop(file)
            self._fetched.discard(file)
            self._note()

    def _drop(self, file: Path) -> None:
        model = self._owner[file]
        model.remote.drop(model.name_of(file))

    def _note(self) -> None:
        if self._ledger is not None:
            write_json(self._ledger, sorted(map(str, self._fetched)))


def _read_ledger(ledger: Path | None) -> list[str]:
    try:
        data = parse_json(ledger.read_bytes(), str(ledger)) if ledger is not None else []
    except (OSError, ModelError):
        return []
    return [p for p in data if isinstance(p, str)] if isinstance(data, list) else []


def disk_needs(plan: Plan, shards: list[int] | None = None) -> dict[str, int]:
    """Bytes of disk the merge needs, output and downloads together: with every Hub file fetched first,
    and with --low-disk (the shards in use at any moment, plus the output written so far). `shards`:
    the shards still to write (a resumed merge), default all."""
    uses = plan.file_uses(shards)
    new: dict[Path, int] = {}  # Hub files not in the cache yet
    for model, names in plan.files_used():
        if model.remote is not None:
            new |= {model.path / n: model.remote.files[n].size for n in names if not (model.path / n).exists()}
    all_weights = {f for m in plan.models for f in m.files}
    new = {f: size for f, size in new.items() if f in uses or f not in all_weights}  # weights only where still read
    weights = {f: size for f, size in new.items() if f in uses}
    chosen = plan.shards if shards is None else [plan.shards[i] for i in shards]
    peak = most_live = written = 0
    for i, t in enumerate(t for s in chosen for t in s.tensors):
        written += t.nbytes
        # the engine maps the next tensor's inputs while merging this one: a shard arrives one tensor early
        live = sum(size for f, size in weights.items() if uses[f].first - 1 <= i <= uses[f].last)
        peak, most_live = max(peak, live + written), max(most_live, live)
    others = sum(new.values()) - sum(weights.values())
    metadata = plan.metadata_bytes()  # headers, copied files, index, card, lock, records: written whatever is left
    output = sum(s.nbytes for s in chosen) + metadata
    return {
        "output_bytes": output,
        "download_bytes": sum(new.values()),
        "peak_bytes": sum(new.values()) + output,
        "low_disk_peak_bytes": others + peak + metadata,
        "low_disk_download_peak_bytes": others + most_live,  # the downloads alone, where they land elsewhere
    }


def room(plan: Plan, dest: Path, shards: list[int] | None = None, low_disk: bool = False) -> list[str]:
    """What will not fit on disk, a line each: the output (and the Hub downloads where they land on the same
    filesystem) against the free space beside `dest`, and the downloads against their own filesystem's.
    Empty where everything fits, or where the free space cannot be told. `shards`: as disk_needs."""
    needs = disk_needs(plan, shards)
    out = _volume(dest.parent)
    cache = next((m.remote.hub.cache_dir for m, _ in plan.files_used() if m.remote is not None), None)
    hub = _volume(cache) if needs["download_bytes"] and cache is not None else None
    lines = []
    if hub is not None and out is not None and hub[0] != out[0]:
        downloads = needs["low_disk_download_peak_bytes" if low_disk else "download_bytes"]
        if downloads > hub[1]:
            lines.append(
                f"the Hub downloads need {sized(downloads)} in the Hugging Face cache ({cache}), and {hub[2]} has "
                f"{sized(hub[1])} free: free some space there"
                + ("" if low_disk else ", add --low-disk")
                + " or point HF_HUB_CACHE elsewhere"
            )
        written, what = needs["output_bytes"], "the output needs"
    else:
        written = needs["low_disk_peak_bytes" if low_disk else "peak_bytes"]
        what = "the output and the Hub downloads need" if needs["download_bytes"] else "the output needs"
    if out is not None and written > out[1]:
        smaller = needs["download_bytes"] and not low_disk and needs["low_disk_peak_bytes"] <= out[1]
        need, free = sized(written), sized(out[1])
        if need == free:  # the same when rounded: in bytes
            need, free = f"{written} B", f"{out[1]} B"
        lines.append(
            f"output {dest}: {what} {need}, and {out[2]} has {free} free: free some space there"
            + (", add --low-disk (then at most " + sized(needs["low_disk_peak_bytes"]) + ")" if smaller else "")
            + " or write the output elsewhere"
        )
    return lines


def _volume(path: Path) -> tuple[int, int, Path] | None:
    """(device id, free bytes, the folder looked at) for the filesystem that holds `path`, or would: its nearest
    folder that exists. None where none can be looked at, or where its size is not told (a total of 0: some
    FUSE and network filesystems)."""
    for folder in (path, *path.parents):
        try:
            device, usage = os.stat(folder).st_dev, shutil.disk_usage(folder)
        except OSError:  # not there yet, or not ours to look into
            continue
        return (device, usage.free, folder) if usage.total else None
    return None

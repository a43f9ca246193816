"""The output directory: staged in a temporary sibling, completed with index, config, tokenizer and a
model card, then renamed into place, so a failed or interrupted merge leaves nothing at the destination."""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import yaml

from merger import __version__, parallel
from merger.errors import MergerError, describe
from merger.hub import JustInTime, fetch_inputs
from merger.lock import Lock, LockedInput, inputs_of, write_lock
from merger.plan import Plan
from merger.sources import CARD_NAME, DTYPES, INDEX_NAME, MODEL_FILES, TOKENIZER_FILES, LocalModel, read_config
from merger.stream import write_shards


def check_destination(dest: Path, plan: Plan, force: bool) -> None:
    """Refuse outputs that would clobber an input or an existing directory (without --force)."""
    dest = dest.expanduser().resolve()
    for m in plan.models + [plan.tokenizer_from]:
        if dest == m.path or m.path in dest.parents:
            raise MergerError(f"output {dest} is inside input model '{m.ref}'; choose another directory")
        if dest in m.path.parents:
            raise MergerError(f"output {dest} contains input model '{m.ref}'; choose another directory")
    if dest.exists() and not force:
        raise MergerError(f"output {dest} already exists; pass --force to replace it")


def new_staging(dest: Path) -> Path:
    """A temporary sibling of `dest` (same file system, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".merger-tmp", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the finished model should look like any directory
    return tmp


def commit(tmp: Path, dest: Path, force: bool) -> None:
    """Rename the finished staging directory to `dest`, replacing an old output only with force."""
    if dest.exists() or dest.is_symlink():
        if not force:
            raise MergerError(f"output {dest} already exists; pass --force to replace it")
        old = dest.with_name(f".{dest.name}.{os.getpid()}.merger-old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, dest)


@contextmanager
def staged(dest: Path, force: bool) -> Iterator[Path]:
    """Yield a staging directory for `dest`; on success rename it into place, else remove it."""
    tmp = new_staging(dest)
    try:
        yield tmp
        commit(tmp, dest, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(
    plan: Plan,
    dest: Path,
    *,
    force: bool = False,
    progress: bool = False,
    workers: int = 1,
    low_disk: bool = False,
    lock: Lock | None = None,
    lock_name: str = "lock",
    card: str | None = None,
    provenance: Plan | None = None,
) -> dict | None:
    """Run the whole merge into `dest`. Returns a summary for --json (None on ranks other than 0 of a
    distributed launch, which only write their shards). `card`: markdown appended to the model card.

    Hub inputs are downloaded first: all their files, or with `low_disk` all but the weights, which are
    then fetched shard by shard as the merge maps them and deleted after. With `lock`, every input must
    match it before anything is downloaded or written. `provenance`: the plan whose inputs the lock
    records, if not `plan` (greedy soup: every ingredient its search read)."""
    start = time.perf_counter()
    worker_rss = worker_gpu = 0  # with --workers, the workers' peaks
    dest = dest.expanduser().resolve()
    check_destination(dest, plan, force)
    if low_disk and workers > 1:
        raise MergerError("--low-disk fetches and deletes Hub shards in one process; leave out --workers")
    with ThreadPoolExecutor(1, thread_name_prefix="merger-hash") as pool:
        # Hashing local inputs for the lock reads every file once; it runs beside the merge (hashlib
        # releases the GIL), unless a lock must be checked before anything is written.
        hashing = pool.submit(inputs_of, provenance or plan)
        if lock is not None:
            lock.verify(hashing.result(), lock_name)
        fetch_inputs(plan, weights=not low_disk)
        if plan.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        group = parallel.launched_group()
        if group is not None:
            if low_disk:
                raise MergerError(
                    "--low-disk fetches and deletes Hub shards in one process, not in a distributed launch"
                )
            bytes_read = _write_as_rank(plan, dest, force, progress, group, hashing.result)
            if bytes_read is None:
                return None
        else:
            with staged(dest, force) as tmp:
                if workers > 1:
                    bytes_read, worker_rss, worker_gpu = parallel.write_with_workers(plan, tmp, workers)
                else:
                    files = JustInTime(plan) if low_disk else None
                    bytes_read = write_shards(plan, tmp, progress=progress, files=files)
                write_metadata(plan, tmp, dest.name, hashing.result(), card)
    summary = {
        "output": str(dest),
        "method": plan.spec.method.name,
        "device": plan.device,
        "tensors": len(plan.tensors),
        "shards": len(plan.shards),
        "processes": group.world if group else workers,
        "bytes_read": bytes_read,
        "bytes_written": plan.bytes_written,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": max(peak_rss(), worker_rss),  # per process: the largest, workers included
    }
    if plan.device == "cuda":
        import torch

        summary["peak_gpu_bytes"] = max(torch.cuda.max_memory_allocated(), worker_gpu)
    return summary


def _write_as_rank(
    plan: Plan,
    dest: Path,
    force: bool,
    progress: bool,
    group: parallel.Group,
    inputs: Callable[[], list[LockedInput]],
) -> int | None:
    """This rank's shards; rank 0 then finishes the directory. Every rank reports before anyone commits,
    so one failing rank fails the whole merge (every rank exits with an error) and nothing lands at
    `dest`; a rank that dies outright fails the others' exchange, and whoever notices removes the
    staging directory."""
    tmp = new_staging(dest) if group.rank == 0 else None
    try:
        tmp = Path(group.share(str(tmp) if tmp else None))
        mine = parallel.assign(plan.shards, group.world)[group.rank]
        result: tuple[int, str | None] = (0, None)
        try:
            result = (write_shards(plan, tmp, progress=progress and group.rank == 0, shards=mine), None)
        except Exception as e:  # reported through the gather below
            result = (0, f"rank {group.rank}: {describe(e)}")
        results = group.gather(result)
        errors = [err for _, err in results if err]
        if errors:  # rank 0 says everything; the others what failed there, if anything
            elsewhere = f"rank {group.rank}: the merge failed on another rank (rank 0's log says why)"
            raise MergerError("\n".join(errors) if group.rank == 0 else result[1] or elsewhere)
        if group.rank != 0:
            return None
        write_metadata(plan, tmp, dest.name, inputs())
        commit(tmp, dest, force)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        group.close()
    return sum(n for n, _ in results)


def write_metadata(plan: Plan, directory: Path, title: str, inputs: list[LockedInput], card: str | None = None) -> None:
    write_index(plan, directory)
    copy_support_files(plan, directory)
    write_card(plan, directory, title, card)
    write_lock(plan, inputs, directory)


def proc_kib(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a /proc file, in bytes (None off Linux or if absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux the latter survives exec, so a
    process started from a big parent (a test runner, a notebook) would report the parent's size."""
    hwm = proc_kib("/proc/self/status", "VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_index(plan: Plan, directory: Path) -> None:
    index = {
        "metadata": {"total_size": plan.bytes_written},
        "weight_map": {t.name: s.filename for s in plan.shards for t in s.tensors},
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def output_dtype_name(plan: Plan) -> str | None:
    """The float dtype holding most of the output's bytes, as config.json names it ('bfloat16')."""
    by_dtype: dict[str, int] = {}
    for t in plan.tensors:
        if t.merged:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    if not by_dtype:
        return None
    code = max(by_dtype, key=by_dtype.__getitem__)
    return DTYPES[code][0]


def copy_support_files(plan: Plan, directory: Path) -> None:
    data = read_config(plan.reference)
    if data is not None:
        dtype = output_dtype_name(plan)
        if dtype:
            keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype"]
            for k in keys:
                data[k] = dtype
        (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name in MODEL_FILES:
        if (plan.reference.path / name).exists():
            shutil.copy2(plan.reference.path / name, directory / name)
    for name in TOKENIZER_FILES:
        if (plan.tokenizer_from.path / name).exists():
            shutil.copy2(plan.tokenizer_from.path / name, directory / name)


def write_card(plan: Plan, directory: Path, title: str, extra: str | None = None) -> None:
    """README.md with the Hub's metadata for a merge: `base_model` (the Hub ids of the inputs, or their
    paths if none is on the Hub), `base_model_relation: merge`, and `license` if every input has the same.
    `extra`: markdown added before the recipe (greedy soup's report)."""
    spec = plan.spec
    refs = ([spec.base] if spec.base else []) + [g.ref for g in spec.ingredients]
    hub_ids = [m.remote.repo_id for m in plan.models if m.remote is not None]
    front = {
        "base_model": list(dict.fromkeys(hub_ids or refs)),
        "base_model_relation": "merge",
        "tags": ["merge", "merger"],
        "library_name": "transformers",
    }
    licenses = [card_metadata(m).get("license") for m in plan.models]
    if isinstance(licenses[0], str) and all(lic == licenses[0] for lic in licenses):
        front["license"] = licenses[0]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {title}",
        "",
        f"This model is a merge made with merger {__version__} using the **{spec.method.name}** method"
        + (f" ({spec.method.paper})." if spec.method.paper else "."),
        "",
    ]
    if spec.base:
        lines += [f"Base model: `{spec.base}`{_at_commit(plan.base)}", ""]
    lines += ["Models merged:", ""]
    for g, m in zip(spec.ingredients, plan.inputs):
        shown = ", ".join(f"{k} {v}" for k, v in g.params.model_dump(by_alias=True).items())
        lines.append(f"- `{g.ref}`{_at_commit(m)}" + (f" ({shown})" if shown else ""))
    method_params = ", ".join(f"{k}: {v}" for k, v in spec.params.model_dump(by_alias=True).items())
    if method_params:
        lines += ["", f"Method parameters: {method_params}."]
    if extra:
        lines += ["", extra.strip()]
    recipe = spec.source.text or yaml.safe_dump(spec.recipe.model_dump(exclude_defaults=True), sort_keys=False)
    lines += ["", "## Recipe", "", "```yaml", recipe.strip(), "```", ""]
    (directory / "README.md").write_text("\n".join(lines))


def _at_commit(model: LocalModel | None) -> str:
    return f" at commit `{model.remote.commit[:12]}`" if model is not None and model.remote is not None else ""


def card_metadata(model: LocalModel) -> dict:
    """The YAML front matter of a model's README.md ({} if it has none, or none that parses)."""
    path = model.path / CARD_NAME
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}

"""The `merger` command: a thin click layer that turns domain errors into messages and exit codes."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import click

from merger import __version__, system
from merger.errors import Interrupted, MergerError, describe, printable, sized


def _domain_errors(fn):
    """Print MergerError as `error: ...` lines and exit 2; never a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(f"error: {printable(str(e))}", err=True)
            sys.exit(system.INTERRUPTED.exit_status)
        except MergerError as e:
            for problem in e.problems:
                click.echo(f"error: {printable(problem)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written to the output", err=True)
            sys.exit(system.INTERRUPTED.exit_status)
        except OSError as e:
            if system.INTERRUPTED.is_set():
                raise _interrupted() from None
            click.echo(f"error: {printable(describe(e))}; nothing was written to the output", err=True)
            sys.exit(1)
        except Exception:
            if system.INTERRUPTED.is_set():  # an interrupt that a library turned into another error
                raise _interrupted() from None
            raise

    return wrapper


@contextlib.contextmanager
def _printing(done: str | None = None) -> Iterator[None]:
    """Around a command's printing on stdout, its result: a reader that went away (`merger plan | head -1`)
    ends it quietly with exit 0, as it asked; a stdout that cannot take it (a full disk) gives one error
    line and exit 1, saying what was done all the same (done: the merged output's folder)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:  # a file's (listing the output for `plan`): not stdout's, which have none
            raise
        _stdout_gone()
        if isinstance(e, BrokenPipeError):
            sys.exit(0)
        after = f"; the merge is complete in {done}" if done else ""
        click.echo(f"error: cannot write to standard output: {printable(describe(e))}{after}", err=True)
        sys.exit(1)


def _stdout_gone() -> None:
    """Point stdout at /dev/null: at exit Python flushes what could not be written, and would fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _interrupted() -> SystemExit:
    click.echo("error: interrupted; nothing was written to the output", err=True)
    return SystemExit(system.INTERRUPTED.exit_status)


def _interrupt(signum, frame):
    """SIGINT, SIGTERM, SIGHUP: stop as on Ctrl-C, keeping what is done, wherever the signal lands (but
    between the two halves of putting the output in place: system.interrupts_held)."""
    system.interrupt(signum)


_COMMAND_LINE = "merger's own process"  # click's obj where main() runs the command (not a test runner)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Ctrl-C, kill (SIGTERM) and a terminal that went away (SIGHUP) interrupt `merger apply` alike.
    Afterwards the handlers are the caller's again (a test runner, a notebook); in merger's own process they
    stay, and a signal as it exits leaves the command's exit status alone (INTERRUPTED.finish): Python's
    handler would raise KeyboardInterrupt wherever it landed, in click or at shutdown ("Aborted!", a
    traceback, exit 1 for a merge that is in place)."""
    ctx = click.get_current_context(silent=True)
    own = ctx is not None and ctx.find_root().obj is _COMMAND_LINE
    system.INTERRUPTED.clear()
    # A signal the parent set to be ignored stays ignored: `nohup` (SIGHUP) and a shell's background job
    # (SIGINT) ask for exactly that.
    signals = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
    previous = [signal.signal(s, _interrupt) for s in signals]
    unraisable, sys.unraisablehook = sys.unraisablehook, system.unraisable_hook(sys.unraisablehook)
    try:
        yield
    finally:
        if own:
            system.INTERRUPTED.finish()
        else:
            for s, handler in zip(signals, previous):
                signal.signal(s, handler)
            sys.unraisablehook = unraisable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="merger")
def cli() -> None:
    """Merge fine-tuned checkpoints of one base model into a new model, driven by YAML recipes."""


def _plan(
    recipe: str | None,
    device: str | None,
    shard_size: str | None,
    locked: str | None,
    offline: bool,
    seed: int | None,
    progress=False,
):
    """The plan, and the lock it was pinned to (if any)."""
    import dataclasses

    from pydantic import ByteSize, TypeAdapter, ValidationError

    from merger.hub import Hub
    from merger.lock import read_lock
    from merger.plan import build_plan
    from merger.recipe import load_recipe, parse_recipe

    size = None
    if shard_size is not None:
        try:
            size = int(TypeAdapter(ByteSize).validate_python(shard_size))
        except ValidationError:
            raise MergerError(f"--shard-size: '{shard_size}' is not a size such as 2GB or 500MB") from None
        if size <= 0:
            raise MergerError("--shard-size must be positive")
    if recipe is not None and locked is not None:
        raise MergerError(f"give a RECIPE or --locked LOCK, not both: --locked re-runs the recipe {locked} holds")
    if recipe is None and locked is None:
        raise MergerError("give a RECIPE, or --locked LOCK to re-run the recipe a merger.lock.json holds")
    lock = read_lock(locked) if locked else None
    spec = parse_recipe(lock.recipe, name=f"{locked} (recipe)") if lock else load_recipe(recipe)
    if lock is not None:
        size = size or lock.shard_size
    if seed is not None or lock is not None:  # --random-seed, else the locked run's
        spec = dataclasses.replace(spec, seed=seed if seed is not None else lock.random_seed)
    hub = Hub(offline=offline, pins=lock.pins if lock else None, progress=progress)
    return build_plan(spec, device=device, shard_size=size, hub=hub), lock


def _destination(plan, output: str | None) -> Path:
    path = output or plan.spec.recipe.output.path
    if not path:
        raise MergerError(f"{plan.spec.where('output')}: no output directory; give -o DIR or output.path")
    if "\0" in path:
        raise MergerError("-o: an output directory's name cannot contain a NUL character")
    if os.path.islink(path) and not os.path.exists(path):  # resolving it would make the link's target
        raise MergerError(f"output {path} is a link to {os.readlink(path)}, which does not exist; give a folder")
    return Path(path)


_recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False), required=False)
_output_opt = click.option("-o", "--output", help="Output directory (overrides output.path).")
_device_opt = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to merge (default: the recipe's, else auto)."
)
_seed_opt = click.option(
    "--random-seed",
    "seed",
    type=click.IntRange(0, (1 << 63) - 1),
    help="Seed of the methods that sample (DARE, DELLA...), instead of the recipe's random_seed (default 0).",
)
_shard_opt = click.option("--shard-size", help="Bytes per output shard, e.g. 2GB (overrides output.shard_size).")
_locked_opt = click.option(
    "--locked",
    type=click.Path(dir_okay=False),
    help="Re-run the recipe in a merger.lock.json, with each Hub input at its locked commit (instead of RECIPE).",
)
_offline_opt = click.option(
    "--offline", is_flag=True, help="Use the Hugging Face cache alone, never the network (also: HF_HUB_OFFLINE=1)."
)
_workers_opt = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes writing output shards in parallel (CPU: about one per core).",
)


@cli.command()
@_recipe_arg
@_output_opt
@_device_opt
@_shard_opt
@_locked_opt
@_offline_opt
@_seed_opt
@click.option(
    "--low-disk",
    is_flag=True,
    help="Fetch Hub weights shard by shard as the merge reads them and delete each after its last read.",
)
@click.option("--no-push", is_flag=True, help="Do not publish, even if the recipe has a hub: section.")
@click.option("--force", is_flag=True, help="Replace the output if it is an earlier merger output (or empty).")
@click.option(
    "--rehash",
    is_flag=True,
    help="Read every input to hash it for the lock, even files an earlier run hashed and that are unchanged since.",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress (a bar on a terminal, else a line a minute) and no summary line."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout (implies --quiet).")
@_workers_opt
@_domain_errors
def apply(
    recipe, output, device, shard_size, locked, offline, seed, low_disk, no_push, force, rehash, quiet, as_json, workers
) -> None:
    """Validate RECIPE, then merge its models into a sharded safetensors model.

    Models are local directories or Hub ids (org/name or org/name@revision). Everything is checked from
    the safetensors headers (read remotely for Hub models) before any weight is read or downloaded. The
    output, with merger.lock.json, is written into a hidden partial directory beside it, flushed to disk
    and renamed into place when complete; an interrupted merge is finished by running the same command
    again (the shards it finished are kept). --force replaces only an earlier merger output or an empty
    directory. With a hub: section in the recipe the result is then published.

    greedy_soup first searches: it scores every model and candidate soup with the recipe's evaluator
    (progress on stderr), then writes the chosen soup and prints the search as a table.

    The lock records every input's sha256. A file an earlier run hashed is not read again for it while
    its size, times and inode are unchanged (the hashes are kept in merger's cache); --rehash reads
    every file again.
    """
    from merger import hashes

    with _signals_interrupt(), hashes.afresh() if rehash else contextlib.nullcontext():
        _apply(
            recipe, output, device, shard_size, locked, offline, seed, low_disk, no_push, force, quiet, as_json, workers
        )


def _apply(
    recipe, output, device, shard_size, locked, offline, seed, low_disk, no_push, force, quiet, as_json, workers
):
    from merger import publish
    from merger.apply import apply as write_model
    from merger.methods import greedy

    progress = not quiet and not as_json and sys.stderr is not None  # None: stderr closed
    plan, lock = _plan(recipe, device, shard_size, locked, offline, seed, progress and sys.stderr.isatty())
    dest = _destination(plan, output)
    # A lock re-runs a merge, often one somebody published with its lock: publishing it again, to the
    # repo that lock names, with this user's token, is a step of its own (merger push).
    target = plan.spec.recipe.hub if not (no_push or locked) else None
    if not as_json:  # notes say what the merge does (--json lists them): not progress, which --quiet hushes
        _notes(plan)
        if locked and plan.spec.recipe.hub and not no_push:
            repo = plan.spec.recipe.hub.repo_id
            click.echo(f"note: --locked does not publish to {repo}, as the lock's recipe says; `merger push "
                       f"{printable(str(dest))} {repo}` does", err=True)  # fmt: skip
    api = publish.hub_api() if target else None  # no token: fail now, not after the merge
    if plan.spec.method is greedy.METHOD:
        from merger.soup import format_table, greedy_soup

        if low_disk:
            raise MergerError(
                "greedy_soup reads every model once per candidate soup: --low-disk would download each "
                "Hub model again for every evaluation; leave it out"
            )
        log = None if quiet or as_json else functools.partial(click.echo, err=True)
        summary = greedy_soup(
            plan, dest, force=force, progress=progress, workers=workers, log=log, lock=lock, lock_name=locked
        )
        table = None if quiet or as_json else format_table(summary["greedy_soup"])
    else:
        summary = write_model(
            plan, dest, force=force, progress=progress, workers=workers, low_disk=low_disk, lock=lock, lock_name=locked
        )
        table = None
    if summary is None:  # a non-zero rank of a distributed launch: rank 0 reports (and publishes)
        return
    with _in_place(summary["output"]):
        if table is not None:
            with _printing(str(dest)):
                click.echo(table)
        summary["notes"] = plan.spec.source.notes
        if target:
            with _in_place(summary["output"], f": publish it with `merger push {summary['output']} {target.repo_id}`"):
                summary["published"] = _publish(summary, dest, target, api, as_json)
        with _printing(summary["output"]):
            _report(summary, as_json, quiet, bool(target))


@contextlib.contextmanager
def _in_place(output: str, hint: str = "") -> Iterator[None]:
    """Once the merge is in place, an interrupt says so (and `hint`: what is left to do), never that nothing
    was written."""
    try:
        yield
    except (KeyboardInterrupt, Exception) as e:
        # an interrupt, or one that a library turned into another error
        if isinstance(e, KeyboardInterrupt) or system.INTERRUPTED.is_set():
            raise Interrupted(f"interrupted; the merge is complete and in place at {output}{hint}") from None
        raise


def _publish(summary: dict, dest: Path, target, api, as_json: bool) -> str:
    """Publish the merged model to the recipe's hub: target; returns where it went."""
    from merger import publish

    upload = publish.prepare(
        dest, target.repo_id, private=target.private, revision=target.revision, commit_message=target.commit_message
    )
    try:
        return publish.push(upload, api)
    except publish.PublishError as e:
        out = summary["output"]
        if as_json:  # the merge's summary all the same, for a pipeline that reads it
            try:
                click.echo(json.dumps(summary | {"published": None, "publish_error": str(e)}, indent=2))
            except OSError:  # nobody reads it: the error below is what matters
                _stdout_gone()
        raise publish.PublishError(
            f"{e}; the merged model is in {out}: publish it with `merger push {out} {target.repo_id}`"
        ) from None


def _report(summary: dict, as_json: bool, quiet: bool, published: bool) -> None:
    """What `merger apply` prints on stdout once the merge is in place."""
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        click.echo(
            f"merged {summary['tensors']} tensors with {summary['method']} into {printable(summary['output'])} "
            f"({summary['shards']} shards, {sized(summary['bytes_written'])}) in {summary['seconds']:.1f} s"
            + (
                f"; {summary['shards_resumed']} of them kept from an interrupted run"
                if summary["shards_resumed"]
                else ""
            )
        )
        if published:
            click.echo(f"published to {summary['published']}")


@cli.command()
@_recipe_arg
@_output_opt
@_device_opt
@_shard_opt
@_locked_opt
@_offline_opt
@_seed_opt
@_workers_opt
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_domain_errors
def plan(recipe, output, device, shard_size, locked, offline, seed, workers, as_json) -> None:
    """Validate RECIPE and show what `apply` would do, reading only the safetensors headers
    (for Hub models, remotely: nothing is downloaded but each model's index). With --workers, the
    memory estimates are those of each of the processes `apply --workers` would start."""
    from merger import budget
    from merger.lock import listed
    from merger.staging import check_path, inspect

    p, lock = _plan(recipe, device, shard_size, locked, offline, seed)
    if not as_json:
        _notes(p, config=False)
    if lock is not None:  # what can be checked without reading a file: commits, file lists and sizes
        lock.verify(listed(p, local=True), locked)
    dest = str(_destination(p, output)) if output or p.spec.recipe.output.path else None
    resolved = Path(dest).expanduser().resolve() if dest else None
    if resolved is not None:
        check_path(resolved, p)
    partial = inspect(p, resolved) if resolved else None
    left = len(p.shards) - (len(partial.done) if partial is not None and partial.state == "resumable" else 0)
    processes = budget.worker_processes(workers, left)
    with budget.shared_by(processes):
        info = _plan_info(p, recipe or locked, resolved, partial)
        info["processes"] = processes
        info["peak_memory_estimate_all_processes"] = processes * info["peak_memory_estimate"]
        info["notes"] = p.spec.source.notes
        with _printing():
            if as_json:
                click.echo(json.dumps(info, indent=2))
            else:
                _show_plan(p, info, resolved, partial)


def _notes(p, config: bool = True) -> None:
    """What the recipe gives that merger leaves aside as mergekit does, and (with `config`) that no model
    holds a config.json, as `note:` lines on stderr (`merger plan` shows the config on a line of its own)."""
    for note in p.spec.source.notes:
        click.echo(f"note: {printable(note)}", err=True)
    if config and p.config_from is None:
        click.echo(f"note: {p.config_note()}", err=True)


def _hash_line(info: dict) -> str:
    """What the lock's hashing will read, for `merger plan`."""
    n, known = info["hash_files"], info["hashes_remembered"]
    if not n:
        return f"nothing to hash: every input file's hash ({known}) is remembered from an earlier run"
    more = f"; {known} more remembered from an earlier run" if known else ""
    why = "".join(f"; not remembered for the next run: {reason}" for reason in info["hashes_not_remembered_because"])
    return f"hashes {sized(info['hash_bytes'])} of the inputs ({n} file(s){more}){why}"


def _plan_info(p, name: str, resolved: Path | None, partial) -> dict:
    """What `merger plan --json` prints."""
    from merger.assemble import tensor_record
    from merger.fetch import disk_needs, room
    from merger.lock import to_hash

    todo = None
    if partial is not None and partial.state == "resumable":
        todo = [i for i, s in enumerate(p.shards) if s.filename not in partial.done]
    n_merged = sum(t.merged for t in p.tensors)
    hub, ev = p.spec.recipe.hub, p.spec.recipe.evaluation
    hash_bytes, hash_files, remembered, forgotten = to_hash(p)
    info = {
        "recipe": name,
        "method": p.spec.method.name,
        "base_model": p.spec.base,
        "models": [g.ref for g in p.spec.ingredients if g.merged],
        "commits": {m.ref: m.remote.commit for m in [p.base, *p.inputs, p.tokenizer_from] if m and m.remote},
        "device": p.device,
        "device_reason": p.device_reason,
        "compute_dtype": p.compute_dtype,
        "random_seed": p.spec.seed,
        "config_from": p.config_from.ref if p.config_from is not None else None,
        "vocabulary": _vocabulary_info(p),
        "chat_template": p.chat_template,
        "output": str(resolved) if resolved else None,
        "output_exists": resolved is not None and os.path.lexists(resolved),
        "tensors": len(p.tensors),
        "tensors_merged": n_merged,
        "tensors_copied": len(p.tensors) - n_merged,
        "bytes_read": p.bytes_read,
        "bytes_written": p.bytes_written,
        "hash_bytes": hash_bytes,  # read again for the lock's hashes (merger.hashes)
        "hash_files": hash_files,
        "hashes_remembered": remembered,
        "hashes_not_remembered_because": forgotten,  # why the hashes read now will be read again next run
        "peak_memory_estimate": p.peak_memory,
        "peak_gpu_memory_estimate": p.peak_gpu_memory,
        "peak_pinned_memory_estimate": p.peak_pinned_memory,
        "gpu_tensors_in_pieces": p.gpu_pieced,
        "torch_path_tensors": p.torch_path,  # why not the fused kernels: how many merged tensors, by reason
        "disk": disk_needs(p, todo),
        "disk_short": room(p, resolved, todo) if resolved is not None else [],  # what apply refuses to start with
        "resume": None if partial is None else {
            "partial": str(partial.path),
            "state": partial.state,
            "shards_done": len(partial.done),
            "bytes_done": partial.done_bytes,
        },
        "publish": hub.model_dump() if hub else None,
        "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": s.nbytes} for s in p.shards],
    }  # fmt: skip
    if ev is not None:
        info["evaluation"] = ev.model_dump()
    if p.spec.layered:  # every tensor's sources and parameters
        info["layers"] = p.layers and len(p.layer_origins)
        info["tensor_sources"] = [tensor_record(t) for t in p.tensors]
    return info


def _vocabulary_info(p) -> dict | None:
    """What a recipe's tokenizer source does to the output's vocabulary (merger.vocab); None: nothing."""
    v = p.vocabulary
    if v is None:
        return None
    return {
        "source": p.spec.vocabulary.source,
        "tokens": len(v.tokens),
        "rows": v.rows,
        "added": [t.content for t in v.added],
        "tensors": sorted(v.tensors),
    }


def _vocabulary_lines(p) -> list[str]:
    """`merger plan`'s lines on the output's vocabulary and chat template."""
    lines = []
    spec = p.spec.vocabulary
    if spec is not None:
        v = p.vocabulary
        if v is None:
            what = "every model's vocabulary tensors already fit it: read as they are"
        else:
            added = f", {len(v.added)} added to the source's" if v.added else ""
            most = max(v.sizes.values())
            cut = f" (rows past them dropped: {most} -> {v.rows}, as mergekit does)" if most > v.rows else ""
            what = f"{len(v.tokens)} tokens{added} in {v.rows} rows{cut}; laid out per model: {', '.join(sorted(v.tensors))}"
        lines.append(f"  vocabulary:   {spec.source}: {what}")
    value = p.spec.recipe.chat_template
    if value is not None:
        if p.chat_template is None:
            shown = "auto: none of the models holds one; the tokenizer files as they are"
        elif value == "auto":
            shown = f"auto: the one most models hold ({len(p.chat_template)} characters)"
        else:
            shown = value if len(value) < 40 else f"a Jinja template of {len(value)} characters"
        lines.append(f"  chat:         template {shown}")
    return lines


def _show_plan(p, info: dict, resolved: Path | None, partial) -> None:
    """`merger plan` for a person."""
    ev, hub, disk = p.spec.recipe.evaluation, p.spec.recipe.hub, info["disk"]
    base = ""
    if p.spec.base and p.spec.method.reads_base:
        base = f" onto base '{p.spec.base}'"
    elif p.spec.base:  # a method that reads none: the base is the output's layout (mergekit's meaning)
        base = f"; config, tokenizer and tensor names from base '{p.spec.base}' (not merged)"
    click.echo(f"{info['recipe']}: {info['method']} of {len(info['models'])} model(s){base}")
    for ref, commit in info["commits"].items():
        click.echo(f"  hub:          {ref} at commit {commit}")
    click.echo(f"  device:       {p.device} (compute {info['compute_dtype']}; {p.device_reason})")
    if p.spec.seed:
        click.echo(f"  random seed:  {p.spec.seed} (each tensor's draws follow from it)")
    click.echo(f"  tensors:      {len(p.tensors)} ({info['tensors_merged']} merged, {info['tensors_copied']} copied)")
    if note := p.config_note():
        click.echo(f"  config:       {note}")
    for line in _vocabulary_lines(p):
        click.echo(line)
    click.echo(f"  read:         {sized(p.bytes_read)} from {len(p.models)} model(s)")
    if p.model_wide:  # TIES' global trim: the radix select's passes over the whole model come first
        click.echo(f"                and before merging, {p.spec.method.name} reads the models through a few times")
    click.echo(f"  write:        {sized(p.bytes_written)} in {len(p.shards)} shard(s) of at most {sized(p.shard_size)}")
    for why, count in info["torch_path_tensors"].items():
        click.echo(f"  torch path:   {count} tensor(s), {why}: not the fused kernels, several times slower")
    click.echo(f"  lock:         {_hash_line(info)}")
    gpu = ""
    if p.device == "cuda":
        gpu = (
            f", ~{sized(info['peak_pinned_memory_estimate'])} of it pinned; "
            f"GPU ~{sized(info['peak_gpu_memory_estimate'])}"
        )
    if info["gpu_tensors_in_pieces"]:
        gpu += f"; {len(info['gpu_tensors_in_pieces'])} tensor(s) too large to merge whole go through the GPU in pieces"
    each = "the process itself"
    if info["processes"] > 1:
        each = f"each of {info['processes']} processes (--workers), ~{sized(info['peak_memory_estimate_all_processes'])} in all"
    click.echo(f"  peak memory:  ~{sized(info['peak_memory_estimate'])} beyond {each} (estimate){gpu}")
    if disk["download_bytes"]:
        click.echo(
            f"  disk:         {sized(disk['peak_bytes'])} ({sized(disk['download_bytes'])} downloaded, then the output); "
            f"with --low-disk ~{sized(disk['low_disk_peak_bytes'])} at most"
        )
    else:
        click.echo(f"  disk:         {sized(disk['output_bytes'])} (the output; nothing to download)")
    for line in info["disk_short"]:
        click.echo(f"  no room:      {line} (`merger apply` refuses to start)")
    if ev is not None:
        n = len(info["models"])
        click.echo(
            f"  evaluation:   {ev.evaluator}, {ev.direction} is better, accept {ev.accept}; "
            f"up to {2 * n} evaluations ({n} models alone, {n - 1} soups, the uniform soup of all)"
        )
    click.echo(f"  output:       {info['output'] or '(none: give -o DIR or output.path)'}{_exists(resolved)}")
    if partial is not None:
        click.echo(f"  resume:       {_resume_line(partial, len(p.shards))}")
    if hub:
        where = f", branch {hub.revision}" if hub.revision else ""
        click.echo(f"  publish:      {hub.repo_id}{' (private)' if hub.private else ''}{where}")
    for s in info["shards"]:
        click.echo(f"    {s['file']}  {s['tensors']:>5} tensors  {sized(s['bytes'])}")
    if p.spec.layered:
        _show_layers(p)


def _show_layers(p) -> None:
    """Which inputs and parameter values each output layer gets (merger.assemble.layer_rows)."""
    from merger.assemble import layer_rows

    rows = layer_rows(p.tensors)
    what = max(len(r[0]) for r in rows)
    inputs = max(len(r[1]) for r in rows)
    click.echo("  merged from:")
    for name, sources, values in rows:
        click.echo(f"    {name:<{what}}  {sources:<{inputs}}  {values}".rstrip())


def _exists(resolved: Path | None) -> str:
    """What `merger plan` adds to the output: that the folder it goes in cannot be written, or, where it
    exists, whether --force would replace it."""
    from merger.staging import check_replaceable

    if resolved is None:
        return ""
    folder = next(p for p in resolved.parents if os.path.lexists(p))  # the partial output goes beside it
    if not os.access(folder, os.W_OK | os.X_OK):
        return f" (its folder {folder} cannot be written: apply would refuse)"
    if not os.path.lexists(resolved):
        return ""
    try:
        check_replaceable(resolved)
    except MergerError as e:
        reason = str(e).split("; ")[0].removeprefix(f"output {resolved} ")
        return f" (exists, but it {reason}: apply --force would refuse to replace it)"
    return " (exists: apply needs --force to replace it)"


def _resume_line(partial, shards: int) -> str:
    if partial.state == "busy":
        return f"another merger is writing it now ({partial.path})"
    if partial.state == "stale":
        return f"an interrupted merge of other inputs or another recipe left {partial.path}; apply starts over"
    if partial.state == "in the way":
        return f"{partial.path} is in the way (not a merger partial output): apply refuses to start; remove it"
    return (
        f"an interrupted merge left {len(partial.done)} of {shards} shards ({sized(partial.done_bytes)}) in "
        f"{partial.path}; apply keeps them and writes the rest"
    )


@cli.command()
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (if it does not exist yet).")
@click.option("--revision", help="Branch to push to, created if missing (default: main).")
@click.option("--commit-message", help="The commit's message.")
@click.option("--dry-run", is_flag=True, help="Show what would be uploaded; contact nothing.")
@_domain_errors
def push(output_dir, repo_id, private, revision, commit_message, dry_run) -> None:
    """Publish OUTPUT_DIR (a merged model) to the Hub repo REPO_ID, creating the repo if missing.

    The token comes from HF_TOKEN or `hf auth login`.
    """
    from merger import publish

    upload = publish.prepare(output_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
    if dry_run:
        where = f"branch {revision}" if revision else "the default branch"
        with _printing():
            _show_upload(upload, repo_id, where, private)
        return
    published = publish.push(upload)
    for name, why in upload.skipped:
        click.echo(f"note: not uploaded: {printable(name)} ({why})", err=True)
    with _printing():
        click.echo(f"published {len(upload.files)} files to {published}")


def _show_upload(upload, repo_id: str, where: str, private: bool) -> None:
    click.echo(
        f"would upload {len(upload.files)} files ({sized(upload.nbytes)}) to {repo_id} ({where}"
        f"{', created private if missing' if private else ''}) with message {upload.commit_message!r}:"
    )
    for name, size in upload.files:  # a name may hold a newline: shown escaped, one line per file
        click.echo(f"  {printable(name)}  {sized(size)}")
    for name, why in upload.skipped:
        click.echo(f"  not uploaded: {printable(name)} ({why})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the methods as JSON.")
def methods(as_json) -> None:
    """List the merge methods with their parameters, defaults and papers."""
    from merger.methods import all_methods

    out = []
    for m in all_methods().values():
        out.append(
            {
                "name": m.name,
                "summary": m.summary,
                "paper": m.paper,
                "needs_base_model": m.needs_base,
                "takes_base_model": m.takes_base,
                "model_parameters": _describe_params(m.model_params),
                "parameters": _describe_params(m.params),
            }
        )
    with _printing():
        _show_methods(out, as_json)


def _show_methods(out: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    bold = not os.environ.get("NO_COLOR")  # https://no-color.org: no styling when set to anything
    for m in out:
        base = (
            "  (needs base_model)"
            if m["needs_base_model"]
            else "  (base_model optional)"
            if m["takes_base_model"]
            else ""
        )
        click.echo((click.style(m["name"], bold=True) if bold else m["name"]) + base)
        click.echo(f"  {m['summary']}")
        if m["paper"]:
            click.echo(f"  paper: {m['paper']}")
        for label, key in (("per model", "model_parameters"), ("method", "parameters")):
            for p in m[key]:
                click.echo(f"  {label:>9}: {p['name']} = {p['default']!r:<6} {p['type']}: {p['description']}")
        click.echo()


def _describe_params(model) -> list[dict]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        choices = typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else ()
        typ = "|".join(map(str, choices)) if choices else getattr(ann, "__name__", str(ann))
        ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        limits = [f"{op} {getattr(c, a)}" for c in f.metadata for a, op in ops.items() if hasattr(c, a)]
        desc = f.description or ""
        if limits:
            desc += f" ({', '.join(limits)})"
        out.append({"name": f.alias or name, "type": typ, "default": f.default, "description": desc})
    return out


def main() -> None:
    try:
        with _printing():  # --help or --version to a stdout that cannot take it (the commands see to their own)
            cli(obj=_COMMAND_LINE)
    finally:
        # Python's last collection at exit walks every object numba, numpy and torch made, to free what
        # the process is about to give back anyway: 0.15-0.19 s of each run (measured), 0.02 s frozen.
        gc.freeze()


if __name__ == "__main__":
    main()

"""The `merger` command: a thin click layer that turns domain errors into messages and exit codes."""

from __future__ import annotations

import functools
import json
import signal
import sys
import typing
from pathlib import Path

import click

from merger import __version__
from merger.errors import MergerError


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _domain_errors(fn):
    """Print MergerError as `error: ...` lines and exit 2; never a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergerError as e:
            for line in str(e).splitlines():
                click.echo(f"error: {line}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written to the output", err=True)
            sys.exit(130)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}; nothing was written to the output", err=True)
            sys.exit(1)

    return wrapper


def _sigterm(signum, frame):
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="merger")
def cli() -> None:
    """Merge fine-tuned checkpoints of one base model into a new model, driven by YAML recipes."""


def _plan(recipe: str, device: str | None, shard_size: str | None):
    from pydantic import ByteSize, TypeAdapter, ValidationError

    from merger.plan import build_plan
    from merger.recipe import load_recipe

    size = None
    if shard_size is not None:
        try:
            size = int(TypeAdapter(ByteSize).validate_python(shard_size))
        except ValidationError:
            raise MergerError(f"--shard-size: '{shard_size}' is not a size such as 2GB or 500MB") from None
        if size <= 0:
            raise MergerError("--shard-size must be positive")
    spec = load_recipe(recipe)
    return build_plan(spec, device=device, shard_size=size)


def _destination(plan, output: str | None) -> Path:
    path = output or plan.spec.recipe.output.path
    if not path:
        raise MergerError(f"{plan.spec.where('output')}: no output directory; give -o DIR or output.path")
    return Path(path)


_recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
_output_opt = click.option("-o", "--output", help="Output directory (overrides output.path).")
_device_opt = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to merge (default: the recipe's, else auto)."
)
_shard_opt = click.option("--shard-size", help="Bytes per output shard, e.g. 2GB (overrides output.shard_size).")


@cli.command()
@_recipe_arg
@_output_opt
@_device_opt
@_shard_opt
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout (implies --quiet).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes writing output shards in parallel (CPU: about one per core).",
)
@_domain_errors
def apply(recipe, output, device, shard_size, force, quiet, as_json, workers) -> None:
    """Validate RECIPE, then merge its models into a sharded safetensors model.

    Everything is checked from the safetensors headers before any tensor is read. The output is
    written to a temporary sibling directory and renamed into place when complete.

    greedy_soup first searches: it scores every model and candidate soup with the recipe's evaluator
    (progress on stderr), then writes the chosen soup and prints the search as a table.
    """
    from merger.methods import greedy
    from merger.output import write_model

    signal.signal(signal.SIGTERM, _sigterm)
    plan = _plan(recipe, device, shard_size)
    dest = _destination(plan, output)
    progress = not quiet and not as_json and sys.stderr.isatty()
    if plan.spec.method is greedy.METHOD:
        from merger.soup import format_table, greedy_soup

        log = None if quiet or as_json else functools.partial(click.echo, err=True)
        summary = greedy_soup(plan, dest, force=force, progress=progress, workers=workers, log=log)
        if not quiet and not as_json:
            click.echo(format_table(summary["greedy_soup"]))
    else:
        summary = write_model(plan, dest, force=force, progress=progress, workers=workers)
    if summary is None:  # a non-zero rank of a distributed launch: rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        click.echo(
            f"merged {summary['tensors']} tensors with {summary['method']} into {summary['output']} "
            f"({summary['shards']} shards, {_size(summary['bytes_written'])}) in {summary['seconds']:.1f} s"
        )


@cli.command()
@_recipe_arg
@_output_opt
@_device_opt
@_shard_opt
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_domain_errors
def plan(recipe, output, device, shard_size, as_json) -> None:
    """Validate RECIPE and show what `apply` would do, reading only the safetensors headers."""
    p = _plan(recipe, device, shard_size)
    dest = output or p.spec.recipe.output.path
    n_merged = sum(t.merged for t in p.tensors)
    info = {
        "recipe": recipe,
        "method": p.spec.method.name,
        "base_model": p.spec.base,
        "models": [g.ref for g in p.spec.ingredients],
        "device": p.device,
        "compute_dtype": str(p.compute_dtype).removeprefix("torch."),
        "output": str(Path(dest).expanduser().resolve()) if dest else None,
        "output_exists": bool(dest) and Path(dest).expanduser().exists(),
        "tensors": len(p.tensors),
        "tensors_merged": n_merged,
        "tensors_copied": len(p.tensors) - n_merged,
        "bytes_read": p.bytes_read,
        "bytes_written": p.bytes_written,
        "peak_memory_estimate": p.peak_memory,
        "peak_gpu_memory_estimate": p.peak_gpu_memory,
        "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": s.nbytes} for s in p.shards],
    }
    ev = p.spec.recipe.evaluation
    if ev is not None:
        info["evaluation"] = ev.model_dump()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    base = f" onto base '{p.spec.base}'" if p.spec.base else ""
    click.echo(f"{recipe}: {info['method']} of {len(info['models'])} model(s){base}")
    click.echo(f"  device:       {p.device} (compute {info['compute_dtype']})")
    click.echo(f"  tensors:      {len(p.tensors)} ({n_merged} merged, {info['tensors_copied']} copied)")
    click.echo(f"  read:         {_size(p.bytes_read)} from {len(p.models)} model(s)")
    click.echo(f"  write:        {_size(p.bytes_written)} in {len(p.shards)} shard(s) of at most {_size(p.shard_size)}")
    gpu = f", GPU ~{_size(p.peak_gpu_memory)}" if p.device == "cuda" else ""
    click.echo(f"  peak memory:  ~{_size(p.peak_memory)} beyond the process itself (estimate){gpu}")
    if ev is not None:
        n = len(info["models"])
        click.echo(
            f"  evaluation:   {ev.evaluator}, {ev.direction} is better, accept {ev.accept}; "
            f"up to {2 * n} evaluations ({n} models alone, {n - 1} soups, the uniform soup of all)"
        )
    exists = " (exists: apply needs --force)" if info["output_exists"] else ""
    click.echo(f"  output:       {info['output'] or '(none: give -o DIR or output.path)'}{exists}")
    for s in info["shards"]:
        click.echo(f"    {s['file']}  {s['tensors']:>5} tensors  {_size(s['bytes'])}")


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
                "model_parameters": _describe_params(m.model_params),
                "parameters": _describe_params(m.params),
            }
        )
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for m in out:
        click.echo(click.style(m["name"], bold=True) + ("  (needs base_model)" if m["needs_base_model"] else ""))
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
    cli()


if __name__ == "__main__":
    main()

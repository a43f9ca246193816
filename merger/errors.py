"""Domain errors. Library code raises these; only cli.py turns them into messages and exit codes."""


class MergerError(Exception):
    """A problem the user can fix: bad recipe, bad model, bad output path. Its arguments are its messages,
    one a problem (most errors hold one): the CLI prints each on a line of its own, so a name in one that
    holds a newline (a path, a tensor name from an input) stays on its line and cannot pass for another."""

    recurs = False  # the same inputs fail the same way again: a partial output is not worth keeping

    @property
    def problems(self) -> list[str]:
        return [str(a) for a in self.args] or [""]

    def __str__(self) -> str:
        return "\n".join(self.problems)


class RecipeError(MergerError):
    """The recipe is invalid. Holds one message per problem, each already located."""

    def __init__(self, problems: list[str]):
        super().__init__(*problems)

    def __reduce__(self):  # to a --workers parent: rebuilt from its list
        return type(self), (self.problems,)


class ModelError(MergerError):
    """A model reference cannot be used: missing, unreadable, or inconsistent with the others."""


class InputChanged(ModelError):
    """An input's weight file changed after merger read its header: the shards done were merged partly from
    the old bytes, and a run again would start over (its inputs are not the ones recorded), so they are
    not kept (recurs)."""

    recurs = True


class OutputError(MergerError):
    """The output cannot be written or replaced (an existing directory in the way, a full disk)."""


class DiskFull(OutputError):
    """The output's filesystem had no room (or no quota) left for merger's own records, as the output was set up."""


class Interrupted(MergerError):
    """The run was interrupted (Ctrl-C, SIGTERM): says what was kept for the next run to resume."""


class MergeError(MergerError):
    """A tensor could not be merged (for example integer buffers that differ between inputs)."""

    recurs = True


class OutOfMemory(MergeError):
    """The GPU, or the host memory pinned for its copies, ran out while merging a tensor: not the
    inputs' doing, so the partial output is kept for a run that asks for less (the message says how)."""

    recurs = False


class NaNTaskVector(ValueError):
    """A model's task vector holds NaN entries, which a ranking by magnitude (the TIES trim) cannot
    order. Raised by the methods with the model's index; the engine names the tensor and model."""

    def __init__(self, model: int, count: int, why: str = ""):
        super().__init__(f"model {model}: {count} NaN entries in its task vector")
        self.model = model
        self.count = count
        self.why = why  # what the entries are, where not plain NaN: follows "is" or "are" in the engine's message


def counted(count: int, one: str = "entry", many: str = "entries") -> tuple[str, str]:
    """('1 entry', 'is') or ('3 entries', 'are'): the subject and verb of a message that counts things."""
    return (f"1 {one}", "is") if count == 1 else (f"{count} {many}", "are")


def sized(n: float) -> str:
    """A byte count as a message gives it: '512 B', '100.66 MB', '2.20 GB' (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


class EvaluationError(MergerError):
    """A held-out evaluation failed: the evaluator crashed, printed no score, or its data is unusable."""


def problems_of(e: BaseException) -> list[str]:
    """An error's messages: a MergerError's problems, else describe's one line."""
    return e.problems if isinstance(e, MergerError) else [describe(e)]


def describe(e: BaseException) -> str:
    """One line for an error: an OSError as its message and file ('No space left on device (out/x)')."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    return str(e) or type(e).__name__


def printable(line: str) -> str:
    """A line as a terminal or a markdown heading should show it: names from input files and paths (tensor
    names, folders) may hold control characters (a newline too), which are shown escaped, not sent as they are."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)

"""What a terminal, a shell script or a CI pipeline sees of `merger`: its standard streams closed, full or
read by a reader that stops early, signals its parent set to be ignored, NO_COLOR, and names that hold a
newline. Real processes, since what is checked is what the operating system gives them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GOOD, hooked

from merger.errors import MergerError, ModelError, RecipeError


def merger(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "merger", *args], cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs
    )


@pytest.fixture
def recipe(workdir: Path) -> Path:
    path = workdir / "recipe.yaml"
    path.write_text(GOOD)
    return path


def _outputs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".out", "out")))


def bash(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """A pipeline as a script runs it; its merger's exit status ends stderr (${PIPESTATUS[0]})."""
    return subprocess.run(
        f"{line}; echo ${{PIPESTATUS[0]}} >&2", shell=True, executable="/bin/bash", cwd=cwd, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_a_reader_that_stops_early_leaves_a_finished_merge_a_success(recipe, workdir):
    """`merger apply ... | head -1`: the merge is in place; the closed pipe ends the printing quietly."""
    done = bash(f"{sys.executable} -m merger apply recipe.yaml | true", workdir)
    assert done.stderr == "0\n"
    assert (workdir / "out" / "merger.lock.json").is_file()
    listing = bash(f"{sys.executable} -m merger plan recipe.yaml | head -1", workdir)
    assert listing.stdout == "recipe.yaml: ties of 2 model(s) onto base 'base'\n"
    assert listing.stderr == "0\n"


def test_a_stdout_that_cannot_be_written_says_the_merge_is_done(recipe, workdir):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "merger", "apply", "recipe.yaml", "--json"],
            cwd=workdir, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == (
        f"error: cannot write to standard output: No space left on device; the merge is complete in {workdir / 'out'}\n"
    )
    assert (workdir / "out" / "merger.lock.json").is_file()


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["apply", "--help"]])
def test_help_to_a_stdout_that_cannot_take_it_is_one_line(workdir, args):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "merger", *args], cwd=workdir, stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert done.returncode == 1
    assert done.stderr == "error: cannot write to standard output: No space left on device\n"


def test_a_closed_stderr_does_not_stop_a_merge(recipe, workdir):
    done = merger("apply", "recipe.yaml", cwd=workdir)
    closed = subprocess.run(
        [sys.executable, "-m", "merger", "apply", "recipe.yaml", "-o", "out2"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(2),
    )
    assert done.returncode == 0
    assert closed.returncode == 0, closed.stdout
    assert closed.stdout.startswith("merged 3 tensors with ties into ")
    assert sorted(p.name for p in (workdir / "out2").iterdir()) == sorted(p.name for p in (workdir / "out").iterdir())


# Hold the merge after each shard, having said so on stderr, until $RELEASE exists or the run is interrupted
# (a file and a flag: a thread held on a Python signal handler could wait for ever on a main thread that the
# interrupt left waiting for that thread).
HOLD = """
import os, sys, time
import merger.staging as staging
from merger import system

_finished = staging.Finished.__call__

def __call__(self, shard, path):
    _finished(self, shard, path)
    print("held", file=sys.stderr, flush=True)
    while not os.path.exists(os.environ["RELEASE"]) and not system.INTERRUPTED.is_set():
        time.sleep(0.02)

staging.Finished.__call__ = __call__
"""


def held(workdir: Path, ignored: signal.Signals | None = None) -> subprocess.Popen:
    """`merger apply` held after its first shard (HOLD), with `ignored` set to SIG_IGN as its parent would."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "merger", "apply", "recipe.yaml", "-q"],
        cwd=workdir,
        env=os.environ | hooked(workdir, HOLD) | {"RELEASE": str(workdir / "release")},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=None if ignored is None else lambda: signal.signal(ignored, signal.SIG_IGN),
    )
    try:
        assert proc.stderr.readline() == "held\n"
    except BaseException:  # not held: never leave it waiting
        proc.kill()
        proc.communicate()
        raise
    return proc


@pytest.mark.parametrize("sent", ["SIGHUP", "SIGINT"])
def test_a_signal_the_parent_ignores_stays_ignored(recipe, workdir, sent):
    """`nohup merger apply` (SIGHUP ignored) and `merger apply &` in a script (SIGINT ignored) keep merging."""
    number = getattr(signal, sent)
    proc = held(workdir, number)
    try:
        proc.send_signal(number)
        time.sleep(0.3)
        (workdir / "release").touch()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.communicate()
    assert (workdir / "out" / "merger.lock.json").is_file()


def test_a_signal_the_parent_leaves_alone_interrupts(recipe, workdir):
    proc = held(workdir)
    try:
        proc.send_signal(signal.SIGHUP)  # never released: only the interrupt lets it go on
        assert proc.wait(timeout=120) == 128 + signal.SIGHUP
        assert proc.stderr.read().startswith("error: interrupted; ")
    finally:
        proc.kill()
        proc.communicate()
    assert not (workdir / "out").exists()


def test_no_color_leaves_the_methods_plain(workdir):
    """click keeps styles on a terminal: NO_COLOR (https://no-color.org) leaves them out there too."""
    script = "import os, sys; sys.stdout.isatty = lambda: True; from merger.cli import main; sys.argv = ['merger', 'methods']; main()"
    styled = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workdir, timeout=120)
    plain = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=workdir, timeout=120,
        env=os.environ | {"NO_COLOR": "1"},
    )  # fmt: skip
    assert "\x1b[1mlinear\x1b[0m" in styled.stdout
    assert plain.stdout.startswith("linear\n") and "\x1b" not in plain.stdout


def test_a_newline_in_a_name_stays_in_its_error_line(workdir):
    (workdir / "odd.yaml").write_text('merge_method: linear\nmodels: [{model: "nope\\nerror: fake"}, {model: ft2}]\n')
    (workdir / "recipe.yaml").write_text(GOOD)
    done = merger("plan", "odd.yaml", cwd=workdir)
    assert done.returncode == 2
    assert done.stderr == (
        f"error: odd.yaml:2: models[0].model: 'nope\\nerror: fake': no such directory in the working directory ({workdir})\n"
    )
    out = workdir / "o\nut"
    out.mkdir()
    done = merger("apply", "recipe.yaml", "-o", str(out), cwd=workdir)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "o\\nut" in done.stderr


def test_errors_keep_their_problems_apart_across_processes():
    """--workers sends a worker's error to its parent pickled: each problem stays a line of its own."""
    import pickle

    for error in (ModelError("a 'x\ny'", "b"), RecipeError(["r:1: one", "r:2: two"]), MergerError()):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and again.problems == error.problems
    assert str(ModelError("one", "two")) == "one\ntwo"


def test_a_dangling_link_as_the_output_makes_nothing(recipe, workdir, tmp_path_factory):
    target = tmp_path_factory.mktemp("elsewhere") / "missing" / "model"
    (workdir / "link").symlink_to(target)
    done = merger("apply", "recipe.yaml", "-o", "link", cwd=workdir)
    assert done.returncode == 2
    assert done.stderr == f"error: output link is a link to {target}, which does not exist; give a folder\n"
    assert not target.parent.exists()


def test_a_mount_point_is_refused_before_merging(recipe, workdir):
    mount = Path("/proc")
    if not os.path.ismount(mount):
        pytest.skip("/proc is not a mount point here")  # Linux, where CI runs, always has it
    for command in (["plan"], ["apply", "--force"]):
        done = merger(*command, "recipe.yaml", "-o", str(mount), cwd=workdir)
        assert done.returncode == 2, done.stderr
        assert done.stderr == (
            "error: output /proc is a mount point, which merger cannot replace (it writes beside the output and "
            "renames the result into place); write into a folder inside it, such as /proc/model\n"
        )


def test_bind_mounts_are_mount_points_too():
    """A bind mount within one file system has its parent's device (os.path.ismount misses it): the
    mount table says where mounts are, its escapes undone."""
    from merger import system

    table = (
        b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        b"36 22 8:1 /srv/data /home/me/my\\040models rw - ext4 /dev/sda1 rw\n"
        b"37 22 0:5 / /proc rw - proc proc rw\n"
    )
    assert system.mount_points(table) == {b"/", b"/home/me/my models", b"/proc"}
    assert system.is_mount_point("/proc") and not system.is_mount_point(os.getcwd() + "/not-a-mount")


def test_a_file_error_while_planning_is_not_blamed_on_stdout(recipe, workdir, monkeypatch):
    from click.testing import CliRunner

    import merger.cli
    from merger.cli import cli

    (workdir / "out").mkdir()

    def unreadable(dest):
        raise PermissionError(13, "Permission denied", str(dest))

    monkeypatch.setattr(merger.cli, "_exists", lambda resolved: unreadable(resolved))
    result = CliRunner().invoke(cli, ["plan", "recipe.yaml"])
    assert result.exit_code == 1
    assert result.stderr == f"error: Permission denied ({workdir / 'out'}); nothing was written to the output\n"


def test_a_publish_that_fails_still_prints_the_merge_summary(recipe, workdir):
    """With a hub: section and --json, the merge's summary reaches stdout even when publishing fails."""
    (workdir / "recipe.yaml").write_text(GOOD + "hub:\n  repo_id: me/merged\n")
    done = merger(
        "apply", "recipe.yaml", "--json", cwd=workdir,
        env=os.environ | {"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    summary = json.loads(done.stdout)
    assert summary["output"] == str(workdir / "out") and summary["published"] is None
    assert summary["publish_error"] and summary["publish_error"] in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_progress_off_a_terminal_is_whole_lines(workdir, monkeypatch):
    """A CI log gets a progress line every LOG_EVERY seconds (CircleCI stops a job silent for 10 minutes),
    each a line of its own; a merge shorter than that prints none, and -q none at all."""
    from click.testing import CliRunner

    import merger.stream
    from merger.cli import cli

    (workdir / "recipe.yaml").write_text(GOOD)
    quiet = CliRunner().invoke(cli, ["apply", "recipe.yaml"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr  # shorter than LOG_EVERY
    monkeypatch.setattr(merger.stream, "LOG_EVERY", 0.0)
    logged = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-o", "out2"])
    assert logged.exit_code == 0, logged.output
    lines = logged.stderr.splitlines()
    assert lines and all(line.startswith("merging: ") for line in lines), logged.stderr
    assert "\r" not in logged.stderr and lines[-1].startswith("merging: 100%")
    silent = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-o", "out3", "-q"])
    assert silent.exit_code == 0 and silent.stderr == ""


def test_a_publish_that_fails_fails_when_nobody_reads_the_summary(recipe, workdir):
    (workdir / "recipe.yaml").write_text(GOOD + "hub:\n  repo_id: me/merged\n")
    env = "HF_TOKEN=hf_test HF_ENDPOINT=http://127.0.0.1:9"
    done = bash(f"{env} {sys.executable} -m merger apply recipe.yaml --json | true", workdir)
    assert done.stderr.endswith("\n2\n") and done.stderr.startswith("error: "), done.stderr
    assert "Exception" not in done.stderr

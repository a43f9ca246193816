"""Resume: a merge stopped in any way (Ctrl-C, SIGTERM, SIGHUP, SIGKILL; a killed --workers parent; at any
point, metadata and the final rename included) is finished by running the same command again: the shards
it finished are kept as they are (same files), the rest written, and the output is byte-identical to a
merge that was never stopped. A changed recipe or input starts over. Every merge here is a real process
stopped by a real signal, at a point a start-up hook picks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import KILL_IN, alive, hooked, six_shard_ties

SHARDS = 6

# Stop the merge, by the signal in $STOP_WITH, once the writer has finished $STOP_AFTER shards.
STOP_AFTER_SHARDS = """
import os, signal
import merger.staging as staging

_finished = staging.Finished.__call__
_count = [0]

def __call__(self, shard, path):
    _finished(self, shard, path)
    _count[0] += 1
    if _count[0] == int(os.environ["STOP_AFTER"]):
        os.kill(os.getpid(), getattr(signal, os.environ["STOP_WITH"]))
        signal.pause() if os.environ["STOP_WITH"] == "SIGKILL" else None

staging.Finished.__call__ = __call__
"""


def merger(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "merger", *args],
        capture_output=True,
        text=True,
        env=os.environ | (env or {}),
        timeout=120,
    )


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A TIES recipe over bf16 models whose output is six shards, and the output of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    recipe = six_shard_ties(root)
    done = merger(
        "apply", str(recipe), "-o", str(root / "whole" / "out"), "-q"
    )  # named as the outputs below: the card's title
    assert done.returncode == 0, done.stderr
    return root, recipe, files(root / "whole" / "out")


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def kept_shards(partial: Path) -> dict[str, tuple[int, int]]:
    """The shards a partial output records as finished: name -> (inode, mtime) of the file."""
    out = {}
    for marker in (partial / "done").glob("[!.]*.json"):  # not a marker cut short by the kill (.*.tmp)
        out[marker.name.removesuffix(".json")] = _stamp(partial / "model" / marker.name.removesuffix(".json"))
    return out


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns  # an inode may be used again once freed: with the mtime, it tells


def assert_resumed(out: Path, kept: dict[str, tuple[int, int]], whole: dict[str, bytes]) -> None:
    """`out` is the uninterrupted run's output, byte for byte, and its shards kept from the stopped run are
    the very files that run wrote (not written again); nothing is left beside it."""
    assert files(out) == whole
    for name, was in kept.items():
        assert _stamp(out / name) == was, name
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("signal_name", "after"), [("SIGKILL", 1), ("SIGTERM", 3), ("SIGINT", 2), ("SIGHUP", 1), ("SIGKILL", 5)]
)
def test_a_stopped_merge_resumes_where_it_stopped(family, tmp_path, signal_name, after):
    _, recipe, whole = family
    out = tmp_path / "out"
    env = hooked(tmp_path, STOP_AFTER_SHARDS) | {"STOP_AFTER": str(after), "STOP_WITH": signal_name}
    stopped = merger("apply", str(recipe), "-o", str(out), "-q", env=env)
    partial = tmp_path / ".out.merger-partial"
    kept = kept_shards(partial)
    assert not out.exists() and len(kept) >= after, stopped.stderr
    if signal_name == "SIGKILL":
        assert stopped.returncode == -9
    else:  # a clean stop: one line saying what is kept and how to go on
        assert stopped.returncode == 128 + getattr(signal, signal_name)  # as a shell reports it: 143 for SIGTERM
        assert stopped.stderr == (
            f"error: interrupted; {len(kept)} of {SHARDS} shards are done and kept in {partial}: run the same "
            "command again to resume (or delete it)\n"
        )
    plan = merger("plan", str(recipe), "-o", str(out), "--json")
    resume = json.loads(plan.stdout)["resume"]
    assert resume["state"] == "resumable" and resume["shards_done"] == len(kept) and resume["bytes_done"] > 0
    shared = json.loads(merger("plan", str(recipe), "-o", str(out), "--json", "--workers", "4").stdout)
    assert shared["processes"] == max(1, min(4, SHARDS - len(kept)))  # as apply --workers 4 would start
    text = merger("plan", str(recipe), "-o", str(out)).stdout
    assert f"resume:       an interrupted merge left {len(kept)} of {SHARDS} shards" in text

    again = merger("apply", str(recipe), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.rstrip().endswith(f"; {len(kept)} of them kept from an interrupted run"), again.stdout
    assert_resumed(out, kept, whole)


SWALLOWED = """
import ctypes, importlib, os, signal

module, _, name = os.environ["SWALLOW_IN"].partition(":")
owner = importlib.import_module(module)
cls, _, method = name.partition(".")
owner = getattr(owner, cls)
_real = getattr(owner, method)
_count = [0]


@ctypes.CFUNCTYPE(None)
def _callback():  # C calling back into Python, as numba's compiler does: what it raises is dropped
    os.kill(os.getpid(), signal.SIGTERM)


def hooked(*args, **kwargs):
    _count[0] += 1
    if _count[0] == int(os.environ["SWALLOW_AT"]):
        _callback()
    return _real(*args, **kwargs)


setattr(owner, method, hooked)
"""


@pytest.mark.parametrize(("where", "at"), [("merger.stream:Merger.release", 3), ("merger.staging:Partial.commit", 1)])
def test_an_interrupt_a_callback_dropped_still_stops_the_merge(family, tmp_path, where, at):
    """A signal whose KeyboardInterrupt is raised while C code has called back into Python (a ctypes
    callback, as in numba's compiler) is dropped there: the merge still stops at the next tensor, or before
    the output is put in place, with the one line and the signal's exit status, and no traceback."""
    _, recipe, whole = family
    out = tmp_path / "out"
    env = hooked(tmp_path, SWALLOWED) | {"SWALLOW_IN": where, "SWALLOW_AT": str(at)}
    stopped = merger("apply", str(recipe), "-o", str(out), "-q", env=env)
    assert stopped.returncode == 128 + signal.SIGTERM and not out.exists(), stopped.stderr
    assert stopped.stderr.startswith("error: interrupted; ") and stopped.stderr.count("\n") == 1, stopped.stderr
    kept = kept_shards(tmp_path / ".out.merger-partial")
    assert len(kept) == SHARDS if where.endswith("commit") else len(kept) < SHARDS
    again = merger("apply", str(recipe), "-o", str(out), "-q")
    assert again.returncode == 0, again.stderr
    assert_resumed(out, kept, whole)


@pytest.mark.parametrize(
    ("where", "at"),
    [
        ("merger.stream:ShardWriter.write", 2),  # in the middle of the first shard: nothing finished yet
        ("merger.stream:ShardWriter.write", 9),  # in the middle of a later shard
        # past the page cache (MERGER_DROP_BEHIND=1): these shards are a block each, written as they close
        ("merger.files:DirectFile._flush", 3),  # a later shard's block
        ("merger.files:os.ftruncate", 2),  # a later shard written, padded, not yet cut to its size
        ("merger.output:write_card", 1),  # every shard done, metadata half written
        ("merger.staging:_rename_new", 1),  # everything written and flushed, not yet in place
    ],
)
def test_killed_anywhere_the_same_command_finishes(family, tmp_path, where, at):
    _, recipe, whole = family
    out = tmp_path / "out"
    env = hooked(tmp_path, KILL_IN) | {"KILL_IN": where, "KILL_AT": str(at)}
    env["MERGER_DROP_BEHIND"] = "1" if where.startswith("merger.files") else "0"
    assert merger("apply", str(recipe), "-o", str(out), "-q", env=env).returncode == -9
    assert not out.exists()
    kept = kept_shards(tmp_path / ".out.merger-partial")
    again = merger("apply", str(recipe), "-o", str(out), "-q")
    assert again.returncode == 0, again.stderr
    assert_resumed(out, kept, whole)


def test_killed_after_the_rename_leaves_the_new_output_and_the_next_run_cleans_up(family, tmp_path):
    """Killed between putting the output in place and removing the partial directory: the destination
    is complete; a later run into it (here with --force) clears what is left."""
    _, recipe, whole = family
    out = tmp_path / "out"
    env = hooked(tmp_path, KILL_IN) | {"KILL_IN": "merger.staging:Partial.discard"}
    assert merger("apply", str(recipe), "-o", str(out), "-q", env=env).returncode == -9
    assert files(out) == whole
    again = merger("apply", str(recipe), "-o", str(out), "-q", "--force")
    assert again.returncode == 0, again.stderr
    assert files(out) == whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_changed_recipe_or_input_starts_over(family, tmp_path):
    root, recipe, _ = family
    out = tmp_path / "out"
    stop = hooked(tmp_path, STOP_AFTER_SHARDS) | {"STOP_AFTER": "2", "STOP_WITH": "SIGKILL"}
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace("density: 0.3", "density: 0.4"))
    fresh = merger("apply", str(other), "-o", str(tmp_path / "fresh" / "out"), "-q")
    assert fresh.returncode == 0, fresh.stderr

    assert merger("apply", str(recipe), "-o", str(out), "-q", env=stop).returncode == -9
    stale = kept_shards(tmp_path / ".out.merger-partial")
    plan = json.loads(merger("plan", str(other), "-o", str(out), "--json").stdout)
    assert plan["resume"]["state"] == "stale"
    assert merger("apply", str(other), "-o", str(out), "-q").returncode == 0
    assert files(out) == files(tmp_path / "fresh" / "out")
    assert all(_stamp(out / n) != was for n, was in stale.items())  # every shard written anew

    # an input rewritten in place, its size and mtime put back: its stamp (ctime, inode) still tells
    shutil.copytree(root / "ft2", tmp_path / "ft2")
    mine = tmp_path / "mine.yaml"
    mine.write_text(recipe.read_text().replace(str(root / "ft2"), str(tmp_path / "ft2")))
    out2 = tmp_path / "out2"
    assert merger("apply", str(mine), "-o", str(out2), "-q", env=stop).returncode == -9
    stale = kept_shards(tmp_path / ".out2.merger-partial")
    shard = tmp_path / "ft2" / "model-00002-of-00003.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-2:] = b"\x80\x3f"
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert merger("apply", str(mine), "-o", str(tmp_path / "fresh2" / "out2"), "-q").returncode == 0
    assert merger("apply", str(mine), "-o", str(out2), "-q").returncode == 0
    assert files(out2) == files(tmp_path / "fresh2" / "out2")
    assert all(_stamp(out2 / n) != was for n, was in stale.items())


def test_a_kept_shard_rewritten_with_its_size_and_mtime_put_back_is_written_again(family, tmp_path):
    """A finished shard of the partial output changed in place, its size and mtime restored: its change time
    tells, so the next run writes it again rather than keeping the altered bytes."""
    _, recipe, whole = family
    out = tmp_path / "out"
    env = hooked(tmp_path, STOP_AFTER_SHARDS) | {"STOP_AFTER": "2", "STOP_WITH": "SIGKILL"}
    assert merger("apply", str(recipe), "-o", str(out), "-q", env=env).returncode == -9
    kept = kept_shards(tmp_path / ".out.merger-partial")
    name = sorted(kept)[0]
    shard = tmp_path / ".out.merger-partial" / "model" / name
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-2:] = bytes([data[-2] ^ 1, data[-1]])
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = merger("apply", str(recipe), "-o", str(out), "-q")
    assert again.returncode == 0, again.stderr
    assert files(out) == whole
    assert _stamp(out / name) != kept[name]


# Record each --workers process's pid, then SIGKILL the parent once a worker has finished its first shard.
KILL_THE_PARENT = """
import os, signal
import merger.staging as staging

_finished = staging.Finished.__call__

def __call__(self, shard, path):
    _finished(self, shard, path)
    if os.environ.get("PIDS"):
        with open(os.environ["PIDS"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        os.kill(os.getppid(), signal.SIGKILL)
        signal.pause()

staging.Finished.__call__ = __call__
"""


LATE = """
import os, signal
import merger.cli as cli
import merger.system as system

if os.environ["LATE_AT"] == "report":
    _report = cli._report

    def late_report(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return _report(*args, **kwargs)

    cli._report = late_report
else:
    _finish = system._Interrupted.finish

    def finish(self):
        _finish(self)
        for _ in range(int(os.environ["LATE_AT"])):
            os.kill(os.getpid(), signal.SIGTERM)

    system._Interrupted.finish = finish
"""


@pytest.mark.parametrize("at", ["report", "1", "2"])
def test_a_signal_once_the_merge_is_in_place(family, tmp_path, at):
    """A signal after the output is in place never says that nothing was written: as the summary is printed,
    it says the merge is complete (exit 143); as the process exits, it leaves the exit status 0 and prints
    nothing (Python's own handler raised KeyboardInterrupt in click or at shutdown: "Aborted!", exit 1, or
    a traceback); a second one ends the process at once."""
    _, recipe, whole = family
    out = tmp_path / "out"
    env = hooked(tmp_path, LATE) | {"LATE_AT": at}
    done = merger("apply", str(recipe), "-o", str(out), "-q", env=env)
    assert (out / "merger.lock.json").is_file()
    if at == "report":
        assert done.returncode == 128 + signal.SIGTERM
        assert done.stderr == f"error: interrupted; the merge is complete and in place at {out}\n"
    else:
        assert done.returncode == (0 if at == "1" else -signal.SIGTERM) and done.stderr == "", done.stderr
    assert_resumed(out, {}, whole)


def test_workers_interrupted_with_their_parent_leave_one_line(family, tmp_path):
    """SIGTERM to a --workers merge: its workers are ended mid-shard, and the terminal gets the one line
    (no warning of semaphores left behind, which tqdm's lock in a worker ended so used to print)."""
    _, recipe, whole = family
    out = tmp_path / "out"
    term = KILL_THE_PARENT.replace("SIGKILL", "SIGTERM")
    env = hooked(tmp_path, term) | {"PIDS": str(tmp_path / "pids")}
    stopped = merger("apply", str(recipe), "-o", str(out), "-q", "--workers", "2", env=env)
    assert stopped.returncode == 128 + signal.SIGTERM and not out.exists(), stopped.stderr
    assert stopped.stderr.startswith("error: interrupted; ") and stopped.stderr.count("\n") == 1, stopped.stderr
    kept = kept_shards(tmp_path / ".out.merger-partial")
    again = merger("apply", str(recipe), "-o", str(out), "-q", "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert_resumed(out, kept, whole)


def test_workers_die_with_their_parent_and_their_shards_are_resumed(family, tmp_path):
    _, recipe, whole = family
    out = tmp_path / "out"
    pids = tmp_path / "pids"
    env = hooked(tmp_path, KILL_THE_PARENT) | {"PIDS": str(pids)}
    assert merger("apply", str(recipe), "-o", str(out), "-q", "--workers", "2", env=env).returncode == -9
    workers = {int(p) for p in pids.read_text().split()}
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in workers), "a --workers process outlived its parent"
    kept = kept_shards(tmp_path / ".out.merger-partial")
    assert kept
    again = merger("apply", str(recipe), "-o", str(out), "-q", "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert_resumed(out, kept, whole)


# Finish one shard, then hold the partial output (and its lock) until killed.
HOLD = """
import os, signal
import merger.staging as staging

_finished = staging.Finished.__call__

def __call__(self, shard, path):
    _finished(self, shard, path)
    signal.pause()

staging.Finished.__call__ = __call__
"""


def test_a_second_merger_into_the_same_output_stops_at_once(family, tmp_path):
    _, recipe, _ = family
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "merger", "apply", str(recipe), "-o", str(out), "-q"],
        env=os.environ | hooked(tmp_path, HOLD),
        stderr=subprocess.PIPE,
    )
    try:
        done = tmp_path / ".out.merger-partial" / "done"
        deadline = time.monotonic() + 60
        while not (done.is_dir() and any(done.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = merger("apply", str(recipe), "-o", str(out), "-q")
        assert second.returncode == 2
        assert second.stderr == (
            f"error: output {out}: another merger is writing it now (it holds {tmp_path / '.out.merger-partial'}); "
            "wait for it to finish\n"
        )
        plan = merger("plan", str(recipe), "-o", str(out)).stdout
        assert "resume:       another merger is writing it now" in plan
    finally:
        first.kill()
        first.communicate()


def test_an_interrupt_does_not_wait_for_the_inputs_to_be_hashed(workdir, monkeypatch):
    """Hashing the inputs for the lock runs beside the merge; a merge interrupted meanwhile stops it at
    its next block rather than waiting for it (for a 70B model, minutes)."""
    from click.testing import CliRunner
    from conftest import GOOD

    import merger.files
    import merger.lock
    import merger.stream
    from merger.cli import cli

    def endless(model, name, hub_weights=True, stop=None):  # a file that takes very long to hash
        while not stop.is_set():
            time.sleep(0.01)
        raise merger.files.Stopped

    interrupts = []

    def interrupted(self, t):
        interrupts.append(time.monotonic())
        raise KeyboardInterrupt

    monkeypatch.setattr(merger.lock, "record", endless)
    monkeypatch.setattr(merger.stream.Merger, "release", interrupted)
    Path("recipe.yaml").write_text(GOOD)
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml"])
    assert result.exit_code == 130 and result.stderr == "error: interrupted; nothing was written to the output\n"
    assert time.monotonic() - interrupts[0] < 2


def test_an_output_put_in_place_while_waiting_for_the_hold_is_not_merged_again(workdir, monkeypatch):
    """Two runs into one new output started together: the second waits for the first's hold on the partial
    output, and finds the output in place once it has it. It stops there rather than merge it all again."""
    from click.testing import CliRunner
    from conftest import GOOD

    import merger.staging
    from merger.cli import cli

    Path("recipe.yaml").write_text(GOOD)
    claim = merger.staging._claim

    other = []

    def claimed_after_another_run(path, dest):  # the other run commits while this one waits
        if not other:
            other.append(None)
            other[0] = CliRunner().invoke(cli, ["apply", "-q", "recipe.yaml"])
        return claim(path, dest)

    monkeypatch.setattr(merger.staging, "_claim", claimed_after_another_run)
    result = CliRunner().invoke(cli, ["apply", "-q", "recipe.yaml"])
    assert result.exit_code == 2
    assert other[0].exit_code == 0
    assert result.stderr == f"error: output {workdir / 'out'} already exists; pass --force to replace it\n"
    assert sorted(os.listdir(workdir)) == ["base", "ft1", "ft2", "out", "recipe.yaml"]


def test_a_folder_named_as_the_partial_output_that_merger_did_not_make_is_left_alone(workdir):
    from click.testing import CliRunner
    from conftest import GOOD

    from merger.cli import cli

    Path("recipe.yaml").write_text(GOOD)
    mine = workdir / ".out.merger-partial"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    plan = CliRunner().invoke(cli, ["plan", "recipe.yaml"])  # says what apply does with it: not "starts over"
    assert (
        plan.exit_code == 0
        and (f"  resume:       {mine} is in the way (not a merger partial output): apply refuses to start; remove it\n")
        in plan.stdout
    )
    shown = CliRunner().invoke(cli, ["plan", "recipe.yaml", "--json"])
    assert json.loads(shown.stdout)["resume"]["state"] == "in the way"
    result = CliRunner().invoke(cli, ["apply", "-q", "recipe.yaml"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: output {workdir / 'out'}: {mine} is in the way (not a merger partial output); remove it\n"
    )
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and not (workdir / "out").exists()


def test_a_disk_full_as_the_partial_output_is_set_up_is_one_line(workdir, monkeypatch):
    """Out of inodes (or space) before the first shard: the output named, exit 2, no traceback."""
    import errno

    from click.testing import CliRunner
    from conftest import GOOD

    import merger.staging
    from merger.cli import cli

    Path("recipe.yaml").write_text(GOOD)
    partial = workdir / ".out.merger-partial"

    def full(path, data, durable=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(merger.staging, "write_json", full)
    result = CliRunner().invoke(cli, ["apply", "-q", "recipe.yaml"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: output {workdir / 'out'}: No space left on device ({partial / 'state.json'})\n")
    assert not partial.exists() and not (workdir / "out").exists()


def test_a_disk_full_as_the_inputs_hashes_are_recorded_is_one_line(workdir, monkeypatch, caplog):
    """The hashes are recorded as soon as they are known, on the hashing thread: a full disk there is not
    a traceback from the thread's callback, and the merge fails where it records them again."""
    import errno

    from click.testing import CliRunner
    from conftest import GOOD

    import merger.staging
    from merger.cli import cli

    Path("recipe.yaml").write_text(GOOD)

    def full(self, inputs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "state.json"))

    monkeypatch.setattr(merger.staging.Partial, "record_inputs", full)
    result = CliRunner().invoke(cli, ["apply", "-q", "recipe.yaml"])
    assert result.exit_code == 2, result.output
    partial = workdir / ".out.merger-partial"
    assert result.stderr == (
        f"error: output {workdir / 'out'}: no space left on the device; 1 of 1 shards are done and kept in "
        f"{partial}: run the same command again to resume (or delete it)\n"
    )
    assert not (workdir / "out").exists()
    assert [r.getMessage() for r in caplog.records if r.name == "concurrent.futures"] == []  # no traceback logged


@pytest.mark.parametrize("left", [[".state.json.1234.5678.tmp"], ["model/", "done/"], ["old/", "model/"]])
def test_what_a_killed_run_leaves_before_its_fingerprint_is_merger_s(workdir, left):
    """A run killed as it wrote its state (write_atomic's temporary file), as it cleared a stale partial
    output (state.json removed before model/), or as it put an old output back (discard keeps old/ alone)
    left a partial output without a fingerprint: it is taken up, not refused as someone else's (an old
    output goes back in place, and then the output exists)."""
    from click.testing import CliRunner
    from conftest import GOOD

    from merger.cli import cli

    Path("recipe.yaml").write_text(GOOD)
    partial = workdir / ".out.merger-partial"
    partial.mkdir()
    for name in left:
        (partial / name).mkdir() if name.endswith("/") else (partial / name).write_text("{")
    result = CliRunner().invoke(cli, ["apply", "-q", "recipe.yaml"])
    if "old/" in left:
        assert result.exit_code == 2 and result.stderr.endswith("already exists; pass --force to replace it\n")
        assert (workdir / "out").is_dir()  # the old output, back in place
    else:
        assert result.exit_code == 0, result.output
        assert (workdir / "out" / "merger.lock.json").is_file() and not partial.exists()

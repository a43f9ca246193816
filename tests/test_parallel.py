"""Several processes writing one model: byte-identical to a single process run."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import alive, hooked, six_shard_ties

from merger.parallel import EXIT_WAIT, _end, assign
from merger.plan import OutTensor, layout


def _family(tmp_path):
    return six_shard_ties(tmp_path)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _merger(*args, env=None):
    return subprocess.run([sys.executable, "-m", "merger", *args], capture_output=True, text=True, env=env)


def test_assign_balances_and_covers_every_shard():
    shards = layout([OutTensor(f"t{i}", (n,), "U8", False, n) for i, n in enumerate([9, 1, 5, 5, 3, 8, 2])], 1)
    parts = assign(shards, 3)
    assert sorted(i for p in parts for i in p) == list(range(7))
    loads = [sum(shards[i].nbytes for i in p) for p in parts]
    assert max(loads) - min(loads) <= 2
    assert assign(shards, 3) == parts  # deterministic


def test_cuda_workers_spread_over_the_gpus(monkeypatch):
    """--workers K on CUDA: worker i merges on GPU i % count (each in its own process, so setting the
    device there is enough); a CPU merge leaves CUDA alone."""
    import merger.parallel

    devices, written = [], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(
        merger.parallel, "write_shards", lambda plan, d, shards, threads, **k: written.append(shards) or 7
    )

    class Planned:
        device = "cuda"

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5)
    for i in range(3):
        read, rss, gpu = merger.parallel._write_part(Planned(), None, [i], 1, i, None, False)
        assert read == 7 and rss > 0 and gpu == 5
    assert devices == [0, 1, 0] and written == [[0], [1], [2]]
    Planned.device = "cpu"
    assert merger.parallel._write_part(Planned(), None, [3], 1, 3, None, False)[2] == 0
    assert devices == [0, 1, 0] and written[-1] == [3]


def test_workers_output_is_byte_identical(tmp_path):
    recipe = _family(tmp_path)
    one = _merger("apply", str(recipe), "-o", str(tmp_path / "one" / "out"), "-q")
    assert one.returncode == 0, one.stderr
    two = _merger("apply", str(recipe), "-o", str(tmp_path / "two" / "out"), "--workers", "3", "--json")
    assert two.returncode == 0, two.stderr
    assert "resource_tracker" not in two.stderr  # its warning of a worker stopped as it exited (1 run in 4)
    assert json.loads(two.stdout)["processes"] == 3
    a, b = _files(tmp_path / "one" / "out"), _files(tmp_path / "two" / "out")
    assert len([f for f in a if f.endswith(".safetensors")]) > 3
    assert a == b
    many = _merger("apply", str(recipe), "-o", str(tmp_path / "many" / "out"), "--workers", str(10**20), "--json")
    assert many.returncode == 0, many.stderr  # one process per shard, however many are asked for
    assert json.loads(many.stdout)["processes"] == len([f for f in a if f.endswith(".safetensors")])
    assert _files(tmp_path / "many" / "out") == a


def test_workers_that_answered_are_left_to_exit_and_the_rest_stopped():
    """parallel._end: a worker that sent its result exits on its own (stopped while exiting, it left a
    semaphore to the resource tracker, which warned of it at the end of 1 run in 4); one that never answered
    (after another's failure) is stopped at once."""
    ctx = multiprocessing.get_context("spawn")
    done, stuck = ctx.Process(target=time.sleep, args=(1.0,)), ctx.Process(target=time.sleep, args=(600,))
    for proc in (done, stuck):
        proc.start()
    began = time.monotonic()
    _end([done, stuck], [done])
    assert done.exitcode == 0
    assert stuck.exitcode == -signal.SIGTERM
    assert time.monotonic() - began < EXIT_WAIT + 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe, out, ranks=(0, 1), env=None):
    """Ranks of a two-process launch as a launcher (accelerate launch, torchrun) starts them: WORLD_SIZE,
    RANK, MASTER_*. Returns [(returncode, stdout, stderr)] per rank."""
    port = _free_port()
    procs = []
    for rank in ranks:
        rank_env = os.environ | (env or {}) | {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "merger", "apply", str(recipe), "-o", str(out), "--json"],
            env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def test_distributed_gloo_launch_is_byte_identical(tmp_path):
    recipe = _family(tmp_path)
    one = _merger("apply", str(recipe), "-o", str(tmp_path / "one" / "out"), "-q")
    assert one.returncode == 0, one.stderr
    ranks = _launch(recipe, tmp_path / "dist" / "out")
    assert [r[0] for r in ranks] == [0, 0], ranks
    assert json.loads(ranks[0][1])["processes"] == 2 and ranks[1][1] == ""
    assert _files(tmp_path / "one" / "out") == _files(tmp_path / "dist" / "out")
    assert [p.name for p in (tmp_path / "dist").iterdir()] == ["out"]


KILL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import merger.apply
    merger.apply.write_shards = lambda *a, **k: os._exit(9)  # killed mid-merge (OOM killer, scancel)
"""

FAIL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import merger.apply
    from merger.errors import MergeError
    def write_shards(*a, **k):
        raise OSError(28, "No space left on device") if os.environ["FAIL"] == "disk" else MergeError("tensor 'w': bad")
    merger.apply.write_shards = write_shards
"""


@pytest.mark.parametrize("sabotage", ["killed", "disk full", "cannot merge"])
def test_a_rank_that_dies_or_fails_fails_every_rank(tmp_path, sabotage):
    """One rank failing fails every rank, and nothing lands at the output. A rank killed outright (the OOM
    killer, scancel) or a full disk is what a resume is for: what the other rank finished is kept, and
    the same launch again writes the rest, byte-identical to a single process. A failure that would come
    again (a tensor that cannot be merged) keeps nothing."""
    recipe = _family(tmp_path)
    env = hooked(tmp_path, KILL_RANK_1 if sabotage == "killed" else FAIL_RANK_1)
    env["FAIL"] = "disk" if sabotage == "disk full" else "merge"
    (rc0, out0, err0), (rc1, _, err1) = _launch(recipe, tmp_path / "dist" / "out", env=env)
    assert rc0 == 2 and out0 == ""
    assert "Traceback" not in err0 + err1
    assert not (tmp_path / "dist" / "out").exists()
    if sabotage == "cannot merge":
        assert rc1 == 2 and err0 == err1 == "error: rank 1: tensor 'w': bad\n"
        assert not (tmp_path / "dist").exists()  # no output, no partial output, not even the directory made for them
        return
    partial = tmp_path / "dist" / ".out.merger-partial"
    kept = sorted(p.name for p in (partial / "done").iterdir())
    assert 0 < len(kept) < 6  # rank 0's share
    resume = f"; {len(kept)} of 6 shards are done and kept in {partial}: run the same command again to resume (or delete it)\n"
    if sabotage == "killed":
        assert rc1 == 9
        assert err0.startswith("error: rank 0: could not collect every rank's result: another process")
    else:
        assert rc1 == 2 and err1 == "error: rank 1: No space left on device\n"
        assert err0.startswith("error: rank 1: No space left on device")
    assert len(err0.splitlines()) == 1 and err0.endswith(resume)
    ranks = _launch(recipe, tmp_path / "dist" / "out")
    assert [r[0] for r in ranks] == [0, 0], ranks
    one = _merger("apply", str(recipe), "-o", str(tmp_path / "one" / "out"), "-q")
    assert one.returncode == 0, one.stderr
    assert _files(tmp_path / "one" / "out") == _files(tmp_path / "dist" / "out")
    assert [p.name for p in (tmp_path / "dist").iterdir()] == ["out"]


ROOM_FOR_999_BYTES = """
import collections, shutil
shutil.disk_usage = lambda path: collections.namedtuple("usage", "total used free")(10**12, 0, 999)
"""


def test_every_rank_refuses_a_disk_too_small_before_writing(tmp_path):
    recipe = _family(tmp_path)
    ranks = _launch(recipe, tmp_path / "dist" / "out", env=hooked(tmp_path, ROOM_FOR_999_BYTES))
    said = [err for _, _, err in ranks]
    assert [rc for rc, *_ in ranks] == [2, 2] and said[0] == said[1], ranks
    assert said[0].startswith(f"error: output {tmp_path / 'dist' / 'out'}: the output needs ")
    assert said[0].endswith(
        f", and {tmp_path / 'dist'} has 999 B free: free some space there or write the output elsewhere\n"
    )
    assert not (tmp_path / "dist").exists()  # no output, no partial output, not the directory made for them


def test_a_rank_that_never_joins_is_waited_for_the_timeout(tmp_path):
    recipe = _family(tmp_path)
    ((rc, out, err),) = _launch(recipe, tmp_path / "dist" / "out", ranks=(0,), env={"MERGER_DIST_TIMEOUT": "2"})
    assert rc == 2 and out == ""
    assert err.startswith("error: rank 0: could not meet the other ranks") and "MERGER_DIST_TIMEOUT" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == []


def test_a_bad_timeout_is_named():
    from merger.errors import MergerError
    from merger.parallel import Group

    for bad in ("soon", "0", "-5", "nan"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MERGER_DIST_TIMEOUT", bad)
            with pytest.raises(
                MergerError, match=f"^MERGER_DIST_TIMEOUT: '{bad}' is not a positive number of seconds$"
            ):
                Group()


KILL_A_WORKER = """
import os
import merger.parallel

def _write_part(*a, **k):
    os._exit(9)  # a --workers process killed mid-merge

merger.parallel._write_part = _write_part  # what the pool's processes run (the parent never calls it)
"""


def test_a_worker_that_dies_fails_the_merge_instead_of_hanging(tmp_path):
    recipe = _family(tmp_path)
    out = tmp_path / "w" / "out"
    env = os.environ | hooked(tmp_path, KILL_A_WORKER)
    done = subprocess.run(
        [sys.executable, "-m", "merger", "apply", str(recipe), "-o", str(out), "--workers", "2", "-q"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "error: a --workers process died while writing its shards (killed, or out of memory?)\n"
    assert not out.parent.exists()  # nothing kept: not even the directory made to hold the output


LAUNCHER = """
import os, subprocess, sys
port, recipe, out = sys.argv[1:]
env = os.environ | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port, "MERGER_DIST_TIMEOUT": "600"}
rank = subprocess.Popen([sys.executable, "-m", "merger", "apply", recipe, "-o", out], env=env)
print(rank.pid, flush=True)
rank.wait()
"""


def test_a_rank_ends_when_its_launcher_dies(tmp_path):
    """A launcher killed outright (SIGKILL, the OOM killer) cannot stop its ranks: each notices its parent
    is gone and ends within seconds, even while it waits for a rank that will never come."""
    recipe = _family(tmp_path)
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(_free_port()), str(recipe), str(tmp_path / "out")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    rank = int(launcher.stdout.readline())
    time.sleep(3)  # the rank is up, waiting for rank 1 (for 600 s)
    assert alive(rank)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 15
    while alive(rank) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(rank), "a rank outlived its launcher"


def test_every_method_travels_to_workers_by_its_registered_name():
    """A plan goes to --workers pickled; methods whose functions are closures or lambdas (slerp's, tsv's)
    could not go as they are: each travels as its name and is the registry's own object there."""
    import pickle

    from merger.methods import all_methods

    for name, method in all_methods().items():
        assert pickle.loads(pickle.dumps(method)) is method, name


@pytest.mark.parametrize("method", ["slerp", "dare_ties", "iso_c"])  # a lambda, a seeded draw, a closure
def test_workers_merge_every_kind_of_method_byte_identically(tmp_path, method):
    root = six_shard_ties(tmp_path).parent
    models = {"slerp": "[{model: ft1}]", "dare_ties": "[{model: ft1, parameters: {density: 0.5}}, {model: ft2}]"}
    recipe = tmp_path / f"{method}.yaml"
    recipe.write_text(
        f"merge_method: {method}\nbase_model: base\nmodels: {models.get(method, '[{model: ft1}, {model: ft2}]')}\n"
        "random_seed: 7\noutput: {shard_size: 20KB}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    outs = []
    for workers in ("1", "3"):
        out = tmp_path / f"w{workers}" / "out"  # one name: the model card holds it
        done = subprocess.run(
            [sys.executable, "-m", "merger", "apply", str(recipe), "-o", str(out), "-q", "--workers", workers],
            capture_output=True, text=True, cwd=root, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outs.append(_files(out))
    assert len([f for f in outs[0] if f.endswith(".safetensors")]) > 3
    assert outs[0] == outs[1]

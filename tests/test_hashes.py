"""Input hashes remembered between runs (merger.hashes): a rerun on unchanged files reads none of them
to hash it, the lock still holds each file's true sha256, and any change to a file, --rehash, a
file changed just before it was hashed or a cache others may write makes merger read the file again."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import GOOD, write_checkpoint

from merger import hashes
from merger.cli import cli
from merger.files import Folder


@pytest.fixture
def reads(monkeypatch):
    """The files merger reads to hash them, in order (name within its model)."""
    seen: list[str] = []
    real = Folder.hash

    def counting(self, name, stop=None):
        seen.append(f"{Path(self.path).name}/{name}")
        return real(self, name, stop)

    monkeypatch.setattr(Folder, "hash", counting)
    return seen


def _apply(*args: str) -> None:
    result = CliRunner().invoke(cli, ["apply", "recipe.yaml", "-q", "--force", *args])
    assert result.exit_code == 0, result.output


def _locked_hashes() -> dict[str, str]:
    """file (model/name) -> sha256, as the output's lock records them."""
    lock = json.loads(Path("out/merger.lock.json").read_text())
    return {f"{i['refs'][0]}/{n}": f["sha256"] for i in lock["inputs"] for n, f in i["files"].items()}


def _true_hashes() -> dict[str, str]:
    """file -> sha256 of its bytes, read here (the oracle), for every file the lock names; which must
    include every weight file."""
    named = sorted(_locked_hashes())
    weights = {f"{m}/{f.name}" for m in ("base", "ft1", "ft2") for f in Path(m).glob("*.safetensors")}
    assert weights <= set(named) and len(weights) == 5
    return {name: hashlib.sha256(Path(name).read_bytes()).hexdigest() for name in named}


def _files() -> list[str]:
    return sorted(_true_hashes())


def _store() -> Path:
    return Path(os.environ["MERGER_CACHE_DIR"]) / "sha256"


def test_a_rerun_reads_no_unchanged_file_to_hash_it_and_locks_the_same_hashes(workdir, reads, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    assert sorted(reads) == _files()  # every file the lock names, read once
    assert _locked_hashes() == _true_hashes()
    assert len(list(_store().iterdir())) == len(_files())
    assert oct(_store().stat().st_mode & 0o777) == "0o700"
    reads.clear()
    _apply()
    assert reads == []
    assert _locked_hashes() == _true_hashes()
    # --locked checks the inputs against the lock by the remembered hashes too
    result = CliRunner().invoke(cli, ["apply", "--locked", "out/merger.lock.json", "-o", "again", "-q"])
    assert result.exit_code == 0, result.output
    assert reads == []


def _lock_line() -> str:
    """`merger plan`'s lock line."""
    result = CliRunner().invoke(cli, ["plan", "recipe.yaml"])
    assert result.exit_code == 0, result.output
    return next(line for line in result.output.splitlines() if line.startswith("  lock:"))


def _plan_json() -> dict:
    return json.loads(CliRunner().invoke(cli, ["plan", "recipe.yaml", "--json"]).stdout)


def test_plan_says_what_the_lock_will_read_to_hash(workdir, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    files = _files()
    sizes = {name: Path(name).stat().st_size for name in files}
    info = _plan_json()
    assert (info["hash_bytes"], info["hash_files"], info["hashes_remembered"]) == (0, 0, len(files))
    assert (
        _lock_line()
        == f"  lock:         nothing to hash: every input file's hash ({len(files)}) is remembered from an earlier run"
    )
    time.sleep(0.05)
    Path("ft2/model.safetensors").touch()  # a new ctime: its hash is read again
    info = _plan_json()
    assert (info["hash_bytes"], info["hash_files"]) == (sizes["ft2/model.safetensors"], 1)
    assert info["hashes_remembered"] == len(files) - 1
    assert _lock_line().endswith(f" of the inputs (1 file(s); {len(files) - 1} more remembered from an earlier run)")
    with hashes.afresh():
        info = _plan_json()
    assert (info["hash_bytes"], info["hash_files"], info["hashes_remembered"]) == (sum(sizes.values()), len(files), 0)
    assert info["hashes_not_remembered_because"] == []


def _planned_hashing() -> tuple[str, dict]:
    """`merger plan`'s lock line after its figures, and its JSON."""
    line, info = _lock_line(), _plan_json()
    if not info["hash_files"]:
        return "", info
    known = f"; {info['hashes_remembered']} more remembered from an earlier run" if info["hashes_remembered"] else ""
    return line.split(" of the inputs ", 1)[1].removeprefix(f"({info['hash_files']} file(s){known})"), info


def _mount_of(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


@pytest.mark.parametrize("case", ["others may write", "a link", "cannot be created", "change times", "usable"])
def test_plan_says_why_the_hashes_it_reads_will_not_be_remembered(workdir, monkeypatch, tmp_path, case):
    """A user whose every run hashes all the inputs again learns why from `merger plan`, and it is so:
    after a merge, the plan finds nothing remembered."""
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    cache = tmp_path / "cache"
    store = cache / "sha256"
    if case == "others may write":
        store.mkdir(parents=True)
        store.chmod(0o777)
        why = f"merger's hash cache cannot be used: {store} may be written by other users"
    if case == "a link":  # to a private directory: still not used
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        cache.mkdir(mode=0o700)
        store.symlink_to(tmp_path / "elsewhere")
        why = f"merger's hash cache cannot be used: {store} is a link"
    if case == "cannot be created":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
        why = f"merger's hash cache cannot be used: {cache / 'sha256'} cannot be created (Not a directory)"
    if case == "change times":
        monkeypatch.setattr(hashes, "KEEPS_CTIME", {})  # as on squashfs, a FUSE mount or FAT
        why = f"the inputs under {_mount_of(Path('.'))} are on a file system whose change times merger cannot rely on"
    monkeypatch.setenv("MERGER_CACHE_DIR", str(cache))
    after, info = _planned_hashing()
    reasons = [] if case == "usable" else [why]
    assert info["hashes_not_remembered_because"] == reasons and info["hashes_remembered"] == 0
    assert after == "".join(f"; not remembered for the next run: {r}" for r in reasons)
    _apply()
    after, info = _planned_hashing()
    if case == "usable":
        assert info["hash_files"] == 0 and info["hashes_remembered"] > 5  # the weights, configs, tokenizers
    else:
        assert info["hashes_remembered"] == 0 and info["hash_files"] > 5
        assert after == f"; not remembered for the next run: {why}"


def test_a_file_rewritten_with_its_size_and_mtime_put_back_is_hashed_again(workdir, reads, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    shard = Path("ft2/model.safetensors")
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    time.sleep(0.05)  # past the change time's grain
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    reads.clear()
    _apply()
    assert reads == ["ft2/model.safetensors"]
    assert _locked_hashes()["ft2/model.safetensors"] == hashlib.sha256(bytes(data)).hexdigest()
    assert _locked_hashes() == _true_hashes()


def test_rehash_reads_every_file_and_corrects_what_the_cache_holds(workdir, reads, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    for entry in _store().iterdir():  # a cache that lies (merger trusts only its own private directory)
        entry.write_text("0" * 64 + "\n")
    reads.clear()
    _apply()
    assert reads == [] and set(_locked_hashes().values()) == {"0" * 64}
    _apply("--rehash")
    assert sorted(reads) == _files()
    assert _locked_hashes() == _true_hashes()
    reads.clear()
    _apply()
    assert reads == [] and _locked_hashes() == _true_hashes()


def test_a_locked_rerun_is_not_refused_for_a_wrong_remembered_hash(workdir, reads, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    for entry in _store().iterdir():
        entry.write_text("f" * 64 + "\n")
    reads.clear()
    result = CliRunner().invoke(cli, ["apply", "--locked", "out/merger.lock.json", "-o", "again", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(reads) == _files()  # the remembered hashes differed from the lock: every file read again
    again = json.loads(Path("again/merger.lock.json").read_text())
    assert again["inputs"] == json.loads(Path("out/merger.lock.json").read_text())["inputs"]
    assert _locked_hashes() == _true_hashes()
    assert {e.read_text() for e in _store().iterdir()} == {f"{h}\n" for h in _true_hashes().values()}


def test_entries_that_are_not_a_hash_are_ignored(workdir, reads, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    for i, entry in enumerate(sorted(_store().iterdir())):
        entry.write_bytes([b"", b"xyz\n", b"0" * 63 + b"\n", b"A" * 64 + b"\n", b"0" * 64][i % 5])
    reads.clear()
    _apply()
    assert sorted(reads) == _files()
    assert _locked_hashes() == _true_hashes()


def test_a_file_changed_just_before_it_was_hashed_is_not_remembered(workdir, reads, monkeypatch):
    # a write in the same timestamp grain as the hash could follow it unseen
    monkeypatch.setattr(hashes, "SETTLED", 3600.0)  # every file here changed less than an hour ago
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    assert not _store().exists() or not list(_store().iterdir())
    reads.clear()
    _apply()
    assert sorted(reads) == _files()


def test_nothing_is_remembered_where_the_kernel_does_not_keep_change_times(workdir, reads, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    monkeypatch.setattr(hashes, "KEEPS_CTIME", {})  # as on squashfs, a FUSE mount or FAT
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    _apply()
    assert sorted(reads) == sorted(_files() * 2)
    assert not _store().exists() or not list(_store().iterdir())
    assert _locked_hashes() == _true_hashes()


def test_a_cache_others_may_write_is_neither_read_nor_written(workdir, reads, monkeypatch, tmp_path):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()  # the private cache's entries, under the names a shared cache would use
    entries = [e.name for e in _store().iterdir()]
    shared = tmp_path / "shared-cache"
    (shared / "sha256").mkdir(parents=True)
    for name in entries:  # planted by someone else: each names the wrong hash
        (shared / "sha256" / name).write_text("0" * 64 + "\n")
    for d in (shared, shared / "sha256"):
        d.chmod(0o777)
    monkeypatch.setenv("MERGER_CACHE_DIR", str(shared))
    reads.clear()
    _apply()
    assert sorted(reads) == _files()
    assert _locked_hashes() == _true_hashes()
    assert {e.read_text() for e in (shared / "sha256").iterdir()} == {"0" * 64 + "\n"}  # nothing written


def test_the_cache_directory_is_used_only_through_a_checked_descriptor(workdir, reads, monkeypatch, tmp_path):
    """A link that passes the check and is then swapped for another user's directory leads nowhere:
    merger opens the directory once, refuses a link, and checks what it opened."""
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    real = _store()
    elsewhere = tmp_path / "elsewhere"
    real.rename(elsewhere)
    real.symlink_to(elsewhere)  # private, but a link: not followed
    reads.clear()
    _apply()
    assert sorted(reads) == _files() and _locked_hashes() == _true_hashes()


def test_an_input_rewritten_while_it_is_merged_is_refused(workdir, monkeypatch):
    """Its remembered hash (or one read early in the merge) would not be of the bytes merged."""
    import merger.apply

    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    real = merger.apply.write_shards

    def then_rewrite(*args, **kwargs):
        read = real(*args, **kwargs)
        shard = Path("ft2/model.safetensors")
        data = shard.read_bytes()
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        return read

    monkeypatch.setattr(merger.apply, "write_shards", then_rewrite)
    # --locked: every input is hashed (here: found remembered) before the merge starts
    result = CliRunner().invoke(cli, ["apply", "--locked", "out/merger.lock.json", "-o", "again", "-q"])
    assert result.exit_code == 2, result.output
    # what is done was merged partly from the old bytes, and a run again starts over: nothing is kept
    assert result.stderr == "error: 'ft2': model.safetensors changed while merger merged it; run the command again\n"
    assert not Path("again").exists() and not Path(".again.merger-partial").exists()


def test_past_the_limit_the_least_recently_used_entries_go(workdir, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    monkeypatch.setattr(hashes, "LIMIT", 8)
    entry = {}
    for i in range(9):
        write_checkpoint(Path(f"m{i}"), {"w": torch.full((4, 4), float(i))}, n_shards=1)
    for i in range(8):
        before = set(_store().iterdir()) if _store().exists() else set()
        hashes.hashed(Folder.of(Path(f"m{i}"), f"m{i}"), "model.safetensors")
        (entry[i],) = set(_store().iterdir()) - before
        os.utime(entry[i], (time.time() - 1000 + i,) * 2)  # m0's used longest ago, m7's last
    digest, _ = hashes.hashed(Folder.of(Path("m0"), "m0"), "model.safetensors")  # found, and used now
    assert digest == hashlib.sha256(Path("m0/model.safetensors").read_bytes()).hexdigest()
    hashes.hashed(Folder.of(Path("m8"), "m8"), "model.safetensors")  # the ninth: past the limit
    left = set(_store().iterdir())
    assert len(left) == 7  # the least recently used eighth of the limit, and one more, removed
    assert entry[1] not in left and entry[2] not in left
    assert {entry[i] for i in (0, 3, 4, 5, 6, 7)} <= left

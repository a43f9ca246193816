"""Input hashes remembered between runs (merger.hashes): a rerun on unchanged files reads none of them
to hash it, the lock still holds each file's true sha256, and any change to a file, --rehash, a
file changed just before it was hashed or a cache others may write makes merger read the file again."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import GOOD

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


def test_a_file_changed_just_before_it_was_hashed_is_not_remembered(workdir, reads):
    # the files were written moments ago: a write in the same timestamp grain could follow unseen
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    assert not _store().exists() or not list(_store().iterdir())
    reads.clear()
    _apply()
    assert sorted(reads) == _files()


def test_a_cache_others_may_write_is_neither_read_nor_written(workdir, reads, monkeypatch, tmp_path):
    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    shared = tmp_path / "shared-cache"
    (shared / "sha256").mkdir(parents=True)
    shared.chmod(0o777)
    monkeypatch.setenv("MERGER_CACHE_DIR", str(shared))
    Path("recipe.yaml").write_text(GOOD)
    _apply()
    assert list((shared / "sha256").iterdir()) == []
    reads.clear()
    _apply()
    assert sorted(reads) == _files()
    assert _locked_hashes() == _true_hashes()

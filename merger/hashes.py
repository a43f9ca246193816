"""Input files' sha256, remembered between runs by each file's stamp, so that a merge run again on
unchanged inputs does not read them all once more to hash them: 2 GB per TinyLlama input, 140 GB per
70B one, read beside the merge that reads them too.

A remembered hash is keyed by the file's real path and its stamp (size, modification and change
times, inode, device). On the file systems where the kernel keeps the change time (KEEPS_CTIME:
ext4, xfs, btrfs, zfs, f2fs, tmpfs, overlayfs, NFS), writing a file changes it and no user call can
set it back, so a file rewritten with its size and modification time put back is hashed again.
Elsewhere (a squashfs image, a FUSE mount, FAT: the change time is whatever the file's author or the
driver says) and off Linux, nothing is remembered. A file changed within SETTLED seconds before it
was hashed is not remembered either: a timestamp's grain could hide a write right after the hash.

The hashes live in merger's private cache (`sha256/`, one small file per file hashed, the LIMIT used
last), read and written through one descriptor of that directory, checked to be this user's and
writable by nobody else; where it cannot be had, nothing is remembered. `merger apply --rehash`
hashes every input afresh (`afresh()`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from merger import system
from merger.files import Folder, cache_dir, not_private, unusable_cache
from merger.sources import stamp

SETTLED = 2.0  # seconds since a file's last change before its hash is remembered
LIMIT = 16384  # entries kept (a few MB); past it, the least recently used are removed
KEEPS_CTIME = {  # statfs f_type of the file systems whose change times the kernel keeps
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
    0x01021994: "tmpfs",
    0x794C7630: "overlayfs",
    0x6969: "nfs",
}
_DIGEST = re.compile(rb"[0-9a-f]{64}\n")
_afresh = threading.Event()  # set: hash every file now, remember nothing old (--rehash)


@contextlib.contextmanager
def afresh() -> Iterator[None]:
    """Within it, every hash is read from the file (and remembered for later runs)."""
    was = _afresh.is_set()
    _afresh.set()
    try:
        yield
    finally:
        if not was:
            _afresh.clear()


def remembering() -> bool:
    """Whether hashes found remembered are taken (outside afresh())."""
    return not _afresh.is_set()


def hashed(folder: Folder, name: str, stop: threading.Event | None = None) -> tuple[str, os.stat_result]:
    """`folder.hash(name)`: the sha256 of the file's bytes and its status; without reading the file
    where an earlier run hashed it as it is now."""
    found = _found(folder, name)
    if found is not None:
        return found
    started = time.time_ns()
    digest, st = folder.hash(name, stop)
    real = folder.locate(name)
    if max(st.st_mtime_ns, st.st_ctime_ns) <= started - SETTLED * 1e9 and _keeps_ctime(real):
        with _store() as store:
            if store is not None:
                _write(store, _key(real, st), digest)
    return digest, st


def remembered(folder: Folder, name: str) -> bool:
    """Whether hashed() would take the file's hash from the cache, without reading the file."""
    return _found(folder, name) is not None


def forgotten(folder: Folder, name: str) -> str | None:
    """Why this file's hash, once read, would not be remembered for later runs (None: it would be, as
    far as can be told before hashing: a file changed within SETTLED seconds is not remembered either).
    A file not here yet (a Hub file to download) is judged by the nearest folder above it that is."""
    if system.libc() is None:
        return "hashes are remembered on Linux alone"
    real = folder.locate(name)
    there = next(p for p in (real, *real.parents) if p.exists())
    if not _keeps_ctime(there):
        mount = next(p for p in (there, *there.parents) if p.is_mount() or p == p.parent)
        return f"the inputs under {mount} are on a file system whose change times merger cannot rely on"
    fd, problem = _open_store()
    if fd is not None:
        os.close(fd)
    return problem and f"merger's hash cache cannot be used: {problem}"


def _found(folder: Folder, name: str) -> tuple[str, os.stat_result] | None:
    """The remembered hash of the file as it is now, and its status (None: not remembered, or not here)."""
    real = folder.locate(name)
    st = folder.stat(name)
    if st is None or _afresh.is_set() or not _keeps_ctime(real):
        return None
    with _store() as store:
        digest = _read(store, _key(real, st)) if store is not None else None
    return (digest, st) if digest else None


def _key(real: Path, st: os.stat_result) -> str:
    """The entry's name: a hash of the file's real path and stamp."""
    return hashlib.sha256("\0".join([str(real), *map(str, stamp(st))]).encode()).hexdigest()


@contextlib.contextmanager
def _store() -> Iterator[int | None]:
    """A descriptor of the private `sha256/` directory, checked through that descriptor (so a link
    swapped in after the check leads nowhere), or None."""
    fd, _ = _open_store()
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _open_store() -> tuple[int | None, str | None]:
    """_store's descriptor, or None and why the directory cannot be used."""
    problem = unusable_cache("sha256")
    if problem:
        return None, problem
    path = cache_dir() / "sha256"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return None, f"{path} is a link" if path.is_symlink() else f"{path} cannot be opened ({e.strerror})"
    try:
        problem = not_private(path, os.fstat(fd))
    except OSError as e:
        problem = f"{path} cannot be read ({e.strerror})"
    if problem:
        os.close(fd)
        return None, problem
    return fd, None


def _read(store: int, key: str) -> str | None:
    try:
        fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=store)
    except OSError:
        return None
    try:
        data = os.read(fd, 66)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not _DIGEST.fullmatch(data):
        return None
    with contextlib.suppress(OSError):
        os.utime(key, dir_fd=store)  # used now: the last to be removed
    return data[:64].decode()


def _write(store: int, key: str, digest: str) -> None:
    """Written to a temporary name and renamed (relative to the directory's descriptor, which
    files.write_atomic does not take): a reader sees a whole entry or none. A full disk or a
    read-only home only costs a later run a hash."""
    tmp = f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=store)
        try:
            os.write(fd, f"{digest}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, key, src_dir_fd=store, dst_dir_fd=store)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=store)
    _prune(store)


def _prune(store: int) -> None:
    """Past LIMIT entries, the least recently used eighth of them is removed (with any temporary one a
    killed process left)."""
    with contextlib.suppress(OSError):
        with os.scandir(store) as it:
            entries = list(it)
        if len(entries) <= LIMIT:
            return
        used = sorted(entries, key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns)
        for e in used[: len(entries) - LIMIT + LIMIT // 8]:
            with contextlib.suppress(OSError):
                os.unlink(e.name, dir_fd=store)


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]  # f_type leads struct statfs on Linux


def _keeps_ctime(real: Path) -> bool:
    """Whether the file system holding `real` is one whose change times the kernel keeps."""
    libc = system.libc()
    if libc is None:
        return False
    buf = _StatFs()
    if libc.statfs(os.fsencode(real), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) in KEEPS_CTIME

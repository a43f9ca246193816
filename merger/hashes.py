"""Input files' sha256, remembered between runs by each file's stamp, so that a merge run again on
unchanged inputs does not read them all once more to hash them: 2 GB per TinyLlama input, 140 GB per
70B one, read beside the merge that reads them too.

A remembered hash is keyed by the file's real path and its stamp (size, modification and change
times, inode, device). Writing a file changes its change time, which no user call can set back, so a
file rewritten with its size and modification time put back is hashed again. A file changed within
SETTLED seconds before it was hashed is not remembered: a timestamp's grain (a few milliseconds, whole
seconds on some file systems) could hide a write right after the hash. The hashes live in merger's
private cache (`sha256/`, one small file per file hashed); where that cannot be had (another user's
or a world-writable directory), nothing is remembered. `merger apply --rehash` hashes every input
afresh (`afresh()`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from merger.files import Folder, private_cache, write_atomic
from merger.sources import stamp

SETTLED = 2.0  # seconds since a file's last change before its hash is remembered
_DIGEST = re.compile(rb"[0-9a-f]{64}\n")
_afresh = threading.Event()  # set: hash every file now, remember nothing old (--rehash)


@contextlib.contextmanager
def afresh() -> Iterator[None]:
    """Within it, every hash is read from the file (and remembered for later runs)."""
    _afresh.set()
    try:
        yield
    finally:
        _afresh.clear()


def hashed(folder: Folder, name: str, stop: threading.Event | None = None) -> tuple[str, os.stat_result]:
    """`folder.hash(name)`: the sha256 of the file's bytes and its status; without reading the file
    where an earlier run hashed it as it is now."""
    st = folder.stat(name)
    entry = _entry(folder.locate(name), st) if st is not None else None
    if entry is not None and not _afresh.is_set():
        with contextlib.suppress(OSError):
            data = entry.read_bytes()
            if _DIGEST.fullmatch(data):
                return data[:64].decode(), st
    started = time.time_ns()
    digest, st = folder.hash(name, stop)
    entry = _entry(folder.locate(name), st)
    if entry is not None and max(st.st_mtime_ns, st.st_ctime_ns) <= started - SETTLED * 1e9:
        with contextlib.suppress(OSError):  # a full disk or a read-only home only costs a later run a hash
            write_atomic(entry, f"{digest}\n".encode())
    return digest, st


def _entry(real: Path, st: os.stat_result) -> Path | None:
    """Where the hash of the file at `real` with status `st` is remembered (None: nowhere)."""
    store = private_cache("sha256")
    if store is None:
        return None
    key = "\0".join([str(real), *map(str, stamp(st))])
    return store / hashlib.sha256(key.encode()).hexdigest()

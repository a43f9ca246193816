"""Files: what merger reads from an input or the user names, and how it makes its own writes durable.

Inputs come from strangers. Every file merger reads from a model is a regular file inside that model's
folder (a Hub snapshot's files may link into the repo's blob store beside it): a name that climbs out
(`../x`, `/etc/x`), a symlink that leads elsewhere, a FIFO or a device is refused with one line naming
it, before anything is read. Support files (config, tokenizer, index, card) have a size limit, JSON a
nesting limit. A recipe or lock may come from a pipe (`<(...)`); one nothing writes to is refused.

Outputs: a file counts as written once it is on disk (fsync), and a directory once its entries are.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import select
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from merger import system
from merger.errors import ModelError

SUPPORT_LIMIT = 128 << 20  # bytes: the largest config, tokenizer, index or card read from an input
# (the largest tokenizer.json on the Hub are ~35 MB)
CONFIG_LIMIT = 4 << 20  # bytes: the largest model config (config.json and its kind: a few KB as published). Python
# holds a parsed JSON value in about 70 bytes: an 80 MB config of small lists took 5.8 GB and 6 minutes.
CONFIGS = frozenset({"config.json", "generation_config.json", "preprocessor_config.json"})
JSON_DEPTH = 64  # nesting of the JSON merger reads (real configs and tokenizers nest under 10 deep)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _opened_path(fd: int) -> Path | None:
    """The path of what descriptor `fd` opened, as the kernel knows it (Linux); None elsewhere."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def check_name(name: object, label: str, what: str) -> str:
    """A file name an input gives (an index's weight_map entry): relative, inside the folder."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"'{label}': {what} names {name!r}, which is not a file name")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ModelError(f"'{label}': {what} names {name!r}, which is not a plain file name inside the model's folder")
    return name


@dataclass(frozen=True)
class Folder:
    """A model's folder, and the real directories its files may live in: the folder itself, and for a
    Hugging Face cache snapshot the repo's storage directory (snapshot files are links into its blobs)."""

    path: Path
    label: str  # the recipe's reference, for messages
    roots: tuple[Path, ...] = field(default=())

    @classmethod
    def of(cls, path: Path, label: str, storage: Path | None = None) -> Folder:
        path = Path(os.path.realpath(path))
        if storage is None and path.parent.name == "snapshots" and (path.parent.parent / "blobs").is_dir():
            storage = path.parent.parent  # a snapshot in a Hugging Face cache, given as a local path
        roots = (path,) + ((Path(os.path.realpath(storage)),) if storage is not None else ())
        return cls(path, label, roots)

    def locate(self, name: str) -> Path:
        """The real path of `name` in this folder; refused if it leads outside."""
        real = Path(os.path.realpath(self.path / name))
        if not any(real == r or r in real.parents for r in self.roots):
            raise ModelError(
                f"'{self.label}': {name} leads outside the model's folder (to {real}); refusing to read it"
            )
        return real

    def stat(self, name: str) -> os.stat_result | None:
        """`name`'s status if it is there (None if not); refused if it is not a regular file inside."""
        real = self.locate(name)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ModelError(f"'{self.label}': cannot read {name}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"'{self.label}': {name} is {_kind(st.st_mode)}; merger reads regular files only")
        return st

    def has(self, name: str) -> bool:
        return self.stat(name) is not None

    def open(self, name: str, limit: int | None = None) -> BinaryIO:
        """`name` opened for reading: a regular file inside the folder (never blocking on a FIFO), of at
        most `limit` bytes."""
        real = self.locate(name)
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except FileNotFoundError:
            raise ModelError(f"'{self.label}': {name} is missing") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a link since it was located
                raise ModelError(f"'{self.label}': {name} changed while merger opened it") from None
            raise ModelError(f"'{self.label}': cannot read {name}: {e.strerror}") from None
        opened = _opened_path(fd)  # a directory on the way swapped for a link since locate(): seen here
        if opened is not None and not any(opened == r or r in opened.parents for r in self.roots):
            os.close(fd)
            raise ModelError(f"'{self.label}': {name} changed while merger opened it (it led to {opened})")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ModelError(f"'{self.label}': {name} is {_kind(st.st_mode)}; merger reads regular files only")
        if limit is not None and st.st_size > limit:
            os.close(fd)
            raise ModelError(
                f"'{self.label}': {name} is {st.st_size} bytes, more than the {limit} merger reads of such a file"
            )
        return os.fdopen(fd, "rb")

    def read_bytes(self, name: str, limit: int = SUPPORT_LIMIT) -> bytes:
        try:
            with self.open(name, limit) as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise ModelError(f"'{self.label}': cannot read {name}: {e.strerror}") from None
        if len(data) > limit:
            raise ModelError(f"'{self.label}': {name} grew past {limit} bytes while merger read it")
        return data

    def read_text(self, name: str, limit: int = SUPPORT_LIMIT) -> str:
        try:
            return self.read_bytes(name, limit).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"'{self.label}': {name} is not UTF-8 text") from None

    def read_json(self, name: str, limit: int = SUPPORT_LIMIT) -> object:
        return parse_json(self.read_bytes(name, limit), f"'{self.label}': {name}")

    def sha256(self, name: str, stop: threading.Event | None = None) -> str:
        """The sha256 of `name`'s bytes, read now (raises Stopped once `stop` is set)."""
        return self.hash(name, stop)[0]

    def hash(self, name: str, stop: threading.Event | None = None) -> tuple[str, os.stat_result]:
        """The sha256 of `name`'s bytes, read now, and the status of the file those bytes were read from;
        refused if the file changed while it was read."""
        try:
            with self.open(name) as f:
                before = os.fstat(f.fileno())
                digest = _sha256(f, stop)
                after = os.fstat(f.fileno())
        except OSError as e:
            raise ModelError(f"'{self.label}': cannot read {name}: {e.strerror}") from None
        if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
            after.st_size,
            after.st_mtime_ns,
            after.st_ctime_ns,
        ):
            raise ModelError(f"'{self.label}': {name} changed while merger read it; run the command again")
        return digest, after


PIPE_WAIT = 60.0  # seconds a pipe named as a recipe or lock may take to deliver it (`<(generate-recipe)`)


def read_user_file(path: str | Path, limit: int) -> bytes:
    """A file the user names on the command line (a recipe, a lock): a regular file, or a pipe (process
    substitution, /dev/stdin) read until its writer is done; at most `limit` bytes (one more is read, so
    the caller can tell). Raises OSError, or ValueError for a device, a directory, a pipe nothing writes
    to, or one that keeps it waiting past PIPE_WAIT."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(limit + 1)
        if not stat.S_ISFIFO(mode):
            raise ValueError(f"is {_kind(mode)}, not a file")
        return _read_pipe(fd, limit)
    finally:
        os.close(fd)


def _read_pipe(fd: int, limit: int) -> bytes:
    """Read a non-blocking pipe to its end: a read returns b"" once its writer is done, or at once if it
    has none (a FIFO nobody opened for writing); EAGAIN means a writer that has not written yet."""
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + PIPE_WAIT
    while size <= limit:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ValueError(f"is a pipe that sent nothing more for {PIPE_WAIT:g} s") from None
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if not chunks:
        raise ValueError("is a pipe that nothing wrote to")
    return b"".join(chunks)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read now (a file of the user's: a script, a data file)."""
    with open(path, "rb") as f:
        return _sha256(f)


class Stopped(Exception):
    """Work in the background was told to stop (the merge it ran beside was interrupted)."""


def _sha256(f: BinaryIO, stop: threading.Event | None = None) -> str:
    """Through one reused 1 MiB buffer (hashlib releases the GIL on blocks this size); `stop`, checked
    between blocks, ends it early."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := f.readinto(buf):
        if stop is not None and stop.is_set():
            raise Stopped
        h.update(view[:n])
    return h.hexdigest()


def support_limit(name: str) -> int:
    """The most bytes merger reads of the support file `name` from an input."""
    return CONFIG_LIMIT if name in CONFIGS else SUPPORT_LIMIT


def parse_json(raw: bytes, what: str, *, unique_keys: bool = False, depth: bool = True) -> object:
    """JSON from an input, as one-line errors: not UTF-8, not JSON, nested deeper than JSON_DEPTH (unless
    `depth` is False: a caller that checks the shape itself, as a safetensors header's reader does), or
    (with `unique_keys`) a key given twice in one object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{what} is not UTF-8 JSON") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except _Duplicate as e:
        raise ModelError(f"{what} gives the key {e.args[0]!r} twice") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{what} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        data = _TOO_DEEP
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ModelError(f"{what} is not valid JSON ({str(e).split(';')[0]})") from None
    if data is _TOO_DEEP or (depth and _depth(data) > JSON_DEPTH):
        raise ModelError(f"{what} nests deeper than {JSON_DEPTH} levels; not a file merger reads")
    return data


_TOO_DEEP = object()


def _depth(data: object) -> int:
    """How deep lists and objects nest in parsed JSON (without recursion)."""
    deepest = 0
    todo = [(data, 1)] if isinstance(data, dict | list) else []
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        if deepest > JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node
        todo.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


class _Duplicate(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


# --- writing ---------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """merger's own cache: $MERGER_CACHE_DIR, else $XDG_CACHE_HOME/merger, else ~/.cache/merger."""
    if os.environ.get("MERGER_CACHE_DIR"):
        return Path(os.environ["MERGER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "merger"


def private_cache(name: str) -> Path | None:
    """cache_dir() / name, created for this user alone (mode 0700), or None if it cannot be had, or if
    it or the cache directory belongs to someone else or others may write to it (unusable_cache says which)."""
    return None if unusable_cache(name) else cache_dir() / name


def unusable_cache(name: str) -> str | None:
    """Why cache_dir() / name cannot be merger's private cache directory (created here, mode 0700, if
    missing), or None if it can."""
    path = cache_dir() / name
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        return f"{path} cannot be created ({e.strerror})"
    for p in (path, path.parent):
        try:
            problem = not_private(p, os.stat(p))
        except OSError as e:
            problem = f"{p} cannot be read ({e.strerror})"
        if problem:
            return problem
    return None


def not_private(path: Path, st: os.stat_result) -> str | None:
    """Why the directory at `path`, whose status is `st`, is not this user's alone (None if it is)."""
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to another user"
    if st.st_mode & 0o022:
        return f"{path} may be written by other users"
    return None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    _fsync_path(path, getattr(os, "O_DIRECTORY", 0))


def fsync_file(path: Path) -> None:
    """Make a file's bytes durable (through a descriptor of its own: any will do)."""
    _fsync_path(path)


def _fsync_path(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace `path` with `data` in one step (a temporary sibling renamed over it): a reader, or a
    process killed meanwhile, sees the old file or the new one. `durable`: on disk before it returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, data: object, *, durable: bool = False, indent: int | None = 1) -> None:
    write_atomic(path, (json.dumps(data, indent=indent) + "\n").encode(), durable=durable)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing [offset, offset + nbytes) of `fd` to disk, without waiting and
    without dropping the pages from the cache (sync_file_range on Linux; nothing elsewhere): the fsync
    that ends a shard then finds most of it written."""
    call = getattr(system.libc(), "sync_file_range", None)
    if call is not None:
        call(
            ctypes.c_int(fd),
            ctypes.c_longlong(offset),
            ctypes.c_longlong(nbytes),
            ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
        )


# The most bytes of one write(2) into the page cache. A file system with large folios (xfs; ext4 since Linux
# 6.16) sizes a write's new page-cache folios by its length, up to 2 MiB, and a 2 MiB folio takes a free 2 MiB
# block. A VM that hands free memory back to its host (free page reporting) hands back exactly such blocks, so
# the copy into each one faults on the host. Written 8 MiB a call, a cached TinyLlama merge spent most of its
# time there; 512 KiB a call took a third of that copy's time (README, Performance). Elsewhere the extra calls
# cost nothing measurable: 4,400 for a 2.2 GB output.
BUFFERED_CALL = 512 << 10

ALIGN = 4096  # O_DIRECT's alignment of memory, file offsets and lengths: the largest logical block in use


class DirectFile:
    """A new file written past the page cache (O_DIRECT): bytes are copied into a reused, page-aligned
    staging buffer (`stage`: an anonymous mapping whose size is a multiple of ALIGN) and written a whole
    buffer at a time, straight from it to the disk at the file offsets it holds; close() writes the last,
    partial block padded with zeros and truncates the file to its true size. Nothing of the file is left
    in memory, and the CPU's only work is the copy into the buffer: filling fresh page-cache pages instead
    costs a VM that returns freed memory to its host faults on the host, the more the larger the write
    calls (BUFFERED_CALL; README, Performance). A direct write returns once the disk has the data; the
    caller's fsync still makes the file's size and the disk's own cache durable.

    `open` returns None where the file system refuses O_DIRECT (tmpfs before Linux 6.6, some network
    file systems). A write it refuses later (alignment stricter than ALIGN) is made again without
    O_DIRECT, and the file goes on through the page cache (`direct` turns False). After any failed
    write the file is closed: every later call fails."""

    def __init__(self, fd: int, stage: memoryview):
        self._fd = fd
        self._stage = stage
        self._used = 0  # bytes of the buffer filled, not yet written
        self._written = 0  # bytes of the file written
        self.direct = True

    @classmethod
    def open(cls, path: Path, stage: memoryview) -> DirectFile | None:
        direct = getattr(os, "O_DIRECT", 0)
        if not direct:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | direct, 0o666)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return None
        return cls(fd, stage)

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._written + self._used

    def flush(self) -> None:
        """Nothing to hand to the kernel before a whole buffer is written (as a BinaryIO's flush)."""

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            n = min(len(data), len(self._stage) - self._used)
            self._stage[self._used : self._used + n] = data[:n]
            self._used += n
            data = data[n:]
            if self._used == len(self._stage):
                self._flush(self._used)

    def _flush(self, nbytes: int) -> None:
        """Write the buffer's first nbytes (a multiple of ALIGN) at the file's end."""
        done = 0
        try:
            while done < nbytes:
                try:
                    end = nbytes if self.direct else min(nbytes, done + BUFFERED_CALL)
                    more = os.pwrite(self._fd, self._stage[done:end], self._written + done)
                except OSError as e:
                    if e.errno != errno.EINVAL or not self.direct:
                        raise
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    self.direct = False
                    continue
                if more == 0:  # a short write, then nothing: the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += more
        except BaseException:
            self.abort()
            raise
        self._written += nbytes
        self._used = 0

    def close(self) -> None:
        """Write what is left, padded to ALIGN, and cut the file to its size."""
        try:
            if self._used:
                size = self.tell()
                padded = -(-self._used // ALIGN) * ALIGN
                self._stage[self._used : padded] = bytes(padded - self._used)
                self._flush(padded)
                os.ftruncate(self._fd, size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without writing what the buffer holds."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

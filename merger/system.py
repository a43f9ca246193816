"""What merger asks of the operating system: memory figures, the cores it may use, where file systems are
mounted, and processes that end together (a worker or rank whose parent is gone exits; a command runs in
its own process group)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library's functions Python has no wrapper for (prctl, renameat2, sync_file_range, sigaction),
    with errno kept; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


class _Interrupted(threading.Event):
    """Set by the CLI's signal handler before it raises KeyboardInterrupt: code that turns an exception into
    another (numba turns one raised while it loads a kernel into SystemError) cannot then hide that the run
    was interrupted. signum: the first signal since it was last cleared (SIGINT where none: a Ctrl-C that
    Python's own handler turned into KeyboardInterrupt)."""

    signum: int = signal.SIGINT
    over = False  # the command's work is done (finish): a signal no longer interrupts it

    def clear(self) -> None:
        self.signum = signal.SIGINT
        self.over = False
        super().clear()

    def finish(self) -> None:
        """The command line's command is done and its process exits with the command's own status: a signal
        from now on leaves that status alone (the output is complete, or the error said), and a second one of
        the same kind ends the process at once, as if merger had no handler (a shutdown that hangs)."""
        self.over = True

    @property
    def exit_status(self) -> int:
        """What the interrupted command exits with: 128 + the signal's number, as a shell reports a process
        that signal ended (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP), so a script or CI job can tell
        which it was."""
        return 128 + (self.signum if self.is_set() else signal.SIGINT)


INTERRUPTED = _Interrupted()
_held = threading.local()


def interrupt(signum: int = signal.SIGINT) -> None:
    """What the CLI's handler of SIGINT, SIGTERM and SIGHUP does: raise KeyboardInterrupt in the main
    thread now, or, inside interrupts_held(), as soon as that section ends."""
    if INTERRUPTED.over:
        signal.signal(signum, signal.SIG_DFL)
        return
    if not INTERRUPTED.is_set():
        INTERRUPTED.signum = signum
    INTERRUPTED.set()
    if getattr(_held, "depth", 0):
        _held.pending = True
        return
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise an interrupt that a library swallowed: the signal handler's KeyboardInterrupt, raised where C
    code had called back into Python (numba's compiler does, through ctypes), is printed and dropped there,
    and the run would go on to the end. Called between tensors and before the output is put in place."""
    if INTERRUPTED.is_set() and not getattr(_held, "depth", 0):
        raise KeyboardInterrupt


def unraisable_hook(previous: Callable) -> Callable:
    """sys.unraisablehook while signals interrupt: an interrupt dropped in a callback (above) is not
    printed as a traceback, since raise_if_interrupted raises it again; anything else is as before."""

    def hook(unraisable) -> None:
        if not (issubclass(unraisable.exc_type, KeyboardInterrupt) and INTERRUPTED.is_set()):
            previous(unraisable)

    return hook


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """A section no interrupt may cut in two (renaming the output into place and clearing up after):
    one that arrives meanwhile is raised when it ends. A Python signal handler runs in the main thread,
    so holding it there is enough."""
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1
        if not _held.depth and getattr(_held, "pending", False):
            _held.pending = False
            raise KeyboardInterrupt


def proc_kib(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a /proc file, in bytes (None off Linux or if absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_available() -> int | None:
    """Bytes of memory a new allocation may take: the kernel's MemAvailable, capped by the room left
    under this process's cgroup (v2) memory limits where any is set (a container, a systemd slice)."""
    available = proc_kib("/proc/meminfo", "MemAvailable")
    room = cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


# How each cgroup version states a memory limit: (the hierarchy's directory under the cgroup root, the
# limit's file, the usage's file, memory.stat's field for the page cache the kernel reclaims first).
_CGROUP_FILES = {
    "v2": ("", "memory.max", "memory.current", "inactive_file"),
    "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}
_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as the largest page count it holds, about 2**63


def cgroup_room(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> int | None:
    """The least room under the memory limit of this process's cgroup and of each cgroup above it (a
    limit set on a parent binds its children), cgroup v2 or v1; None where no limit is set. Room is
    the limit less what the cgroup holds that it cannot drop: its usage less its inactive page cache
    (a merge's inputs, read once, fill the cache up to the limit, and the kernel reclaims those first)."""
    rooms = []
    for version, path in _memory_cgroups(membership):
        where, *files = _CGROUP_FILES[version]
        path = path.strip("/")
        while True:
            room = _room_in(os.path.join(root, where, path), *files)
            if room is not None:
                rooms.append(room)
            if not path:
                break
            path = os.path.dirname(path)
    return min(rooms, default=None)


def _memory_cgroups(membership: str) -> list[tuple[str, str]]:
    """(version, path) of this process's memory cgroups, from /proc/self/cgroup: the v2 one (`0::path`)
    and the v1 memory controller's (`N:memory:path`)."""
    found = []
    try:
        with open(membership) as f:
            for line in f:
                number, _, rest = line.rstrip("\n").partition(":")
                controllers, _, path = rest.partition(":")
                if number == "0" and not controllers:
                    found.append(("v2", path))
                elif "memory" in controllers.split(","):
                    found.append(("v1", path))
    except OSError:
        pass
    return found


def _room_in(group: str, limit_file: str, usage_file: str, cache_field: str) -> int | None:
    """Room under one cgroup's memory limit (cgroup_room), None if it sets none or cannot be read."""
    try:
        with open(os.path.join(group, limit_file)) as f:
            raw = f.read().strip()
        if raw == "max" or int(raw) >= _NO_LIMIT:
            return None
        with open(os.path.join(group, usage_file)) as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return max(0, int(raw) - used + _stat_bytes(os.path.join(group, "memory.stat"), cache_field))


def _stat_bytes(path: str, field: str) -> int:
    """The bytes on a `field N` line of a cgroup's memory.stat, 0 if absent."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == field:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def is_mount_point(path: str | os.PathLike, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether `path` (absolute, resolved) is where a file system or a bind mount is mounted, from Linux's
    list of this process's mounts: os.path.ismount compares devices, which misses a bind mount within one
    file system and takes a btrfs subvolume for a mount. os.path.ismount where there is no such list."""
    try:
        with open(mountinfo, "rb") as f:
            text = f.read()
    except OSError:
        return os.path.ismount(path)
    return os.fsencode(path) in mount_points(text)


def mount_points(mountinfo: bytes) -> set[bytes]:
    """The mount points of a /proc/self/mountinfo (its fifth field, with the kernel's octal escapes of a
    space, tab, newline or backslash undone)."""
    unescape = functools.partial(re.sub, rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]))
    return {unescape(fields[4]) for line in mountinfo.splitlines() if len(fields := line.split(b" ")) > 4}


def peak_rss() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux the latter survives exec, so a
    process started from a big parent (a test runner, a notebook) would report the parent's size."""
    hwm = proc_kib("/proc/self/status", "VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_threads() -> int:
    """Chunk threads of one merging process: the cores this process may use (at most 16)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(cores, 16)


class Background:
    """Threads doing work beside the merge (hashing inputs for the lock) that take only the cores the
    merge leaves idle, waiting for the disk say (Linux: SCHED_IDLE, per thread), until somebody waits
    for their result: then they run as any thread does (on a busy machine they could otherwise starve)."""

    def __init__(self) -> None:
        self._threads: list[int] = []
        self._wanted = False
        self._lock = threading.Lock()

    def enter(self) -> None:
        """A thread's initializer: run at idle priority, unless the work is wanted now already."""
        with self._lock:
            if self._wanted:
                return
            self._threads.append(threading.get_native_id())
            _schedule(threading.get_native_id(), idle=True)

    def now_wanted(self) -> None:
        """Somebody waits for the work: every thread of it back to the normal priority."""
        with self._lock:
            self._wanted = True
            for tid in self._threads:
                _schedule(tid, idle=False)


def _schedule(tid: int, idle: bool) -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # a thread that ended, a kernel without SCHED_IDLE
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        os.sched_setscheduler(tid, policy, os.sched_param(0))


_PR_SET_PDEATHSIG = 1


def die_with_parent(*, at_once: bool, parent: int | None = None) -> None:
    """End this process when the process that started it ends (killed with SIGKILL included): a --workers
    process or a launched rank must not go on writing for a parent that is gone. A watcher thread checks
    the parent every half second; `at_once` also asks the kernel to signal at once (PR_SET_PDEATHSIG on
    Linux), which is right only where the parent started us from a thread that lives as long as it does
    (the signal follows the parent *thread*): our own --workers, not a launcher's ranks. `parent`: the
    pid the parent had (a process that starts slowly may find itself orphaned already)."""
    parent = parent or os.getppid()
    if at_once and libc() is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc().prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # gone already
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # as if interrupted: the process cleans up as it would on Ctrl-C
        time.sleep(3)
        os._exit(1)  # still here: the main thread is stuck in a call the signal cannot interrupt

    threading.Thread(target=watch, name="merger-parent-watch", daemon=True).start()


def run_in_group(command: str, timeout: float | None) -> subprocess.CompletedProcess:
    """Run a shell command in its own process group, capturing its output as text. On timeout
    (subprocess.TimeoutExpired), an interrupt or any other exception the whole group is ended: SIGTERM,
    then SIGKILL after two seconds, so nothing the command started keeps running."""
    proc = subprocess.Popen(
        command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        end_group(proc)
        raise
    end_group(proc)  # the command exited; anything it left running in its group goes with it
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def end_group(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL to what remains after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            break
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        proc.communicate(timeout=grace)  # reap it, and close its pipes


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True

"""A run's workdir: whether it can be written, and one run at a time in it.

``unwritable`` says why a path cannot hold a run before anything is created there. A run then
holds an exclusive lock on the workdir for its whole length.

Two runs in one workdir interleave their metrics and overwrite each other's checkpoints. So a run
holds a POSIX record lock (``fcntl.lockf``, which NFS supports) on ``<workdir>/.lock`` from before
it touches anything there until it ends. The kernel drops the lock when the process dies, however
it dies, so a killed run leaves no stale lock: its file stays, unlocked, and the resume takes it.
In a multi-host job only process 0 (the one writer) holds it, and all processes agree on refusing.
On an NFS mount without a lock daemon (``nolock``) locks are local to each host, so they cannot
keep runs on two hosts apart; where the file system refuses locks outright, the run is refused.
POSIX locks belong to a process: one process can take the same workdir twice (in-process calls
of ``train_and_evaluate`` are not guarded against each other).
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from typing import Optional, Tuple


LOCK_FILE = ".lock"


class WorkdirUnusable(ValueError):
    """The workdir cannot be written, or another run holds it."""


class WorkdirInUse(WorkdirUnusable):
    """Another live process holds the workdir."""


WORKDIR_DEPTH = 200  # bytes that the deepest file in a workdir adds to its path (Orbax's names)


def unwritable(path: str) -> Optional[str]:
    """Why ``path`` (a folder, existing or to be created) cannot be written, or None.

    Creates nothing that stays: the nearest existing folder is tested by writing a temporary file,
    because as root the permission bits grant everything, while a read-only or full file system
    does not.
    """
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    name_max, path_max = (os.pathconf(existing, n) for n in ("PC_NAME_MAX", "PC_PATH_MAX"))
    long_name = next((p for p in path.split(os.sep) if len(p.encode()) > name_max), None)
    if long_name:
        return f"the name {long_name[:30]}… is {len(long_name.encode())} bytes; this file system allows {name_max}"
    if len(path.encode()) + WORKDIR_DEPTH > path_max:
        return (f"the path is {len(path.encode())} bytes; with the files a run writes inside it, it must stay "
                f"under {path_max - WORKDIR_DEPTH}")
    if not os.path.isdir(existing):
        return f"{existing} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing):
            return None
    except OSError as e:
        return f"cannot write to {existing} ({e.strerror})"


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` whole or not at all (a kill mid-write leaves the old file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")  # what a run rewrites or appends to


def _unwritable_file(path: str) -> Optional[str]:
    if os.path.isdir(path):
        return f"{path} is a folder; a run writes a file there"
    if os.path.exists(path) and not os.access(path, os.W_OK):  # (as root: a read-only file system)
        return f"cannot write to {path} (read-only)"
    return None


def _acquire(workdir: str) -> Tuple[Optional[int], Optional[str]]:
    """(locked file descriptor, None), or (None, why not)."""
    for folder in (workdir, os.path.join(workdir, "checkpoints")):
        problem = os.path.isdir(folder) and unwritable(folder)
        if problem:  # fail now, not after the first epoch's checkpoint times out
            return None, problem
    for name in RUN_FILES:  # fail now, not when the first epoch's metrics line is written
        problem = _unwritable_file(os.path.join(workdir, name))
        if problem:
            return None, problem
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: NFS mounted without a lock daemon
            os.close(fd)
            return None, (f"cannot lock {os.path.join(workdir, LOCK_FILE)} ({e.strerror}); this file system "
                          "does not support locks, so two runs could write this workdir at once")
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            holder = f"pid {owner['pid']} on host {owner['host']}"
        except (ValueError, KeyError, TypeError):
            holder = "another process"
        os.close(fd)
        return None, (f"workdir {workdir} in use by {holder}; wait for that run to end, or choose "
                      "another --workdir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    os.fsync(fd)
    return fd, None


@contextlib.contextmanager
def exclusive(workdir: str):
    """Hold ``workdir`` for the duration; raise WorkdirInUse at once if another run holds it."""
    from bn_jax import parallel  # (this module imports no JAX: the CLI checks a workdir before it starts JAX)
    fd, problem = _acquire(workdir) if parallel.is_writer() else (None, None)
    if parallel.any_process(problem is not None):  # every process refuses alike
        if fd is not None:
            os.close(fd)
        error = WorkdirInUse if problem is None or " in use by " in problem else WorkdirUnusable
        raise error(problem or f"workdir {workdir} in use (process 0 could not lock it)")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock

"""One run per workdir: an exclusive lock held for the whole run.

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

from bn_jax import parallel

LOCK_FILE = ".lock"


class WorkdirUnusable(ValueError):
    """The workdir cannot be written, or another run holds it."""


class WorkdirInUse(WorkdirUnusable):
    """Another live process holds the workdir."""


def unwritable(folder: str) -> Optional[str]:
    """Why nothing can be written into ``folder``, found by writing a file (as root, permission
    bits grant everything, but a read-only or full file system does not), or None."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return f"cannot write to {folder} ({e.strerror})"


def _acquire(workdir: str) -> Tuple[Optional[int], Optional[str]]:
    """(locked file descriptor, None), or (None, why not)."""
    for folder in (workdir, os.path.join(workdir, "checkpoints")):
        problem = os.path.isdir(folder) and unwritable(folder)
        if problem:  # fail now, not after the first epoch's checkpoint times out
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

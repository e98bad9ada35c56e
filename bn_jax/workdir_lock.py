"""One run per workdir: an exclusive lock held for the whole run.

Two runs in one workdir interleave their metrics and overwrite each other's checkpoints. So a run
holds a POSIX record lock (``fcntl.lockf``, which NFS supports) on ``<workdir>/.lock`` from before
it touches anything there until it ends. The kernel drops the lock when the process dies, however
it dies, so a killed run leaves no stale lock: its file stays, unlocked, and the resume takes it.
In a multi-host job only process 0 (the one writer) holds it, and all processes agree on refusing.
"""

import contextlib
import fcntl
import json
import os
import socket
from typing import Optional, Tuple

from bn_jax import parallel

LOCK_FILE = ".lock"


class WorkdirInUse(ValueError):
    """Another live process holds the workdir."""


def _acquire(workdir: str) -> Tuple[Optional[int], Optional[str]]:
    """(locked file descriptor, None), or (None, why not)."""
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
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
        raise WorkdirInUse(problem or f"workdir {workdir} in use (process 0 could not lock it)")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock

"""A run's folder: the files it holds (``RunDir``, each named once), whether it can be
written, and one run at a time in it.

``RunDir`` names every file of a run and answers what the trainer, the sweep and the analysis
ask of a folder: is the run finished, may this run start or resume here (``prepare``). ``unwritable`` says why a path cannot hold a run before anything is created there. A run then
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
import shutil
import socket
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from bn_jax import config as config_lib


class WorkdirUnusable(ValueError):
    """The workdir cannot be written, or another run holds it."""


class WorkdirInUse(WorkdirUnusable):
    """Another live process holds the workdir."""


class RunDir:
    """The files of one run, each named here once (docs/cli.md, "Output files")."""

    CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
    CHECKPOINTS, CORRUPT, LOCK, REPORT = "checkpoints", "corrupt_checkpoints", ".lock", "report"
    PACK = "pack.json"  # a pack's member: the packs it trained in (bn_jax.pack_run)
    REWRITTEN = (CONFIG, METRICS, SUMMARY)  # the files a run rewrites or appends to
    OUTPUTS = (CHECKPOINTS, CORRUPT, METRICS, SUMMARY, CONFIG, PACK)  # what --restart removes

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    config = property(lambda self: self.file(self.CONFIG))
    metrics = property(lambda self: self.file(self.METRICS))
    summary = property(lambda self: self.file(self.SUMMARY))
    checkpoints = property(lambda self: os.path.abspath(self.file(self.CHECKPOINTS)))
    corrupt_checkpoints = property(lambda self: self.file(self.CORRUPT))
    lock = property(lambda self: self.file(self.LOCK))
    report = property(lambda self: self.file(self.REPORT))

    def is_finished(self) -> bool:
        """A finished run has its summary (written last, atomically)."""
        return os.path.exists(self.summary)

    def saved_config(self) -> Optional[Dict[str, Any]]:
        """config.json's content, or None where there is none or it is no readable JSON object."""
        try:
            with open(self.config) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) else None

    def holds(self, experiment) -> bool:
        """Whether the run here is of ``experiment`` (runtime keys never count: ``same_experiment``)."""
        saved = self.saved_config()
        return saved is not None and config_lib.same_experiment(saved, experiment)

    def extended_to(self, experiment) -> Optional[int]:
        """The epochs of the run here when it is ``experiment`` trained further (--extend_to_epochs):
        the same experiment but for more epochs; otherwise None."""
        saved = self.saved_config()
        if saved is None or config_lib.different_keys(saved, experiment) != ["epochs"]:
            return None
        epochs = saved.get("experiment", saved)["epochs"]
        return epochs if epochs > experiment.epochs else None

    def write_config(self, experiment, runtime, provenance: Dict[str, Any]) -> None:
        """config.json: {"experiment": ..., "runtime": ..., "provenance": ...} (``config.load`` reads it)."""
        write_atomic(self.config, json.dumps({"experiment": experiment.to_dict(), "runtime": runtime.to_dict(),
                                              "provenance": provenance}, indent=2, sort_keys=True, allow_nan=False))

    def step_entries(self) -> List[str]:
        """Names in checkpoints/ that look like saved steps (folders, or stray files)."""
        folder = self.checkpoints
        return [n for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []

    def has_checkpoint(self) -> bool:
        return any(os.path.isdir(os.path.join(self.checkpoints, n)) for n in self.step_entries())

    def prepare(self, experiment, restart: bool, log=print) -> None:
        """--restart: remove an earlier run's outputs. Otherwise refuse outputs we cannot resume from
        (WorkdirUnusable naming them); the checkpoint itself is checked against the experiment later."""
        if restart:
            quarantined = sorted(os.listdir(self.corrupt_checkpoints)) if os.path.isdir(self.corrupt_checkpoints) else []
            if quarantined:  # (never deleted unsaid: they may hold the only copy of a run's work)
                log(f"--restart: deleting {len(quarantined)} quarantined checkpoint(s) in {self.corrupt_checkpoints} "
                    f"({', '.join(quarantined)})")
            for name in self.OUTPUTS:
                path = self.file(name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
            log(f"--restart: removed earlier outputs in {self.path}")
            return
        names = self.step_entries()
        stray = sorted(n for n in names if not os.path.isdir(os.path.join(self.checkpoints, n)))
        if stray:  # Orbax would skip them silently
            message = (f"{os.path.join(self.checkpoints, stray[0])} is a file, not a checkpoint folder"
                       + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""))
            if len(stray) == len(names):
                raise WorkdirUnusable(f"{message}, and no checkpoint folder is left; move it away and "
                                      "re-run to start over, or pass --restart")
            log(f"warning: {message}; ignoring it")
        if len(names) > len(stray):
            return  # resume
        self._refuse_outputs_without_checkpoints(experiment)

    def _refuse_outputs_without_checkpoints(self, experiment) -> None:
        quarantine = self.corrupt_checkpoints
        if os.path.isdir(quarantine) and os.listdir(quarantine):
            raise WorkdirUnusable(f"every checkpoint in {self.checkpoints} was found corrupt and moved to "
                                  f"{quarantine}; pass --restart to start over")
        if self.is_finished():
            raise WorkdirUnusable(f"{self.path} holds a finished run without checkpoints; pass "
                                  "--restart to overwrite it or choose another --workdir")
        if os.path.exists(self.config):
            with open(self.config) as f:
                diff = config_lib.different_keys(json.load(f), experiment)
            if diff:
                raise WorkdirUnusable(
                    f"{self.path} holds outputs of a run with different {', '.join(diff)} and no checkpoint; "
                    "pass --restart to overwrite them or choose another --workdir")

    def exclusive(self):
        """Hold this folder for the duration (``exclusive``)."""
        return exclusive(self.path)


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


def _unwritable_file(path: str) -> Optional[str]:
    if os.path.isdir(path):
        return f"{path} is a folder; a run writes a file there"
    if os.path.exists(path) and not os.access(path, os.W_OK):  # (as root: a read-only file system)
        return f"cannot write to {path} (read-only)"
    return None


def _acquire(workdir: str) -> Tuple[Optional[int], Optional[str]]:
    """(locked file descriptor, None), or (None, why not)."""
    run = RunDir(workdir)
    for folder in (workdir, run.checkpoints):
        problem = os.path.isdir(folder) and unwritable(folder)
        if problem:  # fail now, not after the first epoch's checkpoint times out
            return None, problem
    for name in RunDir.REWRITTEN:  # fail now, not when the first epoch's metrics line is written
        problem = _unwritable_file(run.file(name))
        if problem:
            return None, problem
    fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: NFS mounted without a lock daemon
            os.close(fd)
            return None, (f"cannot lock {run.lock} ({e.strerror}); this file system "
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


def in_use(workdir: str) -> bool:
    """Whether another process holds ``workdir`` now (a run training there)."""
    lock = RunDir(workdir).lock
    if not os.path.exists(lock):
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EACCES, errno.EAGAIN)
    finally:
        os.close(fd)  # (releases the shared lock, if taken)
    return False


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

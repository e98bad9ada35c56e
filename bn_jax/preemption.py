"""Preemption: SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (or a deadline) become a checkpoint and exit code 75.

SIGUSR1/SIGUSR2 are what SLURM's ``--signal=B:USR1@120`` and submitit send ahead of a time limit.

The guard only sets a flag; the training loop polls it between compiled calls, saves a
checkpoint, and raises ``Preempted``. Re-running the same command resumes.
"""

import signal
import threading
import time
from typing import Optional

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; re-running the same command resumes


class Preempted(Exception):
    """A signal or the time limit stopped the run; re-run the same command to resume.

    ``step`` is the step of the checkpoint written on the way out, or None when the run stopped
    during start-up, before its first step (nothing new to save).
    """

    def __init__(self, reason: str, step: Optional[int], path: str):
        if step is None:
            message = f"{reason} during start-up: stopped before the first step; nothing new to save"
        else:
            message = f"{reason}: saved a checkpoint at step {step} in {path}"
        super().__init__(message + "; re-run the same command to resume")
        self.step = step


class PreemptionGuard:
    """Turns the first of ``SIGNALS`` into a flag the loop polls; a second SIGINT interrupts.

    ``deadline`` (a ``time.time()`` value) asks for the same stop once that time has passed: the
    loop checkpoints at its next call boundary, as for a signal, but never during start-up.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, deadline: Optional[float] = None):
        self.signame: Optional[str] = None
        self.deadline = deadline
        self._previous = {}

    @property
    def signalled(self) -> bool:
        return self.signame is not None

    @property
    def requested(self) -> bool:
        return self.signalled or (self.deadline is not None and time.time() >= self.deadline)

    @property
    def reason(self) -> str:
        return f"{self.signame} received" if self.signalled else "time limit reached"

    def _handle(self, signum, frame):
        # Only set the flag: printing here could re-enter a print the main thread is inside.
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def reinstall(self) -> None:
        """Take the signals back (``jax.distributed.initialize`` installs a SIGTERM handler of its own)."""
        if self._previous:
            for s in self.SIGNALS:
                signal.signal(s, self._handle)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stop_before_start(guard, where: str) -> None:
    """Raise Preempted (nothing saved) if a signal arrived during start-up; every process agrees."""
    from bn_jax import parallel  # (this module imports no JAX: the CLI's --help stays light)
    if guard is not None and parallel.any_process(guard.signalled):
        raise Preempted(guard.reason if guard.signalled else "another process was signalled", None, where)

"""Every process's own log: ``<run folder>/logs/process_<i>.log`` holds what its terminal showed.

In a multi-process job only process 0 prints to the terminal, so a failure on host 3 would leave
no trace; here every process keeps its start-up, devices, warnings and the error that ended it.
The CLI starts the log first thing: text is kept in memory until the run folder is accepted
(``attach``), so that a refused run still writes nothing, and then appended to the file as it
comes. A progress bar's redraws (``\\r``) keep only each line's last state. Text the C++ runtime
writes to the file descriptor directly (XLA's own warnings) is not seen.

This module imports no JAX: the CLI uses it before a run starts.
"""

import datetime
import io
import os
import socket
import sys
import traceback
from typing import List, Optional

MAX_PENDING_LINES = 10_000  # kept in memory before the folder is known (a few MB at most)


class ProcessLog:
    """Collects lines, and once folders are attached, appends them to each one's log file."""

    def __init__(self):
        self.pending: List[str] = []
        self.files: List[io.TextIOBase] = []
        self.partial = ""

    def add(self, text: str) -> None:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            redraws = [part for part in line.split("\r") if part.strip()]
            self.emit((redraws[-1] if redraws else "") + "\n")

    def emit(self, line: str) -> None:
        if not self.files:
            if len(self.pending) < MAX_PENDING_LINES:
                self.pending.append(line)
            return
        for f in self.files:
            f.write(line)
            f.flush()

    def attach(self, path: str, header: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a", encoding="utf-8")
        f.write(header + "\n" + "".join(self.pending))
        f.flush()
        self.files.append(f)

    def close(self) -> None:
        if self.partial:
            self.add("\n")
        for f in self.files:
            f.close()
        self.files = []


class Tee(io.TextIOBase):
    """A terminal stream that also hands its text to the log."""

    def __init__(self, stream, log: ProcessLog):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.add(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name):  # anything else a library asks of a terminal stream (buffer, errors, ...)
        return getattr(self.stream, name)


ACTIVE: Optional[ProcessLog] = None
_streams = None


def start() -> ProcessLog:
    """Keep what this process prints from now on (``sys.stdout`` and ``sys.stderr``)."""
    global ACTIVE, _streams
    ACTIVE = ProcessLog()
    _streams = (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = Tee(sys.stdout, ACTIVE), Tee(sys.stderr, ACTIVE)
    return ACTIVE


def attach(folders, process_index: int, process_count: int) -> None:
    """From now on, append this process's log to ``<folder>/logs/process_<i>.log`` of each folder
    (a pack's members each get it), starting with what it printed so far. No-op without ``start``."""
    if ACTIVE is None:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = (f"=== {stamp} process {process_index} of {process_count} on {socket.gethostname()}, pid {os.getpid()}: "
              f"{' '.join(sys.argv)}")
    for folder in folders:
        ACTIVE.attach(os.path.join(folder, "logs", f"process_{process_index}.log"), header)


def note(*parts) -> None:
    """A line for this process's log file only (a process other than 0 keeps the terminal quiet)."""
    if ACTIVE is not None:
        ACTIVE.add(" ".join(str(p) for p in parts) + "\n")


def record_exception() -> None:
    """The exception being handled, into the log (the terminal gets Python's own traceback)."""
    if ACTIVE is not None:
        ACTIVE.add(traceback.format_exc())


def stop() -> None:
    """Give the terminal streams back and close the log files."""
    global ACTIVE, _streams
    if ACTIVE is None:
        return
    sys.stdout, sys.stderr = _streams
    ACTIVE.close()
    ACTIVE, _streams = None, None

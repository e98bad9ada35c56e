"""How a failed Orbax write reaches the user: a full disk as one line, no background tracebacks.

Orbax saves in background threads, and tensorstore prints from C++ threads past
``sys.excepthook``; a failed save or restore would otherwise bury the one line that matters
under ~150 lines of "Event loop is closed" tracebacks.
"""

import errno
import logging
import re
import sys
import threading
from typing import Optional

FAILED_IN_BACKGROUND = False  # an Orbax save failed: its threads may print while Python shuts down


_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded")
_BYTES = re.compile(r"write (\d+) bytes")


def disk_full_bytes(error: BaseException) -> Optional[int]:
    """The bytes a failed write needed, if ``error`` says the disk was full (0 when unknown)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 0
    text = str(error)
    if not _NO_SPACE.search(text):
        return None
    sizes = _BYTES.findall(text)
    return max(map(int, sizes)) if sizes else 0


class _DropClosedLoopTracebacks:
    """stderr, less the 'Event loop is closed' tracebacks that tensorstore's threads print
    (from C++, past sys.excepthook) when a failed Orbax save or restore has closed its loop, and
    less Orbax threads' tracebacks of a full disk. Other output passes straight through; other
    tracebacks are held until complete, then written."""

    def __init__(self, stream):
        self.stream, self.held = stream, {}  # per thread: threads print tracebacks concurrently

    def write(self, text):
        me = threading.get_ident()
        held = self.held.get(me)
        if held is None and not text.startswith("Traceback (most recent call last):"):
            return self.stream.write(text)
        held = self.held[me] = (held or []) + [text]
        block = "".join(held)
        last = block.rstrip("\n").rsplit("\n", 1)[-1]
        if block.endswith("\n") and last and not last.startswith((" ", "Traceback")):  # the exception line
            del self.held[me]
            if last != "RuntimeError: Event loop is closed" and not _NO_SPACE.search(last):
                self.stream.write(block)  # (a disk-full error is reported once, as DiskFull)
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _NoSpaceRecords(logging.Filter):
    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (_NO_SPACE.search(record.getMessage()) or (error and _NO_SPACE.search(str(error))))


def quiet_background_noise() -> None:
    """For a command-line process, until it exits: keep a failed Orbax save or restore to the one
    line we print about it, without 'Event loop is closed' tracebacks and without Orbax's threads
    logging the disk-full error that DiskFull reports. (Those threads may still run while the
    interpreter shuts down, so this is not undone.)"""
    if not isinstance(sys.stderr, _DropClosedLoopTracebacks):
        # sys.__stderr__ too: the interpreter falls back to it while it shuts down
        sys.stderr = sys.__stderr__ = _DropClosedLoopTracebacks(sys.stderr)
        logging.getLogger("absl").addFilter(_NoSpaceRecords())


class _ReadOnlyNotices(logging.Filter):
    """Orbax's two notices for every read-only manager: that it opens a folder read-only, which is
    what reading a run's checkpoint asks of it."""

    def filter(self, record):
        text = record.getMessage()
        return not ("read_only=True, setting save_interval_steps" in text or "Given directory is read only" in text)


def quiet_read_only_notices() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _ReadOnlyNotices) for f in logger.filters):
        logger.addFilter(_ReadOnlyNotices())

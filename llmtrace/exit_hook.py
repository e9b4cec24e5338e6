"""Close every live trace writer when the interpreter shuts down, each within its ``exit_timeout``.

Writers are closed after the interpreter has joined the threads still running when the main thread ended, and
after ``concurrent.futures`` has run the work queued in its pools, so that traces those submit are accepted.
"""

from __future__ import annotations

import atexit

# Imported now, not when the driver first needs it: the module registers an interpreter-exit hook at import,
# which Python refuses once shutdown has begun, and the exit hook's final flush may be the driver's first
# insert (it checks for pandas, whose import pulls this module in).
import concurrent.futures.thread  # noqa: F401
import threading
import weakref
from typing import Protocol


class ClosesAtExit(Protocol):
    """What the exit hook needs of a writer."""

    exit_timeout: float

    def close(self, timeout: float | None = None) -> object:
        """Flush and stop, waiting at most ``timeout`` seconds."""


_live: weakref.WeakSet[ClosesAtExit] = weakref.WeakSet()
_registered = False
_registration_lock = threading.Lock()


def close_at_exit(writer: ClosesAtExit) -> None:
    """Make sure ``writer`` is closed (within its ``exit_timeout``) when the interpreter shuts down."""
    global _registered
    _live.add(writer)
    with _registration_lock:
        if not _registered:
            # atexit, not threading's exit hooks: those run when the main thread ends, before the interpreter
            # joins the threads that are still running and before concurrent.futures waits for its pools' queued
            # work, which may all still submit traces. atexit hooks run after both, while the interpreter is
            # still whole (the writer's thread can import driver modules lazily and finish its inserts), and
            # before the hooks of modules imported earlier (chDB's), since they run last registered first.
            atexit.register(_close_live_writers)
            _registered = True


def forget(writer: ClosesAtExit) -> None:
    """Stop tracking ``writer`` (it was closed)."""
    _live.discard(writer)


def _close_live_writers() -> None:
    for writer in list(_live):
        writer.close(timeout=writer.exit_timeout)

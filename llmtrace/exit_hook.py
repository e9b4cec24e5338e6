"""Close every live trace writer when the interpreter shuts down, each within its ``exit_timeout``."""

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
            # threading's exit hooks run before the interpreter starts tearing down (atexit hooks run after),
            # when the writer's thread can still import lazily-loaded driver modules and finish its inserts.
            # concurrent.futures relies on the same hook; fall back to atexit where it does not exist.
            register = getattr(threading, "_register_atexit", atexit.register)
            register(_close_live_writers)
            _registered = True


def forget(writer: ClosesAtExit) -> None:
    """Stop tracking ``writer`` (it was closed)."""
    _live.discard(writer)


def _close_live_writers() -> None:
    for writer in list(_live):
        writer.close(timeout=writer.exit_timeout)

"""TraceWriter: ``submit()`` returns at once; a thread batches, retries, spools and replays.

The no-loss path, in the order a trace takes it:

1. **Buffer** (this module). ``submit`` snapshots the trace and appends it to an in-memory buffer under a
   lock; every database call, log line and callback happens on the writer's own thread. When the buffer is
   full, the overflow policy decides: wait, drop (counted), or spool (see 3).
2. **Retries** (this module). The thread writes batches with ``TraceRepository.add_many``. A transient
   failure (``DatabaseError.transient``, or an error that cannot be classified) is retried with backoff, as
   the same batch, so the repository's insert deduplication makes every retry exactly-once; a permanent one
   is not retried: the batch goes to the spool at once. With a spool, a batch that exhausts its retries opens
   the outage breaker: later batches are spooled without retries, and a single attempt probes the database
   every ``max_backoff`` seconds, so that an outage drains the buffer at the spool's speed.
3. **Spool** (:mod:`llmtrace.spool`, format in :mod:`llmtrace.spool_format`). Batches that could not be
   written are appended to checksummed files in ``spool_dir``; a file is published atomically, already
   locked, and rotated by size.
4. **Replay** (:mod:`llmtrace.spool_replay`). The thread replays spool files of its destination, its own and
   other processes', in bounded groups, and quarantines what can never be stored instead of retrying it
   forever.

Every trace ``submit`` accepted is, at every moment, in exactly one of these states (the counters of
:class:`WriterStats`)::

    submitted == written + spooled + dropped + failed + unconfirmed + queue_depth + overflow_pending + in_flight

and nothing on the writer's thread can stop it: an unexpected error in a write, a replay or a spool
operation is logged once, reported to ``on_error``, counted in ``errors``, and the thread goes on.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmtrace import exit_hook
from llmtrace.errors import ConfigurationError, DatabaseError, LLMTraceError, WriteUnconfirmed
from llmtrace.model import LLMTrace
from llmtrace.repository import TraceRepository
from llmtrace.spool import DEFAULT_MAX_FILE_BYTES, Spool
from llmtrace.spool_replay import SpoolReplayer

logger = logging.getLogger(__name__)

OverflowPolicy = Literal["block", "drop_oldest", "drop_newest", "spool"]
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_oldest", "drop_newest", "spool")
# overflow="spool" collects this many traces (or flush_interval seconds' worth) into one spool record: one
# write per 128 traces instead of one per trace, and one insert per replayed group instead of one per trace.
# The price: up to this many overflowing traces sit in memory, as the buffer's do, until their record is written.
OVERFLOW_RECORD_TRACES = 128
# How long close() waits for a batch the thread is already spooling (local I/O) before reporting it in flight.
_SPOOLING_GRACE_SECONDS = 5.0


class WriterQueueFull(LLMTraceError):  # noqa: N818 (reads as a state, like queue.Full)
    """``submit`` waited for room in the writer's buffer longer than its timeout."""


class WriterClosed(LLMTraceError):  # noqa: N818
    """``submit`` was called on a writer that is closing or closed."""


class WriterStopped(WriterClosed):
    """The writer's thread stopped on an unexpected error; the writer accepts no more traces.

    Traces it held were spooled (or counted as failed without a spool); ``close()`` reports them.
    """


@dataclass(frozen=True)
class WriterStats:
    """Counters of a writer, as of the moment they were read.

    Where every accepted trace is, at every moment::

        submitted == written + spooled + dropped + failed + unconfirmed + queue_depth + overflow_pending + in_flight

    A batch that ``close(timeout)`` gave up on while its write was stalled is counted once, as spooled. If the
    stalled write later succeeds, the traces are in ClickHouse *and* in the spool; the counters do not change
    (replay finds them stored and skips them), and a log line says so. If it later fails, nothing more
    happens: it is neither retried nor spooled again.

    Attributes:
        submitted: Traces accepted by ``submit`` (including those the overflow policy dropped).
        written: Traces stored in ClickHouse by this writer's live writes (a trace found already stored counts).
        spooled: Traces written to the spool instead (write failed, buffer overflowed, or ``close`` timed out).
            They are durable; replay (by this or another writer of the same destination) stores them later.
        dropped: Traces discarded by the ``drop_oldest`` / ``drop_newest`` overflow policies.
        failed: Traces lost: not written, and not spooled (no ``spool_dir``, or the spool could not be
            written, e.g. a full disk).
        unconfirmed: Traces whose insert was sent but whose storing could not be read back before the retries
            ran out (:class:`llmtrace.WriteUnconfirmed`), with no ``spool_dir`` to settle it later: they may or
            may not be stored. With a spool they are spooled instead, and replay settles them.
        queue_depth: Traces waiting in the buffer.
        overflow_pending: Traces that overflowed (``overflow="spool"``) and wait in memory for their spool
            record (at most ``OVERFLOW_RECORD_TRACES``, or ``flush_interval`` seconds).
        in_flight: Traces being written to ClickHouse or to the spool right now.
        retried: Failed write attempts that were retried.
        replayed: Traces from spool files (this writer's or others' of the same destination) now stored.
        quarantined: Traces from spool files set aside in ``spool_dir/quarantine`` because the model or
            ClickHouse rejects them.
        unreadable: Damaged stretches of spool files (a corrupt record; how many traces they held is unknown)
            set aside as raw bytes in ``spool_dir/quarantine``. The torn last record a writer killed mid-append
            leaves is set aside too, but not counted: that append never returned.
        errors: Problems no other counter covers: unexpected errors (each logged with its traceback) and
            spool I/O errors.
        last_error: The most recent error, or ``None``.
    """

    submitted: int
    written: int
    spooled: int
    dropped: int
    failed: int
    unconfirmed: int
    queue_depth: int
    overflow_pending: int
    in_flight: int
    retried: int
    replayed: int
    quarantined: int
    unreadable: int
    errors: int
    last_error: str | None

    @property
    def lost(self) -> int:
        """Traces that will never reach ClickHouse: ``dropped + failed``. The number to alert on."""
        return self.dropped + self.failed

    @property
    def pending(self) -> int:
        """Traces not settled yet: ``queue_depth + overflow_pending + in_flight``."""
        return self.queue_depth + self.overflow_pending + self.in_flight


@dataclass(frozen=True)
class WriterEvent:
    """What ``on_error`` receives: something went wrong and how many traces it concerns.

    ``kind`` is one of:

    - ``"retry"``: a write failed and will be retried;
    - ``"spooled"``: a write failed for good (or permanently), the batch went to the spool;
    - ``"failed"``: a batch is lost (no spool, or the spool could not be written);
    - ``"unconfirmed"``: a batch was sent but what it stored could not be read back, and there is no spool;
    - ``"dropped"``: the overflow policy discarded traces;
    - ``"spool_lost"``: the spool file being appended to was removed by someone else, with its traces;
    - ``"replay_failed"``: replay could not store spooled traces; they stay in the spool for a later pass;
    - ``"quarantined"``: spooled traces the model or ClickHouse rejects were set aside;
    - ``"unreadable"``: damaged bytes of a spool file were set aside;
    - ``"torn_tail"``: a spool file ends in a record its writer did not finish (it was killed while
      appending; that append never returned, so nothing it acknowledged is lost); the bytes were set aside;
    - ``"foreign_file"`` / ``"legacy_file"``: a ``*.spool`` path that is not a spool file (left alone), or a
      version 1 file (replayed, though it does not say which database it belongs to);
    - ``"error"``: anything unexpected (the message says what the writer was doing).
    """

    kind: str
    count: int
    message: str
    error: BaseException | None = None


class _NeedsPublishing(Exception):  # noqa: N818 (a reason)
    """An append that would have needed an fsync (a new spool file) on a thread that must not wait for the disk."""


class _OutageContinues(Exception):  # noqa: N818 (a reason, given to on_error)
    """A batch spooled without a write attempt: the database failed every recent attempt (the outage breaker)."""

    def __init__(self, last_error: str | None) -> None:
        super().__init__(f"the database is still failing; last error: {last_error}")


_SERIOUS = frozenset({"failed", "unconfirmed", "dropped", "spool_lost", "quarantined", "unreadable", "error"})


# A submitted trace as the writer holds it: see _freeze.
_Frozen = dict[str, Any]


@dataclass(eq=False)
class _Batch:
    traces: list[_Frozen]
    # "writing": add_many (or its retries) in progress; "spooling": the thread is spooling it; "taken": close()
    # gave up on the thread and spooled it itself; "settled": counted.
    state: str = "writing"
    # An attempt failed after its insert was sent (WriteUnconfirmed): the traces may be stored.
    maybe_stored: bool = False


class TraceWriter:
    """Write traces in the background without ever blocking the caller on I/O.

    Batches flush when ``batch_size`` traces are waiting or ``flush_interval`` seconds after the first of
    them arrived, whichever comes first. A batch that fails transiently is retried with exponential backoff
    and jitter; when retries are exhausted, or at once on a permanent failure, it goes to ``spool_dir`` (if
    set). Spooled batches are replayed when a writer starts on that directory, after the next successful
    write, and every ``replay_interval`` seconds (which also picks up files other processes left).

    Use it as a context manager, or call :meth:`close` at shutdown; an exit hook also closes it, waiting
    at most ``exit_timeout`` seconds.

    Args:
        repository: Where batches are written (``add_many``); its ``destination`` tags the spool files.
        batch_size: Traces per insert (live and replayed).
        flush_interval: Longest time, in seconds, a trace waits in the buffer before its batch is written.
        max_queue: Capacity of the buffer, in traces.
        overflow: What ``submit`` does when the buffer is full: ``"block"`` (wait up to ``submit_timeout``,
            then raise :class:`WriterQueueFull`), ``"drop_oldest"``, ``"drop_newest"``, or ``"spool"``
            (collect overflowing traces into records of ``OVERFLOW_RECORD_TRACES`` and write each to
            ``spool_dir`` on the caller's thread that fills it; the writer's thread fsyncs them, and writes a
            record that needs a new spool file, so that no fsync runs on the caller's thread). While the
            database is down (see ``max_backoff``), ``"block"`` with a ``spool_dir`` spools like ``"spool"``.
        spool_dir: Directory for batches that cannot be written; ``None`` means they are lost (and logged).
        max_retries: Retries of a transiently failing batch before it is spooled (or lost).
        retry_backoff: First retry delay in seconds; doubles on each retry, with +/-50% jitter.
        max_backoff: Cap on the retry delay, in seconds. With a ``spool_dir``, also the interval between write
            attempts once a batch has exhausted its retries: until one succeeds (live or replayed), batches are
            spooled at once, without retries.
        submit_timeout: For ``overflow="block"``: seconds ``submit`` waits for room; ``None`` waits forever.
        on_error: Called on the writer's thread with a :class:`WriterEvent` for every problem; exceptions
            it raises are logged and ignored.
        exit_timeout: Seconds the exit hook waits for the buffer to drain.
        replay_interval: Seconds between replay passes over the spool directory.
        max_spool_file_bytes: Size at which a spool file is closed and a new one started.
    """

    def __init__(
        self,
        repository: TraceRepository,
        *,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        max_queue: int = 100_000,
        overflow: OverflowPolicy = "block",
        spool_dir: str | os.PathLike[str] | None = None,
        max_retries: int = 5,
        retry_backoff: float = 0.2,
        max_backoff: float = 10.0,
        submit_timeout: float | None = None,
        on_error: Callable[[WriterEvent], object] | None = None,
        exit_timeout: float = 5.0,
        replay_interval: float = 30.0,
        max_spool_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        _check_options(batch_size, flush_interval, max_queue, overflow, spool_dir, max_retries, replay_interval)
        if max_spool_file_bytes < 1:
            raise ValueError(f"max_spool_file_bytes must be at least 1, got {max_spool_file_bytes}")
        self.repository = repository
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.overflow = overflow
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.submit_timeout = submit_timeout
        self.on_error = on_error
        self.exit_timeout = exit_timeout
        self.replay_interval = replay_interval

        self._spool: Spool | None = None
        self._replayer: SpoolReplayer | None = None
        # Never held while taking self._lock. Re-entrant only so that close() can tell whether this thread holds
        # it (a signal handler interrupted it); it is never taken twice.
        self._spool_lock = threading.RLock()
        if spool_dir is not None:
            try:
                self._spool = Spool(spool_dir, destination=repository.destination, max_file_bytes=max_spool_file_bytes)
            except OSError as exc:
                raise ConfigurationError(
                    f"spool_dir {os.fspath(spool_dir)!r} cannot be used: {exc.strerror or exc}. Give a directory this "
                    "process can create and write to, or spool_dir=None to go without a spool."
                ) from exc
            self._replayer = SpoolReplayer(
                Path(spool_dir),
                repository,
                batch_size=batch_size,
                interval=replay_interval,
                report=self._report_replay,
                own_file=self._own_spool_file,
                rotate_own=self._rotate_spool,
                idle=self._idle,
            )

        # Re-entrant, so that a signal handler that interrupts submit() on its thread can still read the stats or
        # close the writer (see close()).
        self._lock = threading.RLock()
        self._wake_writer = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        # Full batches wait in _sealed; the batch being filled is _open. Taking a batch is O(1), which keeps
        # the lock hold times, and so submit()'s latency, short.
        self._sealed: deque[list[_Frozen]] = deque()
        self._open: list[_Frozen] = []
        self._open_since = 0.0
        self._depth = 0
        self._in_flight: _Batch | None = None
        self._in_transit = 0  # traces taken out of memory on their way to the spool, outside the lock
        self._overflow: list[_Frozen] = []
        # Overflow records a submit could not append without an fsync (the spool needed a new file): the
        # writer's thread writes them, so that no fsync runs on the caller's thread.
        self._handed_over: deque[tuple[int, list[LLMTrace]]] = deque()
        self._overflow_since = 0.0
        # flush() waits for two lanes: the buffer, settled in order (counters suffice), and overflow records,
        # which callers write concurrently (so each record gets a ticket, and the lane is done up to the
        # first ticket not yet settled).
        self._enqueued = 0
        self._settled = 0
        self._flush_target = 0
        self._tickets_issued = 0
        self._tickets_done: set[int] = set()
        self._tickets_done_upto = 0
        self._closing = False
        self._stopped: BaseException | None = None
        self._give_up = threading.Event()
        self._spooled_since_success = False
        # The outage breaker (with a spool only): set when a batch exhausted its retries on a transient failure.
        # While it is set, batches go to the spool at once, one write attempt (a probe) is made at most every
        # max_backoff seconds, and a full buffer spools instead of blocking submit(). Cleared by any successful
        # write, live or replayed.
        self._outage = False
        self._next_probe_at = 0.0
        self._dropped_unreported = 0
        self._unreported: list[WriterEvent] = []
        self._counts = dict.fromkeys(
            ("submitted", "written", "spooled", "dropped", "failed", "unconfirmed", "retried", "errors"), 0
        )
        self._last_error: str | None = None

        self._pid = os.getpid()
        self._forked_from: int | None = None  # the pid of the process that created it, in a forked child
        self._thread = threading.Thread(target=self._run, name="llmtrace-writer", daemon=True)
        self._thread.start()
        _live_writers.add(self)
        exit_hook.close_at_exit(self)

    # -- the caller's side --------------------------------------------------------------------------------

    def submit(self, trace: LLMTrace | Mapping[str, Any], *, timeout: float | None = -1.0) -> None:
        """Queue a trace for writing and return at once.

        The writer keeps its own copy: changing ``trace`` afterwards (e.g. reusing it as a template) does not
        change what is written.

        Args:
            trace: An :class:`LLMTrace`, or a mapping validated into one (errors raise here, at the caller).
            timeout: For ``overflow="block"``, seconds to wait for room; the default is the writer's
                ``submit_timeout``.

        Raises:
            pydantic.ValidationError: The mapping is not a valid trace.
            WriterQueueFull: The buffer stayed full for ``timeout`` seconds (``overflow="block"``).
            WriterStopped: The writer's thread stopped on an unexpected error (raised at once).
            WriterClosed: The writer is closing or closed.
        """
        snapshot = _freeze(trace)
        wait = self.submit_timeout if timeout == -1.0 else timeout
        record: tuple[int, list[_Frozen]] | None = None
        with self._lock:
            self._check_accepting()
            # Counted once it has a place: a submit waiting for room (the lock released) is nowhere yet.
            action = self._make_room(wait) if self._depth >= self.max_queue else "queue"
            self._counts["submitted"] += 1
            if action == "queue":
                self._append(snapshot)
            elif action == "spool":
                record = self._add_overflow(snapshot)
        if record is not None:
            self._write_overflow(record, on_caller=True)

    def _check_accepting(self) -> None:
        """Raise if traces can no longer be accepted (lock held)."""
        if self._forked_from is not None:
            raise WriterStopped(
                f"This TraceWriter was created in process {self._forked_from}, before this process forked from it; "
                "its thread, buffer and connections stayed there, so it accepts no traces here. Create the writer "
                "after the fork, in the process that uses it (e.g. in gunicorn's post_fork hook or the worker's "
                "start-up, or with multiprocessing's 'spawn' start method)."
            )
        if self._stopped is not None:
            raise WriterStopped(
                f"This TraceWriter's thread stopped on an unexpected error ({self._stopped!r}); it accepts no "
                "more traces. What it held was spooled or counted as failed (see close()). Create a new writer."
            )
        if self._closing:
            raise WriterClosed("This TraceWriter is closed; traces can no longer be submitted.")

    def _make_room(self, wait: float | None) -> Literal["queue", "spool", "drop"]:
        """Apply the overflow policy to a full buffer (lock held); say what to do with the new trace."""
        if self.overflow == "block" and self._outage:
            return "spool"  # the database is down and a spool is set: what it is for, rather than blocking
        if self.overflow == "block":
            has_room = self._room.wait_for(
                lambda: self._depth < self.max_queue or self._closing or self._stopped is not None or self._outage,
                timeout=wait,
            )
            if not has_room:
                raise WriterQueueFull(
                    f"The trace writer's buffer ({self.max_queue:,} traces) stayed full for {wait} s: ClickHouse "
                    "is slower than the submit rate or unavailable. Raise max_queue or submit_timeout, or use "
                    "overflow='spool' (needs spool_dir) or a drop policy."
                )
            if self._closing or self._stopped is not None:
                if self._stopped is None:
                    raise WriterClosed("This TraceWriter closed while submit() waited for room.")
                self._check_accepting()
            return "spool" if self._depth >= self.max_queue else "queue"
        if self.overflow == "spool":
            return "spool"
        self._counts["dropped"] += 1
        self._dropped_unreported += 1
        if self.overflow == "drop_newest":
            return "drop"
        oldest = self._sealed[0] if self._sealed else self._open
        oldest.pop(0)
        if not oldest and self._sealed:
            self._sealed.popleft()
        self._depth -= 1
        self._settled += 1
        return "queue"

    def _append(self, trace: _Frozen) -> None:
        if not self._open:
            self._open_since = time.monotonic()
        self._open.append(trace)
        self._depth += 1
        self._enqueued += 1
        if len(self._open) >= self.batch_size:
            self._sealed.append(self._open)
            self._open = []
            self._wake_writer.notify()
        elif len(self._open) == 1:
            self._wake_writer.notify()  # starts the flush_interval clock

    def _add_overflow(self, trace: _Frozen) -> tuple[int, list[_Frozen]] | None:
        """Collect an overflowing trace; return a full (or old enough) record to write now (lock held)."""
        now = time.monotonic()
        if not self._overflow:
            self._overflow_since = now
            self._wake_writer.notify()  # the thread writes the record if no submit fills it in time
        self._overflow.append(trace)
        if len(self._overflow) >= OVERFLOW_RECORD_TRACES or now - self._overflow_since >= self.flush_interval:
            return self._take_overflow()
        return None

    def _take_overflow(self) -> tuple[int, list[_Frozen]]:
        """Take the collected overflow traces as one record, with its ticket (lock held)."""
        traces, self._overflow = self._overflow, []
        self._tickets_issued += 1
        self._in_transit += len(traces)
        return self._tickets_issued, traces

    def _write_overflow(
        self, record: tuple[int, list[_Frozen]], spool: Spool | None = None, *, on_caller: bool = False
    ) -> None:
        """Write an overflow record to the spool, on whichever thread took it; never raises.

        ``on_caller``: on the thread of a ``submit``, which must not wait for the disk. The record is appended
        only if the spool's current file can take it without an fsync; otherwise it is handed to the writer's
        thread (still counted in flight).
        """
        ticket, frozen = record
        traces = _thaw_all(frozen)
        if on_caller:
            error = self._append_to_spool(traces, sync=False, only_if_open=True)
            if isinstance(error, _NeedsPublishing):
                with self._lock:
                    self._handed_over.append((ticket, traces))
                    self._wake_writer.notify()
                return
        else:
            # No fsync here: the writer's thread fsyncs after its current batch, so that a burst shares one.
            error = self._append_to_spool(traces, sync=False, spool=spool)
        self._overflow_written(ticket, len(traces), error)

    def _write_handed_over(self, spool: Spool | None = None) -> None:
        """Write the overflow records submits handed over (on the writer's thread, or when closing)."""
        while True:
            with self._lock:
                if not self._handed_over:
                    return
                ticket, traces = self._handed_over.popleft()
            error = self._append_to_spool(traces, sync=False, spool=spool)
            self._overflow_written(ticket, len(traces), error)

    def _overflow_written(self, ticket: int, count: int, error: BaseException | None) -> None:
        with self._lock:
            self._in_transit -= count
            self._count_spool_outcome(count, error)
            self._tickets_done.add(ticket)
            while self._tickets_done_upto + 1 in self._tickets_done:
                self._tickets_done_upto += 1
                self._tickets_done.remove(self._tickets_done_upto)
            self._progress.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every trace submitted before this call is written, spooled or given up.

        Returns at once (``False`` if traces were still held) when the writer's thread has stopped.

        Returns:
            ``True`` if that happened within ``timeout`` seconds (``None`` waits as long as it takes).
        """
        # A signal handler that interrupted this writer's code on this thread: waiting would let the writer's
        # thread in while that code is half-way through (or deadlock), so it only says whether all is done.
        interrupted = _held_here(self._lock) or _held_here(self._spool_lock)
        record = None
        with self._lock:
            target = self._enqueued
            self._flush_target = max(self._flush_target, target)
            if self._overflow and not interrupted:
                record = self._take_overflow()
            ticket = self._tickets_issued
            self._wake_writer.notify()
        if record is not None:
            self._write_overflow(record)

        def done() -> bool:
            return self._settled >= target and self._tickets_done_upto >= ticket

        with self._lock:
            if not interrupted:
                self._progress.wait_for(lambda: done() or self._stopped is not None, timeout=timeout)
            return done()

    def close(self, timeout: float | None = None) -> WriterStats:
        """Flush and stop the writer.

        If the buffer cannot be drained within ``timeout`` seconds (e.g. the database stalls), the traces still
        waiting, and the batch being written, go to the spool (if set) or are counted as failed and logged.
        Closing again returns the final counters again.

        Safe to call from a signal handler. If the handler interrupted this writer's own code on the same
        thread (a ``submit`` in progress), the writer's thread cannot make progress until the handler returns,
        so ``close`` does not wait for it: it spools what the buffer holds at once, into a spool file of its
        own, and returns. The trace whose ``submit`` was interrupted is written by the writer's thread if the
        process goes on, and is counted as pending if it does not.

        Returns:
            The final :class:`WriterStats`: ``written`` (stored), ``spooled`` (durable in the spool, replayed by
            the next writer on the directory), ``lost`` (``dropped + failed``: alert when it is not 0).
        """
        interrupted = _held_here(self._lock) or _held_here(self._spool_lock)
        with self._lock:
            first = not self._closing
            self._closing = True
            self._wake_writer.notify_all()
            self._room.notify_all()
        if first:
            exit_hook.forget(self)
        if interrupted:
            self._close_interrupted()
            return self._log_closed(first)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._give_up.set()  # a stalled write that fails from now on is not retried
            self._salvage(f"close() gave up after {timeout} s")
        if not self._thread.is_alive():
            self._guarded("spooling overflowing traces", self._write_handed_over)
        self._guarded("closing the spool file", self._rotate_spool)
        if not self._thread.is_alive():
            self._report_pending()
        return self._log_closed(first)

    def _close_interrupted(self) -> None:
        """close() from a signal handler that interrupted this thread inside the writer: spool without waiting.

        The writer's locks are held further up this thread's stack, so neither the writer's thread nor the
        spool file being appended to can be waited for: the buffer goes to a spool file of its own.
        """
        self._give_up.set()
        spool = None
        if self._spool is not None:
            try:
                spool = Spool(self._spool.directory, destination=self._spool.destination)
            except OSError:
                logger.exception("llmtrace: close() from a signal handler cannot use the spool; traces stay queued")
                return
        self._salvage("close() interrupted the writer on its own thread (a signal handler)", spool=spool)
        if spool is not None:
            self._guarded("closing the spool file", spool.rotate)

    def _log_closed(self, first: bool) -> WriterStats:
        stats = self.stats
        if first and (stats.spooled or stats.lost or stats.unconfirmed or stats.pending):
            logger.log(
                logging.ERROR if stats.lost or stats.unconfirmed or stats.pending else logging.WARNING,
                "llmtrace: trace writer closed: %d written, %d spooled%s (replayed by now: %d), %d lost "
                "(%d dropped, %d failed), %d unconfirmed%s",
                stats.written,
                stats.spooled,
                f" to {self._spool.directory}" if self._spool else "",
                stats.replayed,
                stats.lost,
                stats.dropped,
                stats.failed,
                stats.unconfirmed,
                f", {stats.pending} still in flight" if stats.pending else "",
            )
        return stats

    @property
    def stats(self) -> WriterStats:
        """A consistent snapshot of the writer's counters."""
        replayer = self._replayer
        with self._lock:
            in_flight = self._in_transit
            if self._in_flight is not None and self._in_flight.state in ("writing", "spooling"):
                in_flight += len(self._in_flight.traces)
            return WriterStats(
                **self._counts,
                queue_depth=self._depth,
                overflow_pending=len(self._overflow),
                in_flight=in_flight,
                replayed=replayer.replayed if replayer else 0,
                quarantined=replayer.quarantined if replayer else 0,
                unreadable=replayer.unreadable if replayer else 0,
                last_error=self._last_error,
            )

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- fork -------------------------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a child forked from the writer's process: let go of everything that belongs to the parent.

        Only the forking thread survives a fork, so the writer's thread is gone here, and its locks may have been
        held by it at that instant: they are made anew. The buffer, the batch in flight and the counters are the
        parent's (the parent writes those traces), so the child's writer starts empty, accepts nothing
        (:meth:`submit` raises :class:`WriterStopped`), and its ``flush`` and ``close`` return at once. The
        child's copies of the spool's file descriptors are closed: a lock (``flock``) belongs to every copy of
        a descriptor, so a copy kept by a long-lived child would keep the parent's spool file locked, and
        unreplayable, after the parent let go of it.
        """
        self._forked_from = self._pid
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._wake_writer = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._spool_lock = threading.RLock()
        self._give_up = threading.Event()
        self._give_up.set()
        self._closing = True
        self._sealed.clear()
        self._open = []
        self._overflow = []
        self._handed_over.clear()
        self._depth = self._in_transit = 0
        self._in_flight = None
        self._enqueued = self._settled = self._flush_target = 0
        self._tickets_issued = self._tickets_done_upto = 0
        self._tickets_done = set()
        self._dropped_unreported = 0
        self._unreported = []
        self._counts = dict.fromkeys(self._counts, 0)
        self._last_error = None
        if self._spool is not None:
            self._spool.forget_after_fork()
        if self._replayer is not None:
            self._replayer.forget_after_fork()
        exit_hook.forget(self)

    # -- the writer's thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if batch.traces:
                    self._guarded(f"writing a batch of {len(batch.traces)} traces", self._write, batch)
                    self._guarded("settling a batch", self._ensure_settled, batch)
                self._chores()
            self._guarded("spooling overflowing traces", self._spool_overflow)
            self._guarded("syncing the spool", self._sync_spool)
            self._report_pending()
            if self._replayer is not None:
                self._replayer.abandon()
        except BaseException as exc:  # the thread must not vanish silently, whatever stopped it
            self._stop(exc)

    def _next_batch(self) -> _Batch | None:
        """The next batch to write; an empty one when only chores are due; ``None`` when closed and drained."""
        with self._lock:
            while True:
                if self._sealed:
                    traces = self._sealed.popleft()
                    break
                now = time.monotonic()
                if self._open:
                    due = self._open_since + self.flush_interval
                    if self._closing or self._flush_target > self._settled or now >= due:
                        traces, self._open = self._open, []
                        break
                elif self._closing:
                    return None
                wait = self._seconds_until_chores(now)
                if wait <= 0:
                    return _Batch([])
                if self._open:
                    wait = min(wait, self._open_since + self.flush_interval - now)
                self._wake_writer.wait(timeout=wait)
            self._depth -= len(traces)
            self._in_flight = batch = _Batch(traces)
            self._room.notify_all()
            return batch

    def _seconds_until_chores(self, now: float) -> float:
        """How long the thread may sleep before something else than a live batch needs it (lock held)."""
        if self._dropped_unreported or self._unreported or self._handed_over:
            return 0.0
        wait = self.flush_interval
        if self._overflow:
            wait = min(wait, self._overflow_since + self.flush_interval - now)
        if self._replayer is not None:
            wait = min(wait, self._replayer.seconds_until_due(now))
        if self._outage:
            wait = min(wait, self._next_probe_at - now)
        return wait

    def _chores(self) -> None:
        """Between batches: spool overflow that waited long enough, fsync, report, replay a little."""
        self._guarded("spooling overflowing traces", self._spool_overflow, True)
        self._guarded("syncing the spool", self._sync_spool)
        self._report_pending()
        if self._replayer is None:
            return
        now = time.monotonic()
        if self._outage and now >= self._next_probe_at:
            # No live batch came to probe the database with: a replay pass does (a write like any other).
            self._next_probe_at = now + self.max_backoff
            self._replayer.request()
        if self._replayer.due(now):
            self._guarded("replaying the spool", self._replayer.run, self._live_work_waits)
            if self._replayer.healthy:
                self._end_outage()

    def _live_work_waits(self) -> bool:
        """Whether a replay pass should pause for live traffic (or a close)."""
        with self._lock:
            if self._closing or self._sealed or self._dropped_unreported or self._unreported or self._handed_over:
                return True
            return bool(self._open) and time.monotonic() >= self._open_since + self.flush_interval

    def _write(self, batch: _Batch) -> None:
        traces = _thaw_all(batch.traces)
        if self._outage and self._replayer is not None and self._replayer.healthy:
            self._end_outage()  # a replayed insert succeeded: the database answers again
        probe = self._outage
        if probe and time.monotonic() < self._next_probe_at:
            self._abandon(batch, _OutageContinues(self._last_error), traces)
            return
        attempt = 0
        while True:
            try:
                stored = self.repository.add_many(traces, batch_size=len(traces))
            except Exception as exc:
                retry = self._note_failure(exc, first=attempt == 0)
                # Once an attempt may have stored the batch, only a later confirmation or replay can say it did not.
                batch.maybe_stored = batch.maybe_stored or isinstance(exc, WriteUnconfirmed)
                if not retry or attempt >= self.max_retries or self._give_up.is_set() or probe:
                    if retry and self._spool is not None:
                        self._start_outage(probe)
                    self._abandon(batch, exc, traces)
                    return
                attempt += 1
                delay = min(self.max_backoff, self.retry_backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                with self._lock:
                    self._counts["retried"] += 1
                message = f"write failed, retry {attempt} in {delay:.2f} s"
                self._emit(WriterEvent("retry", len(batch.traces), message, exc))
                if self._give_up.wait(delay):
                    self._abandon(batch, exc, traces)
                    return
            else:
                self._written(batch, stored)
                return

    def _start_outage(self, probe: bool) -> None:
        """A batch exhausted its retries (or a probe failed): spool the next batches at once until a probe works."""
        self._next_probe_at = time.monotonic() + self.max_backoff
        if not probe:
            with self._lock:
                self._outage = True
                self._room.notify_all()
            logger.warning(
                "llmtrace: the database keeps failing; batches go to the spool without retries, and one write is "
                "tried every %.1f s until it succeeds",
                self.max_backoff,
            )

    def _end_outage(self) -> None:
        with self._lock:
            was, self._outage = self._outage, False
        if was:
            logger.warning("llmtrace: the database answers again; batches are written (and retried) as usual")

    def _note_failure(self, exc: Exception, *, first: bool) -> bool:
        """Record a failed write; return whether retrying it may help."""
        if self._replayer is not None:
            self._replayer.note_write(ok=False)
        expected = isinstance(exc, (DatabaseError, ValueError))
        with self._lock:
            self._last_error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            if not expected and first:
                self._counts["errors"] += 1
        if isinstance(exc, DatabaseError):
            return exc.transient
        if isinstance(exc, ValueError):  # TraceValidationError: the same traces fail the same way
            return False
        # Not classified (a driver error that escaped the repository's mapping, or a bug): logged with its
        # traceback once per batch, and retried, since a connection problem is the likelier cause.
        if first:
            self._emit(WriterEvent("error", 0, "unexpected error writing a batch; retrying it", exc), exc_info=exc)
        return True

    def _written(self, batch: _Batch, stored: int) -> None:
        if self._replayer is not None:
            self._replayer.note_write(ok=True, stored=stored)
        self._end_outage()
        with self._lock:
            late = batch.state == "taken"
            if not late:
                self._settle(batch, "written")
            replay = self._spooled_since_success and not late
            if replay:
                self._spooled_since_success = False
        if late:
            logger.warning(
                "llmtrace: a stalled write of %d traces that close() had given up on (and spooled) succeeded "
                "after all; they are counted as spooled, and replay will find them stored",
                len(batch.traces),
            )
        elif replay and self._replayer is not None:
            self._replayer.request()  # the database answers again: replay what was spooled meanwhile

    def _abandon(self, batch: _Batch, error: BaseException, traces: list[LLMTrace] | None = None) -> None:
        """Spool a batch that could not be written (or count it as failed)."""
        with self._lock:
            if batch.state != "writing":
                return  # close() took it over and spooled it
            batch.state = "spooling"
        count = len(batch.traces)
        if self._spool is None and batch.maybe_stored:
            with self._lock:
                self._settle(batch, "unconfirmed")
            message = "write sent but not confirmed, and no spool_dir: the traces may or may not be stored"
            self._emit(WriterEvent("unconfirmed", count, message, error))
            return
        if self._spool is None:
            with self._lock:
                self._settle(batch, "failed")
            self._emit(WriterEvent("failed", count, "write failed and no spool_dir: traces lost", error))
            return
        spool_error = self._append_to_spool(traces or _thaw_all(batch.traces), sync=True)
        with self._lock:
            self._settle(batch, "spooled" if spool_error is None else "failed")
        if spool_error is None:
            self._emit(WriterEvent("spooled", count, f"write failed; spooled to {self._spool.directory}", error))

    def _settle(self, batch: _Batch, outcome: str) -> None:
        """Count the in-flight batch's outcome (lock held)."""
        batch.state = "settled"
        self._counts[outcome] += len(batch.traces)
        self._settled += len(batch.traces)
        if self._in_flight is batch:
            self._in_flight = None
        self._progress.notify_all()

    def _ensure_settled(self, batch: _Batch) -> None:
        # Reached only if _write itself failed unexpectedly (a bug): the batch must still end up somewhere.
        with self._lock:
            unsettled = batch.state == "writing"
        if unsettled:
            self._abandon(batch, RuntimeError("the write ended without an outcome"))

    def _stop(self, exc: BaseException) -> None:
        """The thread is about to end on an unexpected error: save what it held and refuse further traces."""
        logger.critical(
            "llmtrace: the trace writer's thread stopped on an unexpected error; submit() now raises WriterStopped",
            exc_info=exc,
        )
        with self._lock:
            self._stopped = exc
            self._last_error = f"writer thread stopped: {exc!r}"
            if self._in_flight is not None and self._in_flight.state == "spooling":
                # Stopped while spooling it: whether the record made it is unknown, so it is spooled again
                # (replay stores each trace once) and counted once.
                self._in_flight.state = "writing"
            self._wake_writer.notify_all()
            self._room.notify_all()
            self._progress.notify_all()
        try:
            self._salvage("the writer's thread stopped")
            if self._replayer is not None:
                self._replayer.abandon()
        except BaseException:
            logger.exception("llmtrace: could not save the traces of a stopped trace writer")

    def _salvage(self, reason: str, spool: Spool | None = None) -> None:
        """Spool (or count as failed) everything held in memory, including a batch the thread is stuck on.

        ``spool``: a spool to use instead of the writer's own (see :meth:`_close_interrupted`).
        """
        with self._lock:
            held = [trace for batch in self._sealed for trace in batch] + self._open
            self._sealed.clear()
            self._open = []
            # Not set to 0: a submit interrupted (by a signal handler calling close) between adding a trace and
            # counting it finishes its count afterwards, and the depth must then come out right.
            self._depth -= len(held)
            stuck = self._in_flight
            if stuck is not None and stuck.state == "writing":
                stuck.state = "taken"
                held += stuck.traces
                self._in_flight = None
            spooling = stuck if stuck is not None and stuck.state == "spooling" else None
            self._in_transit += len(held)
            record = self._take_overflow() if self._overflow else None
            self._room.notify_all()
        self._write_handed_over(spool)
        if record is not None:
            self._write_overflow(record, spool)
        # In records of batch_size, as the thread spools batches: replay reads a record whole, so a record of
        # the whole buffer would make replay's memory grow with max_queue (and could outgrow the frame's length).
        for start in range(0, len(held), self.batch_size):
            part = held[start : start + self.batch_size]
            last = start + self.batch_size >= len(held)
            error = self._append_to_spool(_thaw_all(part), sync=last, spool=spool) if self._spool is not None else None
            with self._lock:
                self._in_transit -= len(part)
                self._settled += len(part)
                if self._spool is None:
                    self._counts["failed"] += len(part)
                else:
                    self._count_spool_outcome(len(part), error)
                self._progress.notify_all()
        if held:
            destination = f"spooled to {self._spool.directory}" if self._spool else "lost (no spool_dir set)"
            logger.error("llmtrace: %s; %d trace(s) not written to ClickHouse were %s", reason, len(held), destination)
        if spooling is not None and spool is None:
            # The thread is spooling its batch (local I/O): give it a moment so that close() can report it.
            with self._lock:
                self._progress.wait_for(lambda: spooling.state == "settled", timeout=_SPOOLING_GRACE_SECONDS)

    # -- the spool ----------------------------------------------------------------------------------------

    def _append_to_spool(
        self, traces: list[LLMTrace], *, sync: bool, spool: Spool | None = None, only_if_open: bool = False
    ) -> BaseException | None:
        """Append a batch to the spool; return the error instead of raising it (the caller counts it).

        ``spool``: a spool of this thread's own to use instead of the writer's (no lock needed).
        ``only_if_open``: append only if no fsync is needed (see ``Spool.try_append``); if one is, nothing is
        appended and a :class:`_NeedsPublishing` is returned.
        """
        assert self._spool is not None
        vanished = 0
        error: BaseException | None = None
        try:
            if spool is not None:
                try:
                    spool.append(traces, sync=sync)
                finally:
                    vanished = spool.take_vanished()
            else:
                with self._spool_lock:
                    try:
                        if only_if_open:
                            if not self._spool.try_append(traces):
                                error = _NeedsPublishing()
                        else:
                            self._spool.append(traces, sync=sync)
                    finally:
                        vanished = self._spool.take_vanished()
        except Exception as exc:
            error = exc
        with self._lock:
            if vanished:
                # Counted as spooled when they were appended; their file is gone, so they are lost after all.
                self._counts["spooled"] -= vanished
                self._counts["failed"] += vanished
                self._unreported.append(
                    WriterEvent("spool_lost", vanished, f"the spool file was removed from {self._spool.directory}")
                )
            if isinstance(error, _NeedsPublishing):
                pass  # nothing appended: the caller hands the batch over
            elif error is not None:
                self._counts["errors"] += 1
                self._last_error = f"spool write failed: {error}"
                self._unreported.append(
                    WriterEvent("failed", len(traces), f"cannot write to the spool {self._spool.directory}", error)
                )
            else:
                self._spooled_since_success = True
            self._wake_writer.notify()
        return error

    def _count_spool_outcome(self, count: int, error: BaseException | None) -> None:
        """Count traces taken out of memory for the spool as spooled or failed (lock held)."""
        self._counts["spooled" if error is None else "failed"] += count

    def _spool_overflow(self, only_if_due: bool = False) -> None:
        self._write_handed_over()
        with self._lock:
            due = self._overflow and (
                not only_if_due
                or self._flush_target > self._settled
                or time.monotonic() >= self._overflow_since + self.flush_interval
            )
            record = self._take_overflow() if due else None
        if record is not None:
            self._write_overflow(record)

    def _sync_spool(self) -> None:
        if self._spool is not None:
            with self._spool_lock:
                self._spool.sync()

    def _rotate_spool(self) -> None:
        if self._spool is not None:
            with self._spool_lock:
                self._spool.rotate()

    def _own_spool_file(self) -> tuple[Path | None, int, float]:
        assert self._spool is not None
        with self._spool_lock:
            return self._spool.current_path, self._spool.current_traces, self._spool.current_age

    def _idle(self) -> bool:
        with self._lock:
            return not self._sealed and not self._open and not self._overflow and not self._handed_over

    # -- problems -----------------------------------------------------------------------------------------

    def _guarded(self, context: str, action: Callable[..., object], *args: Any) -> None:
        """Run ``action``; an unexpected exception is logged once, reported, counted, and the thread goes on."""
        try:
            action(*args)
        except Exception as exc:
            with self._lock:
                self._counts["errors"] += 1
                self._last_error = f"{context}: {type(exc).__name__}: {exc}"
            self._emit(WriterEvent("error", 0, f"unexpected error while {context}", exc), exc_info=exc)

    def _report_replay(self, kind: str, count: int, message: str, error: BaseException | None) -> None:
        if kind == "error":
            with self._lock:
                self._counts["errors"] += 1
        if error is not None:
            with self._lock:
                self._last_error = str(error)
        self._emit(WriterEvent(kind, count, message, error), exc_info=error if kind == "error" else None)

    def _report_pending(self) -> None:
        with self._lock:
            dropped, self._dropped_unreported = self._dropped_unreported, 0
            events, self._unreported = self._unreported, []
        if dropped:
            message = f"buffer full: {dropped} trace(s) dropped ({self.overflow})"
            events.insert(0, WriterEvent("dropped", dropped, message))
        for event in events:
            self._emit(event)

    def _emit(self, event: WriterEvent, *, exc_info: BaseException | None = None) -> None:
        level = logging.ERROR if event.kind in _SERIOUS else logging.WARNING
        suffix = f": {event.error}" if event.error is not None and exc_info is None else ""
        logger.log(level, "llmtrace writer: %s (%d traces)%s", event.message, event.count, suffix, exc_info=exc_info)
        if self.on_error is not None:
            try:
                self.on_error(event)
            except Exception:
                logger.exception("llmtrace: the on_error callback raised")


def _held_here(lock: Any) -> bool:
    """Whether this thread holds ``lock`` (a ``threading.RLock``)."""
    return bool(lock._is_owned())


# Every writer of this process, for the fork handler below.
_live_writers: weakref.WeakSet[TraceWriter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for writer in list(_live_writers):
        if writer._forked_from is None:
            writer._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _freeze(trace: LLMTrace | Mapping[str, Any]) -> _Frozen:
    """The writer's own copy of a submitted trace: its field values, with ``agent_tags`` as a tuple.

    Later changes by the caller cannot reach it: every value is immutable. That also lets the garbage
    collector untrack it, so that a full buffer does not lengthen the collector's pauses, as copies of the
    model did (a full buffer of model copies cost the writer a sixth of its throughput). And it is cheap:
    about 1 microsecond, against 5 for ``model_copy``.
    """
    if isinstance(trace, LLMTrace):
        fields = trace.__dict__.copy()
    elif isinstance(trace, Mapping):
        fields = LLMTrace.model_validate(trace).__dict__
    else:
        raise TypeError(f"submit() takes an LLMTrace or a mapping, got {type(trace).__name__}")
    fields["agent_tags"] = tuple(fields["agent_tags"])
    return fields


# Shared by every thawed trace: it names every field, so pydantic's only change to it (adding the name of a
# field assigned to) can never alter it.
_ALL_FIELDS = set(LLMTrace.model_fields)


def _thaw(frozen: _Frozen) -> LLMTrace:
    """An :class:`LLMTrace` with a frozen trace's values, restored as pickle does (its values were validated).

    It takes over ``frozen`` as its ``__dict__`` (the writer thaws each batch once, and holds no other
    reference to it that it reads again before the batch is settled): one allocation fewer per trace.
    """
    frozen["agent_tags"] = list(frozen["agent_tags"])
    trace = _new_trace(LLMTrace)
    trace.__setstate__(
        {
            "__dict__": frozen,
            "__pydantic_fields_set__": _ALL_FIELDS,
            "__pydantic_extra__": None,
            "__pydantic_private__": None,
        }
    )
    return trace


_new_trace = LLMTrace.__new__


def _thaw_all(frozen: list[_Frozen]) -> list[LLMTrace]:
    return [_thaw(fields) for fields in frozen]


def _check_options(
    batch_size: int,
    flush_interval: float,
    max_queue: int,
    overflow: str,
    spool_dir: object,
    max_retries: int,
    replay_interval: float,
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if flush_interval <= 0:
        raise ValueError(f"flush_interval must be positive, got {flush_interval}")
    if max_queue < 1:
        raise ValueError(f"max_queue must be at least 1, got {max_queue}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
    if replay_interval <= 0:
        raise ValueError(f"replay_interval must be positive, got {replay_interval}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}")
    if overflow == "spool" and spool_dir is None:
        raise ValueError("overflow='spool' needs spool_dir: the directory to spool traces to")

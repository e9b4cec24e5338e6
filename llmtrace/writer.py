"""Background trace writers: ``submit()`` returns at once; a thread batches, retries, spools and replays.

The caller's thread only validates the trace and appends it to an in-memory buffer under a lock; every
database call, log line and callback happens on the writer's own thread. (The one exception is the
``"spool"`` overflow policy, which writes to a local file on the caller's thread when the buffer is full;
the writer's thread fsyncs it.)

Batches keep their identity across retries and replays, so ClickHouse's insert deduplication and the
repository's stored-trace lookup make every retry exactly-once.
"""

from __future__ import annotations

import asyncio
import atexit

# Imported now, not when the driver first needs it: the module registers an interpreter-exit hook at import,
# which Python refuses once shutdown has begun, and the exit hook's final flush may be the driver's first
# insert (it checks for pandas, whose import pulls this module in).
import concurrent.futures.thread  # noqa: F401
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from llmtrace.errors import DatabaseError, LLMTraceError
from llmtrace.model import LLMTrace
from llmtrace.repository import TraceRepository
from llmtrace.spool import Spool, read_spool_file

logger = logging.getLogger(__name__)

OverflowPolicy = Literal["block", "drop_oldest", "drop_newest", "spool"]
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_oldest", "drop_newest", "spool")


class WriterQueueFull(LLMTraceError):  # noqa: N818 (reads as a state, like queue.Full)
    """``submit`` waited for room in the writer's buffer longer than its timeout."""


class WriterClosed(LLMTraceError):  # noqa: N818
    """``submit`` was called on a writer that is closing or closed."""


@dataclass(frozen=True)
class WriterStats:
    """Counters of a writer, as of the moment they were read.

    ``submitted == written + spooled + dropped + failed + queue_depth + in_flight`` holds at every moment
    (after a ``close`` that timed out, the batch that was in flight is counted as spooled and, should its
    stalled write still succeed, as written too).

    Attributes:
        submitted: Traces accepted by ``submit`` (including those later dropped by the overflow policy).
        written: Traces stored in ClickHouse (a trace that was already stored counts as written).
        spooled: Traces written to the spool directory instead (overflow, or retries exhausted).
        dropped: Traces discarded by the ``drop_oldest`` / ``drop_newest`` overflow policies.
        failed: Traces lost because retries were exhausted and no spool directory was set.
        retried: Failed write attempts that were retried.
        replayed: Traces written to ClickHouse from spool files.
        torn_records: Torn or corrupt spool records found (and skipped) during replay.
        queue_depth: Traces waiting in the buffer.
        in_flight: Traces in the batch being written right now.
        last_error: The most recent write error, or ``None``.
    """

    submitted: int
    written: int
    spooled: int
    dropped: int
    failed: int
    retried: int
    replayed: int
    torn_records: int
    queue_depth: int
    in_flight: int
    last_error: str | None


@dataclass(frozen=True)
class WriterEvent:
    """What ``on_error`` receives: something went wrong and how many traces it concerns.

    ``kind`` is one of ``"retry"`` (a write failed and will be retried), ``"spooled"`` (retries exhausted,
    batch spooled), ``"failed"`` (retries exhausted, no spool: traces lost), ``"dropped"`` (overflow policy
    discarded traces), ``"torn_record"`` (a spool record could not be read back) or ``"replay_failed"``.
    """

    kind: str
    count: int
    message: str
    error: BaseException | None = None


class TraceWriter:
    """Write traces in the background without ever blocking the caller on I/O.

    Batches flush when ``batch_size`` traces are waiting or ``flush_interval`` seconds after the first of
    them arrived, whichever comes first. A failed batch is retried with exponential backoff and jitter; when
    retries are exhausted it goes to ``spool_dir`` (if set). Spooled batches are replayed when a writer
    starts on that directory, after the next successful write, and, while no traces arrive, every
    ``replay_interval`` seconds.

    Use it as a context manager, or call :meth:`close` at shutdown; an ``atexit`` hook also closes it,
    waiting at most ``exit_timeout`` seconds.

    Args:
        repository: Where batches are written (``add_many``).
        batch_size: Traces per insert.
        flush_interval: Longest time, in seconds, a trace waits in the buffer before its batch is written.
        max_queue: Capacity of the buffer, in traces.
        overflow: What ``submit`` does when the buffer is full: ``"block"`` (wait up to ``submit_timeout``,
            then raise :class:`WriterQueueFull`), ``"drop_oldest"``, ``"drop_newest"``, or ``"spool"``
            (write the trace to ``spool_dir`` on the caller's thread, where it survives the process dying; the
            writer's thread fsyncs it after its current batch, so that a burst shares one fsync).
        spool_dir: Directory for batches that cannot be written; ``None`` means they are lost (and logged).
        max_retries: Retries of a failed batch before it is spooled (or lost).
        retry_backoff: First retry delay in seconds; doubles on each retry, with +/-50% jitter.
        max_backoff: Cap on the retry delay, in seconds.
        submit_timeout: For ``overflow="block"``: seconds ``submit`` waits for room; ``None`` waits forever.
        on_error: Called on the writer's thread with a :class:`WriterEvent` for every problem; exceptions
            it raises are logged and ignored.
        exit_timeout: Seconds the ``atexit`` hook waits for the buffer to drain.
        replay_interval: Seconds between replay attempts of spooled batches while the writer is idle.
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
    ) -> None:
        _check_options(batch_size, flush_interval, max_queue, overflow, spool_dir, max_retries, replay_interval)
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
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        self._spool_lock = threading.Lock()

        self._lock = threading.Lock()
        self._wake_writer = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        # Full batches wait in _sealed; the batch being filled is _open. Taking a batch is O(1), which keeps
        # the lock hold times, and so submit()'s latency, short.
        self._sealed: deque[list[LLMTrace]] = deque()
        self._open: list[LLMTrace] = []
        self._open_since = 0.0
        self._depth = 0
        self._in_flight: list[LLMTrace] = []
        self._enqueued = 0
        self._handled = 0
        self._flush_target = 0
        self._closing = False
        self._closed = False
        self._give_up = threading.Event()
        self._replay_due = False  # the thread replays existing spool files when it starts
        self._next_idle_replay = 0.0  # time.monotonic() after which an idle writer may try a due replay
        self._dropped_unreported = 0
        self._counts = dict.fromkeys(
            ("submitted", "written", "spooled", "dropped", "failed", "retried", "replayed", "torn_records"), 0
        )
        self._last_error: str | None = None

        self._thread = threading.Thread(target=self._run, name="llmtrace-writer", daemon=True)
        self._thread.start()
        _close_at_exit(self)

    # -- the caller's side --------------------------------------------------------------------------------

    def submit(self, trace: LLMTrace | Mapping[str, Any], *, timeout: float | None = -1.0) -> None:
        """Queue a trace for writing and return at once.

        Args:
            trace: An :class:`LLMTrace`, or a mapping validated into one (errors raise here, at the caller).
            timeout: For ``overflow="block"``, seconds to wait for room; the default is the writer's
                ``submit_timeout``.

        Raises:
            pydantic.ValidationError: The mapping is not a valid trace.
            WriterQueueFull: The buffer stayed full for ``timeout`` seconds (``overflow="block"``).
            WriterClosed: The writer is closing or closed.
        """
        if not isinstance(trace, LLMTrace):
            if not isinstance(trace, Mapping):
                raise TypeError(f"submit() takes an LLMTrace or a mapping, got {type(trace).__name__}")
            trace = LLMTrace.model_validate(trace)
        wait = self.submit_timeout if timeout == -1.0 else timeout
        with self._lock:
            if self._closing:
                raise WriterClosed("This TraceWriter is closed; traces can no longer be submitted.")
            self._counts["submitted"] += 1
            action = self._make_room(wait) if self._depth >= self.max_queue else "queue"
            if action == "queue":
                self._append(trace)
        if action == "spool":
            # No fsync here, on the caller's thread: the writer's thread fsyncs after its current batch, so
            # a burst of overflowing traces shares one fsync (see Spool.append).
            self._spool_batch([trace], sync=False)

    def _make_room(self, wait: float | None) -> Literal["queue", "spool", "drop"]:
        """Apply the overflow policy to a full buffer (lock held); say what to do with the new trace."""
        if self.overflow == "block":
            if not self._room.wait_for(lambda: self._depth < self.max_queue or self._closing, timeout=wait):
                self._counts["submitted"] -= 1
                raise WriterQueueFull(
                    f"The trace writer's buffer ({self.max_queue:,} traces) stayed full for {wait} s: ClickHouse "
                    "is slower than the submit rate or unavailable. Raise max_queue or submit_timeout, or use "
                    "overflow='spool' (needs spool_dir) or a drop policy."
                )
            if self._closing:
                self._counts["submitted"] -= 1
                raise WriterClosed("This TraceWriter closed while submit() waited for room.")
            return "queue"
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
        self._handled += 1
        return "queue"

    def _append(self, trace: LLMTrace) -> None:
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

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every trace submitted before this call is written, spooled or given up.

        Returns:
            ``True`` if that happened within ``timeout`` seconds (``None`` waits as long as it takes).
        """
        with self._lock:
            target = self._enqueued
            self._flush_target = max(self._flush_target, target)
            self._wake_writer.notify()
            return self._progress.wait_for(lambda: self._handled >= target, timeout=timeout)

    def close(self, timeout: float | None = None) -> int:
        """Flush and stop the writer.

        If the buffer cannot be drained within ``timeout`` seconds (e.g. the database stalls), the traces still
        waiting, and the batch being written, go to the spool (if set) or are counted as failed and logged.

        Returns:
            How many traces were not confirmed written to ClickHouse when ``close`` returned (``0`` when all
            were). They are in the spool if ``spool_dir`` is set.
        """
        with self._lock:
            if self._closed:
                return 0
            self._closing = True
            self._closed = True
            self._wake_writer.notify_all()
            self._room.notify_all()
        _live_writers.discard(self)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._rotate_spool()
            return 0
        self._give_up.set()  # a stalled write that fails from now on is not retried
        with self._lock:
            leftover = [trace for batch in self._sealed for trace in batch] + self._open + self._in_flight
            self._sealed.clear()
            self._open = []
            self._depth = 0
        if self._spool is not None:
            self._spool_batch(leftover)
        else:
            with self._lock:
                self._counts["failed"] += len(leftover)
        logger.error(
            "llmtrace: the trace writer did not drain within %s s; %d trace(s) not written to ClickHouse were %s",
            timeout,
            len(leftover),
            f"spooled to {self._spool.directory}" if self._spool else "lost (no spool_dir set)",
        )
        self._rotate_spool()
        return len(leftover)

    @property
    def stats(self) -> WriterStats:
        """A consistent snapshot of the writer's counters."""
        with self._lock:
            return WriterStats(
                **self._counts,
                queue_depth=self._depth,
                in_flight=len(self._in_flight),
                last_error=self._last_error,
            )

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the writer's thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        self._replay_spool()
        while (batch := self._next_batch()) is not None:
            self._report_drops()
            self._write(batch)
            if not batch:
                self._replay_when_idle()
            self._sync_spool()
            with self._lock:
                self._handled += len(batch)
                self._in_flight = []
                self._progress.notify_all()
        self._report_drops()

    def _next_batch(self) -> list[LLMTrace] | None:
        with self._lock:
            while True:
                if self._sealed:
                    batch = self._sealed.popleft()
                    break
                if self._open:
                    due = self._open_since + self.flush_interval
                    if self._closing or self._flush_target > self._handled or time.monotonic() >= due:
                        batch, self._open = self._open, []
                        break
                    self._wake_writer.wait(timeout=max(0.0, due - time.monotonic()))
                elif self._closing:
                    return None
                else:
                    self._wake_writer.wait(timeout=self.flush_interval)
                    if self._dropped_unreported or self._idle_replay_is_due():
                        return []  # nothing to write, but drops to report or a replay to try
            self._depth -= len(batch)
            self._in_flight = batch
            self._room.notify_all()
            return batch

    def _write(self, batch: list[LLMTrace]) -> None:
        if not batch:
            return
        attempt = 0
        while True:
            try:
                self.repository.add_many(batch, batch_size=len(batch))
            except DatabaseError as exc:
                with self._lock:
                    self._last_error = str(exc)
                if attempt >= self.max_retries or self._give_up.is_set():
                    self._abandon(batch, exc)
                    return
                attempt += 1
                delay = min(self.max_backoff, self.retry_backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                with self._lock:
                    self._counts["retried"] += 1
                self._emit(WriterEvent("retry", len(batch), f"write failed, retry {attempt} in {delay:.2f} s", exc))
                if self._give_up.wait(delay):
                    self._abandon(batch, exc)
                    return
            except Exception as exc:  # a bug must not kill the thread and strand the buffer
                logger.exception("llmtrace: unexpected error writing a batch of %d traces", len(batch))
                self._abandon(batch, exc)
                return
            else:
                with self._lock:
                    self._counts["written"] += len(batch)
                    replay = self._replay_due
                if replay:
                    self._replay_spool()
                return

    def _abandon(self, batch: list[LLMTrace], error: BaseException) -> None:
        if self._spool is not None:
            self._spool_batch(batch)
            self._emit(
                WriterEvent("spooled", len(batch), f"retries exhausted; spooled to {self._spool.directory}", error)
            )
        else:
            with self._lock:
                self._counts["failed"] += len(batch)
            self._emit(WriterEvent("failed", len(batch), "retries exhausted and no spool_dir: traces lost", error))

    def _spool_batch(self, batch: list[LLMTrace], *, sync: bool = True) -> None:
        if self._spool is None or not batch:
            return
        with self._spool_lock:
            self._spool.append(batch, sync=sync)
        with self._lock:
            self._counts["spooled"] += len(batch)
            self._replay_due = True
            # The database just refused this batch (or the buffer overflowed): give it time before a replay.
            self._postpone_idle_replay()

    def _sync_spool(self) -> None:
        if self._spool is not None:
            with self._spool_lock:
                self._spool.sync()

    def _rotate_spool(self) -> None:
        if self._spool is not None:
            with self._spool_lock:
                self._spool.rotate()

    def _replay_spool(self) -> None:
        """Write every closed spool file's batches; delete a file once all of it is stored."""
        if self._spool is None:
            return
        self._rotate_spool()
        with self._lock:
            self._replay_due = False
        for path in self._spool.claim_closed_files():
            contents = read_spool_file(path)
            if contents.torn is not None:
                with self._lock:
                    self._counts["torn_records"] += 1
                torn = contents.torn
                self._emit(WriterEvent("torn_record", 1, f"skipped {torn.reason} at byte {torn.offset} of {torn.path}"))
            try:
                for batch in contents.batches:
                    self.repository.add_many(batch, batch_size=max(len(batch), 1))
                    with self._lock:
                        self._counts["replayed"] += len(batch)
            except DatabaseError as exc:
                with self._lock:
                    self._replay_due = True
                    self._postpone_idle_replay()
                    self._last_error = str(exc)
                self._emit(WriterEvent("replay_failed", 0, f"replay of {path} failed; will retry later", exc))
                return
            path.unlink(missing_ok=True)
            logger.info("llmtrace: replayed spool file %s (%d batches)", path, len(contents.batches))

    def _replay_when_idle(self) -> None:
        with self._lock:
            due = self._idle_replay_is_due()
        if due:
            self._replay_spool()

    def _idle_replay_is_due(self) -> bool:
        """Whether spooled batches wait and the idle replay timer has run out (lock held)."""
        return self._replay_due and time.monotonic() >= self._next_idle_replay

    def _postpone_idle_replay(self) -> None:
        """Start the idle replay timer over (lock held)."""
        self._next_idle_replay = time.monotonic() + self.replay_interval

    def _report_drops(self) -> None:
        with self._lock:
            dropped, self._dropped_unreported = self._dropped_unreported, 0
        if dropped:
            self._emit(WriterEvent("dropped", dropped, f"buffer full: {dropped} trace(s) dropped ({self.overflow})"))

    def _emit(self, event: WriterEvent) -> None:
        level = logging.WARNING if event.kind in ("retry", "spooled", "torn_record", "replay_failed") else logging.ERROR
        logger.log(level, "llmtrace writer: %s (%d traces)%s", event.message, event.count,
                   f": {event.error}" if event.error else "")  # fmt: skip
        if self.on_error is not None:
            try:
                self.on_error(event)
            except Exception:
                logger.exception("llmtrace: the on_error callback raised")


_live_writers: weakref.WeakSet[TraceWriter] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _close_at_exit(writer: TraceWriter) -> None:
    """Make sure ``writer`` is closed (within its ``exit_timeout``) when the interpreter shuts down."""
    global _exit_hook_registered
    _live_writers.add(writer)
    with _exit_hook_lock:
        if not _exit_hook_registered:
            # threading's exit hooks run before the interpreter starts tearing down (atexit hooks run after),
            # when the writer's thread can still import lazily-loaded driver modules and finish its inserts.
            # concurrent.futures relies on the same hook; fall back to atexit where it does not exist.
            register = getattr(threading, "_register_atexit", atexit.register)
            register(_close_live_writers)
            _exit_hook_registered = True


def _close_live_writers() -> None:
    for writer in list(_live_writers):
        writer.close(timeout=writer.exit_timeout)


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


class AsyncTraceWriter:
    """:class:`TraceWriter` for asyncio code: ``submit`` never blocks the event loop.

    Inserts run on the writer's thread, never on the loop. ``submit`` is a plain (non-async) call that only
    appends to the buffer, so a task cancelled after ``submit`` returned cannot lose that trace. With
    ``overflow="block"`` a full buffer makes ``submit`` raise :class:`WriterQueueFull` at once (the loop must
    not block); ``await submit_wait(...)`` waits for room without blocking the loop instead.

    Takes the same arguments as :class:`TraceWriter`.
    """

    POLL_INTERVAL = 0.005

    def __init__(self, repository: TraceRepository, **options: Any) -> None:
        self._writer = TraceWriter(repository, **options)

    def submit(self, trace: LLMTrace | Mapping[str, Any]) -> None:
        """Queue a trace and return at once (see :meth:`TraceWriter.submit`)."""
        self._writer.submit(trace, timeout=0)

    async def submit_wait(self, trace: LLMTrace | Mapping[str, Any], *, timeout: float | None = None) -> None:
        """Queue a trace, waiting (without blocking the loop) for room in a full buffer.

        Raises:
            WriterQueueFull: No room appeared within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self._writer.submit(trace, timeout=0)
                return
            except WriterQueueFull:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(self.POLL_INTERVAL)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait, off the event loop, until everything submitted so far is written or spooled."""
        return await asyncio.to_thread(self._writer.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> int:
        """Flush and stop; see :meth:`TraceWriter.close`. Cancelling the awaiting task does not stop the close."""
        return await asyncio.shield(asyncio.to_thread(self._writer.close, timeout))

    @property
    def stats(self) -> WriterStats:
        """See :attr:`TraceWriter.stats`."""
        return self._writer.stats

    async def __aenter__(self) -> AsyncTraceWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

"""Replay: spooled traces back into ClickHouse, exactly once, in bounded memory, without ever getting stuck.

The last step of the writer's no-loss path (buffer -> retries -> spool -> replay). A *pass* walks the spool
directory oldest file first, claims each file of this writer's destination (see :mod:`llmtrace.spool` for
the claim protocol), streams its records, and writes their traces with ``TraceRepository.add_many`` in
groups of whole records, one insert per group of at least ``batch_size`` traces (or the file's end): memory
is bounded by one group and one record, whatever the file's size. A file
is removed once each of its traces is stored or quarantined. Replay is idempotent (the repository skips
stored traces, and a group re-sent whole carries the same insert token), so a pass cut short anywhere, by
a failure, a crash or ``close()``, is simply done again later.

What cannot be stored is set aside, never dropped and never retried forever:

- bytes that hold no readable record (a torn tail, a flipped bit) are copied to the quarantine, and the
  reader goes on at the next valid record;
- items the current model rejects (a field from a newer version, a negative count, not an object) are
  quarantined with the model's message; the other traces of their record are replayed;
- a record ClickHouse rejects with a permanent error (e.g. a constraint) is retried on later passes, and
  quarantined once it has been rejected on three passes at least ``interval`` apart, provided other inserts
  to the same destination succeeded since its first rejection: otherwise the destination itself is what
  fails (a read-only user, say), and the record waits. A missing table never counts against a record.
  Before quarantining, the record is split in halves, recursively, so that only the traces ClickHouse
  rejects on their own are set aside. Rejections are counted in a file every process replaying the directory
  shares (:class:`llmtrace.spool.StrikeBook`), so writers that live shorter than three intervals add theirs up.

A transient failure (the server unreachable, overloaded, timing out), or a missing table, ends the pass;
the next one starts ``interval`` seconds later, or as soon as the writer's next live write succeeds. A
permanent failure moves on to the next record and file, so one bad record blocks nothing behind it; three
failed groups in a row end the pass early, so that a destination that fails everything costs three
attempts per interval.

Passes also run every ``interval`` seconds while the writer is healthy, so that files other processes left
(dead, or alive and rotating) are replayed by running writers, not only at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from llmtrace.errors import DatabaseError, SchemaNotMigratedError
from llmtrace.model import LLMTrace
from llmtrace.repository import TraceRepository
from llmtrace.spool import ClaimedFile, NotClaimable, Quarantine, StrikeBook, claim, scan
from llmtrace.spool_format import BadSpan, Record, read_records

logger = logging.getLogger(__name__)

# A record ClickHouse rejects is quarantined on this rejection (see the module docs).
POISON_STRIKES = 3
# Failed groups in a row after which a pass stops (the destination, not a record, is failing).
FAILED_GROUPS_TO_STOP = 3

Report = Callable[[str, int, str, "BaseException | None"], None]
"""``report(kind, count, message, error)``: how the replayer tells its writer about a problem."""


def _book_name(key: tuple[str, int, str]) -> str:
    """A record's name in the strike book: ``<file name>:<offset>``."""
    return f"{key[0]}:{key[1]}"


class _Step(Enum):
    GO_ON = "go on"
    FILE_DONE = "file done"
    STOP = "stop the pass"


class _TransientFailureError(Exception):
    """A write failed in a way that may succeed later: the pass ends here."""


@dataclass
class _Strikes:
    count: int
    inserts_at_first: int
    last: float


class _GroupReader:
    """Reads a claimed file's records in groups of about ``batch_size`` traces; never the whole file at once.

    Reading runs on the replaying thread. Decoding a group on a thread of its own, while the previous group
    is inserted, was measured slower on this project's 2-core machine (0.53x-0.69x add_many against
    0.62x-0.81x): validating a group holds the GIL for tens of milliseconds at a time, which stalls the
    insert's own Python work rather than overlapping it.
    """

    def __init__(self, claimed: ClaimedFile, batch_size: int) -> None:
        self._records = read_records(claimed.fd, claimed.header, claimed.records_start)
        self._batch_size = batch_size

    def next_group(self) -> list[Record | BadSpan] | None:
        """The next group of records and damaged stretches; ``None`` at the end of the file.

        Raises:
            OSError: The file could not be read.
        """
        group: list[Record | BadSpan] = []
        size = 0
        for item in self._records:
            group.append(item)
            size += len(item.traces) if isinstance(item, Record) else 0
            if size >= self._batch_size:
                break
        return group or None

    def close(self) -> None:
        """Stop reading (the file itself is closed by its owner)."""
        self._records.close()


@dataclass
class _OpenFile:
    claimed: ClaimedFile
    reader: _GroupReader
    complete: bool = True  # every record so far is stored or quarantined
    traces: int = 0
    settled_keys: list[tuple[str, int, str]] = field(default_factory=list)

    def release(self) -> None:
        self.reader.close()
        self.claimed.release()

    def remove(self) -> None:
        self.reader.close()
        self.claimed.remove()


class SpoolReplayer:
    """Replays the spool files of one destination, a bounded step at a time, on the writer's thread.

    Not thread-safe: one thread drives it. Its counters may be read from any thread.

    Args:
        directory: The spool directory.
        repository: Where traces are written; files are replayed only if tagged with its ``destination``.
        batch_size: Traces per insert.
        interval: Seconds between passes, and before a new pass after a failed one.
        report: Told about every problem (on the driving thread).
        own_file: The file this process is appending to, how many traces it holds and its age in seconds
            (passes skip it until it is rotated).
        rotate_own: Closes that file, making it replayable.
        idle: Whether the writer has no live traffic waiting.

    Attributes:
        replayed: Traces from spool files now stored (including ones found already stored).
        quarantined: Traces set aside because the model or ClickHouse rejects them.
        unreadable: Damaged stretches of spool files (or whole records) that held no readable traces, set aside
            as bytes. Torn tails (a writer killed mid-append) are set aside too, but not counted here.
    """

    def __init__(
        self,
        directory: Path,
        repository: TraceRepository,
        *,
        batch_size: int,
        interval: float,
        report: Report,
        own_file: Callable[[], tuple[Path | None, int, float]],
        rotate_own: Callable[[], None],
        idle: Callable[[], bool],
    ) -> None:
        self.directory = directory
        self.repository = repository
        self.destination = repository.destination
        self.batch_size = batch_size
        self.interval = interval
        self.quarantine = Quarantine(directory)
        self.replayed = 0
        self.quarantined = 0
        self.unreadable = 0
        self._report = report
        self._own_file = own_file
        self._rotate_own = rotate_own
        self._idle = idle
        self._pending: list[Path] | None = None  # the current pass's files still to visit; None: no pass
        self._file: _OpenFile | None = None
        self._requested = True  # a writer replays what is waiting when it starts
        self._next_pass_at = 0.0
        self._failed_groups = 0
        self._healthy = False  # whether the last write to the destination (live or replay) succeeded
        self._inserts = 0  # inserts that stored traces, live or replayed: evidence the destination works
        self._strikes: dict[tuple[str, int, str], _Strikes] = {}
        # Strikes shared with other processes (see StrikeBook); records whose rejections this process saw and
        # the book does not yet call confirmed, with this process's insert count at the first of them.
        self.strike_book = StrikeBook(directory)
        self._unconfirmed: dict[tuple[str, int, str], int] = {}
        # Records stored or quarantined, and stretches found unreadable, in files still in the spool (a file
        # is kept while one of its records waits): a later pass skips them rather than storing them again
        # or setting them aside twice.
        self._settled: set[tuple[str, int, str]] = set()
        self._warned: set[str] = set()
        self._quarantine_read = False
        # Files of other destinations sharing the directory: names are never reused and a file's header never
        # changes, so each is opened once, not on every pass.
        self._elsewhere: set[str] = set()

    # -- scheduling ---------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether a pass is under way (and was paused, or is about to start)."""
        return self._pending is not None

    @property
    def healthy(self) -> bool:
        """Whether the last write to the destination, live or replayed, succeeded."""
        return self._healthy

    def request(self) -> None:
        """Start a pass at the next opportunity (e.g. the database answered again after spooling)."""
        self._requested = True

    def due(self, now: float) -> bool:
        """Whether :meth:`run` has work now."""
        return self.active or self._requested or now >= self._next_pass_at

    def seconds_until_due(self, now: float) -> float:
        """How long the driving thread may sleep before :meth:`run` has work."""
        return 0.0 if self.due(now) else self._next_pass_at - now

    def note_write(self, *, ok: bool, stored: int = 0) -> None:
        """Tell the replayer how a live write to the destination went (its health decides what a pass tries)."""
        self._healthy = ok
        if stored:
            self._inserts += 1
            if self._unconfirmed:
                self._confirm_strikes()

    def abandon(self) -> None:
        """End the pass now, releasing its file for a later one (nothing is lost: the file stays)."""
        if self._file is not None:
            self._file.release()
            self._file = None
        self._end_pass()

    def forget_after_fork(self) -> None:
        """In a forked child: close this process's copy of the file the parent is replaying (see ``Spool``)."""
        if self._file is not None:
            self._file.claimed.release()
            self._file = None
        self._pending = None

    # -- a pass -------------------------------------------------------------------------------------------

    def run(self, pause: Callable[[], bool]) -> None:
        """Work on the current pass (starting one if due) until it ends, or ``pause()`` says to yield.

        A paused pass keeps its file claimed and resumes where it stopped on the next call.
        """
        try:
            if self._pending is None:
                self._start_pass()
            while self._pending is not None:
                if self._file is None:
                    if not self._pending:
                        self._end_pass()
                        return
                    self._file = self._open(self._pending.pop(0))
                    continue
                step = self._step(self._file)
                if step is _Step.FILE_DONE:
                    self._finish_file(self._file)
                    self._file = None
                elif step is _Step.STOP:
                    self.abandon()
                    return
                if pause():
                    return
        except BaseException:
            self.abandon()
            raise

    def _start_pass(self) -> None:
        self._requested = False
        self._failed_groups = 0
        own, own_traces, own_age = self._own_file()
        candidates = scan(self.directory, skip=own)
        if own is not None and own_traces and self._worth_rotating(own_traces, own_age, others=bool(candidates)):
            self._rotate_own()
            candidates = scan(self.directory)
        current = {path.name for path in candidates}
        if not self._quarantine_read:
            # Stretches and items an earlier process set aside from files still here are not set aside again.
            self._quarantine_read = True
            try:
                self._settled.update(key for key in self.quarantine.set_aside_parts() if key[0] in current)
            except OSError as exc:
                self._report("error", 0, f"cannot read the quarantine {self.quarantine.path}", exc)
        self._elsewhere &= current
        candidates = [path for path in candidates if path.name not in self._elsewhere]
        self._warned &= current
        self._strikes = {key: strikes for key, strikes in self._strikes.items() if key[0] in current}
        self._unconfirmed = {key: first for key, first in self._unconfirmed.items() if key[0] in current}
        self._settled = {key for key in self._settled if key[0] in current}
        self._pending = candidates

    def _worth_rotating(self, traces: int, age: float, *, others: bool) -> bool:
        """Whether to close this process's own file now, so that this pass can replay it.

        Only when the database looks healthy, or there is nothing else to try: not on every pass of an
        outage, which would make a file per pass. And only once the file holds a full group, is older than
        ``interval``, or the writer is idle: every file costs a few fsyncs to publish and remove, which
        overflow under steady traffic would otherwise pay for a handful of traces at a time.
        """
        if others and not self._healthy:
            return False
        return traces >= self.batch_size or age >= self.interval or self._idle()

    def _end_pass(self) -> None:
        # A request made during the pass stays: what was spooled since its scan gets a pass of its own.
        self._pending = None
        self._next_pass_at = time.monotonic() + self.interval

    def _open(self, path: Path) -> _OpenFile | None:
        try:
            claimed = claim(path, destination=self.destination)
        except NotClaimable as exc:
            self._not_claimable(path, exc)
            return None
        except OSError as exc:
            self._warn_once(path, "error", f"cannot open spool file {path} ({exc}); it is left for a later pass", exc)
            return None
        if claimed is None:
            return None
        if claimed.header.destination is None:
            self._warn_once(
                path,
                "legacy_file",
                f"spool file {path} has the version 1 format, which does not say where its traces belong; "
                f"replaying it into {self.destination}",
                None,
            )
        return _OpenFile(claimed, _GroupReader(claimed, self.batch_size))

    def _not_claimable(self, path: Path, problem: NotClaimable) -> None:
        if problem.kind == "elsewhere":
            self._elsewhere.add(path.name)
        elif problem.kind == "empty":
            path.unlink(missing_ok=True)  # no bytes, hence no traces (a version 1 writer died creating it)
            logger.info("llmtrace: removed empty spool file %s", path)
        elif problem.kind == "damaged":
            reason = f"spool file header damaged ({problem}); the destination of its traces is unknown"
            if self.quarantine.add_file(path, reason):
                self.unreadable += 1
                self._report("unreadable", 1, f"moved {path} to {self.quarantine.directory}: {reason}", None)
        else:
            self._warn_once(
                path, "foreign_file", f"{path} is not an llmtrace spool file ({problem}); leaving it alone", None
            )

    def _warn_once(self, path: Path, kind: str, message: str, error: BaseException | None) -> None:
        if path.name not in self._warned:
            self._warned.add(path.name)
            self._report(kind, 0, message, error)

    # -- one file -----------------------------------------------------------------------------------------

    def _step(self, current: _OpenFile) -> _Step:
        """Store the file's next group of records (about ``batch_size`` traces)."""
        items = current.reader.next_group()
        if items is None:
            return _Step.FILE_DONE
        group: list[tuple[Record, list[LLMTrace]]] = []
        for item in items:
            if isinstance(item, BadSpan):
                self._set_aside_bytes(current, item.offset, item.end, item.reason, torn_tail=item.torn_tail)
            elif item.body_problem is not None:
                self._set_aside_bytes(current, item.offset, item.end, item.body_problem)
            else:
                if item.rejected:
                    self._set_aside_items(current, item)
                if item.traces and self._key(current, item.offset, "record") not in self._settled:
                    group.append((item, item.traces))
        return self._store_group(current, group) if group else _Step.GO_ON

    def _store_group(self, current: _OpenFile, group: list[tuple[Record, list[LLMTrace]]]) -> _Step:
        traces = [trace for _, part in group for trace in part]
        try:
            error = self._try_store(traces)
            if error is None:
                self._failed_groups = 0
                for record, part in group:
                    self._stored(current, record, len(part))
                return _Step.GO_ON
            # A record of the group is rejected: find which, storing the others. (A group of one record is
            # that record.)
            any_stored = False
            for record, part in group:
                record_error = self._try_store(part) if len(group) > 1 else error
                if record_error is None:
                    any_stored = True
                    self._stored(current, record, len(part))
                else:
                    self._strike(current, record, part, record_error)
        except _TransientFailureError:
            current.complete = False
            return _Step.STOP
        self._failed_groups = 0 if any_stored else self._failed_groups + 1
        if self._failed_groups >= FAILED_GROUPS_TO_STOP:
            message = f"{self._failed_groups} groups in a row rejected; stopping this pass"
            self._report("replay_failed", 0, message, error)
            return _Step.STOP
        return _Step.GO_ON

    def _strike(self, current: _OpenFile, record: Record, traces: list[LLMTrace], error: DatabaseError) -> None:
        """Count a permanent rejection of ``record``; quarantine it when it keeps being rejected.

        Raises:
            _TransientFailureError: A write made while splitting the record failed transiently.
        """
        key = self._key(current, record.offset, "record")
        now = time.monotonic()
        strikes = self._strikes.setdefault(key, _Strikes(0, self._inserts, now - self.interval))
        # Rejections count at most once per interval: passes come sooner after live writes succeed, and a
        # record should keep being rejected for a while, not over a burst of passes, before it is set aside.
        if now - strikes.last >= self.interval:
            strikes.count += 1
            strikes.last = now
        count, confirmed = self._shared_strike(key, confirmed=self._inserts > strikes.inserts_at_first)
        count, confirmed = max(count, strikes.count), confirmed or self._inserts > strikes.inserts_at_first
        if count < POISON_STRIKES or not confirmed:
            current.complete = False
            self._report(
                "replay_failed",
                len(traces),
                f"ClickHouse rejected the record at byte {record.offset} of {current.claimed.path} "
                f"({count} time(s)); it stays in the spool",
                error,
            )
            return
        self._split_and_quarantine(current, record, traces, error)
        del self._strikes[key]
        self._unconfirmed.pop(key, None)
        self._forget_strikes(lambda name: name == _book_name(key))
        self._settle(current, key)

    def _shared_strike(self, key: tuple[str, int, str], *, confirmed: bool) -> tuple[int, bool]:
        """Count a rejection in the strike book other processes share; return its count and whether confirmed.

        A rejection counts at most once per ``interval`` there too (wall-clock time, as processes share it).
        """
        name, wall = _book_name(key), time.time()

        def change(book: dict[str, Any]) -> tuple[int, bool]:
            entry = book.get(name)
            if not isinstance(entry, dict):
                entry = {"count": 0, "last": wall - self.interval, "confirmed": False}
            if wall - float(entry.get("last", 0)) >= self.interval:
                entry["count"] = int(entry.get("count", 0)) + 1
                entry["last"] = wall
            entry["confirmed"] = bool(entry.get("confirmed")) or confirmed
            book[name] = entry
            return int(entry["count"]), bool(entry["confirmed"])

        try:
            count, shared_confirmed = self.strike_book.update(change)
        except (OSError, ValueError, TypeError) as exc:
            self._report("error", 0, f"cannot update the strike book {self.strike_book.path}", exc)
            return 0, False
        if not shared_confirmed:
            self._unconfirmed[key] = self._strikes[key].inserts_at_first
        return count, shared_confirmed

    def _confirm_strikes(self) -> None:
        """Inserts to the destination succeeded after records were rejected: say so in the shared book."""
        names = {_book_name(key) for key, first in self._unconfirmed.items() if self._inserts > first}
        if not names:
            return
        self._unconfirmed = {key: first for key, first in self._unconfirmed.items() if _book_name(key) not in names}

        def change(book: dict[str, Any]) -> None:
            for name in names:
                if isinstance(book.get(name), dict):
                    book[name]["confirmed"] = True

        try:
            self.strike_book.update(change)
        except OSError as exc:
            self._report("error", 0, f"cannot update the strike book {self.strike_book.path}", exc)

    def _forget_strikes(self, forget: Callable[[str], bool]) -> None:
        """Remove the book's entries whose names ``forget`` selects (their record or file is settled)."""
        if not self.strike_book.path.exists():
            return

        def change(book: dict[str, Any]) -> None:
            for name in [name for name in book if forget(name)]:
                del book[name]

        try:
            self.strike_book.update(change)
        except OSError as exc:
            self._report("error", 0, f"cannot update the strike book {self.strike_book.path}", exc)

    def _split_and_quarantine(
        self, current: _OpenFile, record: Record, traces: list[LLMTrace], error: DatabaseError
    ) -> None:
        """Store what ClickHouse accepts of ``traces`` (which it rejected whole); quarantine each trace it rejects."""
        if len(traces) == 1:
            self._quarantine_traces(current, record, traces, f"rejected by ClickHouse: {error}")
            return
        middle = len(traces) // 2
        for half in (traces[:middle], traces[middle:]):
            half_error = self._try_store(half)
            if half_error is not None:
                self._split_and_quarantine(current, record, half, half_error)
            else:
                self.replayed += len(half)
                current.traces += len(half)

    def _try_store(self, traces: list[LLMTrace]) -> DatabaseError | None:
        """Store ``traces``; return the permanent error that rejected them, if any.

        Raises:
            _TransientFailureError: The failure may go away (or cannot be classified): the pass should end.
        """
        try:
            # One insert per group, even one a record longer than batch_size: split at batch_size, a group of
            # 8 overflow records of 128 traces would cost a second insert for its last 24.
            stored = self.repository.add_many(traces, batch_size=max(len(traces), 1))
        except DatabaseError as exc:
            self._healthy = False
            # A missing table is the destination's problem, whatever the records: wait for it like an outage.
            if exc.transient or isinstance(exc, SchemaNotMigratedError):
                self._report("replay_failed", 0, "replay failed; will retry later", exc)
                raise _TransientFailureError from exc
            return exc
        except ValueError as exc:  # TraceValidationError: the repository's checks go beyond the model's
            return DatabaseError(f"the repository rejected the traces: {exc}")
        except Exception as exc:
            # Until every driver failure maps to DatabaseError, a raw one may escape: it is most likely the
            # connection, so the pass ends and is tried again later rather than treating the record as bad.
            self._healthy = False
            self._report("error", 0, "unexpected error while replaying; will retry later", exc)
            raise _TransientFailureError from exc
        self._healthy = True
        if stored:
            self._inserts += 1
            if self._unconfirmed:
                self._confirm_strikes()
        return None

    # -- the quarantine -----------------------------------------------------------------------------------

    def _stored(self, current: _OpenFile, record: Record, count: int) -> None:
        self.replayed += count
        current.traces += count
        self._settle(current, self._key(current, record.offset, "record"))

    def _key(self, current: _OpenFile, offset: int, part: str) -> tuple[str, int, str]:
        return (current.claimed.path.name, offset, part)

    def _settle(self, current: _OpenFile, key: tuple[str, int, str]) -> None:
        """Remember that ``key`` is quarantined, so that a later pass over the same (kept) file skips it."""
        self._settled.add(key)
        current.settled_keys.append(key)

    def _set_aside_bytes(
        self, current: _OpenFile, start: int, end: int, reason: str, *, torn_tail: bool = False
    ) -> None:
        key = self._key(current, start, "bytes")
        if key in self._settled:
            return
        source = current.claimed.path
        entry = {"destination": self.destination, "source": source.name, "offset": start, "reason": reason}
        if not self._quarantine(current, lambda: self.quarantine.add_bytes(current.claimed, start, end, entry)):
            return
        self._settle(current, key)
        message = f"{reason}: bytes {start}-{end} of {source} moved to the quarantine"
        if torn_tail:
            # A writer killed while appending: that append never returned, so nothing acknowledged is in it.
            self._report("torn_tail", 0, f"{message} (its writer stopped in the middle of an append)", None)
        else:
            self.unreadable += 1
            self._report("unreadable", 0, message, None)

    def _set_aside_items(self, current: _OpenFile, record: Record) -> None:
        key = self._key(current, record.offset, "items")
        if key in self._settled:
            return
        entry = {
            "destination": self.destination,
            "source": current.claimed.path.name,
            "offset": record.offset,
            "items": [{"index": item.index, "reason": item.reason, "item": item.item_json} for item in record.rejected],
        }
        if self._quarantine(current, lambda: self.quarantine.add(entry)):
            self.quarantined += len(record.rejected)
            self._settle(current, key)
            reasons = "; ".join(sorted({item.reason for item in record.rejected}))
            self._report(
                "quarantined",
                len(record.rejected),
                f"item(s) of the record at byte {record.offset} of {current.claimed.path} are not valid traces "
                f"({reasons}); moved to the quarantine",
                None,
            )

    def _quarantine_traces(self, current: _OpenFile, record: Record, traces: list[LLMTrace], reason: str) -> None:
        entry = {
            "destination": self.destination,
            "source": current.claimed.path.name,
            "offset": record.offset,
            "reason": reason,
            "traces": [trace.model_dump(mode="json") for trace in traces],
        }
        if self._quarantine(current, lambda: self.quarantine.add(entry)):
            self.quarantined += len(traces)
            self._report("quarantined", len(traces), f"{reason}; moved to the quarantine", None)

    def _quarantine(self, current: _OpenFile, write: Callable[[], None]) -> bool:
        try:
            write()
        except OSError as exc:
            current.complete = False  # the file keeps what could not be set aside
            self._report("error", 0, f"cannot write to the quarantine {self.quarantine.directory}", exc)
            return False
        return True

    def _finish_file(self, current: _OpenFile) -> None:
        path = current.claimed.path
        if not current.complete:
            current.release()
            return
        try:
            current.remove()
        except OSError as exc:
            self._report("error", 0, f"cannot remove replayed spool file {path}; it will be replayed again", exc)
            return
        self._settled.difference_update(current.settled_keys)
        self._forget_strikes(lambda name: name.rpartition(":")[0] == path.name)
        logger.info("llmtrace: replayed spool file %s (%d traces)", path, current.traces)

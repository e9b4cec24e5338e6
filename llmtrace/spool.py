"""The spool directory: where batches that could not be written to ClickHouse wait, and how files change hands.

Files (the format is in :mod:`llmtrace.spool_format`):

- ``<time in ns>-<pid>-<random>.spool``: batches for one destination (``database.table``, in the file
  header); names sort by age.
- ``.<name>.spool.tmp``: a spool file being created; never read.
- ``.strikes.json``: records ClickHouse rejected, and on how many replay passes (see :class:`StrikeBook`).
- ``quarantine/quarantine.jsonl``: one JSON line per record or trace that replay set aside, with the reason;
  ``quarantine/*.bin`` hold raw bytes that could not be read at all. Nothing in ``quarantine/`` is deleted
  or retried by llmtrace: it is for a person to look at.

Publishing (the appending process). A file is created under a temporary name that no replayer looks at,
locked (``flock``, exclusive), given its header, fsynced, renamed to its final name, and the directory is
fsynced. A replayer can therefore only ever see a file that is complete and already locked by its writer;
it cannot claim a file in the instant between its creation and its lock. The writer keeps the lock until
it rotates the file (closes it; files rotate at ``max_file_bytes``) or dies, when the kernel releases it.

Claiming (the replaying process). A replayer opens a ``*.spool`` path and reads its header (complete since
publication) to skip other destinations' files without locking them. It then takes the exclusive lock
without waiting (a file still held is skipped) and checks that the path still names the inode it locked:
if another replayer finished the file and removed it in between, the path is gone or names another file,
and this one is skipped. A claimed file is replayed, then removed (while still locked) and the directory
fsynced. A ``*.spool`` path that is not a spool file (a directory, someone else's file) is never touched,
and one that is not a regular file (a named pipe, a device, a symbolic link) is not even opened;
a spool file whose header is damaged, so whose destination is unknown, is moved whole into the quarantine.

Several processes, and several destinations, can share one directory: each replays only files whose header
names its own destination (version 1 files, which carry none, are replayed by whichever writer claims them).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmtrace.model import LLMTrace
from llmtrace.spool_format import (
    FileHeader,
    NotASpoolFile,
    encode_file_header,
    encode_record,
    read_at,
    read_file_header,
)

logger = logging.getLogger(__name__)

SUFFIX = ".spool"
TEMPORARY_SUFFIX = ".spool.tmp"
QUARANTINE_DIRECTORY = "quarantine"
QUARANTINE_FILE = "quarantine.jsonl"
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
# Spool files hold whole requests and responses: readable by their owner only.
FILE_MODE = 0o600
# A temporary file older than this, and unlocked, was left by a process that died while creating it; it holds
# only a header (records are appended after the rename), so removing it loses nothing.
STALE_TEMPORARY_SECONDS = 600.0


class Spool:
    """The appending side of a spool directory: this writer's current file, published atomically, rotated by size.

    Not thread-safe by itself; :class:`llmtrace.TraceWriter` serialises access.

    Args:
        directory: Where spool files live; created if missing (also when it is removed while in use).
        destination: ``database.table`` of the traces (``TraceRepository.destination``), written into every
            file's header so that only a writer for that destination replays them.
        max_file_bytes: Size after which the current file is closed and the next append starts a new one, so
            that a long outage makes many files that can each be replayed (and removed) on their own.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, destination: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    ) -> None:
        if max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be at least 1, got {max_file_bytes}")
        self.directory = Path(directory)
        self.destination = destination
        self.max_file_bytes = max_file_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._traces = 0
        self._unsynced = False
        self._created = 0.0
        self._vanished = 0

    @property
    def current_path(self) -> Path | None:
        """The file being appended to, if any."""
        return self._path

    @property
    def current_traces(self) -> int:
        """Traces appended to the current file."""
        return self._traces

    @property
    def current_age(self) -> float:
        """Seconds since the current file was created (0 when there is none)."""
        return time.monotonic() - self._created if self._fd is not None else 0.0

    def append(self, traces: Sequence[LLMTrace], *, sync: bool = True) -> None:
        """Append one batch as one record.

        The record reaches the operating system before this returns, so it survives the process crashing.
        With ``sync`` (the default) it is also fsynced, so it survives the machine crashing; without, it
        waits for the next :meth:`sync` or :meth:`rotate`, which lets many appends share one fsync.

        Raises:
            OSError: The record could not be written (full disk, missing permissions, ...). Whatever part of
                it reached the file is cut off again, and the file is closed: the next append starts a new
                one. Nothing of the failed batch is in the spool.
        """
        record = encode_record(traces)
        if self._fd is not None and (self._size >= self.max_file_bytes or not self._still_published()):
            self.rotate()
        if self._fd is None:
            self._publish_new_file()
        assert self._fd is not None
        try:
            _write_all(self._fd, record)
            if sync:
                os.fsync(self._fd)
        except OSError:
            self._cut_back_and_close()
            raise
        self._size += len(record)
        self._traces += len(traces)
        self._unsynced = not sync

    def try_append(self, traces: Sequence[LLMTrace]) -> bool:
        """Append one batch as one record without any fsync, if the current file can take it as it is.

        Returns ``False`` (appending nothing) when that would mean publishing a new file or rotating the
        current one, which fsync: the caller then hands the batch to a thread that may wait for the disk.

        Raises:
            OSError: As :meth:`append`.
        """
        if self._fd is None or self._size >= self.max_file_bytes or not self._still_published():
            return False
        self.append(traces, sync=False)
        return True

    def sync(self) -> None:
        """Fsync what was appended without ``sync``.

        Raises:
            OSError: The fsync failed; the file is closed (records already written stay in it).
        """
        if self._fd is not None and self._unsynced:
            try:
                os.fsync(self._fd)
            except OSError:
                self._close()
                raise
        self._unsynced = False

    def rotate(self) -> None:
        """Close the current file (fsynced), so that it can be replayed; the next append starts a new one."""
        if self._fd is None:
            return
        try:
            self.sync()
        finally:
            self._close()

    def take_vanished(self) -> int:
        """How many appended traces were in files removed from under this spool since the last call."""
        vanished, self._vanished = self._vanished, 0
        return vanished

    def forget_after_fork(self) -> None:
        """In a forked child: close this process's copy of the parent's file, leaving the file to the parent.

        The copy shares the parent's lock; kept open, it would hold the file locked after the parent let go.
        """
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._path, self._size, self._traces, self._unsynced = None, None, 0, 0, False
        self._vanished = 0

    def _publish_new_file(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():019d}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        temporary = self.directory / f".{name}{TEMPORARY_SUFFIX}"
        final = self.directory / f"{name}{SUFFIX}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            # Locked before the final name exists: a replayer can never hold a file its writer still fills.
            fcntl.flock(fd, fcntl.LOCK_EX)
            header = encode_file_header(self.destination)
            _write_all(fd, header)
            os.fsync(fd)
            os.rename(temporary, final)
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        self._fd, self._path, self._size, self._traces, self._unsynced = fd, final, len(header), 0, False
        self._created = time.monotonic()

    def _still_published(self) -> bool:
        """Whether the current file still has its name (someone may have removed it, or the whole directory)."""
        assert self._fd is not None and self._path is not None
        if names_inode(self._path, os.fstat(self._fd)):
            return True
        logger.error(
            "llmtrace: spool file %s was removed while this process appended to it; the %d trace(s) in it are lost",
            self._path,
            self._traces,
        )
        self._vanished += self._traces
        self._traces = 0
        return False

    def _cut_back_and_close(self) -> None:
        assert self._fd is not None
        # If even this fails, the torn record stays: readers skip it and resynchronise on the next one.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._path, self._size, self._traces, self._unsynced = None, None, 0, 0, False


@dataclass
class ClaimedFile:
    """A spool file this process holds the lock of, ready to be read and, once replayed, removed.

    Attributes:
        path: The file's path.
        fd: The open file descriptor (read with ``pread``); its lock is released when it is closed.
        header: What the file says about itself.
        records_start: Offset of the first record.
    """

    path: Path
    fd: int
    header: FileHeader
    records_start: int

    def remove(self) -> None:
        """Remove the file (still holding its lock, so no one else can be reading it) and release it."""
        try:
            self.path.unlink(missing_ok=True)
            fsync_directory(self.path.parent)
        finally:
            self.release()

    def release(self) -> None:
        """Release the lock, leaving the file for a later replay."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def scan(directory: Path, *, skip: Path | None = None) -> list[Path]:
    """The ``*.spool`` paths of ``directory``, oldest first (by name: names start with their creation time).

    Also removes temporary files that a process left behind when it died while creating a file.
    """
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    paths = []
    for entry in entries:
        if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
            if skip is None or entry.path != str(skip):
                paths.append(Path(entry.path))
        elif entry.name.endswith(TEMPORARY_SUFFIX):
            _remove_if_stale(Path(entry.path))
    return sorted(paths, key=_age_key)


def _age_key(path: Path) -> tuple[str, str]:
    # Version 2 names start with their creation time in nanoseconds; other names (version 1) sort by their
    # modification time, before them.
    stem = path.name.split("-", 1)[0]
    if len(stem) == 19 and stem.isdigit():
        return ("1", path.name)
    try:
        return ("0", f"{path.stat().st_mtime:020.6f}")
    except OSError:
        return ("0", "")


def _remove_if_stale(path: Path) -> None:
    try:
        fd = open_regular_file(path)
    except (OSError, NotARegularFile):
        return  # not ours to remove (a named pipe, a directory, a symbolic link), or gone
    try:
        if time.time() - os.fstat(fd).st_mtime < STALE_TEMPORARY_SECONDS:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        path.unlink(missing_ok=True)
    except OSError:
        return
    finally:
        os.close(fd)


class NotARegularFile(Exception):  # noqa: N818 (a reason, like NotClaimable)
    """A path in the spool directory that is not a regular file (a directory, a named pipe, a device, a link)."""


def open_regular_file(path: Path) -> int:
    """Open ``path`` for reading without ever blocking, following no link, and only if it is a regular file.

    A named pipe opened for reading would wait until someone opens it for writing (for ever, on the writer's
    thread), and a device may do anything when opened: such paths are checked with ``lstat`` and never opened.
    The open itself is non-blocking, in case the path changed in between, and the open file is checked again.

    Raises:
        NotARegularFile: The path is not a regular file; it was left exactly as it is.
        OSError: The path is gone (``FileNotFoundError``) or could not be opened.
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotARegularFile(_kind_of(mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symbolic link since the lstat
            raise NotARegularFile("a symbolic link, not a spool file") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotARegularFile(_kind_of(mode))
    return fd


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory, not a spool file"
    if stat.S_ISFIFO(mode):
        return "a named pipe, not a spool file"
    if stat.S_ISLNK(mode):
        return "a symbolic link, not a spool file"
    return "not a regular file"


class NotClaimable(Exception):  # noqa: N818 (a reason, not a failure)
    """A ``*.spool`` path that replay must not treat as a spool file of its own (see :func:`claim`).

    Attributes:
        kind: ``"foreign"`` (a directory, or a file that is not a spool file: left exactly as it is),
            ``"empty"`` (a file with no bytes, hence no traces), ``"damaged"`` (a spool file whose header
            cannot be read, so whose destination is unknown) or ``"elsewhere"`` (a spool file of another
            destination, never locked by this claimer).
    """

    def __init__(self, reason: str, *, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


def claim(path: Path, *, destination: str) -> ClaimedFile | None:
    """Lock a spool file of ``destination`` for replay.

    The header is read before the lock is taken (it is complete before a file gets its name), so files of
    other destinations are never locked, and never delay the writers that replay them.

    Returns:
        The claimed file; ``None`` when another process holds it, or it is gone.

    Raises:
        NotClaimable: The path is not a readable spool file, or a spool file of another destination.
        OSError: The file could not be opened or locked for another reason.
    """
    try:
        fd = open_regular_file(path)
    except FileNotFoundError:
        return None
    except NotARegularFile as exc:
        raise NotClaimable(str(exc), kind="foreign") from None
    try:
        opened = os.fstat(fd)
        try:
            header, start = read_file_header(fd)
        except NotASpoolFile as exc:
            kind = "empty" if opened.st_size == 0 else "damaged" if exc.ours else "foreign"
            raise NotClaimable(str(exc), kind=kind) from None
        if header.destination not in (destination, None):
            raise NotClaimable(f"a spool file of {header.destination}", kind="elsewhere")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return None  # its writer is still appending, or another replayer has it
            raise
        if not names_inode(path, opened):
            os.close(fd)
            return None  # replayed and removed by someone else between our open and our lock
        return ClaimedFile(path, fd, header, start)
    except BaseException:
        os.close(fd)
        raise


def names_inode(path: Path, opened: os.stat_result) -> bool:
    """Whether ``path`` still names the file whose ``fstat`` is ``opened``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def fsync_directory(directory: Path) -> None:
    """Make a rename or removal in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


STRIKES_FILE = ".strikes.json"


class StrikeBook:
    """Rejections of spooled records, shared by every process replaying a spool directory.

    ``.strikes.json`` in the spool directory maps ``"<file name>:<offset>"`` to what replay knows about a
    record ClickHouse rejected: how many passes rejected it (``count``), when the last counted one was
    (``last``, Unix time), and whether other inserts to the destination succeeded since its first rejection
    (``confirmed``). Kept in a file, so that writers that live shorter than a few replay intervals (a cron
    job, a crash loop) add up their rejections instead of each starting from zero. Read and rewritten under
    ``flock``; rejections are rare.
    """

    def __init__(self, spool_directory: Path) -> None:
        self.path = spool_directory / STRIKES_FILE

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply ``change`` to the book (a dict, changed in place) and save it; return what ``change`` returned.

        Raises:
            OSError: The book could not be read or written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = read_at(fd, 0, os.fstat(fd).st_size)
            try:
                book = json.loads(data) if data else {}
            except ValueError:
                book = {}
            if not isinstance(book, dict):
                book = {}
            before = json.dumps(book, sort_keys=True)
            result = change(book)
            after = json.dumps(book, sort_keys=True)
            if after != before:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                _write_all(fd, after.encode())
                os.fsync(fd)
            return result
        finally:
            os.close(fd)


class Quarantine:
    """Where replay sets aside what it must not retry forever, each entry with its reason.

    Entries are lines of ``quarantine/quarantine.jsonl`` (appended under ``flock`` and fsynced, so several
    processes can add to it); raw unreadable bytes go to a ``.bin`` file next to it that the entry names.

    Args:
        spool_directory: The spool directory; the quarantine is its ``quarantine/`` subdirectory.
    """

    def __init__(self, spool_directory: Path) -> None:
        self.directory = spool_directory / QUARANTINE_DIRECTORY
        self.path = self.directory / QUARANTINE_FILE

    def add(self, entry: dict[str, Any]) -> None:
        """Append one entry (a JSON object) with the time it was quarantined.

        Raises:
            OSError: It could not be written.
        """
        line = json.dumps({"quarantined_at": datetime.now(UTC).isoformat(), **entry}) + "\n"
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def set_aside_parts(self) -> Iterator[tuple[str, int, str]]:
        """What earlier replays set aside from spool files, as ``(file name, offset, "bytes" | "items")``.

        A file is kept while one of its records waits (the database is down, say), so a later process replays
        it again: these say which of its stretches and items are already in the quarantine. Read a line at a
        time; lines that cannot be read are skipped.
        """
        try:
            handle = open(self.path, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                if '"bytes_file"' not in line and '"items"' not in line:
                    continue  # whole files moved, and traces ClickHouse rejected: nothing to skip
                try:
                    entry = json.loads(line)
                    source, offset = str(entry["source"]), int(entry["offset"])
                except (ValueError, KeyError, TypeError):
                    continue
                if "bytes_file" in entry:
                    yield source, offset, "bytes"
                elif "items" in entry:
                    yield source, offset, "items"

    def add_file(self, path: Path, reason: str) -> bool:
        """Move a whole spool file whose header is damaged into the quarantine, if no one holds it.

        Returns:
            Whether it was moved (``False``: another process holds it, or it is gone).
        """
        try:
            handle = open(open_regular_file(path), "rb")  # noqa: SIM115 (closed below, after the move)
        except (FileNotFoundError, NotARegularFile):
            return False
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if not names_inode(path, os.fstat(handle.fileno())):
                return False
            self.directory.mkdir(parents=True, exist_ok=True)
            target = self.directory / path.name
            os.rename(path, target)
            fsync_directory(path.parent)
            fsync_directory(self.directory)
        self.add({"reason": reason, "source": path.name, "moved_to": target.name})
        return True

    def add_bytes(self, source: ClaimedFile, start: int, end: int, entry: dict[str, Any]) -> None:
        """Copy bytes ``[start, end)`` of a claimed file to a ``.bin`` file and add an entry naming it.

        Copied in chunks: a damaged stretch may be as long as the file.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{source.path.stem}-{start}.bin"
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE), "wb") as out:
            position = start
            while position < end:
                chunk = read_at(source.fd, position, min(end - position, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                position += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        preview = base64.b64encode(read_at(source.fd, start, min(end - start, 48))).decode()
        self.add({**entry, "bytes_file": target.name, "length": end - start, "first_bytes_base64": preview})

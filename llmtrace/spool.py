"""An append-only on-disk spool for batches of traces that could not be written to ClickHouse.

File format (``*.spool`` files in the spool directory), a sequence of records::

    magic  b"LTS1"        4 bytes
    length of payload     4 bytes, unsigned big-endian
    CRC-32 of payload     4 bytes, unsigned big-endian
    payload               JSON: {"traces": [<LLMTrace as JSON>, ...]}

A crash can only tear the last record of a file, because records are only ever appended. A reader stops at
the first record whose header is incomplete, whose length runs past the end of the file, or whose checksum
does not match, and reports it; it never yields a partial batch. Each writer process appends to a file of
its own, named with its pid and a random suffix, so two processes never share one.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from llmtrace.model import LLMTrace

MAGIC = b"LTS1"
HEADER = struct.Struct(">4sII")
SUFFIX = ".spool"


@dataclass(frozen=True)
class TornRecord:
    """A record that could not be read back: where it starts and why."""

    path: Path
    offset: int
    reason: str


@dataclass
class SpoolContents:
    """What :func:`read_spool_file` found: the complete batches, and at most one torn record at the end."""

    batches: list[list[LLMTrace]] = field(default_factory=list)
    torn: TornRecord | None = None


def encode_record(traces: Sequence[LLMTrace]) -> bytes:
    """One spool record holding ``traces``."""
    payload = json.dumps({"traces": [trace.model_dump(mode="json") for trace in traces]}).encode()
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_spool_file(path: Path) -> SpoolContents:
    """Read every complete record of a spool file, stopping at (and reporting) a torn or corrupt one."""
    data = path.read_bytes()
    contents = SpoolContents()
    offset = 0
    while offset < len(data):
        torn = _check_record(path, data, offset)
        if torn is not None:
            contents.torn = torn
            break
        _, length, _ = HEADER.unpack_from(data, offset)
        payload = data[offset + HEADER.size : offset + HEADER.size + length]
        traces = [LLMTrace.model_validate(item) for item in json.loads(payload)["traces"]]
        contents.batches.append(traces)
        offset += HEADER.size + length
    return contents


def _check_record(path: Path, data: bytes, offset: int) -> TornRecord | None:
    if len(data) - offset < HEADER.size:
        return TornRecord(path, offset, f"incomplete header ({len(data) - offset} of {HEADER.size} bytes)")
    magic, length, checksum = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        return TornRecord(path, offset, "not a record header")
    available = len(data) - offset - HEADER.size
    if length > available:
        return TornRecord(path, offset, f"payload cut short ({available} of {length} bytes)")
    if zlib.crc32(data[offset + HEADER.size : offset + HEADER.size + length]) != checksum:
        return TornRecord(path, offset, "checksum mismatch")
    return None


class Spool:
    """A directory of spool files: append batches to this process's file; claim closed files to replay them.

    Each file is held under an exclusive ``flock`` while it is appended to or replayed, so several writer
    processes can share one directory: none replays a file another is still writing or replaying. Not
    thread-safe by itself; :class:`llmtrace.TraceWriter` serialises access.

    Args:
        directory: Where spool files live; created if missing.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._unsynced = False

    def append(self, traces: Sequence[LLMTrace], *, sync: bool = True) -> None:
        """Append one batch.

        The record reaches the operating system before this returns, so it survives the process crashing.
        With ``sync`` (the default) it is also fsynced, so it survives the machine crashing; without, it
        waits for the next :meth:`sync` or :meth:`rotate`, which lets many small appends share one fsync.
        """
        if self._file is None:
            path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{SUFFIX}"
            handle = open(path, "ab")  # noqa: SIM115 (kept open across appends; closed by rotate)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            self._file, self._path = handle, path
        self._file.write(encode_record(traces))
        self._file.flush()
        self._unsynced = True
        if sync:
            self.sync()

    def sync(self) -> None:
        """Fsync what was appended without ``sync``."""
        if self._file is not None and self._unsynced:
            os.fsync(self._file.fileno())
        self._unsynced = False

    def rotate(self) -> None:
        """Close the file being appended to, so that it can be replayed; the next append starts a new one."""
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
            self._path = None

    def claim_closed_files(self) -> Iterator[Path]:
        """Yield the spool files nobody holds, oldest first, each locked for the caller until the next one.

        The caller replays a yielded file and deletes it once every batch in it is stored.
        """
        candidates = sorted(self.directory.glob(f"*{SUFFIX}"), key=_modified_time)
        for path in candidates:
            if path == self._path:
                continue
            try:
                handle = open(path, "rb")  # noqa: SIM115 (held while the caller replays the file)
            except FileNotFoundError:
                continue  # replayed and removed by another process meanwhile
            try:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process is appending to it or replaying it
                if path.exists():
                    yield path
            finally:
                handle.close()


def _modified_time(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0

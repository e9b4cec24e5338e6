"""The spool file format: framed, checksummed records that a reader can resynchronise on after damage.

A spool file (version 2) is a file header followed by records, each in one frame::

    frame    magic                 4 bytes   b"LTS2" for the file header, b"LTR2" for a record
             length of the body    4 bytes   unsigned big-endian
             CRC-32 of the body    4 bytes   unsigned big-endian
             CRC-32 of the above   4 bytes   the 12 bytes before it: a damaged length is never trusted
             body                  length bytes

    file header body   JSON object: {"destination": "<database>.<table>", "pid": ..., "host": ..., "created_at": ...}
    record body        JSON array of traces, each as LLMTrace serialises to JSON

Records are only ever appended, so a crash tears at most the last one. Damage anywhere (a torn tail, a
flipped bit, bytes from elsewhere) costs only the bytes it touches: the reader reports the unreadable span
and goes on at the next frame whose header and body checksums both hold. A record whose checksum holds but
whose contents the current model rejects (a field from a newer version, a negative count, something that is
not a trace) is reported item by item, with the other traces of the record still returned. A record whose
body the decoders cannot handle at all (not JSON, JSON nested too deep, anything that makes them raise) is
reported whole, and reading goes on at the next record.

Version 1 files (magic b"LTS1", written by llmtrace 0.1) have no file header, so no destination, and frames
without a header checksum (``magic, length, CRC-32 of body`` and a body ``{"traces": [...]}``). They are still
read, with the same resynchronisation.

Reading streams the file a frame at a time: memory is bounded by the largest record, not by the file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from llmtrace.model import LLMTrace

FILE_MAGIC = b"LTS2"
RECORD_MAGIC = b"LTR2"
LEGACY_MAGIC = b"LTS1"
FRAME = struct.Struct(">4sIII")
LEGACY_FRAME = struct.Struct(">4sII")
FORMAT_VERSION = 2
# Resynchronisation reads this much at a time while it looks for the next frame.
_SCAN_CHUNK = 1 << 20
_TRACES: TypeAdapter[list[LLMTrace]] = TypeAdapter(list[LLMTrace])
_CUT_SHORT = ("incomplete frame header", "record cut short")


@dataclass(frozen=True)
class FileHeader:
    """What a spool file says about itself.

    Attributes:
        version: 2 for files with a header, 1 for llmtrace 0.1's files.
        destination: ``database.table`` the traces belong to; ``None`` for version 1 files, which predate it.
        pid: The process that wrote the file, when known.
        host: The machine that wrote the file, when known.
    """

    version: int
    destination: str | None
    pid: int | None = None
    host: str | None = None


@dataclass(frozen=True)
class RejectedItem:
    """A readable item of a record that is not a valid trace: its position, its JSON text and why."""

    index: int
    item_json: str
    reason: str


@dataclass(frozen=True)
class Record:
    """One record read back: where it starts and ends, its valid traces and its rejected items.

    When the body is not a JSON array at all, ``traces`` and ``rejected`` are empty and ``body_problem``
    says why; ``body`` then holds the raw bytes for the quarantine.
    """

    offset: int
    end: int
    traces: list[LLMTrace]
    rejected: list[RejectedItem]
    body_problem: str | None = None
    body: bytes = b""


@dataclass(frozen=True)
class BadSpan:
    """Bytes ``[offset, end)`` of a file that hold no readable frame, and why (the first problem found).

    Attributes:
        torn_tail: The span is the end of the file and starts with a frame cut short: what a process killed
            in the middle of an append leaves (damage elsewhere, or a bad checksum, is not a torn tail).
    """

    offset: int
    end: int
    reason: str
    torn_tail: bool = False


class NotASpoolFile(ValueError):  # noqa: N818 (a reason, as raised by read_file_header)
    """The file does not start with a readable spool file header.

    Attributes:
        ours: The file starts with the spool header's magic, but the header is damaged.
    """

    def __init__(self, reason: str, *, ours: bool = False) -> None:
        super().__init__(reason)
        self.ours = ours


def encode_file_header(destination: str) -> bytes:
    """The header frame that starts every version 2 spool file."""
    body = json.dumps(
        {"destination": destination, "pid": os.getpid(), "host": os.uname().nodename, "format": FORMAT_VERSION}
    ).encode()
    return _frame(FILE_MAGIC, body)


def encode_record(traces: Sequence[LLMTrace]) -> bytes:
    """One record frame holding ``traces``."""
    # pydantic-core serialises the whole list in Rust: three times faster than model_dump + json.dumps.
    return _frame(RECORD_MAGIC, _TRACES.dump_json(list(traces)))


def _frame(magic: bytes, body: bytes) -> bytes:
    start = struct.pack(">4sII", magic, len(body), zlib.crc32(body))
    return start + struct.pack(">I", zlib.crc32(start)) + body


def read_file_header(fd: int) -> tuple[FileHeader, int]:
    """Read the header at the start of an open spool file (a file descriptor: reads never move its offset).

    Returns:
        The header and the offset of the first record.

    Raises:
        NotASpoolFile: The file is empty, or starts with something else than a spool header.
    """
    start = read_at(fd, 0, FRAME.size)
    if start[:4] == LEGACY_MAGIC:
        return FileHeader(version=1, destination=None), 0
    if len(start) == 0:
        raise NotASpoolFile("empty file")
    if start[:4] != FILE_MAGIC:
        raise NotASpoolFile(f"does not start with a spool header (first bytes {start[:4]!r})")
    body = _checked_body(fd, 0, start, os.fstat(fd).st_size, FILE_MAGIC)
    if isinstance(body, str):
        raise NotASpoolFile(f"damaged spool header: {body}", ours=True)
    try:
        fields = json.loads(body)
        destination = str(fields["destination"])
        header = FileHeader(FORMAT_VERSION, destination, pid=fields.get("pid"), host=fields.get("host"))
        return header, FRAME.size + len(body)
    except (ValueError, KeyError, TypeError) as exc:
        raise NotASpoolFile(f"unreadable spool header: {exc}", ours=True) from exc


def read_records(fd: int, header: FileHeader, start: int) -> Generator[Record | BadSpan, None, None]:
    """Yield every record of an open spool file from ``start``, and a :class:`BadSpan` for each damaged stretch.

    Memory is bounded by the largest record. Reads are positioned (``pread``), so other readers of the same
    descriptor (the quarantine copying a damaged stretch) do not disturb this one. The file must not grow
    while it is read (spool files are only read once their writer has let go of them).
    """
    size = os.fstat(fd).st_size
    position = start
    while position < size:
        found = _frame_at(fd, position, size, header.version)
        if isinstance(found, str):
            resume = _next_frame(fd, position + 1, size, header.version)
            torn = resume == size and found.startswith(_CUT_SHORT)
            yield BadSpan(position, resume, found, torn_tail=torn)
            position = resume
            continue
        end = position + _frame_size(header.version) + len(found)
        yield _decode_record_safely(found, header.version, position, end)
        position = end


def read_at(fd: int, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
        length -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _decode_record_safely(body: bytes, version: int, offset: int, end: int) -> Record:
    """Decode a record whose frame is sound; whatever its body does to the decoder, the record is reported.

    A body can make the decoders raise more than their own errors: JSON nested deeper than the recursion limit
    raises ``RecursionError``, and a bug or an odd value in the model may raise anything. Such a record is
    returned with a ``body_problem`` (so it is set aside like unreadable bytes), and reading goes on with the
    next record: an exception escaping this generator would end it, and so the whole file. ``MemoryError`` is
    the exception: it says nothing about the record, so it propagates and the file is read again later.
    """
    try:
        return _decode_record(body, version, offset, end)
    except MemoryError:
        raise
    except Exception as exc:
        problem = f"the record cannot be decoded ({type(exc).__name__}: {str(exc)[:200]})"
        return Record(offset, end, [], [], body_problem=problem, body=body)


def _decode_record(body: bytes, version: int, offset: int, end: int) -> Record:
    if version == FORMAT_VERSION:
        try:
            return Record(offset, end, _TRACES.validate_json(body), [])
        except ValidationError:
            pass  # find out which items are bad, below
    try:
        items = json.loads(body)
    except ValueError as exc:
        return Record(offset, end, [], [], body_problem=f"the record is not JSON ({exc})", body=body)
    if version == 1:
        items = items.get("traces") if isinstance(items, dict) else None
    if not isinstance(items, list):
        return Record(offset, end, [], [], body_problem="the record is not a list of traces", body=body)
    traces: list[LLMTrace] = []
    rejected: list[RejectedItem] = []
    for index, item in enumerate(items):
        try:
            traces.append(LLMTrace.model_validate(_require_object(item)))
        except MemoryError:
            raise
        except Exception as exc:  # ValidationError, TypeError, or anything else an odd item makes the model raise
            rejected.append(RejectedItem(index, json.dumps(item), _reason(exc)))
    return Record(offset, end, traces, rejected)


def _require_object(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise TypeError(f"the item is a JSON {type(item).__name__}, not an object")
    return item


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or '(item)'}: {error['msg']}" for error in exc.errors()
        ]
        return "rejected by the trace model: " + "; ".join(problems)
    if isinstance(exc, TypeError):
        return str(exc)
    return f"rejected by the trace model: {type(exc).__name__}: {exc}"


def _frame_size(version: int) -> int:
    return FRAME.size if version == FORMAT_VERSION else LEGACY_FRAME.size


def _frame_at(fd: int, position: int, size: int, version: int) -> bytes | str:
    """The body of the valid record frame at ``position``, or why there is none."""
    start = read_at(fd, position, _frame_size(version))
    magic = RECORD_MAGIC if version == FORMAT_VERSION else LEGACY_MAGIC
    return _checked_body(fd, position, start, size, magic)


def _checked_body(fd: int, position: int, start: bytes, size: int, magic: bytes) -> bytes | str:
    legacy = magic == LEGACY_MAGIC
    frame = LEGACY_FRAME if legacy else FRAME
    if len(start) < frame.size:
        return f"incomplete frame header ({len(start)} of {frame.size} bytes) at the end of the file"
    if legacy:
        found, length, checksum = LEGACY_FRAME.unpack(start)
    else:
        found, length, checksum, header_checksum = FRAME.unpack(start)
        if found == magic and zlib.crc32(start[:12]) != header_checksum:
            return "damaged frame header (checksum mismatch)"
    if found != magic:
        return "not a frame header"
    available = size - position - frame.size
    if length > available:
        return f"record cut short ({available} of {length} bytes)"
    body = read_at(fd, position + frame.size, length)
    if len(body) < length:
        return f"record cut short ({len(body)} of {length} bytes)"
    if zlib.crc32(body) != checksum:
        return "checksum mismatch"
    return body


def _next_frame(fd: int, position: int, size: int, version: int) -> int:
    """Offset of the first valid record frame at or after ``position`` (``size`` when there is none)."""
    magic = RECORD_MAGIC if version == FORMAT_VERSION else LEGACY_MAGIC
    while position < size:
        chunk = read_at(fd, position, _SCAN_CHUNK)
        found = chunk.find(magic)
        while found != -1:
            if not isinstance(_frame_at(fd, position + found, size, version), str):
                return position + found
            found = chunk.find(magic, found + 1)
        # The last bytes may hold the start of a magic that the next chunk completes.
        position += max(1, len(chunk) - len(magic) + 1)
    return size

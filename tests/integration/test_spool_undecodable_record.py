"""A spool record whose decoding raises (not only the format's own errors) is set aside, and blocks nothing.

A record with a valid frame and checksum whose body is JSON nested deeper than Python's recursion limit makes
``json.loads`` raise RecursionError inside the reader. The record is moved to the quarantine like any other
unreadable record, counted once, and the spool files behind it are replayed.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

from sqlalchemy import Engine

from llmtrace import TraceRepository, TraceWriter
from llmtrace.spool import Spool
from llmtrace.spool_format import RECORD_MAGIC, encode_file_header
from tests.writer_support import stored, traces


def frame(magic: bytes, body: bytes) -> bytes:
    start = struct.pack(">4sII", magic, len(body), zlib.crc32(body))
    return start + struct.pack(">I", zlib.crc32(start)) + body


def test_a_deeply_nested_record_does_not_block_later_spool_files(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = TraceRepository(migrated_engine)
    # The oldest file (names sort by their leading nanosecond timestamp): one checksummed record, nested JSON.
    nested = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / f"{1:019d}-1-000000000000.spool").write_bytes(
        encode_file_header(repository.destination) + frame(RECORD_MAGIC, nested)
    )
    spool = Spool(tmp_path, destination=repository.destination)
    spool.append(traces(5))
    spool.rotate()

    writer = TraceWriter(repository, spool_dir=tmp_path, replay_interval=0.3)
    deadline = time.monotonic() + 10
    while stored(migrated_engine)[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = writer.close(timeout=10)
    assert stored(migrated_engine) == (5, 5), stats.last_error
    assert stats.unreadable == 1  # the nested record is set aside, counted once
    assert stats.errors == 0, stats.last_error

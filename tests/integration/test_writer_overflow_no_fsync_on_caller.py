"""With overflow="spool", submit() never fsyncs on the caller's thread (nor on AsyncTraceWriter's event loop).

A submit that fills an overflow record appends it to the spool's current file without an fsync. When that would
need a new file (the first record, or a rotation at max_spool_file_bytes), which fsyncs the file and the
directory, the record is handed to the writer's thread instead.

os.fsync is wrapped only to note which thread calls it (the real fsync still runs); the database is a real client
against a port where nothing listens.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from llmtrace import TraceWriter
from llmtrace.writer import OVERFLOW_RECORD_TRACES
from tests.writer_support import refused_repository, traces


def test_overflow_submits_do_no_fsync_on_the_callers_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    callers: list[str] = []
    real_fsync = os.fsync

    def noting_fsync(fd: int) -> None:
        callers.append(threading.current_thread().name)
        real_fsync(fd)

    writer = TraceWriter(
        refused_repository("writer_overflow"),
        overflow="spool",
        spool_dir=tmp_path,
        max_queue=1,
        batch_size=1000,
        flush_interval=30.0,  # the writer's thread leaves the buffer alone: every further submit overflows
        replay_interval=3600.0,
        max_spool_file_bytes=64 * 1024,  # rotation after a few records, as a long outage does at 64 MiB
    )
    try:
        monkeypatch.setattr(os, "fsync", noting_fsync)
        for trace in traces(1 + 8 * OVERFLOW_RECORD_TRACES):
            writer.submit(trace)
        on_caller = callers.count(threading.current_thread().name)
        monkeypatch.setattr(os, "fsync", real_fsync)
    finally:
        stats = writer.close(timeout=10)
    assert stats.spooled >= 8 * OVERFLOW_RECORD_TRACES
    assert on_caller == 0, f"{on_caller} fsync(s) ran on the thread calling submit()"

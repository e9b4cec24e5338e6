"""A named pipe called ``*.spool`` in the spool directory is left alone, and does not stop the writer.

Opening a FIFO for reading waits until someone opens it for writing; replay checks a path with ``lstat`` before
opening it, so the writer's thread never opens the pipe, and batches keep flowing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sqlalchemy import Engine

from llmtrace import TraceRepository, TraceWriter
from tests.writer_support import stored, traces


def test_a_named_pipe_in_the_spool_directory_is_left_alone(migrated_engine: Engine, tmp_path: Path) -> None:
    fifo = tmp_path / "someone-elses-pipe.spool"
    os.mkfifo(fifo)
    writer = TraceWriter(TraceRepository(migrated_engine), spool_dir=tmp_path, flush_interval=0.05)
    try:
        for trace in traces(10):
            writer.submit(trace)
        flushed = writer.flush(timeout=10)
        writer.close(timeout=5)
    finally:
        # Release a thread stuck in open(): opening the write end lets the reader's open() return.
        with contextlib.suppress(OSError):  # nobody was waiting on it
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert flushed, "the writer's thread is stuck opening the named pipe"
    assert stored(migrated_engine) == (10, 10)

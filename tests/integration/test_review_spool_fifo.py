"""Review: a named pipe called ``*.spool`` in the spool directory stops the writer for good.

claim() opens every ``*.spool`` path with a blocking os.open() before it checks that the path is a regular file.
Opening a FIFO for reading waits until someone opens it for writing, so the writer's thread, doing its start-up
replay, blocks there for ever: no batch is written again, flush() never completes, and with the default overflow
policy submit() eventually blocks the caller too. The README promises that a ``*.spool`` path that is not a spool
file is left alone with one warning, and that nothing stops the writer's thread. (The same holds for a FIFO named
``.*.spool.tmp``, which the stale-temporary clean-up opens the same way.)
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

"""During an outage with a spool, batches go to the spool without a retry cycle each, and submit() does not block.

Once a batch exhausted its retries against a dead destination, the writer stops retrying each following batch
(which cost ~6 s per batch at the default backoff, or 6 x send_receive_timeout against a server that never
answers): batches are spooled at once, a full buffer spools instead of blocking submit(), and one write attempt is
made every ``max_backoff`` seconds. The accounting identity holds throughout, and replay stores every trace once.

Here (all defaults except a smaller buffer and batch): 2,000 traces into a writer whose server refuses connections.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine

from llmtrace import TraceRepository, TraceWriter, WriterClosed
from llmtrace.spool import SUFFIX
from tests.writer_support import (
    balanced,
    database_of,
    ids,
    refused_repository,
    stored,
    stored_ids,
    traces,
    wait_until,
)


def test_an_outage_with_a_spool_does_not_block_submit(migrated_engine: Engine, tmp_path: Path) -> None:
    down = refused_repository(database_of(migrated_engine))
    writer = TraceWriter(down, spool_dir=tmp_path, batch_size=100, max_queue=500)
    items = traces(2000)
    submitted = [0]

    def submit_all() -> None:
        for trace in items:
            try:
                writer.submit(trace)
            except WriterClosed:
                return  # close() below woke it
            submitted[0] += 1

    submitter = threading.Thread(target=submit_all, daemon=True)
    submitter.start()
    submitter.join(20)
    blocked = submitter.is_alive()
    stats = writer.close(timeout=10)  # also wakes a blocked submit (WriterClosed)
    assert not blocked, f"submit() still blocked after 20 s: {submitted[0]} of 2000 accepted, {stats.spooled} spooled"
    assert balanced(stats) and (stats.submitted, stats.spooled, stats.lost, stats.pending) == (2000, 2000, 0, 0)
    # Retries for the first batch only: the breaker spooled the others at once (probes are single attempts).
    assert stats.retried <= 5 + 2, stats

    with TraceWriter(TraceRepository(migrated_engine), spool_dir=tmp_path):
        wait_until(lambda: not list(tmp_path.glob(f"*{SUFFIX}")))
    assert stored(migrated_engine) == (2000, 2000)
    assert stored_ids(migrated_engine) == ids(items)


def test_the_writer_writes_and_retries_as_usual_once_the_database_answers(
    migrated_engine: Engine, tmp_path: Path
) -> None:
    # An outage first (the breaker opens), then the same writer's repository points at a working database.
    writer = TraceWriter(
        refused_repository(database_of(migrated_engine)),
        spool_dir=tmp_path,
        batch_size=10,
        flush_interval=0.01,
        max_retries=1,
        retry_backoff=0.01,
        max_backoff=0.2,
        replay_interval=0.1,
    )
    for trace in traces(50):
        writer.submit(trace)
    assert writer.flush(timeout=30)
    assert writer._outage
    writer.repository = TraceRepository(migrated_engine)
    assert writer._replayer is not None
    writer._replayer.repository = writer.repository
    wait_until(lambda: stored(migrated_engine)[0] == 50)  # a replay pass succeeds: the breaker closes
    for trace in traces(50, start=50):
        writer.submit(trace)
    assert writer.flush(timeout=30)
    stats = writer.close(timeout=10)
    assert not writer._outage
    assert balanced(stats) and (stats.spooled, stats.written, stats.lost) == (50, 50, 0)
    assert stored(migrated_engine) == (100, 100)

"""A record ClickHouse always rejects is quarantined even by writers that each live less than two intervals.

The rejections of a record are counted in a file every replaying process shares, at most once per
replay_interval, together with whether other inserts succeeded since the first one. A process that lives less than
two intervals (a cron job, a serverless function, a crash-looping service) adds its rejection to the earlier
ones', so the record is set aside after three, instead of being retried at every start for ever.

Here: a constraint makes ClickHouse reject one trace; six short-lived writers each replay the spool (the record is
rejected on each of their passes) while writing other traces successfully.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine, text

from llmtrace import TraceRepository, TraceWriter
from llmtrace.spool import Spool
from tests.factories import make_trace
from tests.spool_files import quarantine_entries
from tests.writer_support import traces


def test_a_poison_record_is_quarantined_after_repeated_rejections_across_restarts(
    migrated_engine: Engine, tmp_path: Path
) -> None:
    with migrated_engine.connect() as connection:
        connection.execute(text("ALTER TABLE llm_traces ADD CONSTRAINT no_poison CHECK latency_ms != 4242"))
    repository = TraceRepository(migrated_engine)
    spool = Spool(tmp_path, destination=repository.destination)
    spool.append([make_trace(9999, latency_ms=4242)])
    spool.rotate()

    for start in range(6):  # six processes' lifetimes, each rejecting the record on its start-up pass
        writer = TraceWriter(repository, spool_dir=tmp_path, replay_interval=1.0, flush_interval=0.05)
        for trace in traces(5, start=start * 10):  # the destination accepts other inserts meanwhile
            writer.submit(trace)
        assert writer.flush(timeout=10)
        time.sleep(0.5)
        writer.close(timeout=10)
    rejected = [entry for entry in quarantine_entries(tmp_path) if "traces" in entry]
    assert len(rejected) == 1, "rejected 6 times with other inserts succeeding, still retried at every start"

"""The writer's accounting identity, checked at random moments while threads submit and the table comes and goes.

The fault is real: the table is renamed away and back while the writer works, so inserts (and the
stored-trace lookups before them) fail with the engine's own "unknown table" error at unpredictable points.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from llmtrace import TraceRepository, TraceWriter, WriterQueueFull, WriterStats
from llmtrace.spool import SUFFIX
from tests.spool_files import quarantine_entries
from tests.writer_support import balanced, stored, stored_ids, traces, wait_until

SUBMITTERS = 4
PER_SUBMITTER = 600


class TableFlapper:
    """Renames the traces table away and back at random intervals until stopped."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.outages = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with self.engine.connect() as connection:
            while not self.stop.wait(self.rng.uniform(0.02, 0.08)):
                connection.execute(text("RENAME TABLE llm_traces TO llm_traces_away"))
                self.outages += 1
                time.sleep(self.rng.uniform(0.02, 0.08))
                connection.execute(text("RENAME TABLE llm_traces_away TO llm_traces"))

    def __enter__(self) -> TableFlapper:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize(
    ("policy", "options"),
    [
        ("spool", {"overflow": "spool", "max_queue": 100}),
        ("block", {"overflow": "block", "max_queue": 100, "submit_timeout": 0.05}),
        ("drop_oldest", {"overflow": "drop_oldest", "max_queue": 200}),
    ],
)
def test_every_trace_is_accounted_for_at_every_moment(
    migrated_engine: Engine, tmp_path: Path, policy: str, options: dict[str, Any]
) -> None:
    spool_dir = tmp_path if policy != "drop_oldest" else None
    writer = TraceWriter(
        TraceRepository(migrated_engine),
        batch_size=50,
        flush_interval=0.01,
        spool_dir=spool_dir,
        max_retries=1,
        retry_backoff=0.005,
        replay_interval=1.0,
        **options,
    )
    accepted: list[list[str]] = [[] for _ in range(SUBMITTERS)]
    refused: list[int] = [0] * SUBMITTERS
    snapshots: list[WriterStats] = []
    done = threading.Event()

    def submit(number: int) -> None:
        rng = random.Random(number)
        for index, trace in enumerate(traces(PER_SUBMITTER, start=number * 10_000)):
            if index % 50 == 49:
                time.sleep(rng.uniform(0.05, 0.15))  # bursts of 50 per thread, for about 1.2 s in all
            try:
                writer.submit(trace)
            except WriterQueueFull:
                refused[number] += 1  # not accepted, hence not counted as submitted
                continue
            accepted[number].append(trace.id)

    def sample() -> None:
        rng = random.Random(3)
        while not done.is_set():
            snapshots.append(writer.stats)
            time.sleep(rng.uniform(0, 0.005))

    with TableFlapper(migrated_engine, seed=hash(policy) % 1000) as flapper:
        sampler = threading.Thread(target=sample)
        sampler.start()
        submitters = [threading.Thread(target=submit, args=(number,)) for number in range(SUBMITTERS)]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join()
        writer.flush(timeout=30)
        done.set()
        sampler.join()
    assert flapper.outages > 0 and len(snapshots) > 50
    unbalanced = [stats for stats in snapshots if not balanced(stats)]
    assert unbalanced == []
    assert all(later.submitted >= earlier.submitted for earlier, later in itertools.pairwise(snapshots))

    final = writer.close(timeout=30)
    all_accepted = sorted(trace_id for part in accepted for trace_id in part)
    assert balanced(final) and final.pending == 0 and final.submitted == len(all_accepted)
    assert final.submitted + sum(refused) == SUBMITTERS * PER_SUBMITTER
    if spool_dir is None:
        # Without a spool, what failed or was dropped is lost: what is stored is what was written, plus at most
        # the unconfirmed batches (sent, but the table was away whenever their storing was read back).
        rows, distinct = stored(migrated_engine)
        assert rows == distinct and final.written <= rows <= final.written + final.unconfirmed
        return
    assert final.lost == 0
    with TraceWriter(TraceRepository(migrated_engine), spool_dir=spool_dir):
        wait_until(lambda: not list(spool_dir.glob(f"*{SUFFIX}")))
    assert quarantine_entries(spool_dir) == []  # a table that comes and goes is never taken for bad records
    assert stored(migrated_engine) == (len(all_accepted), len(all_accepted))
    assert stored_ids(migrated_engine) == all_accepted

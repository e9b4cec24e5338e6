"""TraceWriter against a ClickHouse server that cannot be reached (a refused port, the real HTTP client).

Each test then brings "the server back" as the embedded engine's database of the same name (spool files are
tagged with ``database.table``), and checks that replay stores every spooled trace exactly once.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from llmtrace import TraceRepository, TraceWriter, WriterEvent, WriterStopped
from llmtrace.spool import SUFFIX, Spool
from tests.factories import make_trace
from tests.spool_files import quarantine_entries, spooled_traces
from tests.writer_support import (
    balanced,
    database_of,
    finishes,
    ids,
    refused_repository,
    stored,
    stored_ids,
    traces,
    wait_until,
)


def replay_all(engine: Engine, spool_dir: Path) -> None:
    """Replay every spool file of ``spool_dir`` into ``engine``'s database with a fresh writer."""
    with TraceWriter(TraceRepository(engine), spool_dir=spool_dir):
        wait_until(lambda: not list(spool_dir.glob(f"*{SUFFIX}")))


def test_a_restart_in_an_outage_with_a_full_spool_loses_nothing(migrated_engine: Engine, tmp_path: Path) -> None:
    down = refused_repository(database_of(migrated_engine))
    earlier = Spool(tmp_path, destination=down.destination)  # batches an earlier run could not write
    earlier.append(traces(25))
    earlier.append(traces(25, start=25))
    earlier.rotate()

    events: list[WriterEvent] = []
    writer = TraceWriter(
        down,
        batch_size=20,
        flush_interval=0.02,
        spool_dir=tmp_path,
        max_retries=1,
        retry_backoff=0.01,
        replay_interval=0.05,
        on_error=events.append,
    )
    for trace in traces(100, start=100):
        writer.submit(trace)
        assert balanced(writer.stats)
    assert writer.flush(timeout=30)
    # Start-up replay and the idle replays after it (every 50 ms) all fail; the thread lives through them.
    # Enough passes for each record to be rejected on several: an outage must not make them look poisoned.
    wait_until(lambda: sum(event.kind == "replay_failed" for event in events) >= 20)
    assert writer._thread.is_alive()
    stats = writer.stats
    assert balanced(stats) and (stats.spooled, stats.lost, stats.pending, stats.replayed) == (100, 0, 0, 0)
    assert stats.last_error is not None and "127.0.0.1" in stats.last_error
    final = writer.close(timeout=10)
    assert balanced(final) and final.spooled == 100 and final.lost == 0
    assert ids(spooled_traces(tmp_path)) == ids(traces(50) + traces(100, start=100))
    assert quarantine_entries(tmp_path) == []  # an outage is never taken for bad records

    replay_all(migrated_engine, tmp_path)
    assert stored(migrated_engine) == (150, 150)
    assert stored_ids(migrated_engine) == ids(traces(50) + traces(100, start=100))


def test_the_spool_directory_removed_while_spooling(migrated_engine: Engine, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    events: list[WriterEvent] = []
    writer = TraceWriter(
        refused_repository(database_of(migrated_engine)),
        batch_size=10,
        flush_interval=0.02,
        spool_dir=spool_dir,
        max_retries=0,
        on_error=events.append,
    )
    for trace in traces(30):
        writer.submit(trace)
    assert writer.flush(timeout=30) and writer.stats.spooled == 30
    shutil.rmtree(spool_dir)
    for trace in traces(30, start=30):
        writer.submit(trace)
    assert writer.flush(timeout=30)
    assert writer._thread.is_alive()
    final = writer.close(timeout=10)
    # The 30 traces of the removed file are reported lost; the directory was made again for the next 30.
    assert balanced(final) and (final.spooled, final.failed) == (30, 30)
    assert [event.count for event in events if event.kind == "spool_lost"] == [30]
    assert ids(spooled_traces(spool_dir)) == ids(traces(30, start=30))

    replay_all(migrated_engine, spool_dir)
    assert stored_ids(migrated_engine) == ids(traces(30, start=30))


def test_a_stopped_thread_refuses_at_once_and_its_buffer_is_saved(migrated_engine: Engine, tmp_path: Path) -> None:
    def stop_the_thread(event: WriterEvent) -> None:
        if event.kind == "spooled":
            raise SystemExit("a callback that ends the thread")  # not an Exception: nothing may catch it

    writer = TraceWriter(
        refused_repository(database_of(migrated_engine)),
        batch_size=10,
        flush_interval=60,
        spool_dir=tmp_path,
        max_retries=0,
        on_error=stop_the_thread,
    )
    for trace in traces(55):
        writer.submit(trace)
    wait_until(lambda: not writer._thread.is_alive())
    started = time.monotonic()
    with pytest.raises(WriterStopped, match="thread stopped on an unexpected error"):
        writer.submit(make_trace(99))
    assert time.monotonic() - started < 1  # raised at once, not after waiting for room
    assert finishes(writer.flush)  # no timeout, and still no hang
    final = writer.close()
    # The first batch was spooled before the callback stopped the thread; the other 45 when it stopped.
    assert balanced(final) and (final.submitted, final.spooled, final.lost, final.pending) == (55, 55, 0, 0)
    replay_all(migrated_engine, tmp_path)
    assert stored_ids(migrated_engine) == ids(traces(55))


def test_changing_a_trace_after_submit_does_not_change_what_is_written(migrated_engine: Engine) -> None:
    template = make_trace(0)
    with TraceWriter(TraceRepository(migrated_engine), batch_size=1_000, flush_interval=60) as writer:
        for index in range(100):
            template.id = make_trace(index).id  # the caller reuses one object as a template
            template.prompt_tokens = index
            template.agent_tags.append(f"tag-{index}")
            writer.submit(template)
    assert stored(migrated_engine) == (100, 100)
    repository = TraceRepository(migrated_engine)
    for index in (0, 42, 99):
        trace = repository.get("org-1", make_trace(index).id)
        assert trace.prompt_tokens == index
        assert trace.agent_tags == [*make_trace(0).agent_tags, *(f"tag-{i}" for i in range(index + 1))]


def test_submitters_never_see_an_exception_from_an_unreachable_server(migrated_engine: Engine, tmp_path: Path) -> None:
    writer = TraceWriter(
        refused_repository(database_of(migrated_engine)),
        batch_size=7,
        flush_interval=0.01,
        max_queue=20,
        overflow="spool",
        spool_dir=tmp_path,
        max_retries=2,
        retry_backoff=0.001,
        replay_interval=0.02,
    )
    errors: list[BaseException] = []

    def submit(start: int) -> None:
        try:
            for trace in traces(250, start=start):
                writer.submit(trace)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(start,)) for start in (0, 1_000, 2_000, 3_000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = writer.close(timeout=30)
    assert errors == []
    assert balanced(final) and (final.submitted, final.spooled, final.lost) == (1_000, 1_000, 0)
    replay_all(migrated_engine, tmp_path)
    assert stored(migrated_engine) == (1_000, 1_000)

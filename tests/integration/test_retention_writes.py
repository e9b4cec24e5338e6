"""add_many under a retention: traces past the row retention are refused, traces past the payload retention are
stored and read back as ClickHouse keeps them, and live batches pay nothing for the check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from llmtrace import LLMTrace, Retention, TraceRepository, TraceValidationError, TraceWriter, ingest, set_retention
from tests.factories import make_trace
from tests.integration.test_retention import PAYLOADS, scalar, stored_ids, wait_until
from tests.spool_files import quarantine_entries


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    return TraceRepository(migrated_engine)


def test_expired_traces_are_refused_and_nothing_of_a_list_is_written(
    migrated_engine: Engine, repository: TraceRepository
) -> None:
    set_retention(migrated_engine, rows_days=30, payload_days=7)
    now = datetime.now(UTC)
    batch = [
        make_trace(0, created_at=now - timedelta(days=1)),
        make_trace(1, created_at=now - timedelta(days=31)),
        make_trace(2, created_at=now - timedelta(days=10)),
        make_trace(3, created_at=now - timedelta(days=30, minutes=-5)),  # expires within the safety margin
    ]
    with pytest.raises(TraceValidationError) as raised:
        repository.add_many(batch)
    assert [(index, field) for index, field, _ in raised.value.problems] == [(1, "created_at"), (3, "created_at")]
    assert "row retention of 30 day(s)" in str(raised.value)
    assert stored_ids(migrated_engine) == set()

    # Past the payload retention only: stored, counted, and its payloads emptied at the next merge.
    assert repository.add_many([batch[0], batch[2]]) == 2
    wait_until(
        lambda: scalar(migrated_engine, "SELECT countIf(request_json = '') FROM llm_traces") == 1,
        "the payloads of the 10-day-old trace emptied",
    )
    stored = repository.get("org-1", batch[2].id)
    assert stored == batch[2].model_copy(update=dict.fromkeys(PAYLOADS, ""))
    assert stored.request_size_bytes == batch[2].request_size_bytes > 0
    assert repository.add_many([batch[0], batch[2]]) == 0  # stored copies are still recognised


def test_a_generator_stops_at_the_batch_holding_an_expired_trace(
    migrated_engine: Engine, repository: TraceRepository
) -> None:
    set_retention(migrated_engine, rows_days=30, payload_days=None)
    now = datetime.now(UTC)
    ages = [timedelta(days=2)] * 4 + [timedelta(days=2), timedelta(days=45)]
    traces = (make_trace(index, created_at=now - age) for index, age in enumerate(ages))
    with pytest.raises(TraceValidationError) as raised:
        repository.add_many(traces, batch_size=2)
    assert [index for index, _, _ in raised.value.problems] == [5]
    assert any("4 trace(s) from earlier batches" in note for note in raised.value.__notes__)
    assert len(stored_ids(migrated_engine)) == 4


def test_live_batches_do_not_read_the_retention(
    migrated_engine: Engine, repository: TraceRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_retention(migrated_engine, rows_days=1, payload_days=None)
    reads: list[str] = []
    original = ingest.read_row_retention

    def counted(client: object, table: str) -> tuple[Retention, datetime]:
        reads.append(table)
        return original(client, table)

    monkeypatch.setattr(ingest, "read_row_retention", counted)
    now = datetime.now(UTC)
    assert repository.add_many([make_trace(i, created_at=now - timedelta(hours=11)) for i in range(3)]) == 3
    assert reads == []
    # Older batches read it once per call, however many batches there are.
    older = [make_trace(10 + i, created_at=now - timedelta(hours=20)) for i in range(6)]
    assert repository.add_many(older, batch_size=2) == 6
    assert reads == ["llm_traces"]


def test_a_naive_created_at_is_compared_as_utc(migrated_engine: Engine) -> None:
    set_retention(migrated_engine, rows_days=5, payload_days=None)
    naive = (datetime.now(UTC) - timedelta(days=6)).replace(tzinfo=None)
    trace = LLMTrace.model_validate({**make_trace(0).model_dump(), "created_at": naive})
    with pytest.raises(TraceValidationError, match="row retention of 5 day"):
        TraceRepository(migrated_engine).add(trace)


def test_a_writer_stores_the_rest_of_a_batch_and_quarantines_its_expired_traces(
    migrated_engine: Engine, repository: TraceRepository, tmp_path: Path
) -> None:
    set_retention(migrated_engine, rows_days=30, payload_days=None)
    now = datetime.now(UTC)
    live = [make_trace(index, created_at=now - timedelta(minutes=index)) for index in range(8)]
    expired = make_trace(99, created_at=now - timedelta(days=40))
    writer = TraceWriter(repository, batch_size=6, flush_interval=0.05, spool_dir=tmp_path, replay_interval=0.1)
    for trace in [*live[:3], expired, *live[3:5]]:
        writer.submit(trace)
    # The batch is refused whole and spooled; replay sets the expired trace aside once it keeps being refused while
    # other writes succeed (a refusal alone could be a broken database).
    wait_until(lambda: writer.stats.spooled == 6, "the refused batch spooled")
    for trace in live[5:]:
        writer.submit(trace)
    wait_until(lambda: writer.stats.quarantined == 1, "the expired trace quarantined")
    final = writer.close(timeout=10)
    assert stored_ids(migrated_engine) == {trace.id for trace in live}
    assert (final.written, final.spooled, final.replayed, final.quarantined, final.lost) == (3, 6, 5, 1, 0)
    (entry,) = quarantine_entries(tmp_path)
    assert "row retention of 30 day(s)" in entry["reason"]
    assert [trace["id"] for trace in entry["traces"]] == [expired.id]

"""The rollups keep the traces' row retention, whichever way the database got there: migrations run after the
retention was set, and no retention of a rollup's own that would drop days the reports still count. Reports from
every source start at the same whole day the retention keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

import llmtrace.repository as repository_module
from llmtrace import ALL_ORGANIZATIONS, TraceRepository
from llmtrace.migrations import downgrade, upgrade
from llmtrace.retention import Retention, get_retention, set_retention
from llmtrace.rollup import ROLLUPS, Rollup
from llmtrace.synthetic import synthetic_traces
from tests.factories import make_trace


@pytest.mark.parametrize("before", ["0004", "0005"])
def test_migrations_give_the_rollups_the_traces_row_retention(engine: Engine, before: str) -> None:
    upgrade(engine, before)
    set_retention(engine, rows_days=30, payload_days=None)
    upgrade(engine)
    for rollup in ROLLUPS:
        assert get_retention(engine, table=rollup.table).rows_days == 30, rollup.name
    # Down and up again: the daily rollup is created anew, with the retention the traces have then.
    downgrade(engine, "0005")
    set_retention(engine, rows_days=40, payload_days=None)
    upgrade(engine)
    for rollup in ROLLUPS:
        assert get_retention(engine, table=rollup.table).rows_days == 40, rollup.name


@pytest.mark.parametrize("rollup", ROLLUPS, ids=lambda rollup: rollup.name)
def test_a_rollup_takes_no_retention_of_its_own(migrated_engine: Engine, rollup: Rollup) -> None:
    """A shorter retention on a rollup would drop days every report still counts from the traces."""
    now = datetime.now(UTC)
    repository = TraceRepository(migrated_engine)
    repository.add_many(synthetic_traces(200, organizations=2, end=now, span=timedelta(days=20), seed=4))
    table = rollup.table
    with pytest.raises(ValueError, match=f"{table} keeps the row retention of llm_traces"):
        set_retention(migrated_engine, rows_days=5, payload_days=None, table=table)
    assert get_retention(migrated_engine, table=table).rows_days is None
    report = {"group_by": ("model",), "percentiles": "approximate"}
    raw = repository.usage(ALL_ORGANIZATIONS, source="raw", **report)
    assert [row.requests for row in repository.usage(ALL_ORGANIZATIONS, **report)] == [row.requests for row in raw]


# Reports start at the midnight after the retention's cutoff, also when the cutoff is exactly a midnight; the
# server's clock is faked so that the cutoff falls where the test needs it.
CUT_DAY = datetime(2026, 3, 10, tzinfo=UTC)


@pytest.mark.parametrize("now", [CUT_DAY + timedelta(days=30), CUT_DAY + timedelta(days=30, hours=7, microseconds=1)])
@pytest.mark.parametrize("source", ["raw", "hourly", "daily"])
def test_reports_start_at_the_midnight_after_the_cutoff(
    migrated_engine: Engine, monkeypatch: pytest.MonkeyPatch, now: datetime, source: str
) -> None:
    repository = TraceRepository(migrated_engine)
    # Two days of traces, one every 30 minutes: CUT_DAY (where the cutoff falls) and the day after.
    repository.add_many([make_trace(i, created_at=CUT_DAY + timedelta(minutes=30 * i)) for i in range(96)])
    monkeypatch.setattr(repository_module, "read_row_retention", lambda client, table: (Retention(30), now))
    report = {"group_by": (), "percentiles": None, "source": source}
    rows = repository.usage(ALL_ORGANIZATIONS, granularity="day", **report)
    assert [(row.bucket, row.requests) for row in rows] == [(CUT_DAY + timedelta(days=1), 48)]
    assert repository.usage(ALL_ORGANIZATIONS, until=CUT_DAY + timedelta(days=1), **report) == []
    assert [row.requests for row in repository.usage(ALL_ORGANIZATIONS, since=CUT_DAY, **report)] == [48]

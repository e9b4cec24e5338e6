"""The rollups keep the traces' row retention, whichever way the database got there: migrations run after the
retention was set, and no retention of a rollup's own that would drop days the reports still count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from llmtrace import ALL_ORGANIZATIONS, TraceRepository
from llmtrace.migrations import downgrade, upgrade
from llmtrace.retention import get_retention, set_retention
from llmtrace.rollup import ROLLUPS, Rollup
from llmtrace.synthetic import synthetic_traces


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

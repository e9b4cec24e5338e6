"""Retention settings without an engine: validation and the statements that apply them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from llmtrace import Retention
from llmtrace.ddl import SchemaDDL
from llmtrace.retention import MAX_DAYS, RETAINED_TABLES, retention_statements
from llmtrace.topology import SINGLE, Topology

SETTINGS = "MODIFY SETTING ttl_only_drop_parts = 1, materialize_ttl_recalculate_only = 1"
PAYLOAD_TTL = ", ".join(
    f"MODIFY COLUMN `{column}` TTL created_at + toIntervalDay(7)"
    for column in ("request_json", "response_json", "llm_config_json")
)


@pytest.mark.parametrize("name", ["rows_days", "payload_days"])
@pytest.mark.parametrize("days", [0, -1, MAX_DAYS + 1])
def test_days_out_of_range_are_refused_naming_the_argument(name: str, days: int) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be between 1 and {MAX_DAYS} days, or None"):
        Retention(**{name: days})


@pytest.mark.parametrize("name", ["rows_days", "payload_days"])
@pytest.mark.parametrize("days", [True, 1.5, "30", 30.0])
def test_days_that_are_not_whole_numbers_are_refused(name: str, days: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{name} must be a whole number of days or None"):
        Retention(**{name: days})


def test_payloads_cannot_outlive_their_rows() -> None:
    with pytest.raises(ValueError, match=r"payload_days=31 is longer than rows_days=30.*payload_days=None"):
        Retention(rows_days=30, payload_days=31)
    assert Retention(rows_days=30, payload_days=30).payload_days == 30
    assert Retention(rows_days=None, payload_days=400).rows_days is None
    assert Retention(rows_days=1, payload_days=None) == Retention(1)


def test_the_ttl_expression_reads_back_as_its_days() -> None:
    traces = RETAINED_TABLES["llm_traces"]
    assert traces.ttl(30) == "created_at + toIntervalDay(30)"
    assert traces.days(traces.ttl(30)) == 30
    for other in ("created_at + toIntervalMonth(1)", "toDateTime(created_at) + toIntervalDay(30)", ""):
        assert traces.days(other) is None


def statements(
    current: Retention, wanted: Retention, *, materialize: bool = True, ddl: SchemaDDL | None = None
) -> list[str]:
    return retention_statements(current, wanted, table="llm_traces", ddl=ddl or SchemaDDL(), materialize=materialize)


def test_first_retention_sets_the_settings_then_the_ttls_then_materializes() -> None:
    assert statements(Retention(), Retention(30, 7)) == [
        f"ALTER TABLE `llm_traces` {SETTINGS}",
        f"ALTER TABLE `llm_traces` {PAYLOAD_TTL}, MODIFY TTL created_at + toIntervalDay(30)",
        "ALTER TABLE `llm_traces` MATERIALIZE TTL",
    ]
    assert statements(Retention(), Retention(30), materialize=False) == [
        f"ALTER TABLE `llm_traces` {SETTINGS}",
        "ALTER TABLE `llm_traces` MODIFY TTL created_at + toIntervalDay(30)",
    ]


def test_only_what_changes_is_altered() -> None:
    assert statements(Retention(30, 7), Retention(30, 7)) == []
    assert statements(Retention(30, 7), Retention(60, 7)) == [
        "ALTER TABLE `llm_traces` MODIFY TTL created_at + toIntervalDay(60)",
        "ALTER TABLE `llm_traces` MATERIALIZE TTL",
    ]
    assert statements(Retention(30, 7), Retention(30)) == [
        "ALTER TABLE `llm_traces` MODIFY COLUMN `request_json` REMOVE TTL, MODIFY COLUMN `response_json` REMOVE TTL, "
        "MODIFY COLUMN `llm_config_json` REMOVE TTL",
        "ALTER TABLE `llm_traces` MATERIALIZE TTL",
    ]


def test_removing_the_last_ttl_resets_the_settings() -> None:
    assert statements(Retention(30, 7), Retention()) == [
        "ALTER TABLE `llm_traces` MODIFY COLUMN `request_json` REMOVE TTL, MODIFY COLUMN `response_json` REMOVE TTL, "
        "MODIFY COLUMN `llm_config_json` REMOVE TTL, REMOVE TTL",
        "ALTER TABLE `llm_traces` RESET SETTING ttl_only_drop_parts, materialize_ttl_recalculate_only",
    ]


def test_a_cluster_alters_the_local_table_on_every_host() -> None:
    ddl = SchemaDDL(Topology.parse("cluster:traces-eu"), database="traces")
    rendered = statements(Retention(), Retention(30, 7), ddl=ddl)
    assert len(rendered) == 3
    assert all(s.startswith("ALTER TABLE `traces`.`llm_traces_local` ON CLUSTER 'traces-eu' ") for s in rendered)
    assert statements(Retention(), Retention(30, 7), ddl=SchemaDDL(SINGLE)) == [
        s.replace("`traces`.`llm_traces_local` ON CLUSTER 'traces-eu'", "`llm_traces`") for s in rendered
    ]


@pytest.mark.parametrize(
    ("now", "first_day"),
    [
        # The cutoff (now - 30 days) exactly on a midnight: the rows at that instant are already expired, and so
        # is the rollups' row for that day, so the first day kept whole is the next one.
        (datetime(2026, 12, 4, 0, 0, tzinfo=UTC), datetime(2026, 11, 5, tzinfo=UTC)),
        (datetime(2026, 12, 4, 0, 0, 0, 1, tzinfo=UTC), datetime(2026, 11, 5, tzinfo=UTC)),
        (datetime(2026, 12, 4, 23, 59, 59, 999999, tzinfo=UTC), datetime(2026, 11, 5, tzinfo=UTC)),
        # A server time in another zone is the same instant.
        (
            datetime(2026, 12, 4, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            datetime(2026, 11, 5, tzinfo=UTC),
        ),
    ],
)
def test_reports_start_at_the_first_day_the_row_retention_keeps_whole(now: datetime, first_day: datetime) -> None:
    assert Retention(rows_days=30).first_whole_day(now) == first_day
    assert Retention().first_whole_day(now) is None

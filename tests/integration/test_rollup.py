"""The hourly rollup answers what a scan of the traces answers: every grouping and granularity, rows from other
writers, deduplicated retries, deletes, a migration over stored traces, and when it must not answer."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from llmtrace import ALL_ORGANIZATIONS, LLMTrace, TraceRepository, UsageRow
from llmtrace.engine import driver_client
from llmtrace.migrations import upgrade
from llmtrace.retention import set_retention
from llmtrace.rollup import ROLLUP_SELECT, ROLLUP_TABLE_NAME, ROLLUP_VIEW_NAME
from llmtrace.synthetic import synthetic_traces
from llmtrace.usage import GRANULARITIES, GROUP_KEYS
from tests.factories import make_trace

END = datetime(2026, 11, 20, 12, tzinfo=UTC)
COLUMNS = LLMTrace.clickhouse_columns()
PERCENTILE_FIELDS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


def traces() -> list[LLMTrace]:
    """A skewed multi-tenant month, with pre-1970 and far-future traces, long prompts past price tiers, and
    counts that contradict a convention."""
    generated = list(
        synthetic_traces(
            3_000, organizations=30, agents_per_organization=3, skew=1.1, payload_bytes=(10, 200), end=END,
            span=timedelta(days=40), seed=11,
        )
    )  # fmt: skip
    odd = [
        make_trace(1, organization_id="org-0", created_at=datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)),
        make_trace(2, organization_id="org-0", created_at=datetime(2299, 12, 31, 23, 0, tzinfo=UTC)),
        make_trace(3, organization_id="org-1", prompt_tokens=300_000, cached_input_tokens=250_000),
        make_trace(4, organization_id="org-1", prompt_tokens=10, cached_input_tokens=90, reasoning_tokens=5),
        make_trace(5, organization_id="org-2", project_id=None, agent_id=None, provider="", model=""),
    ]
    return generated + odd


def other_writer_rows(count: int) -> list[list[Any]]:
    """Rows as the reference platform's writer sends them (to_clickhouse_row): derived fields left at 0."""
    rows = []
    for trace in synthetic_traces(count, organizations=5, end=END, span=timedelta(days=3), seed=99):
        row = list(trace.to_clickhouse_row())
        for name in ("total_tokens", "request_size_bytes", "response_size_bytes"):
            row[COLUMNS.index(name)] = 0
        rows.append(row)
    return rows


def comparable(rows: list[UsageRow]) -> list[dict[str, Any]]:
    """The rows without their source and percentiles (compared apart: the rollup's are approximate)."""
    return [
        {name: value for name, value in row.__dict__.items() if name not in {"source", *PERCENTILE_FIELDS}}
        for row in rows
    ]


def assert_rollup_answers_like_the_traces(repository: TraceRepository, **report: Any) -> None:
    raw = repository.usage(percentiles="approximate", source="raw", **report)
    rolled = repository.usage(percentiles="approximate", source="rollup", **report)
    assert raw, report
    assert {row.source for row in raw} == {"raw"} and {row.source for row in rolled} == {"rollup"}
    assert comparable(rolled) == comparable(raw), report


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    repository = TraceRepository(migrated_engine)
    repository.add_many(traces())
    with migrated_engine.connect() as connection:
        driver_client(connection).insert("llm_traces", other_writer_rows(500), column_names=COLUMNS)
    return repository


def test_every_grouping_and_granularity_matches_the_traces(repository: TraceRepository) -> None:
    groupings = [(), *((key,) for key in GROUP_KEYS), ("organization_id", "agent_id", "model"), ("provider", "is_byok")]
    for keys, granularity in itertools.product(groupings, (None, *GRANULARITIES)):
        assert_rollup_answers_like_the_traces(
            repository, organization_id=ALL_ORGANIZATIONS, group_by=keys, granularity=granularity
        )
    since, until = END - timedelta(days=9), END - timedelta(days=2)
    assert_rollup_answers_like_the_traces(
        repository, organization_id="org-0", group_by=("agent_id",), granularity="day", since=since, until=until
    )
    assert_rollup_answers_like_the_traces(
        repository, organization_id=ALL_ORGANIZATIONS, group_by=("model",), is_byok=False, provider="openai"
    )


def test_auto_uses_the_rollup_only_when_it_answers_exactly(repository: TraceRepository) -> None:
    def source(**report: Any) -> set[str]:
        return {row.source for row in repository.usage(ALL_ORGANIZATIONS, **report)}

    assert source(percentiles="approximate") == {"rollup"}
    assert source() == {"raw"}  # exact percentiles need every latency
    assert source(percentiles="approximate", run_id="run-00000001") <= {"raw"}
    assert source(percentiles="approximate", since=END - timedelta(days=3, minutes=30)) == {"raw"}
    cases = [
        ({}, "exact percentiles"),
        ({"percentiles": "approximate", "step_id": "s"}, "step_id filter"),
        ({"percentiles": "approximate", "until": END - timedelta(seconds=1)}, "until is not a whole UTC hour"),
    ]
    for report, reason in cases:
        with pytest.raises(ValueError, match=reason):
            repository.usage(ALL_ORGANIZATIONS, source="rollup", **report)
    with pytest.raises(ValueError, match="source: unknown value 'fast'"):
        repository.usage(ALL_ORGANIZATIONS, source="fast")


def test_percentiles_from_the_rollup_are_close_to_exact(repository: TraceRepository) -> None:
    exact = repository.usage(ALL_ORGANIZATIONS, group_by=("model",), source="raw")
    rolled = repository.usage(ALL_ORGANIZATIONS, group_by=("model",), percentiles="approximate")
    assert [row.model for row in exact] == [row.model for row in rolled]
    for left, right in zip(exact, rolled, strict=True):
        if left.requests < 100:
            continue
        for name in PERCENTILE_FIELDS:
            # Latencies here span 150 ms to 30 s; a t-digest of hourly states lands within 2% of that range.
            assert abs(getattr(left, name) - getattr(right, name)) <= 0.02 * 30_000, (left.model, name)


def test_retries_that_clickhouse_drops_never_reach_the_rollup(repository: TraceRepository) -> None:
    batch = list(synthetic_traces(300, organizations=3, end=END, span=timedelta(hours=5), seed=5))
    # The same batch again and again without the lookup: each attempt carries the batch's token.
    for _ in range(3):
        repository.add_many(batch, skip_stored=False)
    # Another writer's retry of an identical block: ClickHouse drops it by the block's hash.
    rows = other_writer_rows(50)
    with repository.engine.connect() as connection:
        for _ in range(2):
            driver_client(connection).insert("llm_traces", rows, column_names=COLUMNS)
    assert repository.count(ALL_ORGANIZATIONS) == len(traces()) + 500 + 300 + 50
    assert_rollup_answers_like_the_traces(repository, organization_id=ALL_ORGANIZATIONS, group_by=("model",))


@pytest.mark.parametrize("erase", [True, False])
def test_deletes_correct_the_rollup(repository: TraceRepository, erase: bool) -> None:
    heavy = "org-0"
    agent = repository.usage(heavy, group_by=("agent_id",), source="raw")[0].agent_id
    assert repository.delete(heavy, agent_id=agent, erase=erase) > 0
    assert repository.delete("org-3", before=END - timedelta(days=20), erase=erase) > 0
    assert repository.delete("org-1", erase=erase) > 0
    for keys in [("organization_id", "agent_id"), ("model",)]:
        assert_rollup_answers_like_the_traces(
            repository, organization_id=ALL_ORGANIZATIONS, group_by=keys, granularity="hour"
        )
    # Written again after the delete: stored again, and counted again.
    again = [trace for trace in traces() if trace.organization_id == "org-1"]
    assert repository.add_many(again) == len(again)
    assert_rollup_answers_like_the_traces(repository, organization_id="org-1", group_by=("agent_id",))


def test_the_migration_fills_the_rollup_from_stored_traces(engine: Engine) -> None:
    upgrade(engine, "0004")
    repository = TraceRepository(engine)
    repository.add_many(traces()[:2_000])
    assert {row.source for row in repository.usage(ALL_ORGANIZATIONS, percentiles="approximate")} == {"raw"}
    upgrade(engine)
    assert_rollup_answers_like_the_traces(
        repository, organization_id=ALL_ORGANIZATIONS, group_by=("organization_id", "model"), granularity="day"
    )


def test_a_rebuild_gives_the_same_rollup(repository: TraceRepository) -> None:
    before = repository.usage(ALL_ORGANIZATIONS, group_by=("agent_id",), granularity="hour", source="rollup",
                              percentiles="approximate")  # fmt: skip
    with repository.engine.connect() as connection:
        # A rollup that went wrong: one organization's rows counted twice.
        connection.execute(text(f"INSERT INTO {ROLLUP_TABLE_NAME} SELECT * FROM {ROLLUP_TABLE_NAME} "
                                "WHERE organization_id = 'org-0' SETTINGS insert_deduplicate = 0"))  # fmt: skip
    assert comparable(repository.usage(ALL_ORGANIZATIONS, group_by=("agent_id",), granularity="hour",
                                       source="rollup", percentiles="approximate")) != comparable(before)  # fmt: skip
    repository.rebuild_rollup()
    assert_rollup_answers_like_the_traces(
        repository, organization_id=ALL_ORGANIZATIONS, group_by=("agent_id",), granularity="hour"
    )


def test_the_view_computes_what_the_code_says(migrated_engine: Engine) -> None:
    with migrated_engine.connect() as connection:
        stored = connection.execute(
            text("SELECT as_select FROM system.tables WHERE database = currentDatabase() AND name = :name"),
            {"name": ROLLUP_VIEW_NAME},
        ).scalar_one()
        source = f"{migrated_engine.url.database}.llm_traces"
        expected = ROLLUP_SELECT.format(source=source, where="")
        normalized = [
            connection.execute(text("SELECT formatQuery(:query)"), {"query": query}).scalar_one()
            for query in (stored, expected)
        ]
    assert normalized[0] == normalized[1]


def test_after_a_retention_drop_both_sources_report_the_same_whole_hours(migrated_engine: Engine) -> None:
    now = datetime.now(UTC)
    repository = TraceRepository(migrated_engine)
    repository.add_many(
        synthetic_traces(3_000, organizations=5, end=now, span=timedelta(days=70), payload_bytes=(10, 100), seed=3)
    )
    everything = repository.usage(ALL_ORGANIZATIONS, group_by=(), source="raw")[0].requests
    set_retention(migrated_engine, rows_days=30, payload_days=None)
    with migrated_engine.connect() as connection:
        for table in ("llm_traces", ROLLUP_TABLE_NAME):  # what merges would do later, now
            connection.execute(text(f"ALTER TABLE {table} MATERIALIZE TTL SETTINGS mutations_sync = 2"))
    cutoff = now - timedelta(days=30)
    for keys, granularity in [(("model",), "day"), (("organization_id", "agent_id"), "hour"), ((), None)]:
        assert_rollup_answers_like_the_traces(
            repository, organization_id=ALL_ORGANIZATIONS, group_by=keys, granularity=granularity
        )
    rows = repository.usage(ALL_ORGANIZATIONS, group_by=(), granularity="hour", source="raw")
    assert rows[0].bucket is not None and rows[0].bucket >= cutoff.replace(minute=0, second=0, microsecond=0)
    assert 0 < sum(row.requests for row in rows) < everything
    # A range wholly past the retention reports nothing, from either source.
    assert repository.usage(ALL_ORGANIZATIONS, until=cutoff - timedelta(days=1)) == []

"""The rollups (hourly and daily) answer what a scan of the traces answers: every grouping and granularity, rows
from other writers, deduplicated retries, deletes, the migrations over stored traces, prices that change inside a
day, and when they must not answer."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, text

from llmtrace import ALL_ORGANIZATIONS, LLMTrace, TraceRepository, UsageRow
from llmtrace.cost import dollars, select_with_cost
from llmtrace.engine import driver_client
from llmtrace.migrations import downgrade, upgrade
from llmtrace.prices import ModelPrice, set_price
from llmtrace.record import TRACES_TABLE
from llmtrace.retention import set_retention
from llmtrace.rollup import DAILY, HOURLY, PER_AGENT, ROLLUPS
from llmtrace.synthetic import synthetic_traces
from llmtrace.usage import GRANULARITIES, GROUP_KEYS, PERCENTILE_FIELDS
from tests.factories import make_trace

END = datetime(2026, 11, 20, 12, tzinfo=UTC)
COLUMNS = LLMTrace.clickhouse_columns()


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


def daily_can_answer(report: dict[str, Any]) -> bool:
    """Whether the daily rollup should answer ``report`` (default prices change only at midnight)."""
    per_agent = set(report.get("group_by", ("model",))) | {name for name in PER_AGENT if report.get(name)}
    whole_days = all(
        report.get(name) is None or report[name] == report[name].replace(hour=0, minute=0, second=0, microsecond=0)
        for name in ("since", "until")
    )
    return report.get("granularity") != "hour" and not per_agent & set(PER_AGENT) and whole_days


def assert_rollup_answers_like_the_traces(
    repository: TraceRepository, *, daily: bool | None = None, **report: Any
) -> None:
    """Each rollup that should answer ``report`` answers exactly what the traces do; the others refuse it.
    ``daily``: whether the daily rollup should answer, when the report alone does not say."""
    raw = repository.usage(percentiles="approximate", source="raw", **report)
    assert raw, report
    assert {row.source for row in raw} == {"raw"}
    for rollup in ROLLUPS:
        if rollup is DAILY and not (daily_can_answer(report) if daily is None else daily):
            with pytest.raises(ValueError, match="the daily rollup"):
                repository.usage(percentiles="approximate", source=rollup.name, **report)
            continue
        rolled = repository.usage(percentiles="approximate", source=rollup.name, **report)
        assert {row.source for row in rolled} == {rollup.name}
        assert comparable(rolled) == comparable(raw), (rollup.name, report)


def assert_reports_without_percentiles_are_exact(repository: TraceRepository, **report: Any) -> None:
    """Without percentiles, every source that answers ``report`` gives the same rows, whole, and the same totals
    as a report with them."""
    raw = repository.usage(percentiles=None, source="raw", **report)
    assert raw, report
    assert all(row.latency_p50_ms is row.latency_p95_ms is row.latency_p99_ms is None for row in raw)
    assert comparable(raw) == comparable(repository.usage(percentiles="approximate", source="raw", **report))
    for rollup in ROLLUPS:
        if rollup is DAILY and not daily_can_answer(report):
            continue
        rolled = repository.usage(percentiles=None, source=rollup.name, **report)
        assert {row.source for row in rolled} == {rollup.name}
        assert [replace(row, source="raw") for row in rolled] == raw, (rollup.name, report)


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
    since, until = (time.replace(hour=0) for time in (since, until))
    assert_rollup_answers_like_the_traces(
        repository, organization_id="org-0", group_by=("model",), granularity="day", since=since, until=until
    )
    assert_rollup_answers_like_the_traces(
        repository, organization_id=ALL_ORGANIZATIONS, group_by=("model",), is_byok=False, provider="openai"
    )


def test_reports_without_percentiles_are_exact_from_every_source(repository: TraceRepository) -> None:
    for keys, granularity in itertools.product([(), *((key,) for key in GROUP_KEYS)], (None, "hour", "day")):
        assert_reports_without_percentiles_are_exact(
            repository, organization_id=ALL_ORGANIZATIONS, group_by=keys, granularity=granularity
        )
    assert_reports_without_percentiles_are_exact(
        repository, organization_id="org-0", group_by=("model",), since=(END - timedelta(days=2)).replace(hour=0)
    )


def test_auto_uses_the_coarsest_rollup_that_answers_exactly(repository: TraceRepository) -> None:
    def source(**report: Any) -> set[str]:
        return {row.source for row in repository.usage(ALL_ORGANIZATIONS, **report)}

    assert source(percentiles="approximate") == {"daily"}
    assert source(percentiles="approximate", granularity="month", is_error=False) == {"daily"}
    assert source(percentiles="approximate", group_by=("agent_id",)) == {"hourly"}
    assert source(percentiles="approximate", project_id="project-1") <= {"hourly"}
    assert source(percentiles="approximate", granularity="hour") == {"hourly"}
    assert source(percentiles="approximate", since=END - timedelta(days=3)) == {"hourly"}  # 12:00, not midnight
    # Midnight UTC written in another time zone is still a whole UTC day.
    india = timezone(timedelta(hours=5, minutes=30))
    assert source(percentiles="approximate", since=(END - timedelta(days=3)).replace(hour=0).astimezone(india)) == {
        "daily"
    }
    assert source() == {"raw"}  # exact percentiles need every latency
    assert source(percentiles=None) == {"daily"}
    assert source(percentiles=None, group_by=("agent_id",)) == {"hourly"}
    assert source(percentiles="approximate", run_id="run-00000001") <= {"raw"}
    assert source(percentiles="approximate", since=END - timedelta(days=3, minutes=30)) == {"raw"}
    cases = [
        ("rollup", {}, "exact percentiles"),
        ("rollup", {"percentiles": "approximate", "step_id": "s"}, "step_id filter"),
        ("rollup", {"percentiles": "approximate", "until": END - timedelta(seconds=1)}, "not a whole UTC hour"),
        ("daily", {"percentiles": "approximate", "group_by": ("agent_id",)}, "does not keep agent_id"),
        ("daily", {"percentiles": "approximate", "granularity": "hour"}, "has no hours"),
        ("daily", {"percentiles": "approximate", "until": END}, "until is not a whole UTC day"),
    ]
    for asked, report, reason in cases:
        with pytest.raises(ValueError, match=reason):
            repository.usage(ALL_ORGANIZATIONS, source=asked, **report)
    with pytest.raises(ValueError, match="source: unknown value 'fast'"):
        repository.usage(ALL_ORGANIZATIONS, source="fast")


def test_a_price_that_starts_inside_a_day_keeps_every_source_exact(repository: TraceRepository) -> None:
    """Days' totals can no longer be priced at once: reports price hours, and the daily rollup stands aside."""
    start = END - timedelta(days=5, hours=10)  # 02:00 UTC
    set_price(repository.engine, ModelPrice.flat("openai", "gpt-4.1", input="7", output="11", effective_from=start))
    report = {"organization_id": ALL_ORGANIZATIONS, "group_by": ("model",), "percentiles": "approximate"}
    with pytest.raises(ValueError, match="takes effect at another time than midnight"):
        repository.usage(source="daily", **report)
    assert {row.source for row in repository.usage(**report)} == {"hourly"}
    # After the days it touches, the daily rollup answers again.
    later = (start + timedelta(days=1)).replace(hour=0)
    assert {row.source for row in repository.usage(since=later, **report)} == {"daily"}
    # Each trace's own cost (llmtrace.cost.select_with_cost) is the independent measure.
    with repository.engine.connect() as connection:
        rows = connection.execute(select_with_cost(TRACES_TABLE.c.model, TRACES_TABLE.c.is_byok)).mappings().all()
    per_model: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        per_model[row["model"]] += dollars(row["cost"])
    assert any(row["model"] == "gpt-4.1" for row in rows)
    for granularity in (None, "day"):
        for asked in ("raw", "hourly"):
            got: dict[str, Decimal] = defaultdict(Decimal)
            for usage in repository.usage(source=asked, granularity=granularity, **report):
                got[usage.model or ""] += usage.cost + usage.byok_cost
            assert got == {model: cost for model, cost in per_model.items() if cost or model in got}, asked
    assert_rollup_answers_like_the_traces(repository, daily=False, organization_id=ALL_ORGANIZATIONS, granularity="day")


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
    for keys, granularity in [
        (("organization_id", "agent_id"), "hour"),
        (("model",), "hour"),
        (("organization_id",), "day"),
    ]:
        assert_rollup_answers_like_the_traces(
            repository, organization_id=ALL_ORGANIZATIONS, group_by=keys, granularity=granularity
        )
    # Written again after the delete: stored again, and counted again.
    again = [trace for trace in traces() if trace.organization_id == "org-1"]
    assert repository.add_many(again) == len(again)
    assert_rollup_answers_like_the_traces(repository, organization_id="org-1", group_by=("agent_id",))
    assert_rollup_answers_like_the_traces(repository, organization_id="org-1", group_by=("model",), granularity="day")


@pytest.mark.parametrize(("before", "answers"), [("0004", "raw"), ("0005", "hourly")])
def test_the_migrations_fill_the_rollups_from_stored_traces(engine: Engine, before: str, answers: str) -> None:
    upgrade(engine, before)
    repository = TraceRepository(engine)
    repository.add_many(traces()[:2_000])
    assert {row.source for row in repository.usage(ALL_ORGANIZATIONS, percentiles="approximate")} == {answers}
    upgrade(engine)
    assert {row.source for row in repository.usage(ALL_ORGANIZATIONS, percentiles="approximate")} == {"daily"}
    assert_rollup_answers_like_the_traces(
        repository, organization_id=ALL_ORGANIZATIONS, group_by=("organization_id", "model"), granularity="day"
    )


def test_a_repository_follows_the_rollups_the_database_has_now(engine: Engine) -> None:
    """A repository that read the daily rollup goes on answering once a downgrade removed it, and the other way."""
    upgrade(engine)
    repository = TraceRepository(engine)
    repository.add_many(traces()[:300])

    def sources() -> set[str]:
        return {row.source for row in repository.usage(ALL_ORGANIZATIONS, percentiles="approximate")}

    assert sources() == {"daily"}
    downgrade(engine, "0005")
    assert sources() == {"hourly"}
    with pytest.raises(ValueError, match="no daily rollup yet"):
        repository.usage(ALL_ORGANIZATIONS, percentiles="approximate", source="daily")
    upgrade(engine)
    assert sources() == {"daily"}
    assert_rollup_answers_like_the_traces(repository, organization_id=ALL_ORGANIZATIONS, group_by=("model",))


def test_a_rebuild_gives_the_same_rollups(repository: TraceRepository) -> None:
    def reports() -> list[list[dict[str, Any]]]:
        return [
            comparable(repository.usage(ALL_ORGANIZATIONS, group_by=keys, source=name, percentiles="approximate"))
            for keys, name in ((("organization_id", "agent_id"), "hourly"), (("organization_id",), "daily"))
        ]

    before = reports()
    with repository.engine.connect() as connection:
        # Rollups that went wrong: one organization's hours counted twice (and so its days, through the view),
        # another's days counted twice.
        for table, organization in ((HOURLY.table, "org-0"), (DAILY.table, "org-1")):
            doubled = f"SELECT * FROM {table} WHERE organization_id = '{organization}'"
            connection.execute(text(f"INSERT INTO {table} {doubled} SETTINGS insert_deduplicate = 0"))
    after = reports()
    assert after[0] != before[0] and after[1] != before[1]
    repository.rebuild_rollup()
    assert reports() == before
    assert_rollup_answers_like_the_traces(
        repository, organization_id=ALL_ORGANIZATIONS, group_by=("organization_id", "model"), granularity="day"
    )


@pytest.mark.parametrize("rollup", ROLLUPS, ids=lambda rollup: rollup.name)
def test_the_view_computes_what_the_code_says(migrated_engine: Engine, rollup: Any) -> None:
    with migrated_engine.connect() as connection:
        stored = connection.execute(
            text("SELECT as_select FROM system.tables WHERE database = currentDatabase() AND name = :name"),
            {"name": rollup.view},
        ).scalar_one()
        source = f"{migrated_engine.url.database}.{rollup.reads}"
        expected = rollup.select.format(source=source, where="")
        normalized = [
            connection.execute(text("SELECT formatQuery(:query)"), {"query": query}).scalar_one()
            for query in (stored, expected)
        ]
    assert normalized[0] == normalized[1]


def test_after_a_retention_drop_every_source_reports_the_same_whole_days(migrated_engine: Engine) -> None:
    now = datetime.now(UTC)
    repository = TraceRepository(migrated_engine)
    repository.add_many(
        synthetic_traces(3_000, organizations=5, end=now, span=timedelta(days=70), payload_bytes=(10, 100), seed=3)
    )
    everything = repository.usage(ALL_ORGANIZATIONS, group_by=(), source="raw")[0].requests
    set_retention(migrated_engine, rows_days=30, payload_days=None)
    with migrated_engine.connect() as connection:
        for table in ("llm_traces", *(rollup.table for rollup in ROLLUPS)):  # what merges would do later, now
            connection.execute(text(f"ALTER TABLE {table} MATERIALIZE TTL SETTINGS mutations_sync = 2"))
    cutoff = now - timedelta(days=30)
    for keys, granularity in [(("model",), "day"), (("organization_id", "agent_id"), "hour"), ((), None)]:
        assert_rollup_answers_like_the_traces(
            repository, organization_id=ALL_ORGANIZATIONS, group_by=keys, granularity=granularity
        )
    rows = repository.usage(ALL_ORGANIZATIONS, group_by=(), granularity="hour", source="raw")
    first_day = cutoff.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    assert rows[0].bucket is not None and rows[0].bucket >= first_day
    assert 0 < sum(row.requests for row in rows) < everything
    # A range wholly past the retention reports nothing, from either source.
    assert repository.usage(ALL_ORGANIZATIONS, until=cutoff - timedelta(days=1)) == []

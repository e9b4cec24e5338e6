"""usage() against a plain-Python computation over the same random traces."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from llmtrace import ALL_ORGANIZATIONS, LLMTrace, TraceRepository, UsageRow
from llmtrace.model import EARLIEST_CREATED_AT, LATEST_CREATED_AT
from llmtrace.synthetic import synthetic_traces
from llmtrace.usage import PERCENTILES

END = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TRACES = list(
    synthetic_traces(
        12_000, organizations=4, agents_per_organization=4, payload_bytes=(10, 200), end=END, span=timedelta(days=75)
    )
)
BUCKETS: dict[str | None, Callable[[datetime], datetime | None]] = {
    None: lambda _: None,
    "hour": lambda t: t.replace(minute=0, second=0, microsecond=0),
    "day": lambda t: t.replace(hour=0, minute=0, second=0, microsecond=0),
    "month": lambda t: t.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
}


def nearest_rank(values: list[int], level: float) -> float:
    """The exact percentile usage() promises: the value at position floor(level * n) of the sorted values."""
    ordered = sorted(values)
    return float(ordered[min(int(level * len(ordered)), len(ordered) - 1)])


def optional_sum(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def expected_usage(
    traces: Sequence[LLMTrace], keys: Sequence[str], granularity: str | None
) -> dict[tuple[Any, ...], dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[LLMTrace]] = defaultdict(list)
    for t in traces:
        groups[(BUCKETS[granularity](t.created_at), *(getattr(t, key) for key in keys))].append(t)
    result = {}
    for group_key, members in groups.items():
        latencies = [t.latency_ms for t in members]
        result[group_key] = {
            "requests": len(members),
            "errors": sum(t.is_error for t in members),
            "prompt_tokens": sum(t.prompt_tokens for t in members),
            "completion_tokens": sum(t.completion_tokens for t in members),
            "total_tokens": sum(t.total_tokens for t in members),
            "cached_input_tokens": optional_sum([t.cached_input_tokens for t in members]),
            "cache_write_tokens": optional_sum([t.cache_write_tokens for t in members]),
            "reasoning_tokens": optional_sum([t.reasoning_tokens for t in members]),
            "request_bytes": sum(t.request_size_bytes for t in members),
            "response_bytes": sum(t.response_size_bytes for t in members),
            "latency_avg_ms": pytest.approx(sum(latencies) / len(latencies), rel=1e-12),
            "latency_percentiles": [nearest_rank(latencies, level) for level in PERCENTILES],
        }
    return result


def as_comparable(rows: list[UsageRow], keys: Sequence[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {
        (row.bucket, *(row.group[key] for key in keys)): {
            "requests": row.requests,
            "errors": row.errors,
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.total_tokens,
            "cached_input_tokens": row.cached_input_tokens,
            "cache_write_tokens": row.cache_write_tokens,
            "reasoning_tokens": row.reasoning_tokens,
            "request_bytes": row.request_bytes,
            "response_bytes": row.response_bytes,
            "latency_avg_ms": row.latency_avg_ms,
            "latency_percentiles": [row.latency_p50_ms, row.latency_p95_ms, row.latency_p99_ms],
        }
        for row in rows
    }


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    repository = TraceRepository(migrated_engine)
    repository.add_many(TRACES)
    return repository


def test_usage_matches_python_for_many_groupings(repository: TraceRepository) -> None:
    cases: list[tuple[Any, tuple[str, ...], str | None, dict[str, Any]]] = [
        (ALL_ORGANIZATIONS, ("model",), None, {}),
        (ALL_ORGANIZATIONS, (), None, {}),
        (ALL_ORGANIZATIONS, ("organization_id", "agent_id"), "day", {}),
        ("org-1", ("provider", "is_error"), "hour", {}),
        ("org-2", ("is_byok", "call_type", "project_id"), "month", {}),
        ("org-0", ("model",), "day", {"is_error": False, "provider": "anthropic"}),
        (ALL_ORGANIZATIONS, ("billing_plan_type", "billing_cost_source"), "month", {}),
        (ALL_ORGANIZATIONS, ("billing_customer_id",), None, {"billing_plan_type": "pro", "is_byok": False}),
    ]
    for organization_id, keys, granularity, filters in cases:
        selected = [
            t
            for t in TRACES
            if (organization_id is ALL_ORGANIZATIONS or t.organization_id == organization_id)
            and all(getattr(t, name) == value for name, value in filters.items())
        ]
        rows = repository.usage(organization_id, group_by=keys, granularity=granularity, **filters)
        assert as_comparable(rows, keys) == expected_usage(selected, keys, granularity), (keys, granularity)
        assert sum(row.requests for row in rows) == len(selected)


def test_usage_time_window_and_ordering(repository: TraceRepository) -> None:
    since, until = END - timedelta(days=1), END
    rows = repository.usage(ALL_ORGANIZATIONS, group_by=("agent_id",), since=since, until=until, granularity="hour")
    selected = [t for t in TRACES if since <= t.created_at < until]
    assert as_comparable(rows, ("agent_id",)) == expected_usage(selected, ("agent_id",), "hour")
    assert [(row.bucket, row.agent_id) for row in rows] == sorted((row.bucket, row.agent_id) for row in rows)


def test_unknown_token_counts_stay_unknown(migrated_engine: Engine) -> None:
    repository = TraceRepository(migrated_engine)
    base = TRACES[0].model_dump()
    repository.add_many(
        [
            {**base, "id": "a", "model": "m-unknown", "cached_input_tokens": None},
            {**base, "id": "b", "model": "m-zero", "cached_input_tokens": 0},
            {**base, "id": "c", "model": "m-zero", "cached_input_tokens": None},
        ]
    )
    by_model = {row.model: row for row in repository.usage(ALL_ORGANIZATIONS, group_by=("model",))}
    assert by_model["m-unknown"].cached_input_tokens is None
    assert by_model["m-zero"].cached_input_tokens == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"group_by": ("modle",)}, "group_by: unknown key(s) 'modle'; use any of organization_id"),
        ({"group_by": ("model", "model")}, "repeats a key"),
        ({"granularity": "week"}, "granularity: unknown value 'week'; use one of hour, day, month"),
        ({"percentiles": "median"}, "percentiles: unknown value 'median'; use one of exact, approximate or None"),
        ({"percentiles": ["exact"]}, "percentiles: unknown value ['exact']; use one of exact, approximate or None"),
    ],
)
def test_bad_usage_arguments(repository: TraceRepository, arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        repository.usage(ALL_ORGANIZATIONS, **arguments)


def test_group_keys_read_as_attributes(repository: TraceRepository) -> None:
    row = repository.usage("org-1", group_by=("model", "agent_id"))[0]
    assert row.model == row.group["model"] and row.agent_id == row.group["agent_id"]
    with pytest.raises(AttributeError, match="group keys: model, agent_id"):
        _ = row.provider


def test_approximate_percentiles_are_close_to_the_exact_ones(repository: TraceRepository) -> None:
    exact = {row.model: row for row in repository.usage(ALL_ORGANIZATIONS, group_by=("model",))}
    approximate = repository.usage(ALL_ORGANIZATIONS, group_by=("model",), percentiles="approximate")
    assert {row.model for row in approximate} == set(exact)
    values = []
    for row in approximate:
        assert (row.requests, row.total_tokens, row.latency_avg_ms) == (
            exact[row.model].requests,
            exact[row.model].total_tokens,
            exact[row.model].latency_avg_ms,
        )
        for level in ("p50", "p95", "p99"):
            value = getattr(row, f"latency_{level}_ms")
            assert value == pytest.approx(getattr(exact[row.model], f"latency_{level}_ms"), rel=0.01), level
            values.append(value)
    # The exact method only ever returns stored (whole) latencies; the t-digest interpolates between them.
    assert any(value != int(value) for value in values)


@pytest.mark.parametrize("granularity", ["hour", "day", "month"])
def test_buckets_are_right_over_the_whole_range_of_created_at(migrated_engine: Engine, granularity: str) -> None:
    # ClickHouse's default bucket functions clamp to 1970..2106 (2149 for months): these would share buckets.
    moments = [
        EARLIEST_CREATED_AT,
        EARLIEST_CREATED_AT + timedelta(days=40, hours=3),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2106, 2, 7, 6, 28, 16, tzinfo=UTC),
        datetime(2106, 3, 1, 0, 0, tzinfo=UTC),
        datetime(2149, 6, 7, tzinfo=UTC),
        datetime(2200, 7, 4, 15, 30, tzinfo=UTC),
        LATEST_CREATED_AT,
    ]
    traces = [TRACES[index].model_copy(update={"created_at": moment}) for index, moment in enumerate(moments)]
    repository = TraceRepository(migrated_engine)
    repository.add_many(traces)
    rows = repository.usage(ALL_ORGANIZATIONS, group_by=(), granularity=granularity)
    assert as_comparable(rows, ()) == expected_usage(traces, (), granularity)
    assert len(rows) == len({BUCKETS[granularity](moment) for moment in moments})


@pytest.mark.parametrize("percentiles", ["exact", "approximate"])
@pytest.mark.parametrize("group_by", [(), ("model",)])
def test_a_report_over_no_traces_has_no_rows(
    repository: TraceRepository, percentiles: str, group_by: tuple[str, ...]
) -> None:
    assert repository.usage("no-such-organization", group_by=group_by, percentiles=percentiles) == []
    assert repository.usage(ALL_ORGANIZATIONS, group_by=group_by, since=END + timedelta(days=1)) == []

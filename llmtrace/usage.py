"""Usage and cost analytics: one aggregate query per report, grouped by tenant, model and time bucket."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Select, func, literal_column, select
from sqlalchemy.sql import ColumnElement

from llmtrace.record import TRACES_TABLE

TABLE = TRACES_TABLE
GROUP_KEYS = (
    "organization_id",
    "project_id",
    "agent_id",
    "model",
    "provider",
    "call_type",
    "is_byok",
    "is_error",
    "billing_plan_type",
    "billing_cost_source",
    "billing_customer_id",
)
GRANULARITIES = ("hour", "day", "month")
PERCENTILES = (0.5, 0.95, 0.99)
# How latency percentiles are computed. "exact" keeps every latency of a group in memory while the query runs;
# "approximate" (a t-digest) uses a few kilobytes per group, whatever its size, and is usually within about
# 1% of the exact value: the choice for reports over very many traces, such as all organizations over months.
PERCENTILE_FUNCTIONS = {"exact": "quantilesExact", "approximate": "quantilesTDigest"}
# ClickHouse's toStartOfHour/Day/Month return DateTime/Date by default, whose range (1970 to 2106, 2149 for Date)
# is narrower than created_at's (1900 to 2299): earlier and later traces would be clamped into one bucket. With
# this setting they return DateTime64/Date32, which cover created_at's whole range.
USAGE_SETTINGS = {"enable_extended_results_for_datetime_functions": 1}
# Optional string columns hold '' for "absent"; group keys report that as None, like LLMTrace does.
_EMPTY_MEANS_NONE = frozenset(
    {"organization_id", "project_id", "agent_id", "billing_plan_type", "billing_cost_source", "billing_customer_id"}
)


@dataclass(frozen=True)
class UsageRow:
    """Totals for one group (and time bucket) of traces.

    Token sums of the optional counters (cached input, cache write, reasoning) are ``None`` when no trace in
    the group reported them, so "unknown" stays distinguishable from "zero".

    Attributes:
        group: The group-by values, keyed by column name, in ``group_by`` order.
        bucket: Start of the time bucket (UTC) when a granularity was asked for, else ``None``.
        requests: Number of traces.
        errors: Number of traces with ``is_error``.
        prompt_tokens: Sum of prompt tokens.
        completion_tokens: Sum of completion tokens.
        total_tokens: Sum of total tokens.
        cached_input_tokens: Sum of cached input tokens, or ``None`` if none was reported.
        cache_write_tokens: Sum of cache-write tokens, or ``None`` if none was reported.
        reasoning_tokens: Sum of reasoning tokens, or ``None`` if none was reported.
        request_bytes: Sum of request payload sizes.
        response_bytes: Sum of response payload sizes.
        latency_avg_ms: Mean latency.
        latency_p50_ms: Median latency (exact unless approximate percentiles were asked for).
        latency_p95_ms: 95th percentile latency.
        latency_p99_ms: 99th percentile latency.
    """

    group: Mapping[str, Any]
    bucket: datetime | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_input_tokens: int | None
    cache_write_tokens: int | None
    reasoning_tokens: int | None
    request_bytes: int
    response_bytes: int
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float

    def __getattr__(self, name: str) -> Any:
        # Lets reports read row.model or row.agent_id for the group keys.
        group = self.__dict__.get("group", {})
        if name in group:
            return group[name]
        raise AttributeError(f"UsageRow has no attribute {name!r} (group keys: {', '.join(group) or 'none'})")


def validate_grouping(group_by: Sequence[str], granularity: str | None, percentiles: str) -> tuple[str, ...]:
    """Check ``group_by``, ``granularity`` and ``percentiles``, and return the group keys as a tuple.

    Raises:
        ValueError: An unknown or repeated group key, or an unknown granularity or percentile method, naming
            the accepted values.
    """
    if isinstance(group_by, str):
        group_by = (group_by,)
    keys = tuple(group_by)
    unknown = [key for key in keys if key not in GROUP_KEYS]
    if unknown:
        raise ValueError(
            f"group_by: unknown key(s) {', '.join(map(repr, unknown))}; use any of {', '.join(GROUP_KEYS)}"
        )
    if len(set(keys)) != len(keys):
        raise ValueError(f"group_by: {keys!r} repeats a key")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"granularity: unknown value {granularity!r}; use one of {', '.join(GRANULARITIES)} or None")
    if percentiles not in PERCENTILE_FUNCTIONS:
        raise ValueError(f"percentiles: unknown value {percentiles!r}; use one of {', '.join(PERCENTILE_FUNCTIONS)}")
    return keys


def bucket_expression(granularity: str) -> ColumnElement[Any]:
    """The UTC start of the hour, day or month each trace falls in, right over created_at's whole range.

    ClickHouse truncates a DateTime64 before 1970 toward zero when it drops the fraction of a second, so
    1969-12-31 23:59:59.5 would start the hour 1970-01-01 00:00. Flooring to the whole second first, in integer
    microseconds, avoids that; the bucket functions are right on whole seconds.
    """
    micros = func.toUnixTimestamp64Micro(TABLE.c.created_at)
    whole_second = func.fromUnixTimestamp64Micro(micros - func.positiveModulo(micros, 1_000_000), "UTC")
    if granularity == "hour":
        return func.toStartOfHour(whole_second)
    if granularity == "day":
        return func.toStartOfDay(whole_second)
    return func.toStartOfMonth(whole_second)


def usage_statement(keys: tuple[str, ...], granularity: str | None, percentiles: str) -> Select[Any]:
    """The aggregate SELECT for a report; the caller adds the filter's WHERE clause."""
    group_columns: list[ColumnElement[Any]] = [TABLE.c[key] for key in keys]
    if granularity is not None:
        group_columns.insert(0, bucket_expression(granularity).label("bucket"))
    c = TABLE.c
    measures = [
        func.count().label("requests"),
        func.countIf(c.is_error).label("errors"),
        func.sum(c.prompt_tokens).label("prompt_tokens"),
        func.sum(c.completion_tokens).label("completion_tokens"),
        func.sum(c.total_tokens).label("total_tokens"),
        func.sum(c.cached_input_tokens).label("cached_input_tokens"),
        func.sum(c.cache_write_tokens).label("cache_write_tokens"),
        func.sum(c.reasoning_tokens).label("reasoning_tokens"),
        # Summed as UInt128: sizes are UInt64, and a sum of them may not fit one.
        func.sum(func.toUInt128(c.request_size_bytes)).label("request_bytes"),
        func.sum(func.toUInt128(c.response_size_bytes)).label("response_bytes"),
        func.avg(c.latency_ms).label("latency_avg_ms"),
        # A parametric aggregate, f(params)(column), which SQLAlchemy's func cannot spell; constant SQL only.
        literal_column(f"{PERCENTILE_FUNCTIONS[percentiles]}({', '.join(map(str, PERCENTILES))})(latency_ms)").label(
            "latency_percentiles"
        ),
    ]
    statement = select(*group_columns, *measures).execution_options(settings=USAGE_SETTINGS)
    if group_columns:
        return statement.group_by(*group_columns).order_by(*group_columns)
    # Without GROUP BY an aggregate query returns one row even over no traces (zero counts, a NaN or 0 median);
    # a report over nothing has no rows.
    return statement.having(func.count() > 0)


def usage_row(values: Mapping[Any, Any], keys: tuple[str, ...], granularity: str | None) -> UsageRow:
    """Build a :class:`UsageRow` from one result row of :func:`usage_statement`."""
    group = {key: (values[key] or None) if key in _EMPTY_MEANS_NONE else values[key] for key in keys}
    p50, p95, p99 = values["latency_percentiles"]
    return UsageRow(
        group=group,
        bucket=_as_bucket(values["bucket"]) if granularity is not None else None,
        requests=values["requests"],
        errors=values["errors"],
        prompt_tokens=values["prompt_tokens"],
        completion_tokens=values["completion_tokens"],
        total_tokens=values["total_tokens"],
        cached_input_tokens=values["cached_input_tokens"],
        cache_write_tokens=values["cache_write_tokens"],
        reasoning_tokens=values["reasoning_tokens"],
        request_bytes=values["request_bytes"],
        response_bytes=values["response_bytes"],
        latency_avg_ms=float(values["latency_avg_ms"]),
        latency_p50_ms=float(p50),
        latency_p95_ms=float(p95),
        latency_p99_ms=float(p99),
    )


def _as_bucket(value: datetime | date) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)

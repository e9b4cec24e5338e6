"""Usage and cost analytics: one aggregate query per report, grouped by tenant, model and time bucket."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, and_, func, literal_column, not_, select
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.selectable import Subquery

from llmtrace.cost import (
    COST_PARTS,
    COST_SETTINGS,
    Tokens,
    band_tier,
    cost_parts,
    dollars,
    join_prices,
    tier_band,
    total_cost,
    trace_tokens,
)
from llmtrace.filters import TraceFilter
from llmtrace.model import MICROS_PER_HOUR
from llmtrace.record import TRACES_TABLE
from llmtrace.rollup import (
    KEY_COLUMNS,
    MEASURES,
    PRICING_COLUMNS,
    ROLLUP_TABLES,
    SUMMED,
    Rollup,
    rollup_clauses,
)

TABLE = TRACES_TABLE
# What a report can group by: every key the hourly rollup keeps, so that any grouping can come from it.
GROUP_KEYS = KEY_COLUMNS
GRANULARITIES = ("hour", "day", "month")
USAGE_SOURCES = ("auto", "raw", "rollup", "hourly", "daily")
PERCENTILES = (0.5, 0.95, 0.99)
# The UsageRow fields that hold them, in the same order (None when a report asks for none).
PERCENTILE_FIELDS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
# How latency percentiles are computed. "exact" keeps every latency of a group in memory while the query runs;
# "approximate" (a t-digest) uses a few kilobytes per group, whatever its size, and is usually within about
# 1% of the exact value: the choice for reports over very many traces, such as all organizations over months.
# None computes none: the fastest reports, from the rollups too, whose percentile states are costly to merge.
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
        latency_p50_ms: Median latency (exact unless approximate percentiles were asked for; ``None`` when no
            percentiles were).
        latency_p95_ms: 95th percentile latency (``None`` likewise).
        latency_p99_ms: 99th percentile latency (``None`` likewise).
        cost: What the traces cost the platform, in USD: every priced trace that is not BYOK, at the price
            in force at its time (see llmtrace.cost). The sum of the six parts below.
        input_cost: Of ``cost``, input tokens not read from or written to the cache.
        cached_input_cost: Of ``cost``, cache reads.
        cache_write_cost: Of ``cost``, cache writes.
        output_cost: Of ``cost``, output tokens other than reasoning.
        reasoning_cost: Of ``cost``, reasoning tokens.
        request_cost: Of ``cost``, fixed fees per request.
        byok_cost: What the BYOK traces (``is_byok``) would cost at the same prices: their owners pay it, so it
            is not in ``cost``.
        unpriced_requests: Traces no price applied to (no price for their provider and model at their time, or
            counts that contradict their provider's convention); they are in no cost.
        source: What answered: ``"raw"`` (the traces), ``"hourly"`` or ``"daily"`` (that rollup).
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
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    cost: Decimal
    input_cost: Decimal
    cached_input_cost: Decimal
    cache_write_cost: Decimal
    output_cost: Decimal
    reasoning_cost: Decimal
    request_cost: Decimal
    byok_cost: Decimal
    unpriced_requests: int
    source: str

    def __getattr__(self, name: str) -> Any:
        # Lets reports read row.model or row.agent_id for the group keys.
        group = self.__dict__.get("group", {})
        if name in group:
            return group[name]
        raise AttributeError(f"UsageRow has no attribute {name!r} (group keys: {', '.join(group) or 'none'})")


def validate_grouping(group_by: Sequence[str], granularity: str | None, percentiles: str | None) -> tuple[str, ...]:
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
    if percentiles is not None and (not isinstance(percentiles, str) or percentiles not in PERCENTILE_FUNCTIONS):
        raise ValueError(
            f"percentiles: unknown value {percentiles!r}; use one of {', '.join(PERCENTILE_FUNCTIONS)} or None"
        )
    return keys


def bucket_expression(granularity: str, time: ColumnElement[Any] | None = None) -> ColumnElement[Any]:
    """The UTC start of the hour, day or month each trace (or rollup hour) falls in, right over the whole range.

    ClickHouse truncates a DateTime64 before 1970 toward zero when it drops the fraction of a second, so
    1969-12-31 23:59:59.5 would start the hour 1970-01-01 00:00. Flooring to the whole second first, in integer
    microseconds, avoids that; the bucket functions are right on whole seconds.
    """
    micros = func.toUnixTimestamp64Micro(TABLE.c.created_at if time is None else time)
    whole_second = func.fromUnixTimestamp64Micro(micros - func.positiveModulo(micros, 1_000_000), "UTC")
    if granularity == "hour":
        return func.toStartOfHour(whole_second)
    if granularity == "day":
        return func.toStartOfDay(whole_second)
    return func.toStartOfMonth(whole_second)


def usage_statement(
    keys: tuple[str, ...],
    granularity: str | None,
    percentiles: str | None,
    trace_filter: TraceFilter,
    source: Rollup | None = None,
    price_period: int = MICROS_PER_HOUR,
) -> Select[Any]:
    """The report's query: traces summed per pricing period of each group, those totals priced, then summed per group.

    Costs depend on the price in force at each trace's time. ``price_period`` (in microseconds) is an hour, or a
    day when no price in the report's range takes effect inside a day: either way one price holds for the whole
    period, so pricing each period's totals is exact, and coarser periods leave fewer totals to price. The totals
    come from the traces (``source=None``) or from a rollup, which stores exactly them; the outer query is the same.
    """
    if source is None:
        totals = period_totals(keys, granularity, percentiles, trace_filter, price_period)
    else:
        totals = rollup_period_totals(source, keys, granularity, percentiles, trace_filter, price_period)
    return priced_totals(totals.subquery("hourly"), keys, granularity, percentiles)


def period_start(time: ColumnElement[Any], micros: int = MICROS_PER_HOUR) -> ColumnElement[Any]:
    """The start of the UTC hour (or other period of ``micros``) ``time`` falls in, as DateTime64(6): integer
    arithmetic on microseconds, right before 1970 too and independent of session settings (the rollups' views
    compute their periods the same way)."""
    micros_of = func.toUnixTimestamp64Micro(time)
    return func.fromUnixTimestamp64Micro(micros_of - func.positiveModulo(micros_of, micros), "UTC")


def rollup_period_totals(
    rollup: Rollup,
    keys: tuple[str, ...],
    granularity: str | None,
    percentiles: str | None,
    trace_filter: TraceFilter,
    price_period: int,
) -> Select[Any]:
    """:func:`period_totals` read from a rollup: its rows merged per pricing period and group (see llmtrace.rollup)."""
    r = ROLLUP_TABLES[rollup.name].c
    time = r[rollup.time_column]
    dimensions: list[ColumnElement[Any]] = [r[key] for key in keys]
    if granularity is not None:
        dimensions.append(bucket_expression(granularity, time).label("bucket"))
    dimensions += [
        r.provider.label("price_provider"),
        r.model.label("price_model"),
        r.is_byok.label("price_byok"),
        (time if price_period <= rollup.micros else period_start(time, price_period)).label("price_hour"),
        *(r[name] for name in PRICING_COLUMNS),
    ]
    measures = [func.sum(r[name]).label(name) for name in MEASURES]
    if percentiles is not None:
        measures.append(literal_column(f"quantilesTDigestMergeState({_LEVELS})(latency_state)").label("latency_state"))
    statement = select(*dimensions, *measures).select_from(ROLLUP_TABLES[rollup.name])
    statement = statement.where(*rollup_clauses(rollup, trace_filter))
    return statement.group_by(*(literal_column(f"`{d.name}`") for d in dimensions))


def period_totals(
    keys: tuple[str, ...],
    granularity: str | None,
    percentiles: str | None,
    trace_filter: TraceFilter,
    price_period: int,
) -> Select[Any]:
    """Per pricing period and group, the traces' totals, split further by what pricing needs to know of each trace."""
    c = TABLE.c
    tokens = trace_tokens()
    dimensions: list[ColumnElement[Any]] = [c[key] for key in keys]
    if granularity is not None:
        dimensions.append(bucket_expression(granularity).label("bucket"))
    dimensions += [
        c.provider.label("price_provider"),
        c.model.label("price_model"),
        c.is_byok.label("price_byok"),
        period_start(c.created_at, price_period).label("price_hour"),
        tier_band(tokens.prompt).label("band_prompt"),
        tier_band(tokens.prompt + tokens.cached_input + tokens.cache_write).label("band_with_cache"),
        tokens.cache_over_prompt.label("cache_over_prompt"),
        tokens.reasoning_over_completion.label("reasoning_over_completion"),
    ]
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
        func.sum(func.toUInt64(c.latency_ms)).label("latency_sum"),
    ]
    if percentiles is not None:
        # A parametric aggregate, f(params)(column), which SQLAlchemy's func cannot spell; constant SQL only.
        state = f"{PERCENTILE_FUNCTIONS[percentiles]}State({_LEVELS})(latency_ms)"
        measures.append(literal_column(state).label("latency_state"))
    statement = select(*dimensions, *measures)
    return trace_filter.apply(statement).group_by(*(literal_column(f"`{d.name}`") for d in dimensions))


def priced_totals(
    hourly: Subquery, keys: tuple[str, ...], granularity: str | None, percentiles: str | None
) -> Select[Any]:
    """Sum per group the period totals of ``hourly``, each priced at the price in force for its period."""
    priced = priced_periods(hourly, keys, granularity).subquery("priced")
    p = priced.c
    paid = and_(p.priceable, not_(p.price_byok))
    group_columns: list[ColumnElement[Any]] = [p[key] for key in keys]
    if granularity is not None:
        group_columns.insert(0, p.bucket)
    measures = [
        func.sum(p.requests).label("requests"),
        func.sum(p.errors).label("errors"),
        *(func.sum(p[name]).label(name) for name in SUMMED),
        # divide() is ClickHouse's true division (Float64), which SQLAlchemy's "/" on integers does not render.
        func.divide(func.sum(p.latency_sum), func.sum(p.requests)).label("latency_avg_ms"),
        *(func.sumIf(p[name], paid).label(name) for name in COST_PARTS),
        func.sumIf(total_cost({name: p[name] for name in COST_PARTS}), and_(p.priceable, p.price_byok)).label(
            "byok_cost"
        ),
        func.sumIf(p.requests, not_(p.priceable)).label("unpriced_requests"),
    ]
    if percentiles is not None:
        merged = f"{PERCENTILE_FUNCTIONS[percentiles]}Merge({_LEVELS})(priced.latency_state)"
        measures.append(literal_column(merged).label("latency_percentiles"))
    statement = (
        select(*group_columns, *measures)
        .select_from(priced)
        .execution_options(settings={**USAGE_SETTINGS, **COST_SETTINGS})
    )
    if group_columns:
        return statement.group_by(*group_columns).order_by(*group_columns)
    # Without GROUP BY an aggregate query returns one row even over no traces; a report over nothing has no rows.
    return statement.having(func.sum(p.requests) > 0)


def priced_periods(hourly: Subquery, keys: tuple[str, ...], granularity: str | None) -> Select[Any]:
    """Each period total of ``hourly`` with its cost parts (millionths of a dollar) and whether it is priceable.

    A query of its own under the report's sums: each part is computed once here rather than once in each sum that
    uses it, which keeps ClickHouse's analysis of the report short.
    """
    h = hourly.c
    priced = join_prices(hourly, h.price_provider, h.price_model, h.price_hour)
    tokens = Tokens(
        requests=h.requests,
        prompt=h.prompt_tokens,
        completion=h.completion_tokens,
        cached_input=func.ifNull(h.cached_input_tokens, 0),
        cache_write=func.ifNull(h.cache_write_tokens, 0),
        reasoning=func.ifNull(h.reasoning_tokens, 0),
        cache_over_prompt=h.cache_over_prompt,
        reasoning_over_completion=h.reasoning_over_completion,
    )
    band = func.if_(priced.price("prompt_includes_cached"), h.band_prompt, h.band_with_cache)
    parts, priceable = cost_parts(priced, tokens, band_tier(priced, band))
    passed = [h[key] for key in keys]
    if granularity is not None:
        passed.append(h.bucket)
    passed += [h[name] for name in ("requests", "errors", *SUMMED, "latency_sum", "price_byok")]
    if "latency_state" in h:
        passed.append(h.latency_state)
    return select(
        *passed,
        priceable.label("priceable"),
        *(expression.label(name) for name, expression in parts.items()),
    ).select_from(priced.from_)


_LEVELS = ", ".join(map(str, PERCENTILES))
NO_PERCENTILES = (None, None, None)


def usage_row(
    values: Mapping[Any, Any], keys: tuple[str, ...], granularity: str | None, source: str = "raw"
) -> UsageRow:
    """Build a :class:`UsageRow` from one result row of :func:`usage_statement`."""
    group = {key: (values[key] or None) if key in _EMPTY_MEANS_NONE else values[key] for key in keys}
    p50, p95, p99 = (
        (float(p) for p in values["latency_percentiles"]) if "latency_percentiles" in values else NO_PERCENTILES
    )
    parts = {name: dollars(values[name]) for name in COST_PARTS}
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
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        cost=sum(parts.values(), start=Decimal(0)),
        **parts,
        byok_cost=dollars(values["byok_cost"]),
        unpriced_requests=values["unpriced_requests"],
        source=source,
    )


def _as_bucket(value: datetime | date) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)

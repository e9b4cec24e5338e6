"""The hourly rollup: ``llm_usage_hourly``, kept by a materialized view, and when a report may read it.

Every insert into ``llm_traces`` also reaches the materialized view ``llm_usage_hourly_mv``, which adds the
block's totals per hour and group to ``llm_usage_hourly`` (an AggregatingMergeTree). A report over a month then
reads a few rows per hour and group instead of every trace.

What keeps it equal to the traces:

- **Same rows.** The view sees exactly the blocks the table stores. An insert ClickHouse drops as a duplicate
  (a retry under the same deduplication token) is dropped for the view too: the rollup table keeps the same
  deduplication window, and ClickHouse deduplicates a view's blocks by the source block's token.
- **Same groups.** The rollup keeps every group key of :meth:`TraceRepository.usage`, the hour, and what pricing
  needs of each trace (how many tier thresholds its input passes, under each convention; whether its counts
  contradict a convention). Prices change on whole hours, so pricing an hour's totals prices each trace.
- **Same sums.** Counts and token sums are exact (``sum`` of a Nullable column stays ``NULL`` when no trace
  reported it). Percentiles come from merged t-digest states: approximate, like ``percentiles="approximate"``
  on the traces (within 2% of the latency range in the tests).
- **Deletes.** :meth:`TraceRepository.delete` removes the rollup's rows for the organization and the hours the
  delete touched, and adds them again from the traces that remain (:func:`refresh_statements`).

A report reads the rollup when it can answer exactly what the traces would: approximate percentiles, filters on
rollup columns only (not ``run_id``, ``step_id``, ``trace_id``), ``since``/``until`` on whole hours.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Column, Connection, MetaData, Table, bindparam, text
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import TextClause

from llmtrace.filters import TraceFilter
from llmtrace.prices import TIER_THRESHOLDS
from llmtrace.record import TABLE_NAME
from llmtrace.topology import SINGLE, Topology

ROLLUP_TABLE_NAME = "llm_usage_hourly"
ROLLUP_VIEW_NAME = "llm_usage_hourly_mv"
# Objects the migrations create by hand, outside the declarative model (Alembic's autogenerate leaves them out).
HAND_WRITTEN = frozenset({ROLLUP_TABLE_NAME, ROLLUP_VIEW_NAME})
MICROS_PER_HOUR = 3_600_000_000
# The group keys of usage(), all kept by the rollup.
KEY_COLUMNS = (
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
PRICING_COLUMNS = ("band_prompt", "band_with_cache", "cache_over_prompt", "reasoning_over_completion")
DIMENSIONS = (*KEY_COLUMNS, "hour", *PRICING_COLUMNS)
# Filters a rollup row can answer (the others name single traces).
ROLLUP_FILTERS = frozenset(KEY_COLUMNS) - {"organization_id"}
_LADDER = "[" + ", ".join(map(str, TIER_THRESHOLDS)) + "]"
_INPUT_WITH_CACHE = (
    "toInt64(t.prompt_tokens) + toInt64(ifNull(t.cached_input_tokens, 0)) + toInt64(ifNull(t.cache_write_tokens, 0))"
)


def _band(size: str) -> str:
    return (
        f"toUInt8(arrayCount((threshold, size) -> size > threshold, {_LADDER}, "
        f"arrayWithConstant({len(TIER_THRESHOLDS)}, {size})))"
    )


# What the view computes from a block of traces. The migration that creates the view holds the same text, written
# out (a migration is a fixed point); a test checks that the view in the database computes exactly this.
ROLLUP_SELECT = (
    f"SELECT {', '.join(KEY_COLUMNS)}, "
    "fromUnixTimestamp64Micro(toUnixTimestamp64Micro(t.created_at) - "
    f"positiveModulo(toUnixTimestamp64Micro(t.created_at), {MICROS_PER_HOUR}), 'UTC') AS hour, "
    f"{_band('toInt64(t.prompt_tokens)')} AS band_prompt, "
    f"{_band(_INPUT_WITH_CACHE)} AS band_with_cache, "
    "(ifNull(t.cached_input_tokens, 0) + ifNull(t.cache_write_tokens, 0)) > t.prompt_tokens AS cache_over_prompt, "
    "ifNull(t.reasoning_tokens, 0) > t.completion_tokens AS reasoning_over_completion, "
    "count() AS requests, countIf(is_error) AS errors, "
    "sum(t.prompt_tokens) AS prompt_tokens, sum(t.completion_tokens) AS completion_tokens, "
    "sum(t.total_tokens) AS total_tokens, sum(t.cached_input_tokens) AS cached_input_tokens, "
    "sum(t.cache_write_tokens) AS cache_write_tokens, sum(t.reasoning_tokens) AS reasoning_tokens, "
    "sum(toUInt128(t.request_size_bytes)) AS request_bytes, sum(toUInt128(t.response_size_bytes)) AS response_bytes, "
    "sum(toUInt64(t.latency_ms)) AS latency_sum, "
    "quantilesTDigestState(0.5, 0.95, 0.99)(t.latency_ms) AS latency_state "
    "FROM {source} AS t{where} "
    f"GROUP BY {', '.join(DIMENSIONS)}"
)


def _rollup_table() -> Table:
    """The rollup's columns, typed for reading (the table is created by a migration, not from this metadata)."""
    from clickhouse_connect.cc_sqlalchemy.datatypes.sqltypes import Bool, DateTime64, Nullable, UInt8, UInt64, UInt128

    from llmtrace.record import TRACES_TABLE

    sums = [
        Column(name, UInt64) for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
    ]
    optional = [
        Column(name, Nullable(UInt64)) for name in ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens")
    ]
    return Table(
        ROLLUP_TABLE_NAME,
        MetaData(),
        *(Column(name, TRACES_TABLE.c[name].type) for name in KEY_COLUMNS),
        Column("hour", DateTime64(6, "UTC")),
        Column("band_prompt", UInt8),
        Column("band_with_cache", UInt8),
        Column("cache_over_prompt", Bool),
        Column("reasoning_over_completion", Bool),
        *sums,
        *optional,
        Column("request_bytes", UInt128),
        Column("response_bytes", UInt128),
        Column("latency_sum", UInt64),
    )


ROLLUP_TABLE = _rollup_table()


def answerable(trace_filter: TraceFilter, percentiles: str) -> str | None:
    """Why the rollup cannot answer a report with this filter and percentile method, or ``None`` if it can."""
    if percentiles != "approximate":
        return "exact percentiles need every latency (pass percentiles='approximate')"
    for name in ("run_id", "step_id", "trace_id"):
        if getattr(trace_filter, name) is not None:
            return f"the {name} filter names single traces"
    for name in ("since", "until"):
        value: datetime | None = getattr(trace_filter, name)
        if value is not None and (value.minute, value.second, value.microsecond) != (0, 0, 0):
            return f"{name} is not a whole UTC hour"
    return None


def rollup_clauses(trace_filter: TraceFilter) -> list[ColumnElement[bool]]:
    """The filter's conditions on the rollup's columns (call only when :func:`answerable`)."""
    r = ROLLUP_TABLE.c
    conditions: list[ColumnElement[bool]] = []
    if isinstance(trace_filter.organization_id, str):
        conditions.append(r.organization_id == trace_filter.organization_id)
    for name in ROLLUP_FILTERS:
        value = getattr(trace_filter, name)
        if value is not None:
            conditions.append(r[name] == value)
    # Whole hours: a trace is at or after ``since`` exactly when its hour is.
    if trace_filter.since is not None:
        conditions.append(r.hour >= trace_filter.since)
    if trace_filter.until is not None:
        conditions.append(r.hour < trace_filter.until)
    return conditions


def exists(connection: Connection) -> bool:
    """Whether the database has the rollup (migration 0005 or later)."""
    statement = text("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = :name")
    return bool(connection.execute(statement, {"name": ROLLUP_TABLE_NAME}).scalar_one())


def refresh_statements(
    organization_id: str, first_hour: datetime, last_hour: datetime, topology: Topology = SINGLE
) -> list[TextClause]:
    """Replace one organization's rollup rows for the hours ``first_hour`` to ``last_hour`` (inclusive) with totals
    computed again from the traces: what a delete runs after removing traces.

    The rows go first (a synchronous mutation), then the totals of the traces that remain are inserted with
    deduplication off, so that totals equal to an earlier refresh's are not dropped as a repeat. On a cluster the
    rows are removed from every shard's local table (``ON CLUSTER``) and the totals go through the Distributed
    tables.
    """
    from llmtrace.record import TRACES_TABLE

    created_at = TRACES_TABLE.c.created_at.type
    typed = [
        bindparam("first_hour", first_hour, type_=created_at),
        bindparam("end", last_hour + timedelta(hours=1), type_=created_at),
    ]
    local = topology.storage_table(ROLLUP_TABLE_NAME)
    remove = text(
        f"ALTER TABLE {local}{topology.on_cluster()} DELETE WHERE organization_id = :organization_id "
        "AND hour >= :first_hour AND hour < :end SETTINGS mutations_sync = 2"
    )
    where = " WHERE organization_id = :organization_id AND t.created_at >= :first_hour AND t.created_at < :end"
    add = text(
        f"INSERT INTO {ROLLUP_TABLE_NAME} {ROLLUP_SELECT.format(source=TABLE_NAME, where=where)} "
        "SETTINGS insert_deduplicate = 0"
    )
    return [statement.bindparams(*typed, organization_id=organization_id) for statement in (remove, add)]


def rebuild_statements(topology: Topology = SINGLE) -> list[TextClause]:
    """Empty the rollup and fill it again from every stored trace (see :meth:`TraceRepository.rebuild_rollup`)."""
    local = topology.storage_table(ROLLUP_TABLE_NAME)
    fill = ROLLUP_SELECT.format(source=TABLE_NAME, where="")
    return [
        text(f"TRUNCATE TABLE {local}{topology.on_cluster()}"),
        text(f"INSERT INTO {ROLLUP_TABLE_NAME} {fill} SETTINGS insert_deduplicate = 0"),
    ]

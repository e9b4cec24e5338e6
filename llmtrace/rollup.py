"""The usage rollups: ``llm_usage_hourly`` and ``llm_usage_daily``, kept by materialized views, and when a report
may read them.

Every insert into ``llm_traces`` reaches the materialized view ``llm_usage_hourly_mv``, which adds the block's
totals per hour and group to ``llm_usage_hourly``; each insert into that table reaches ``llm_usage_daily_mv``,
which adds them per day, without agent and project, to ``llm_usage_daily`` (both AggregatingMergeTrees). A report
over a month then reads a few rows per day or hour and group instead of every trace.

What keeps them equal to the traces:

- **Same rows.** The views see exactly the blocks the table stores. An insert ClickHouse drops as a duplicate
  (a retry under the same deduplication token) is dropped for the views too: the rollups keep the traces'
  deduplication window, and ClickHouse deduplicates a view's blocks by the source block's token.
- **Same groups.** Each rollup keeps its group keys, its time (hour or day), and what pricing needs of each
  trace (how many tier thresholds its input passes, under each convention; whether its counts contradict a
  convention). Pricing a period's totals at once prices each trace, as long as no price changes inside the
  period (see :func:`llmtrace.prices.prices_change_inside_days`).
- **Same sums.** Counts and token sums are exact (``sum`` of a Nullable column stays ``NULL`` when no trace
  reported it). Percentiles come from merged t-digest states: approximate, like ``percentiles="approximate"``
  on the traces (within 2% of the latency range in the tests).
- **Deletes.** :meth:`TraceRepository.delete` removes both rollups' rows for the organization and the days the
  delete touched, and adds them again from the traces that remain (:func:`refresh_statements`).

A report reads a rollup when it can answer exactly what the traces would (:func:`answerable`); the daily one
when it can, else the hourly one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Column, Connection, MetaData, Table, bindparam, text
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import TextClause

from llmtrace.filters import TraceFilter
from llmtrace.model import MICROS_PER_DAY, MICROS_PER_HOUR, as_utc, epoch_micros
from llmtrace.prices import TIER_THRESHOLDS
from llmtrace.record import TABLE_NAME
from llmtrace.topology import SINGLE, Topology

# The group keys of usage(), all kept by the hourly rollup.
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
# Left out of the daily rollup: on a platform of many small tenants they split a day's totals almost as finely as
# the traces themselves.
PER_AGENT = ("project_id", "agent_id")
PRICING_COLUMNS = ("band_prompt", "band_with_cache", "cache_over_prompt", "reasoning_over_completion")
_LADDER = "[" + ", ".join(map(str, TIER_THRESHOLDS)) + "]"
_INPUT_WITH_CACHE = (
    "toInt64(t.prompt_tokens) + toInt64(ifNull(t.cached_input_tokens, 0)) + toInt64(ifNull(t.cache_write_tokens, 0))"
)
# Token and byte sums a report adds up as they are (requests, errors and the latency sum are summed apart).
SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "request_bytes",
    "response_bytes",
)
# Every summed column of a rollup.
MEASURES = ("requests", "errors", *SUMMED, "latency_sum")


def _band(size: str) -> str:
    return (
        f"toUInt8(arrayCount((threshold, size) -> size > threshold, {_LADDER}, "
        f"arrayWithConstant({len(TIER_THRESHOLDS)}, {size})))"
    )


def _period_start(time: str, micros: int) -> str:
    # Integer arithmetic on microseconds: right before 1970 too, and independent of session settings.
    micros_of = f"toUnixTimestamp64Micro({time})"
    return f"fromUnixTimestamp64Micro({micros_of} - positiveModulo({micros_of}, {micros}), 'UTC')"


@dataclass(frozen=True)
class Rollup:
    """One rollup table, its view, what it keeps, and the SELECT its view computes from an inserted block.

    ``select`` names its source as ``{source}`` and takes an optional ``{where}``; the migration that creates the
    view holds the same text, written out, and a test checks that the view in the database computes exactly it.
    """

    name: str  # what UsageRow.source says when it answered
    table: str
    view: str
    reads: str  # the table whose inserts its view sees
    time_column: str
    micros: int  # its period, in microseconds
    keys: tuple[str, ...]
    select: str

    def columns(self) -> Table:
        """Its columns, typed for reading (the table is created by a migration, not from this metadata)."""
        from clickhouse_connect.cc_sqlalchemy.datatypes.sqltypes import (
            Bool,
            DateTime64,
            Nullable,
            UInt8,
            UInt64,
            UInt128,
        )

        from llmtrace.record import TRACES_TABLE

        optional = {"cached_input_tokens", "cache_write_tokens", "reasoning_tokens"}
        wide = {"request_bytes", "response_bytes"}
        return Table(
            self.table,
            MetaData(),
            *(Column(name, TRACES_TABLE.c[name].type) for name in self.keys),
            Column(self.time_column, DateTime64(6, "UTC")),
            Column("band_prompt", UInt8),
            Column("band_with_cache", UInt8),
            Column("cache_over_prompt", Bool),
            Column("reasoning_over_completion", Bool),
            *(
                Column(name, UInt128 if name in wide else Nullable(UInt64) if name in optional else UInt64)
                for name in MEASURES
            ),
        )


HOURLY = Rollup(
    name="hourly",
    table="llm_usage_hourly",
    view="llm_usage_hourly_mv",
    reads=TABLE_NAME,
    time_column="hour",
    micros=MICROS_PER_HOUR,
    keys=KEY_COLUMNS,
    select=(
        f"SELECT {', '.join(KEY_COLUMNS)}, "
        f"{_period_start('t.created_at', MICROS_PER_HOUR)} AS hour, "
        f"{_band('toInt64(t.prompt_tokens)')} AS band_prompt, "
        f"{_band(_INPUT_WITH_CACHE)} AS band_with_cache, "
        "(ifNull(t.cached_input_tokens, 0) + ifNull(t.cache_write_tokens, 0)) > t.prompt_tokens AS cache_over_prompt, "
        "ifNull(t.reasoning_tokens, 0) > t.completion_tokens AS reasoning_over_completion, "
        "count() AS requests, countIf(is_error) AS errors, "
        "sum(t.prompt_tokens) AS prompt_tokens, sum(t.completion_tokens) AS completion_tokens, "
        "sum(t.total_tokens) AS total_tokens, sum(t.cached_input_tokens) AS cached_input_tokens, "
        "sum(t.cache_write_tokens) AS cache_write_tokens, sum(t.reasoning_tokens) AS reasoning_tokens, "
        "sum(toUInt128(t.request_size_bytes)) AS request_bytes, "
        "sum(toUInt128(t.response_size_bytes)) AS response_bytes, "
        "sum(toUInt64(t.latency_ms)) AS latency_sum, "
        "quantilesTDigestState(0.5, 0.95, 0.99)(t.latency_ms) AS latency_state "
        "FROM {source} AS t{where} "
        f"GROUP BY {', '.join((*KEY_COLUMNS, 'hour', *PRICING_COLUMNS))}"
    ),
)
_DAILY_KEYS = tuple(key for key in KEY_COLUMNS if key not in PER_AGENT)
DAILY = Rollup(
    name="daily",
    table="llm_usage_daily",
    view="llm_usage_daily_mv",
    reads=HOURLY.table,
    time_column="day",
    micros=MICROS_PER_DAY,
    keys=_DAILY_KEYS,
    select=(
        f"SELECT {', '.join(_DAILY_KEYS)}, "
        f"{_period_start('h.hour', MICROS_PER_DAY)} AS day, "
        f"{', '.join(PRICING_COLUMNS)}, "
        + ", ".join(f"sum(h.{name}) AS {name}" for name in MEASURES)
        + ", quantilesTDigestMergeState(0.5, 0.95, 0.99)(h.latency_state) AS latency_state "
        "FROM {source} AS h{where} "
        f"GROUP BY {', '.join((*_DAILY_KEYS, 'day', *PRICING_COLUMNS))}"
    ),
)
# Coarsest first: a report reads the first that can answer it.
ROLLUPS = (DAILY, HOURLY)
ROLLUP_TABLES = {rollup.name: rollup.columns() for rollup in ROLLUPS}
# Objects the migrations create by hand, outside the declarative model (Alembic's autogenerate leaves them out).
HAND_WRITTEN = frozenset(name for rollup in ROLLUPS for name in (rollup.table, rollup.view))


def answerable(
    rollup: Rollup,
    trace_filter: TraceFilter,
    percentiles: str | None,
    keys: tuple[str, ...],
    granularity: str | None,
    prices_change_inside_days: bool,
) -> str | None:
    """Why ``rollup`` cannot answer this report, or ``None`` if it answers exactly what the traces would.

    ``prices_change_inside_days``: whether a price takes effect at another time than midnight UTC in the
    report's range (a day's totals could then need two prices).
    """
    if percentiles == "exact":
        return "exact percentiles need every latency (pass percentiles='approximate', or None for none)"
    for name in ("run_id", "step_id", "trace_id"):
        if getattr(trace_filter, name) is not None:
            return f"the {name} filter names single traces"
    for name in PER_AGENT:
        if name not in rollup.keys and (name in keys or getattr(trace_filter, name) is not None):
            return f"the {rollup.name} rollup does not keep {name}"
    if rollup.micros > MICROS_PER_HOUR:
        if granularity == "hour":
            return f"the {rollup.name} rollup has no hours"
        if prices_change_inside_days:
            return "a price in the range takes effect at another time than midnight UTC"
    for name in ("since", "until"):
        value: datetime | None = getattr(trace_filter, name)
        if value is not None and _micros_into_period(value, rollup.micros) != 0:
            return f"{name} is not a whole UTC {rollup.time_column}"
    return None


def _micros_into_period(value: datetime, micros: int) -> int:
    """How far ``value`` is into its UTC hour or day (periods of ``micros``), in microseconds."""
    return epoch_micros(as_utc(value)) % micros


def rollup_clauses(rollup: Rollup, trace_filter: TraceFilter) -> list[ColumnElement[bool]]:
    """The filter's conditions on ``rollup``'s columns (call only when :func:`answerable`)."""
    r = ROLLUP_TABLES[rollup.name].c
    conditions: list[ColumnElement[bool]] = []
    if isinstance(trace_filter.organization_id, str):
        conditions.append(r.organization_id == trace_filter.organization_id)
    for name in rollup.keys:
        value = getattr(trace_filter, name)
        if name != "organization_id" and value is not None:
            conditions.append(r[name] == value)
    # Whole periods: a trace is at or after ``since`` exactly when its period is.
    time = r[rollup.time_column]
    if trace_filter.since is not None:
        conditions.append(time >= trace_filter.since)
    if trace_filter.until is not None:
        conditions.append(time < trace_filter.until)
    return conditions


def existing(connection: Connection) -> frozenset[str]:
    """The names of the rollups the database has (hourly from migration 0005, daily from 0006)."""
    statement = text("SELECT name FROM system.tables WHERE database = currentDatabase() AND name IN :names").bindparams(
        bindparam("names", expanding=True)
    )
    found = set(connection.execute(statement, {"names": [rollup.table for rollup in ROLLUPS]}).scalars())
    return frozenset(rollup.name for rollup in ROLLUPS if rollup.table in found)


def refresh_statements(
    organization_id: str, first_day: datetime, last_day: datetime, present: frozenset[str], topology: Topology = SINGLE
) -> list[TextClause]:
    """Replace one organization's rollup rows for the whole UTC days ``first_day`` to ``last_day`` (inclusive) with
    totals computed again from the traces: what a delete runs after removing traces.

    The rows of every rollup in ``present`` go first (synchronous mutations), then the totals of the traces that
    remain are inserted into the hourly rollup with deduplication off, so that totals equal to an earlier
    refresh's are not dropped as a repeat; its view passes them on to the daily rollup. Whole days, so that the
    daily rollup's rows are redone whole. On a cluster the rows are removed from every shard's local table (``ON
    CLUSTER``) and the totals go through the Distributed tables.
    """
    from llmtrace.record import TRACES_TABLE

    created_at = TRACES_TABLE.c.created_at.type
    typed = [
        bindparam("first_day", first_day, type_=created_at),
        bindparam("end", last_day + timedelta(days=1), type_=created_at),
    ]
    statements = [
        text(
            f"ALTER TABLE {topology.storage_table(rollup.table)}{topology.on_cluster()} DELETE "
            f"WHERE organization_id = :organization_id AND {rollup.time_column} >= :first_day "
            f"AND {rollup.time_column} < :end SETTINGS mutations_sync = 2"
        )
        for rollup in ROLLUPS
        if rollup.name in present
    ]
    where = " WHERE organization_id = :organization_id AND t.created_at >= :first_day AND t.created_at < :end"
    if HOURLY.name in present:
        statements.append(
            text(
                f"INSERT INTO {HOURLY.table} {HOURLY.select.format(source=TABLE_NAME, where=where)} "
                "SETTINGS insert_deduplicate = 0"
            )
        )
    return [statement.bindparams(*typed, organization_id=organization_id) for statement in statements]


def rebuild_statements(present: frozenset[str], topology: Topology = SINGLE) -> list[TextClause]:
    """Empty the rollups and fill them again from every stored trace (see :meth:`TraceRepository.rebuild_rollup`):
    the hourly one from the traces, the daily one through its view."""
    statements = [
        text(f"TRUNCATE TABLE {topology.storage_table(rollup.table)}{topology.on_cluster()}")
        for rollup in ROLLUPS
        if rollup.name in present
    ]
    if HOURLY.name in present:
        fill = HOURLY.select.format(source=TABLE_NAME, where="")
        statements.append(text(f"INSERT INTO {HOURLY.table} {fill} SETTINGS insert_deduplicate = 0"))
    return statements

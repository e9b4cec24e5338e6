"""How long traces are kept: row retention and payload retention, applied by ClickHouse TTL.

Two settings per deployment, stored in the table itself (its TTL clauses), never in a migration:

- **Row retention** (``rows_days``): ``TTL created_at + INTERVAL <rows_days> DAY`` on the table. Expired rows go
  with their data part.
- **Payload retention** (``payload_days``): ``TTL created_at + INTERVAL <payload_days> DAY`` on
  ``request_json``, ``response_json`` and ``llm_config_json``. ClickHouse replaces an expired value with the
  column's default, ``''``; tokens, cost inputs, latency, sizes and ids stay.

:func:`set_retention` writes them and :func:`get_retention` reads them back from ClickHouse, so the table is the
one source of truth and every process sees the same settings. The model (:class:`llmtrace.LLMTraceRecord`) and
the migrations know nothing of TTL, and ``alembic check`` does not compare it, so setting retention leaves no
drift (a test checks this).

How ClickHouse applies it, and what that costs (measured on ClickHouse 26.9, the embedded engine):

- The table is partitioned by month, and ``ttl_only_drop_parts = 1`` makes the row TTL drop a data part only once
  every row in it has expired: it is replaced with an empty part, and nothing is rewritten to remove old rows.
  Parts never span partitions, and merges grow each month's parts towards one, so a trace goes at the earliest
  ``rows_days`` after it was created and at the latest ``rows_days`` after the end of its month (rows_days=30: a
  trace of 1 March goes by 30 April, plus the time the background drop takes). Rows of a part that is rewritten
  anyway (merged with a newer part of the same month, or rewritten for the payload TTL) are removed in that
  rewrite, so some go earlier.
  Exact row deletion would rewrite the oldest month's parts at every TTL merge (by default every 4 hours per
  partition, ``merge_with_ttl_timeout``) for as long as the month takes to expire.
- Payload retention has to rewrite parts: emptying a value is a new part without it. ClickHouse does it in
  background TTL merges, at most one per partition every ``merge_with_ttl_timeout`` (4 hours by default) and a
  few at a time (``max_number_of_merges_with_ttl_in_pool``), so a payload is emptied within hours of its deadline.
  Each rewrite shrinks the part: the payloads are most of its bytes.
- Parts written before retention was set carry no TTL information, and ClickHouse would apply the new TTL only to
  parts written or merged afterwards; an old month that is never merged again would be kept forever. So
  :func:`set_retention` materializes the TTL on existing parts (``materialize=True``), with
  ``materialize_ttl_recalculate_only = 1``: the mutation computes each part's TTL bounds from ``created_at`` and
  hard-links its column files into the new part (compact parts, under 10 MB, are copied); whole expired parts are
  then dropped and payloads emptied by the background merges above. Without that setting, ``MATERIALIZE TTL``
  rewrites every part of the table at once.
- Inserting a trace that is already past the row retention stores it, and ClickHouse drops it at the next merge,
  within milliseconds on this engine: ``add_many`` refuses such traces instead (:mod:`llmtrace.ingest`).

Other tables (the rollups, by ``hour`` or ``day``) get row retention by adding them to :data:`RETAINED_TABLES` with the
column their age is measured by.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from sqlalchemy import Engine

from llmtrace.ddl import SchemaDDL
from llmtrace.engine import driver_client, is_embedded
from llmtrace.errors import ConfigurationError, SchemaNotMigratedError, database_errors
from llmtrace.model import as_utc
from llmtrace.record import TABLE_NAME
from llmtrace.rollup import ROLLUPS, existing
from llmtrace.topology import Topology, resolve

_ROLLUP_TABLE_NAMES = frozenset(rollup.table for rollup in ROLLUPS)
# Longest retention accepted. ClickHouse keeps a part's TTL bounds as 32-bit seconds, which end in February 2106;
# 10,000 days (27 years) keeps created_at + retention below that for traces of this century's first 80 years.
MAX_DAYS = 10_000
PAYLOAD_COLUMNS = ("request_json", "response_json", "llm_config_json")
# Table settings a retention relies on (see the module docs). They are set with the first TTL and reset when the
# last one is removed, so a table without retention is exactly what the migrations created.
TTL_SETTINGS: Mapping[str, int] = MappingProxyType({"ttl_only_drop_parts": 1, "materialize_ttl_recalculate_only": 1})
# Each TTL change is applied by the one MATERIALIZE TTL statement below, not by a mutation per clause.
_ALTER_SETTINGS = {"materialize_ttl_after_modify": 0}
_TABLE = (
    "SELECT engine_full, now64(6, 'UTC') FROM system.tables WHERE database = currentDatabase() AND name = %(table)s"
)
_TTL_CLAUSE = re.compile(r" TTL (?P<ttl>.+?)(?: SETTINGS |$)")


@dataclass(frozen=True)
class RetainedTable:
    """A table whose rows can expire: the column their age is measured by, and its payload columns, if any."""

    time_column: str
    payload_columns: tuple[str, ...] = ()

    def ttl(self, days: int) -> str:
        """The TTL expression of ``days``, as ClickHouse formats it (what :func:`get_retention` reads back)."""
        return f"{self.time_column} + toIntervalDay({days})"

    def days(self, expression: str) -> int | None:
        """The days of a TTL expression this module wrote, ``None`` if it is some other expression (one of the same
        form with a number of days this module refuses, such as 0, counts as another)."""
        match = re.fullmatch(rf"{re.escape(self.time_column)} \+ toIntervalDay\((\d+)\)", expression.strip())
        return int(match.group(1)) if match and 1 <= int(match.group(1)) <= MAX_DAYS else None


# Tables retention applies to, by name, and how. The hourly rollup follows the traces' row retention (see
# set_retention): its totals of expired hours go with the traces.
RETAINED_TABLES: Mapping[str, RetainedTable] = MappingProxyType(
    {
        TABLE_NAME: RetainedTable(time_column="created_at", payload_columns=PAYLOAD_COLUMNS),
        **{rollup.table: RetainedTable(time_column=rollup.time_column) for rollup in ROLLUPS},
    }
)


@dataclass(frozen=True)
class Retention:
    """How long a table keeps its rows and their payloads; ``None`` keeps them for as long as the table exists.

    Attributes:
        rows_days: Rows are dropped this many days after ``created_at`` (with their part: see the module docs).
        payload_days: ``request_json``, ``response_json`` and ``llm_config_json`` are emptied (set to ``''``)
            this many days after ``created_at``; every other column stays. At most ``rows_days``.

    Raises:
        TypeError: A value is neither a whole number nor ``None``.
        ValueError: A value is out of range, or payloads would outlive their rows.
    """

    rows_days: int | None = None
    payload_days: int | None = None

    def __post_init__(self) -> None:
        _check_days("rows_days", self.rows_days)
        _check_days("payload_days", self.payload_days)
        if self.rows_days is not None and self.payload_days is not None and self.payload_days > self.rows_days:
            raise ValueError(
                f"payload_days={self.payload_days} is longer than rows_days={self.rows_days}: rows and their "
                f"payloads are dropped together after {self.rows_days} days, so payloads cannot be kept longer. "
                "Pass payload_days at most rows_days, or payload_days=None to keep payloads as long as rows."
            )

    def cutoff(self, now: datetime) -> datetime | None:
        """The ``created_at`` before which rows are expired at ``now``; ``None`` without row retention."""
        return None if self.rows_days is None else now - timedelta(days=self.rows_days)

    def first_whole_day(self, now: datetime) -> datetime | None:
        """The first UTC midnight from which every day's rows are all kept at ``now``; ``None`` without row
        retention.

        Always the midnight after :meth:`cutoff`, even when the cutoff falls exactly on a midnight: a row is
        expired once its TTL time is reached, so the rows at that midnight are already gone, and so is the
        rollups' row for that day (its TTL is on the day's start).
        """
        cutoff = self.cutoff(as_utc(now))
        if cutoff is None:
            return None
        return cutoff.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def _check_days(name: str, days: object) -> None:
    if days is None:
        return
    if isinstance(days, bool) or not isinstance(days, int):
        raise TypeError(f"{name} must be a whole number of days or None (no retention), got {days!r}")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(
            f"{name} must be between 1 and {MAX_DAYS} days, or None to keep data for as long as the table exists; "
            f"got {days}"
        )


def set_retention(
    engine: Engine,
    *,
    rows_days: int | None,
    payload_days: int | None,
    topology: Topology | str | None = None,
    table: str = TABLE_NAME,
    materialize: bool = True,
) -> Retention:
    """Make ``table`` keep rows for ``rows_days`` and payloads for ``payload_days`` (``None``: no limit).

    Both are stated every time, so a call says the whole retention: passing ``None`` removes that TTL. Only what
    differs from the table's current retention is altered; a repeated call alters nothing.

    Args:
        engine: An engine on the migrated database.
        rows_days: Days after ``created_at`` after which rows are dropped, or ``None`` to keep rows.
        payload_days: Days after ``created_at`` after which payloads are emptied, or ``None`` to keep them.
        topology: The deployment (see :mod:`llmtrace.topology`); ``None`` uses ``LLMTRACE_TOPOLOGY``, else detects
            it. On a cluster the TTL goes to the local table on every host (``ON CLUSTER``).
        table: A table of :data:`RETAINED_TABLES` other than the rollups, which keep the traces' row retention
            (set with the traces' own, and by the migration that creates a rollup).
        materialize: Apply the new TTL to parts written before it (see the module docs). The statement returns
            once ClickHouse has queued the mutation, which reads each part's ``created_at`` column; expired parts
            are then dropped and payloads emptied by background merges (follow them in ``system.mutations`` and
            ``system.parts``). ``False`` leaves existing parts alone until they are merged, which some never are;
            materialize them later, one partition at a time, with
            ``ALTER TABLE llm_traces MATERIALIZE TTL IN PARTITION 202611``.

    Returns:
        The retention read back from the table.

    Raises:
        TypeError, ValueError: An argument is invalid (the message names it).
        ConfigurationError: The table has a TTL llmtrace did not write (it is not replaced), or the topology is
            invalid.
        SchemaNotMigratedError: The table does not exist.
        DatabaseError: ClickHouse failed.
    """
    wanted = Retention(rows_days=rows_days, payload_days=payload_days)
    retained = _retained(table, wanted)
    if table in _ROLLUP_TABLE_NAMES:
        # Reports count every whole day the traces' retention keeps (TraceRepository.usage): a rollup that dropped
        # rows earlier would answer less than the traces, and one that kept them longer would keep expired data.
        raise ValueError(f"{table} keeps the row retention of {TABLE_NAME}: set that one, and the rollups follow it")
    with database_errors(f"setting the retention of {table}"), engine.connect() as connection:
        client = driver_client(connection)
        ddl = _schema_ddl(engine, client, topology)
        current = read_retention(client, ddl.topology.storage_table(table), retained)
        for statement in retention_statements(current, wanted, table=table, ddl=ddl, materialize=materialize):
            client.command(statement, settings=_ALTER_SETTINGS)
        present = existing(connection) if table == TABLE_NAME else frozenset()
        for rollup in (rollup.table for rollup in ROLLUPS if rollup.name in present):
            # The rollups keep the traces' row retention, so that their expired hours and days go with them
            # (reports cut all at the same whole day: see TraceRepository.usage).
            for statement in follow_traces_statements(client, ddl, rollup, materialize=materialize):
                client.command(statement, settings=_ALTER_SETTINGS)
        return read_retention(client, ddl.topology.storage_table(table), retained)


def follow_traces_statements(client: Any, ddl: SchemaDDL, rollup: str, *, materialize: bool) -> list[str]:
    """The statements that give the rollup table ``rollup`` the traces' row retention (none if it has it): what
    :func:`set_retention` runs for each rollup, and a migration for the rollup it creates."""
    traces, _ = read_row_retention(client, ddl.topology.storage_table(TABLE_NAME))
    current = read_retention(client, ddl.topology.storage_table(rollup), RETAINED_TABLES[rollup])
    wanted = Retention(rows_days=traces.rows_days)
    return retention_statements(current, wanted, table=rollup, ddl=ddl, materialize=materialize)


def get_retention(engine: Engine, *, table: str = TABLE_NAME, topology: Topology | str | None = None) -> Retention:
    """The retention ``table`` has now, read from its TTL clauses in ClickHouse.

    Raises:
        ConfigurationError: The table has a TTL llmtrace did not write.
        SchemaNotMigratedError: The table does not exist.
        DatabaseError: ClickHouse failed.
    """
    retained = _retained(table, Retention())
    with database_errors(f"reading the retention of {table}"), engine.connect() as connection:
        client = driver_client(connection)
        storage = _schema_ddl(engine, client, topology).topology.storage_table(table)
        return read_retention(client, storage, retained)


def retention_statements(
    current: Retention, wanted: Retention, *, table: str, ddl: SchemaDDL, materialize: bool
) -> list[str]:
    """The statements that change ``table``'s retention from ``current`` to ``wanted``, rendered by ``ddl``.

    Settings come first, so that the materialization already runs with them; the table TTL comes last in its
    statement, since ClickHouse reads a comma after ``MODIFY TTL`` as the start of another TTL expression.
    """
    retained = RETAINED_TABLES[table]
    if current == wanted:
        return []
    statements: list[str] = []
    if wanted != Retention() and current == Retention():
        statements += ddl.alter_storage(table, [f"MODIFY SETTING {_listed(TTL_SETTINGS)}"])
    clauses: list[str] = []
    if wanted.payload_days != current.payload_days:
        for column in retained.payload_columns:
            if wanted.payload_days is None:
                clauses.append(f"MODIFY COLUMN `{column}` REMOVE TTL")
            else:
                clauses.append(f"MODIFY COLUMN `{column}` TTL {retained.ttl(wanted.payload_days)}")
    if wanted.rows_days != current.rows_days:
        clauses.append("REMOVE TTL" if wanted.rows_days is None else f"MODIFY TTL {retained.ttl(wanted.rows_days)}")
    statements += ddl.alter_storage(table, clauses)
    if wanted == Retention():
        statements += ddl.alter_storage(table, [f"RESET SETTING {', '.join(TTL_SETTINGS)}"])
    elif materialize:
        statements += ddl.alter_storage(table, ["MATERIALIZE TTL"])
    return statements


def read_retention(client: Any, storage_table: str, retained: RetainedTable) -> Retention:
    """The retention of ``storage_table`` (the table that holds the rows) from its table and column TTLs.

    Raises:
        ConfigurationError: A TTL is not one this module writes (a hand-made TTL, or payload columns that differ).
        SchemaNotMigratedError: The table does not exist.
    """
    rows = client.query(_TABLE, parameters={"table": storage_table}).result_rows
    if not rows:
        raise SchemaNotMigratedError(
            f"The {storage_table} table does not exist in this database. Create it with `alembic upgrade head`, "
            "`llmtrace migrate` or llmtrace.migrations.upgrade(engine)."
        )
    return Retention(
        rows_days=_rows_days(rows[0][0], storage_table, retained),
        payload_days=_payload_days(client, storage_table, retained),
    )


def read_row_retention(client: Any, storage_table: str) -> tuple[Retention, datetime]:
    """The row retention of ``storage_table`` (payloads left out) and the server's current time, in one query.

    A missing table has no retention: the statement that needs the table reports it, as it would without this read.

    Raises:
        ConfigurationError: The table's TTL is not one this module writes.
    """
    rows = client.query(_TABLE, parameters={"table": storage_table}).result_rows
    if not rows:
        return Retention(), datetime.now(UTC)
    engine_full, now = rows[0]
    retained = RETAINED_TABLES[TABLE_NAME]
    return Retention(rows_days=_rows_days(engine_full, storage_table, retained)), now


def _rows_days(engine_full: str, storage_table: str, retained: RetainedTable) -> int | None:
    match = _TTL_CLAUSE.search(engine_full)
    if match is None:
        return None
    days = retained.days(match.group("ttl"))
    if days is None:
        raise _foreign_ttl(storage_table, f"TTL {match.group('ttl')}", "REMOVE TTL")
    return days


def _payload_days(client: Any, storage_table: str, retained: RetainedTable) -> int | None:
    if not retained.payload_columns:
        return None
    described = client.query(f"DESCRIBE TABLE `{storage_table}`").named_results()
    ttls = {row["name"]: row["ttl_expression"] for row in described if row["name"] in retained.payload_columns}
    if not any(ttls.values()):
        return None
    days = {retained.days(ttl) for ttl in ttls.values()}
    if len(days) == 1 and None not in days:
        return days.pop()
    listed = "; ".join(f"{name}: {ttl or 'none'}" for name, ttl in ttls.items())
    raise _foreign_ttl(storage_table, f"payload column TTLs ({listed})", "MODIFY COLUMN <column> REMOVE TTL")


def _foreign_ttl(storage_table: str, found: str, removal: str) -> ConfigurationError:
    return ConfigurationError(
        f"{storage_table} has {found}, which llmtrace's retention did not set, so it is neither read nor replaced. "
        f"If it may go, remove it (ALTER TABLE {storage_table} {removal}) and call set_retention again; otherwise "
        "keep managing this table's TTL by hand."
    )


def _retained(table: str, wanted: Retention) -> RetainedTable:
    retained = RETAINED_TABLES.get(table)
    if retained is None:
        raise ValueError(f"table={table!r} has no retention; the tables that do are {', '.join(RETAINED_TABLES)}")
    if wanted.payload_days is not None and not retained.payload_columns:
        raise ValueError(f"{table} has no payload columns; pass payload_days=None")
    return retained


def _schema_ddl(engine: Engine, client: Any, topology: Topology | str | None) -> SchemaDDL:
    resolved = resolve(topology, embedded=is_embedded(engine), client=client)
    database = client.query("SELECT currentDatabase()").result_rows[0][0] if resolved.distributed else None
    return SchemaDDL(resolved, database=database)


def _listed(settings: Mapping[str, int]) -> str:
    return ", ".join(f"{name} = {value}" for name, value in settings.items())

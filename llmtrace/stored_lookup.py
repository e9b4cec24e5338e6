"""Find which traces of a batch are already stored, so that overlapping batches are written once.

The batch's keys travel to ClickHouse in the Native format through a session-scoped temporary table and
are matched with a semi-join on ``(organization_id, agent_id, created_at, id)``: the table's sort key plus
the id. Matching on the sort key lets ClickHouse's primary-key analysis skip every granule that cannot hold
one of the batch's traces (measured on 1M rows: 15 of 129 granules read for a batch of new traces, against
all 129 when matching on ``(organization_id, id)``). A batch scattered over the table's whole history still
falls into most granules, so for shuffled backfills the cost grows with the table (benchmarks/backfill.py).
A re-sent trace has the same agent and creation time as its first copy, so this finds it.

Before that, a probe asks whether any stored row shares an organization and an agent with the batch and
was created no earlier than the batch's oldest trace. Every stored copy of a batch trace would be such a row,
so when there is none the lookup is skipped. A service writing its traces as they happen (each batch newer
than the last) mostly skips it; a backfill of shuffled history always pays for both.

Listing the keys as literals in the query text would be simpler, but the driver escapes literals character
by character in Python and the server parses each one: 10,000 ids cost ~0.16 s that way against ~0.035 s
through the temporary table. Temporary tables need a session; where the server refuses one (e.g. a load
balancer without sticky sessions), the lookup falls back to bound literals matched on
``(organization_id, id)`` (bound datetimes lose their microseconds), logging a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmtrace.model import CLICKHOUSE_COLUMNS, LLMTrace, insert_column_data
from llmtrace.record import TABLE_NAME

logger = logging.getLogger(__name__)

Identity = tuple[str, str]
STAGING_TABLE = "llmtrace_batch_keys"
# The literal fallback lists a batch's ids in the query text; 10,000 UUIDs exceed the default 256 KiB.
LITERAL_SETTINGS = {"max_query_size": 64 * 1024 * 1024}

STAGING_COLUMNS = ("organization_id", "agent_id", "created_at", "id")
_CREATE_STAGING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} "
    "(organization_id String, agent_id String, created_at DateTime64(6, 'UTC'), id String) ENGINE = Memory"
)
_SEMI_JOIN = (
    f"SELECT organization_id, id FROM {TABLE_NAME} "
    f"WHERE ({', '.join(STAGING_COLUMNS)}) IN (SELECT {', '.join(STAGING_COLUMNS)} FROM {STAGING_TABLE})"
)
_PROBE = (
    f"SELECT 1 FROM {TABLE_NAME} WHERE organization_id IN %(organizations)s AND agent_id IN %(agents)s "
    "AND created_at >= fromUnixTimestamp64Micro(%(earliest)s, 'UTC') LIMIT 1"
)
_LITERALS = f"SELECT organization_id, id FROM {TABLE_NAME} WHERE organization_id IN %(organizations)s AND id IN %(ids)s"


@dataclass(frozen=True)
class StoredKeys:
    """The lookup keys of a batch, one list per key column, as stored (absent agent ids are ``''``).

    ``created_at`` holds microseconds since the epoch (what DateTime64(6) stores).
    """

    organization_id: list[str]
    agent_id: list[str]
    created_at: list[int]
    id: list[str]

    @classmethod
    def from_columns(cls, columns: Sequence[list[Any]]) -> StoredKeys:
        """Take the key columns out of :func:`llmtrace.model.insert_column_data` output (no copying)."""
        return cls(*(columns[CLICKHOUSE_COLUMNS.index(name)] for name in STAGING_COLUMNS))

    @classmethod
    def from_traces(cls, traces: Sequence[LLMTrace]) -> StoredKeys:
        """The keys of ``traces`` (for callers that have no column data yet)."""
        return cls.from_columns(insert_column_data(traces))

    def identities(self) -> list[Identity]:
        return list(zip(self.organization_id, self.id, strict=True))


def stored_identities(client: Any, keys: StoredKeys, *, staging: bool = True) -> set[Identity]:
    """Return the ``(organization_id, id)`` of the batch's traces that the table already holds.

    Args:
        client: The clickhouse-connect client of the connection that will write the batch.
        keys: The batch's lookup keys.
        staging: Use the temporary-table semi-join (falling back to literals if the server refuses it);
            ``False`` forces the literal query.
    """
    if not keys.id or not may_hold_copies(client, keys):
        return set()
    if staging:
        try:
            return _through_staging_table(client, keys)
        except _session_errors() as exc:
            logger.warning("llmtrace: temporary tables are unavailable (%s); looking up ids as literals", exc)
    return _through_literals(client, keys.identities())


def may_hold_copies(client: Any, keys: StoredKeys) -> bool:
    """Whether any stored row could be a copy of one of the batch's traces (see the module docs)."""
    parameters = {
        "organizations": sorted(set(keys.organization_id)),
        "agents": sorted(set(keys.agent_id)),
        "earliest": min(keys.created_at),
    }
    return bool(client.query(_PROBE, parameters=parameters).result_rows)


def _through_staging_table(client: Any, keys: StoredKeys) -> set[Identity]:
    client.command(_CREATE_STAGING)
    client.command(f"TRUNCATE TABLE {STAGING_TABLE}")
    columns = [keys.organization_id, keys.agent_id, keys.created_at, keys.id]
    client.insert(STAGING_TABLE, columns, column_names=list(STAGING_COLUMNS), column_oriented=True)
    return {(organization, trace_id) for organization, trace_id in client.query(_SEMI_JOIN).result_rows}


def _through_literals(client: Any, identities: Sequence[Identity]) -> set[Identity]:
    wanted = set(identities)
    parameters = {
        "organizations": sorted({organization for organization, _ in identities}),
        "ids": sorted({trace_id for _, trace_id in identities}),
    }
    # The driver binds (escapes) the values; the query text holds no user value of ours.
    rows = client.query(_LITERALS, parameters=parameters, settings=LITERAL_SETTINGS).result_rows
    return {(organization, trace_id) for organization, trace_id in rows} & wanted


def _session_errors() -> tuple[type[Exception], ...]:
    from clickhouse_connect.driver.exceptions import DatabaseError

    return (DatabaseError,)

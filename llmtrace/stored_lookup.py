"""Find which traces of a batch are already stored, so that overlapping batches are written once.

The batch's identities travel to ClickHouse in the Native format through a session-scoped temporary table
and are matched with a semi-join. Listing them as literals in the query text would be simpler, but the
driver escapes literals character by character in Python and the server parses each one: measured on the
embedded engine, 10,000 ids cost ~0.16 s that way against ~0.035 s through the temporary table.

Temporary tables need a session. Where the server refuses one (e.g. a load balancer without sticky
sessions), the lookup falls back to bound literals, logging once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from llmtrace.record import TABLE_NAME

logger = logging.getLogger(__name__)

Identity = tuple[str, str]
STAGING_TABLE = "llmtrace_batch_identities"
# The literal fallback lists a batch's ids in the query text; 10,000 UUIDs exceed the default 256 KiB.
LITERAL_SETTINGS = {"max_query_size": 64 * 1024 * 1024}

_CREATE_STAGING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} (organization_id String, id String) ENGINE = Memory"
)
_SEMI_JOIN = (
    f"SELECT organization_id, id FROM {TABLE_NAME} "
    f"WHERE organization_id IN (SELECT organization_id FROM {STAGING_TABLE}) "
    f"AND id IN (SELECT id FROM {STAGING_TABLE}) "
    f"AND (organization_id, id) IN (SELECT organization_id, id FROM {STAGING_TABLE})"
)
_LITERALS = f"SELECT organization_id, id FROM {TABLE_NAME} WHERE organization_id IN %(organizations)s AND id IN %(ids)s"


def stored_identities(client: Any, identities: Sequence[Identity], *, staging: bool = True) -> set[Identity]:
    """Return the members of ``identities`` (``(organization_id, id)`` pairs) that the table already holds.

    Args:
        client: The clickhouse-connect client of the connection that will write the batch.
        identities: The batch's identities.
        staging: Use the temporary-table semi-join (falling back to literals if the server refuses it);
            ``False`` forces the literal query.
    """
    if not identities:
        return set()
    if staging:
        try:
            return _through_staging_table(client, identities)
        except _session_errors() as exc:
            logger.warning("llmtrace: temporary tables are unavailable (%s); looking up ids as literals", exc)
    return _through_literals(client, identities)


def _through_staging_table(client: Any, identities: Sequence[Identity]) -> set[Identity]:
    client.command(_CREATE_STAGING)
    client.command(f"TRUNCATE TABLE {STAGING_TABLE}")
    organizations = [organization for organization, _ in identities]
    ids = [trace_id for _, trace_id in identities]
    client.insert(STAGING_TABLE, [organizations, ids], column_names=["organization_id", "id"], column_oriented=True)
    found = {(organization, trace_id) for organization, trace_id in client.query(_SEMI_JOIN).result_rows}
    client.command(f"TRUNCATE TABLE {STAGING_TABLE}")
    return found


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

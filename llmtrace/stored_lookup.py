"""Ask ClickHouse which traces of a batch it already holds, sending the batch's keys as data, never as SQL text.

A trace's stored copy has the same ``(organization_id, agent_id, created_at)``, the table's sort key, and the
same ``id``. The batch's sort keys go to ClickHouse in its Native format, into a temporary table of the
connection's session, and one query selects the stored rows whose sort key is among them: ClickHouse's
primary-key analysis then reads only the granules that can hold those keys. Comparing the ids of the few rows
it returns happens here, so the id column is never read for rows that cannot match.

Why not literals in the query text: a batch may span thousands of organizations and tens of thousands of
agents, and their list alone exceeded ClickHouse's ``max_query_size``; the driver also escapes each literal in
Python and the server parses it (10,000 ids cost ~0.16 s that way, against ~0.02 s as Native data).

What this costs follows how many granules a batch's keys fall into: few for traces that are newer than what
the table holds for their agents (a live service), most of the table for a batch scattered over its history
(a shuffled backfill): see benchmarks/backfill.py. Before it, a probe with two bounds in its text (the batch's
earliest ``created_at`` and its range of organizations) asks whether any stored row could be a copy at all;
when none can, which is the case for a service that writes its traces as they happen, the lookup is skipped.
Parts whose newest trace is older than the batch are skipped by their min/max ``created_at`` unread.

How the keys reach ClickHouse depends on where it runs. On a server they travel with the query itself, as
ClickHouse's "external data" (a table sent in the same HTTP request, in ``JSONCompactColumns``): nothing depends
on a session, which a load balancer in front of ClickHouse Cloud or a cluster does not keep on one server. The
embedded engine has no external data, and its session always lives in this process, so there the keys go into
a temporary table of the connection's session. On a cluster, ``llm_traces`` is a Distributed table: the
semi-join is a ``GLOBAL IN``, so that the keys are read once where the query starts and shipped to every shard
(a plain ``IN`` would look for the keys' table on each shard).

Where the server answers the staged query with an error (it cannot keep a temporary table, or refuses the
external data), the lookup falls back to queries that name at most ``LITERAL_CHUNK`` identities each, logging a
warning once per ``add_many`` call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmtrace.model import CLICKHOUSE_COLUMNS
from llmtrace.record import TABLE_NAME
from llmtrace.topology import Topology

logger = logging.getLogger(__name__)

Identity = tuple[str, str]
STAGING_TABLE = "llmtrace_batch_keys"
# After a probe that could not rule out copies, the lookups of this many following batches skip the probe.
PROBE_PAUSE = 7
# Identities per query of the fallback: ~1,000 UUID pairs are ~60 KB of SQL, well under the default 256 KiB.
LITERAL_CHUNK = 1_000

STAGED_COLUMNS = ("organization_id", "agent_id", "created_at")
_CREATE_STAGING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} "
    "(organization_id String, agent_id String, created_at DateTime64(6, 'UTC')) ENGINE = Memory"
)
# The keys as external data: created_at as microseconds (what DateTime64(6) stores), converted in the query.
EXTERNAL_FORMAT = "JSONCompactColumns"
EXTERNAL_STRUCTURE = "organization_id String, agent_id String, created_at Int64"
_SELECT_KEYS = "SELECT organization_id, agent_id, toUnixTimestamp64Micro(created_at), id"


def semi_join(source: str, *, distributed: bool = False, micros: bool = False) -> str:
    """The query for the stored rows whose sort key is among the keys in the table ``source``.

    Args:
        source: The table (or table expression) holding the keys.
        distributed: ``llm_traces`` is a Distributed table: ship the keys to the shards (``GLOBAL IN``).
        micros: ``source`` holds ``created_at`` as microseconds since the epoch (the external data) rather than
            as a DateTime64(6).
    """
    created_at = "fromUnixTimestamp64Micro(created_at, 'UTC')" if micros else "created_at"
    in_ = "GLOBAL IN" if distributed else "IN"
    # The sort-key condition lets the primary key skip granules; the PREWHERE on created_at alone, an 8-byte
    # column, drops almost every row of the granules left before the three-column tuples are hashed (a batch
    # scattered over the table's history falls into most granules: measured 2x faster there).
    return (
        f"{_SELECT_KEYS} FROM {TABLE_NAME} PREWHERE created_at {in_} (SELECT {created_at} FROM {source}) "
        f"WHERE ({', '.join(STAGED_COLUMNS)}) {in_} (SELECT organization_id, agent_id, {created_at} FROM {source})"
    )


_SEMI_JOIN = semi_join(STAGING_TABLE)
_BY_IDENTITY = f"{_SELECT_KEYS} FROM {TABLE_NAME} WHERE (organization_id, id) IN %(identities)s"
_PROBE = (
    f"SELECT 1 FROM {TABLE_NAME} WHERE created_at >= fromUnixTimestamp64Micro(%(earliest)s, 'UTC') "
    "AND organization_id BETWEEN %(first)s AND %(last)s LIMIT 1"
)

# (organization_id, agent_id, created_at in microseconds since the epoch, id), as stored ('' for no agent).
StoredKey = tuple[str, str, int, str]


@dataclass(frozen=True)
class BatchKeys:
    """The lookup keys of a batch, one list per key column, as stored (absent agent ids are ``''``).

    ``created_at`` holds microseconds since the epoch (what DateTime64(6) stores).
    """

    organization_id: list[str]
    agent_id: list[str]
    created_at: list[int]
    id: list[str]

    @classmethod
    def from_columns(cls, columns: Sequence[list[Any]]) -> BatchKeys:
        """Take the key columns out of :func:`llmtrace.model.insert_column_data` output (no copying)."""
        return cls(*(columns[CLICKHOUSE_COLUMNS.index(name)] for name in (*STAGED_COLUMNS, "id")))

    def identities(self) -> list[Identity]:
        return list(zip(self.organization_id, self.id, strict=True))

    def keys(self) -> set[StoredKey]:
        return set(zip(self.organization_id, self.agent_id, self.created_at, self.id, strict=True))


def external_keys_data(keys: BatchKeys) -> bytes:
    """The batch's sort keys in :data:`EXTERNAL_FORMAT`, for :data:`EXTERNAL_STRUCTURE` (JSON escapes every value)."""
    columns = [keys.organization_id, keys.agent_id, keys.created_at]
    return json.dumps(columns, ensure_ascii=False, separators=(",", ":")).encode()


class StoredTraces:
    """Looks up stored copies of batches' traces over one connection (one staging table per session).

    Args:
        client: The clickhouse-connect client of the connection that will also write the batches.
        staging: Send keys as data (the default); ``False`` uses the chunked fallback.
        external_data: Send the keys with each query as external data (servers) rather than through a temporary
            table of the session (the embedded engine, which has no external data).
        distributed: ``llm_traces`` is a Distributed table (the cluster topology).
        read_settings: Settings of every query here, and of the write path's other reads (see
            :meth:`llmtrace.topology.Topology.read_settings`).
    """

    def __init__(
        self,
        client: Any,
        *,
        staging: bool = True,
        external_data: bool = False,
        distributed: bool = False,
        read_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._staging = staging
        self._staging_created = False
        self._unprobed = 0  # batches left to look up without probing first
        self._external_data = external_data
        self._distributed = distributed
        self.read_settings: dict[str, Any] = dict(read_settings or {})

    @classmethod
    def for_topology(cls, client: Any, topology: Topology, *, embedded: bool) -> StoredTraces:
        """The lookup for a connection to a deployment of ``topology`` (``embedded``: the embedded engine's)."""
        return cls(
            client,
            external_data=not embedded,
            distributed=topology.distributed,
            read_settings=topology.read_settings(),
        )

    def identities(self, keys: BatchKeys) -> set[Identity]:
        """The ``(organization_id, id)`` of the batch's traces that the table holds with the same sort key."""
        if not keys.id:
            return set()
        if self._unprobed:
            self._unprobed -= 1
        elif self.may_hold_copies(keys):
            # Batches that may overlap the table come in runs (a backfill): the next few go straight to the
            # lookup, whose answer the probe would not change, and the probe is tried again after them.
            self._unprobed = PROBE_PAUSE
        else:
            return set()
        return {(organization, trace_id) for organization, _, _, trace_id in self.stored_keys(keys)}

    def stored_keys(self, keys: BatchKeys) -> set[StoredKey]:
        """The batch's keys (sort key and id) that stored rows have, asked without the probe."""
        return self._rows(keys, keys.keys())

    def may_hold_copies(self, keys: BatchKeys) -> bool:
        """Whether any stored row could be a copy of one of the batch's traces (see the module docs)."""
        parameters = {
            "earliest": min(keys.created_at),
            "first": min(keys.organization_id),
            "last": max(keys.organization_id),
        }
        return bool(self._client.query(_PROBE, parameters=parameters, settings=self.read_settings).result_rows)

    def _rows(self, keys: BatchKeys, wanted: set[StoredKey]) -> set[StoredKey]:
        if self._staging:
            try:
                staged = self._through_external_data(keys) if self._external_data else self._through_staging_table(keys)
                return staged & wanted
            except _driver_errors() as exc:
                if getattr(exc, "code", None) is None:
                    raise  # not the server's answer (a transport failure): the caller's error mapping handles it
                # The server answered, but refuses the keys as data (no temporary table for this session, or no
                # external data through whatever stands in front of it).
                how = "external data is" if self._external_data else "temporary tables are"
                logger.warning("llmtrace: %s unavailable (%s); looking up ids in chunks", how, exc)
                self._staging = False
        return self._through_chunks(keys.identities()) & wanted

    def _through_external_data(self, keys: BatchKeys) -> set[StoredKey]:
        from clickhouse_connect.driver.external import ExternalData

        data = ExternalData(
            file_name=STAGING_TABLE, data=external_keys_data(keys), fmt=EXTERNAL_FORMAT, structure=EXTERNAL_STRUCTURE
        )
        query = semi_join(STAGING_TABLE, distributed=self._distributed, micros=True)
        return _as_keys(self._client.query(query, external_data=data, settings=self.read_settings).result_rows)

    def _through_staging_table(self, keys: BatchKeys) -> set[StoredKey]:
        if not self._staging_created:
            self._client.command(_CREATE_STAGING)
            self._staging_created = True
        self._client.command(f"TRUNCATE TABLE {STAGING_TABLE}")
        columns = [keys.organization_id, keys.agent_id, keys.created_at]
        self._client.insert(STAGING_TABLE, columns, column_names=list(STAGED_COLUMNS), column_oriented=True)
        return _as_keys(self._client.query(_SEMI_JOIN, settings=self.read_settings).result_rows)

    def _through_chunks(self, identities: list[Identity]) -> set[StoredKey]:
        found: set[StoredKey] = set()
        for chunk in _chunks(sorted(set(identities)), LITERAL_CHUNK):
            # The driver binds (escapes) the values; no user value is formatted into SQL here.
            answer = self._client.query(_BY_IDENTITY, parameters={"identities": chunk}, settings=self.read_settings)
            found |= _as_keys(answer.result_rows)
        return found


def _as_keys(rows: Sequence[Sequence[Any]]) -> set[StoredKey]:
    return {(organization, agent, int(micros), trace_id) for organization, agent, micros, trace_id in rows}


def _chunks(items: list[Identity], size: int) -> Iterator[list[Identity]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _driver_errors() -> tuple[type[Exception], ...]:
    from clickhouse_connect.driver.exceptions import Error

    return (Error,)

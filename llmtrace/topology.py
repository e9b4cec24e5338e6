"""Which kind of ClickHouse deployment the traces live on: the ``LLMTRACE_TOPOLOGY`` setting and its detection.

Four topologies, one migration history (rendered per topology by :mod:`llmtrace.ddl`):

- ``single``: the embedded engine or one ClickHouse server. Plain MergeTree.
- ``cluster:<name>``: a self-managed cluster named ``<name>`` in the servers' ``remote_servers`` (a macro such
  as ``{cluster}`` also works). Every DDL statement runs ``ON CLUSTER``; rows live in ``llm_traces_local``
  (ReplicatedMergeTree, one replica group per shard) behind a ``Distributed`` table named ``llm_traces``.
- ``replicated``: a database with the ``Replicated`` engine (one shard). ClickHouse replicates the DDL itself,
  tables are argument-less ReplicatedMergeTree, and ``ON CLUSTER`` is never used.
- ``cloud``: ClickHouse Cloud. Tables are declared MergeTree, which Cloud turns into SharedMergeTree; no
  ``ON CLUSTER``, no Distributed table.

An explicit setting (an argument, ``--topology``, or ``LLMTRACE_TOPOLOGY``) wins. Otherwise the topology is
detected, only from what ClickHouse states unambiguously (:func:`detect`): the embedded engine is ``single``;
a database already migrated says which topology it was deployed with (its ``llm_traces`` table's engine);
a fresh database on a ``Shared`` or ``Replicated`` database engine is Cloud or a Replicated database. A server
whose database engine is ordinary is ``single`` only when ``system.clusters`` names no other host: a cluster is
never inferred from ``system.clusters`` (servers list clusters, even of one host, without being deployed as one),
so a server that belongs to a multi-host cluster needs the setting.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmtrace.errors import ConfigurationError
from llmtrace.record import TABLE_NAME

TOPOLOGY_ENV_VAR = "LLMTRACE_TOPOLOGY"
# What the local (storage) table of a Distributed table is called in the cluster topology.
LOCAL_TABLE_SUFFIX = "_local"
# Cluster names come from XML element names in remote_servers (letters, digits, '_', '-', '.'), or are one macro.
_CLUSTER_NAME = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\{[A-Za-z0-9_]+\})$")
ACCEPTED_FORMS = (
    "single (the embedded engine or one server), cluster:<name> (a self-managed cluster as named in the servers' "
    "remote_servers, e.g. cluster:main), replicated (a database with the Replicated engine), "
    "cloud (ClickHouse Cloud)"
)


class Kind(enum.StrEnum):
    """The kinds of deployment llmtrace renders its schema for."""

    SINGLE = "single"
    CLUSTER = "cluster"
    REPLICATED = "replicated"
    CLOUD = "cloud"


@dataclass(frozen=True)
class Topology:
    """A deployment topology; ``cluster`` names the cluster of the ``cluster`` kind (and is ``None`` otherwise).

    Build one with :meth:`parse` (``Topology.parse("cluster:main")``) or use :data:`SINGLE`.
    """

    kind: Kind
    cluster: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is Kind.CLUSTER) != (self.cluster is not None):
            raise ValueError("a cluster name goes with the cluster topology, and only with it")
        if self.cluster is not None and not _CLUSTER_NAME.match(self.cluster):
            raise ValueError(f"invalid cluster name {self.cluster!r}")

    @classmethod
    def parse(cls, value: str, *, source: str = TOPOLOGY_ENV_VAR) -> Topology:
        """Read a topology as written in ``LLMTRACE_TOPOLOGY`` or ``--topology``.

        Args:
            value: ``single``, ``cluster:<name>``, ``replicated`` or ``cloud`` (kinds in any case).
            source: Where the value came from, named in the error message.

        Raises:
            ConfigurationError: The value is none of the accepted forms, or the cluster name is not one.
        """
        if not isinstance(value, str):
            raise ConfigurationError(f"{source} must be a string, got {value!r}. Accepted: {ACCEPTED_FORMS}.")
        kind, colon, cluster = value.strip().partition(":")
        kind = kind.strip().lower()
        if kind == Kind.CLUSTER and colon and _CLUSTER_NAME.match(cluster.strip()):
            return cls(Kind.CLUSTER, cluster.strip())
        if kind in (Kind.SINGLE, Kind.REPLICATED, Kind.CLOUD) and not colon:
            return cls(Kind(kind))
        if kind == Kind.CLUSTER:
            problem = "names no cluster" if not cluster.strip() else f"has an invalid cluster name {cluster.strip()!r}"
            raise ConfigurationError(
                f"{source}={value!r} {problem}: write cluster:<name> with the cluster's name as in the servers' "
                "remote_servers (letters, digits, '_', '-', '.'), or one macro such as cluster:{cluster}."
            )
        raise ConfigurationError(f"Invalid {source} value {value!r}. Accepted: {ACCEPTED_FORMS}.")

    def __str__(self) -> str:
        return f"{self.kind}:{self.cluster}" if self.cluster is not None else str(self.kind)

    @property
    def distributed(self) -> bool:
        """Whether rows live in a local table behind a Distributed table of the same columns (cluster only)."""
        return self.kind is Kind.CLUSTER

    def on_cluster(self) -> str:
        """`` ON CLUSTER '<name>'`` in the cluster topology, ``""`` in every other one."""
        return f" ON CLUSTER '{self.cluster}'" if self.cluster is not None else ""

    def read_settings(self) -> dict[str, Any]:
        """Settings for the write path's reads, which must see what this connection has just inserted.

        ``add_many`` counts the rows its insert stored and looks up which traces are stored; a replica that has
        not yet received the insert would make it count fewer rows and store some traces again.

        - cluster: the insert through the Distributed table writes to one replica of each shard, and reads
          through it pick a replica per shard by ``load_balancing``, random by default. ``in_order`` (also set on
          the insert, see :data:`llmtrace.ingest.INSERT_SETTINGS`) makes both pick the same one, the first
          healthy replica in the cluster's order, while ``prefer_localhost_replica`` (ClickHouse's default)
          prefers the initiator's own.
        - cloud: an HTTP load balancer may send each request to another replica; ClickHouse's documented way to
          read every insert acknowledged so far from any replica is ``select_sequential_consistency``.
        - single, replicated: the statements of one connection reach one server, which applies its own inserts
          before acknowledging them.
        """
        if self.kind is Kind.CLUSTER:
            return {"load_balancing": "in_order"}
        if self.kind is Kind.CLOUD:
            return {"select_sequential_consistency": 1}
        return {}

    def storage_table(self, table: str) -> str:
        """The table that holds ``table``'s rows: its local table on a cluster, the table itself elsewhere."""
        return f"{table}{LOCAL_TABLE_SUFFIX}" if self.distributed else table


SINGLE = Topology(Kind.SINGLE)


def configured(value: Topology | str | None = None, *, source: str = "topology") -> Topology | None:
    """The topology set explicitly: ``value`` if given, else ``LLMTRACE_TOPOLOGY``, else ``None`` (detect it).

    Args:
        value: A topology, or its text form, given by the caller (an argument or a command-line flag).
        source: What ``value`` is called, for the error message (e.g. ``"--topology"``).

    Raises:
        ConfigurationError: The value given, or ``LLMTRACE_TOPOLOGY``, is not an accepted form.
    """
    if isinstance(value, Topology):
        return value
    if value is not None:
        return Topology.parse(value, source=source)
    from_environment = os.environ.get(TOPOLOGY_ENV_VAR, "")
    return Topology.parse(from_environment, source=TOPOLOGY_ENV_VAR) if from_environment.strip() else None


def require_embeddable(topology: Topology) -> None:
    """Refuse a topology other than ``single`` for the embedded engine, which is one server in this process.

    Raises:
        ConfigurationError: ``topology`` is not ``single``.
    """
    if topology.kind is not Kind.SINGLE:
        raise ConfigurationError(
            f"The topology {topology} needs a ClickHouse server, but the database URL is the embedded engine (chDB), "
            f"which is always single. Unset {TOPOLOGY_ENV_VAR} (or pass topology='single'), or set "
            "LLMTRACE_DATABASE_URL to a server of that deployment (clickhousedb://user:pass@host:8123/db)."
        )


def resolve(value: Topology | str | None, *, embedded: bool, client: Any, source: str = "topology") -> Topology:
    """The topology to use on a connection: the explicit setting if any, else the detected one.

    Args:
        value: The caller's explicit topology, or ``None`` to fall back to ``LLMTRACE_TOPOLOGY`` and detection.
        embedded: Whether the connection is the embedded engine's.
        client: The clickhouse-connect client of the connection, for detection on a server.
        source: What ``value`` is called, for error messages.

    Raises:
        ConfigurationError: The setting is malformed, does not fit the embedded engine, or the topology of a
            server cannot be told and was not set.
    """
    topology = configured(value, source=source)
    if embedded:
        topology = topology or SINGLE
        require_embeddable(topology)
        return topology
    return topology or detect(client)


# -- detection --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerFacts:
    """What a server states about the current database, from which :func:`decide` tells the topology.

    Attributes:
        table_engine: Engine of the database's ``llm_traces`` table, ``None`` before the first migration.
        table_engine_full: That table's full engine clause (its arguments name a Distributed table's cluster).
        database_engine: Engine of the current database (``Atomic``, ``Replicated``, ``Shared``, ...).
        shared_merge_tree: Whether the server has the SharedMergeTree engine, which only ClickHouse Cloud has.
        database_shards: Shards of the cluster that a Replicated database forms (0 for other databases).
        remote_clusters: Clusters in ``system.clusters`` that list a host other than this server.
    """

    table_engine: str | None
    table_engine_full: str
    database_engine: str
    shared_merge_tree: bool
    database_shards: int
    remote_clusters: Sequence[str]


_TABLE_ENGINE = "SELECT engine, engine_full FROM system.tables WHERE database = currentDatabase() AND name = %(table)s"
_DATABASE_ENGINE = "SELECT engine FROM system.databases WHERE name = currentDatabase()"
_SHARED_MERGE_TREE = "SELECT count() FROM system.table_engines WHERE name = 'SharedMergeTree'"
# A Replicated database forms a cluster of its own name in system.clusters, one shard per shard_name.
_DATABASE_SHARDS = "SELECT uniqExact(shard_num) FROM system.clusters WHERE cluster = currentDatabase()"
_REMOTE_CLUSTERS = "SELECT DISTINCT cluster FROM system.clusters WHERE NOT is_local ORDER BY cluster"
# The cluster argument of a Distributed engine clause, quoted or not.
_DISTRIBUTED_CLUSTER = re.compile(r"^Distributed\(\s*(?:'(?P<quoted>[^']*)'|(?P<bare>[^,\s)]+))")


def server_facts(client: Any) -> ServerFacts:
    """Ask the server of ``client`` (a clickhouse-connect client) what :class:`ServerFacts` holds."""
    tables = client.query(_TABLE_ENGINE, parameters={"table": TABLE_NAME}).result_rows
    database = client.query(_DATABASE_ENGINE).result_rows
    return ServerFacts(
        table_engine=tables[0][0] if tables else None,
        table_engine_full=tables[0][1] if tables else "",
        database_engine=database[0][0] if database else "",
        shared_merge_tree=bool(client.query(_SHARED_MERGE_TREE).result_rows[0][0]),
        database_shards=int(client.query(_DATABASE_SHARDS).result_rows[0][0]),
        remote_clusters=tuple(row[0] for row in client.query(_REMOTE_CLUSTERS).result_rows),
    )


def detect(client: Any) -> Topology:
    """Tell the topology of a server from what it states (see the module docs), or refuse to guess.

    Raises:
        ConfigurationError: The server could be one node of a cluster, or is a sharded Replicated database.
    """
    return decide(server_facts(client))


def deployed(client: Any) -> Topology | None:
    """The topology the database's ``llm_traces`` table was deployed with, ``None`` if it has no such table."""
    tables = client.query(_TABLE_ENGINE, parameters={"table": TABLE_NAME}).result_rows
    return _from_table_engine(tables[0][0], tables[0][1]) if tables else None


def decide(facts: ServerFacts) -> Topology:
    """The topology that :class:`ServerFacts` imply; see :func:`detect`."""
    if facts.table_engine is not None:
        return _from_table_engine(facts.table_engine, facts.table_engine_full)
    if facts.database_engine == "Shared" or (facts.database_engine == "Replicated" and facts.shared_merge_tree):
        # Cloud databases are Shared, or Replicated on older services; only Cloud has SharedMergeTree.
        return Topology(Kind.CLOUD)
    if facts.database_engine == "Replicated":
        if facts.database_shards > 1:
            raise ConfigurationError(
                f"This Replicated database has {facts.database_shards} shards; llmtrace's replicated topology keeps "
                "every trace on every replica of one shard, and a sharded database would need a Distributed table. "
                f"Use a Replicated database with one shard, or a cluster ({TOPOLOGY_ENV_VAR}=cluster:<name>) in an "
                "Atomic database."
            )
        return Topology(Kind.REPLICATED)
    if facts.remote_clusters:
        raise ConfigurationError(
            "Cannot tell whether to deploy to this server alone or to a cluster: its system.clusters lists "
            f"{', '.join(facts.remote_clusters)} with other hosts, and its database engine "
            f"({facts.database_engine or 'unknown'}) does not replicate tables by itself. Set {TOPOLOGY_ENV_VAR} "
            f"(or --topology / topology=): {ACCEPTED_FORMS}."
        )
    return SINGLE


def _from_table_engine(engine: str, engine_full: str) -> Topology:
    if engine == "Distributed":
        match = _DISTRIBUTED_CLUSTER.match(engine_full)
        cluster = match and (match.group("quoted") if match.group("quoted") is not None else match.group("bare"))
        if not cluster or not _CLUSTER_NAME.match(cluster):
            raise ConfigurationError(
                f"{TABLE_NAME} is a Distributed table whose cluster cannot be read from {engine_full!r}; "
                f"set {TOPOLOGY_ENV_VAR}=cluster:<name>."
            )
        return Topology(Kind.CLUSTER, cluster)
    if engine.startswith("Shared"):
        return Topology(Kind.CLOUD)
    if engine.startswith("Replicated"):
        return Topology(Kind.REPLICATED)
    return SINGLE

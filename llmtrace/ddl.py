"""DDL statements rendered for a deployment topology: how each migration, written once, reaches every deployment.

A migration states what it changes (a table's columns, keys, indexes, deduplication window) and hands it to
:class:`SchemaDDL`, which renders the statements for the topology the migration runs under
(:mod:`llmtrace.topology`):

=========== ============================================== ============== ==========================================
topology    storage engine                                 ON CLUSTER     insert deduplication
=========== ============================================== ============== ==========================================
single      MergeTree                                      never          ``non_replicated_deduplication_window``
cluster     ReplicatedMergeTree('/clickhouse/tables/       every          ``replicated_deduplication_window`` and
            {shard}/{database}/<table>_local', '{replica}') statement      ``replicated_deduplication_window_seconds``
            behind a Distributed table named ``<table>``
replicated  ReplicatedMergeTree (arguments from the        never          the same two
            Replicated database)
cloud       MergeTree (Cloud makes it SharedMergeTree)     never          the same two
=========== ============================================== ============== ==========================================

On a cluster, tables are named with their database (``db.table``): statements ``ON CLUSTER`` run on every host,
and ClickHouse has resolved unqualified names in some of their clauses against each host's default database
rather than the initiator's (ClickHouse issues #6104, #37318). The Distributed table's engine names its
database literally for the same reason.

Why the deduplication window has a time bound chosen here: the replicated engines forget a block's hash after
``replicated_deduplication_window_seconds`` even when fewer blocks than the window came since, and ClickHouse 25.10
lowered its default to one hour. A batch that a writer spools during an outage is replayed when the database is
back, possibly days later; the migrations keep hashes for 7 days (ClickHouse's own default before), which costs
nothing more in Keeper: the block count still bounds how many hashes are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmtrace.topology import SINGLE, Kind, Topology

# Keys of the Alembic context options (EnvironmentContext.configure(**opts)) that carry the topology and the
# database name to the migration scripts; alembic/env.py sets them.
TOPOLOGY_OPTION = "llmtrace_topology"
DATABASE_OPTION = "llmtrace_database"
VERSION_TABLE = "alembic_version"
# Path of a table replicated on every host of a cluster (every shard), such as the version table: one replica
# group for the whole cluster, so that each host reads the same migration state. '{shard}-{replica}' names each
# host uniquely whether the {replica} macro is unique per cluster (host names) or only per shard.
CLUSTER_WIDE_PATH = "/clickhouse/tables/all/{database}/"
CLUSTER_WIDE_REPLICA = "{shard}-{replica}"


@dataclass(frozen=True)
class Deduplication:
    """How many recent inserted blocks a table remembers to drop repeats of, and (replicated engines) for how long."""

    blocks: int
    seconds: int

    def settings(self, topology: Topology) -> dict[str, int]:
        """The table settings that keep this window on ``topology``."""
        if topology.kind is Kind.SINGLE:
            return {"non_replicated_deduplication_window": self.blocks}
        return {"replicated_deduplication_window": self.blocks, "replicated_deduplication_window_seconds": self.seconds}


@dataclass(frozen=True)
class SchemaDDL:
    """Renders DDL statements for one topology.

    Args:
        topology: The deployment the statements are for.
        database: The database the tables live in; required for the cluster topology (see the module docs).
    """

    topology: Topology = SINGLE
    database: str | None = None

    def __post_init__(self) -> None:
        if self.topology.distributed and not self.database:
            raise ValueError("the cluster topology renders database-qualified names, so it needs the database")

    # -- tables -------------------------------------------------------------------------------------------------

    def create_table(
        self,
        table: str,
        columns: Sequence[str],
        *,
        order_by: str,
        partition_by: str,
        deduplication: Deduplication,
        sharding_key: str,
        family: str = "MergeTree",
    ) -> list[str]:
        """``CREATE TABLE IF NOT EXISTS`` for a MergeTree-family table (and, on a cluster, its Distributed table).

        Args:
            table: The table's name as readers and writers use it.
            columns: Column declarations (``"name Type [DEFAULT|MATERIALIZED ...] [CODEC(...)]"``).
            order_by: The sorting key expression.
            partition_by: The partition key expression.
            deduplication: The insert deduplication window.
            sharding_key: How a cluster's Distributed table picks each row's shard. It must be a function of the
                row's values alone (no ``rand()``), so that every attempt of an insert sends a row to the same
                shard, where the insert's deduplication token can recognise it.
            family: The engine family: ``MergeTree``, or ``AggregatingMergeTree`` for a rollup (its replicated
                form on replicated topologies).
        """
        settings = ", ".join(f"{name} = {value}" for name, value in deduplication.settings(self.topology).items())
        storage = self.topology.storage_table(table)
        statements = [
            f"CREATE TABLE IF NOT EXISTS {self.name(storage)}{self.topology.on_cluster()} ({', '.join(columns)}) "
            f"ENGINE = {self._storage_engine(storage, family)} PARTITION BY {partition_by} ORDER BY {order_by} "
            f"SETTINGS {settings}"
        ]
        if self.topology.distributed:
            # AS copies the columns, MATERIALIZED and DEFAULT expressions included: an insert into it fills defaults
            # and sends only ordinary columns, and each shard computes its MATERIALIZED ones from the forwarded
            # settings (see llmtrace.ingest).
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {self.name(table)}{self.topology.on_cluster()} AS {self.name(storage)} "
                f"ENGINE = Distributed('{self.topology.cluster}', '{self.database}', '{storage}', {sharding_key})"
            )
        return statements

    def create_reference_table(
        self, table: str, columns: Sequence[str], *, order_by: str, version: str, is_deleted: str
    ) -> list[str]:
        """``CREATE TABLE IF NOT EXISTS`` for a small table every host holds whole (such as the price list).

        A ReplacingMergeTree keyed by ``order_by``: a row inserted again with a higher ``version`` replaces the
        older one, and one whose ``is_deleted`` is 1 removes it (readers use ``FINAL``). On a cluster it is
        replicated to every host rather than sharded, so that each shard joins its traces with it locally.
        """
        arguments = f"{version}, {is_deleted}"
        if self.topology.kind is Kind.CLUSTER:
            engine = (
                f"ReplicatedReplacingMergeTree('{CLUSTER_WIDE_PATH}{table}', '{CLUSTER_WIDE_REPLICA}', {arguments})"
            )
        elif self.topology.kind is Kind.REPLICATED:
            engine = f"ReplicatedReplacingMergeTree({arguments})"
        else:
            engine = f"ReplacingMergeTree({arguments})"
        return [
            f"CREATE TABLE IF NOT EXISTS {self.name(table)}{self.topology.on_cluster()} ({', '.join(columns)}) "
            f"ENGINE = {engine} ORDER BY {order_by}"
        ]

    def drop_reference_table(self, table: str) -> list[str]:
        """``DROP TABLE IF EXISTS`` for a table made by :meth:`create_reference_table`."""
        sync = " SYNC" if self.topology.distributed else ""
        return [f"DROP TABLE IF EXISTS {self.name(table)}{self.topology.on_cluster()}{sync}"]

    def drop_table(self, table: str) -> list[str]:
        """``DROP TABLE IF EXISTS`` for a table (on a cluster, its Distributed table first, then its local table)."""
        if not self.topology.distributed:
            return [f"DROP TABLE IF EXISTS {self.name(table)}"]
        # SYNC: the local table's Keeper path is fixed, so a table created again after a downgrade would find the
        # dropped one's replicas still registered until the database's delayed drop ran.
        return [
            f"DROP TABLE IF EXISTS {self.name(name)}{self.topology.on_cluster()} SYNC"
            for name in (table, self.topology.storage_table(table))
        ]

    def create_materialized_view(self, view: str, *, target: str, source: str, select: str) -> list[str]:
        """``CREATE MATERIALIZED VIEW IF NOT EXISTS view TO target AS select`` (``select`` reads ``source``).

        On a cluster the view is created on every host, between the local tables: each shard's inserts into its
        local ``source`` table reach its local ``target`` table, and readers see every shard through ``target``'s
        Distributed table. ``select`` names ``source`` as ``{source}``, which is filled in per topology.
        """
        source_name = self.name(self.topology.storage_table(source))
        target_name = self.name(self.topology.storage_table(target))
        return [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {self.name(view)}{self.topology.on_cluster()} TO {target_name} "
            f"AS {select.format(source=source_name)}"
        ]

    def drop_view(self, view: str) -> list[str]:
        """``DROP VIEW IF EXISTS`` for a view made by :meth:`create_materialized_view`."""
        return [f"DROP VIEW IF EXISTS {self.name(view)}{self.topology.on_cluster()}"]

    # -- changes to existing tables -----------------------------------------------------------------------------

    def add_columns(self, table: str, clauses: Iterable[str]) -> list[str]:
        """``ALTER TABLE`` clauses that add or change columns, applied where readers and writers see columns.

        On a cluster they apply to the local table first, then to the Distributed table: a Distributed table
        must never name a column its local tables lack.
        """
        return self._alter([self.topology.storage_table(table), table], clauses)

    def drop_columns(self, table: str, clauses: Iterable[str]) -> list[str]:
        """``ALTER TABLE`` clauses that remove columns: on a cluster, from the Distributed table first."""
        return self._alter([table, self.topology.storage_table(table)], clauses)

    def alter_storage(self, table: str, clauses: Iterable[str]) -> list[str]:
        """``ALTER TABLE`` clauses about stored data (skip indexes, projections, TTL, table settings).

        They apply to the table that stores the rows: on a cluster the local table, never the Distributed one.
        """
        return self._alter([self.topology.storage_table(table)], clauses)

    def _alter(self, tables: list[str], clauses: Iterable[str]) -> list[str]:
        listed = ", ".join(clauses)
        names = dict.fromkeys(tables)  # one table twice (no Distributed table) is altered once
        return [f"ALTER TABLE {self.name(name)}{self.topology.on_cluster()} {listed}" for name in names]

    # -- Alembic's version table --------------------------------------------------------------------------------

    def create_version_table(self, table: str = VERSION_TABLE) -> str:
        """``CREATE TABLE IF NOT EXISTS`` for Alembic's version table, so that every host reads one migration state.

        On a cluster it is replicated across every host (one replica group for all shards); in a Replicated
        database and on Cloud it is replicated by the database. Insert deduplication is off: Alembic re-inserts a
        version it deleted earlier on a downgrade, and a replicated table would drop that insert as a repeat,
        leaving no version row at all.
        """
        if self.topology.kind is Kind.CLUSTER:
            engine = f"ReplicatedMergeTree('{CLUSTER_WIDE_PATH}{table}', '{CLUSTER_WIDE_REPLICA}')"
        elif self.topology.kind is Kind.REPLICATED:
            engine = "ReplicatedMergeTree"
        else:
            engine = "MergeTree"
        settings = "" if self.topology.kind is Kind.SINGLE else " SETTINGS replicated_deduplication_window = 0"
        return (
            f"CREATE TABLE IF NOT EXISTS {self.name(table)}{self.topology.on_cluster()} (version_num String) "
            f"ENGINE = {engine} ORDER BY version_num{settings}"
        )

    # -- names --------------------------------------------------------------------------------------------------

    def name(self, table: str) -> str:
        """``table`` quoted, and on a cluster qualified with the database."""
        return f"`{self.database}`.`{table}`" if self.topology.distributed else f"`{table}`"

    def _storage_engine(self, storage: str, family: str = "MergeTree") -> str:
        if self.topology.kind is Kind.CLUSTER:
            return f"Replicated{family}('/clickhouse/tables/{{shard}}/{{database}}/{storage}', '{{replica}}')"
        if self.topology.kind is Kind.REPLICATED:
            return f"Replicated{family}"
        return family


def migration_ddl() -> SchemaDDL:
    """The renderer for the migration that is running (its topology and database, as alembic/env.py set them)."""
    from alembic import op

    options = op.get_context().opts
    return SchemaDDL(options.get(TOPOLOGY_OPTION, SINGLE), database=options.get(DATABASE_OPTION))


def run(statements: Iterable[str]) -> None:
    """Execute ``statements`` in the running migration, in order (``op.execute`` each)."""
    from alembic import op

    for statement in statements:
        op.execute(statement)

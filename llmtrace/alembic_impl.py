"""Alembic's version table created for the deployment topology, so that every host reads one migration state.

clickhouse-connect's Alembic implementation creates ``alembic_version`` as a plain MergeTree with a plain
``CREATE TABLE``: on a cluster each host would keep its own migration state (and only the host Alembic talked to
would have the table). :class:`TopologyImpl` extends it: when alembic/env.py passes a topology other than
``single`` in the context options, the version table is created by :meth:`llmtrace.ddl.SchemaDDL.create_version_table`
(replicated, ``ON CLUSTER`` on a cluster) instead:

- online, before Alembic looks for the table (``start_migrations``), with ``IF NOT EXISTS``; Alembic then finds
  it and does not create its own. Running it on every migration also creates it on hosts added to the cluster
  since;
- offline (``--sql``), in place of the ``CREATE TABLE`` Alembic prints for it.

Alembic keeps one implementation class per dialect name, so defining this class (importing this module)
registers it for ``clickhousedb`` in this process. Without the topology option, or with ``single``, it behaves
exactly as clickhouse-connect's.
"""

from __future__ import annotations

from typing import Any

from clickhouse_connect.cc_sqlalchemy.alembic import ClickHouseImpl
from sqlalchemy import text
from sqlalchemy.sql.ddl import CreateTable

from llmtrace.ddl import DATABASE_OPTION, TOPOLOGY_OPTION, VERSION_TABLE, SchemaDDL
from llmtrace.topology import Kind, Topology


class TopologyImpl(ClickHouseImpl):
    """clickhouse-connect's ``ClickHouseImpl``, with the version table created for the migrations' topology."""

    __dialect__ = "clickhousedb"

    def start_migrations(self) -> None:
        super().start_migrations()
        ddl = self._topology_ddl()
        if ddl is not None and not self.as_sql:
            self._exec(text(ddl.create_version_table(self._version_table)))

    def _exec(
        self,
        construct: Any,
        execution_options: Any = None,
        multiparams: Any = None,
        params: Any = None,
    ) -> Any:
        ddl = self._topology_ddl()
        if ddl is not None and self.as_sql and self._creates_version_table(construct):
            construct = text(ddl.create_version_table(self._version_table))
        return super()._exec(construct, execution_options=execution_options, multiparams=multiparams, params=params)

    @property
    def _version_table(self) -> str:
        return str(self.context_opts.get("version_table") or VERSION_TABLE)

    def _topology_ddl(self) -> SchemaDDL | None:
        topology = self.context_opts.get(TOPOLOGY_OPTION)
        if not isinstance(topology, Topology) or topology.kind is Kind.SINGLE:
            return None
        return SchemaDDL(topology, database=self.context_opts.get(DATABASE_OPTION))

    def _creates_version_table(self, construct: Any) -> bool:
        return isinstance(construct, CreateTable) and construct.element.name == self._version_table

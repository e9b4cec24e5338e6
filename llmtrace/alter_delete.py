"""The statements that delete traces: ``ALTER TABLE ... DELETE`` and ``DELETE FROM``, for every topology.

SQLAlchemy's ``delete()`` compiles to ClickHouse's lightweight ``DELETE FROM``, which only masks rows. Erasing
them needs the mutation, and building it as a statement (rather than pasting compiled SQL into a string) keeps
the conditions' values bound parameters that pass through their types' bind processing: that is what keeps
the microseconds of a DateTime64 bound.

On a cluster both kinds go to the local table, ``ON CLUSTER``: a Distributed table stores nothing to mutate,
and ClickHouse does not pass a delete through it. :func:`delete_statement` picks the statement and the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, ColumnElement, MetaData, Table, and_, delete
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable
from sqlalchemy.sql.visitors import replacement_traverse

from llmtrace.topology import Kind, Topology


class AlterTableDelete(Executable, ClauseElement):
    """``ALTER TABLE <table> [ON CLUSTER <cluster>] DELETE WHERE <conditions>``: rewrites the parts holding matching
    rows without them."""

    inherit_cache = False  # a rare, per-request statement: not worth a cache key

    def __init__(self, table: Table, *conditions: ColumnElement[bool], cluster: str | None = None) -> None:
        if not conditions:
            raise ValueError(f"{type(self).__name__} needs at least one condition")
        self.table = table
        self.condition = and_(*conditions)
        # Validated as a topology's cluster name is: it is written into the statement.
        self.on_cluster = Topology(Kind.CLUSTER, cluster).on_cluster() if cluster is not None else ""


class DeleteFrom(AlterTableDelete):
    """``DELETE FROM <table> [ON CLUSTER <cluster>] WHERE <conditions>``: a lightweight delete, for a cluster's
    local table (SQLAlchemy's ``delete()`` has no ``ON CLUSTER``)."""


@compiles(AlterTableDelete)
def _compile_alter_table_delete(element: AlterTableDelete, compiler: SQLCompiler, **options: Any) -> str:
    table = compiler.preparer.format_table(element.table)
    return f"ALTER TABLE {table}{element.on_cluster} DELETE WHERE {compiler.process(element.condition, **options)}"


@compiles(DeleteFrom)
def _compile_delete_from(element: DeleteFrom, compiler: SQLCompiler, **options: Any) -> str:
    table = compiler.preparer.format_table(element.table)
    return f"DELETE FROM {table}{element.on_cluster} WHERE {compiler.process(element.condition, **options)}"


def delete_statement(
    table: Table, conditions: Sequence[ColumnElement[bool]], *, erase: bool, topology: Topology
) -> Executable:
    """The statement that removes ``table``'s rows matching ``conditions``, where the rows are stored.

    Args:
        table: The table readers and writers use (on a cluster, the Distributed table).
        conditions: Conditions on ``table``'s columns; at least one.
        erase: Rewrite the parts without the rows (``ALTER TABLE ... DELETE``) rather than mask them (``DELETE``).
        topology: The deployment; on a cluster the statement targets the local table ``ON CLUSTER``.
    """
    if not topology.distributed:
        return AlterTableDelete(table, *conditions) if erase else delete(table).where(*conditions)
    local = _storage_table(table, topology.storage_table(table.name))
    on_local = [_retarget(condition, table, local) for condition in conditions]
    kind = AlterTableDelete if erase else DeleteFrom
    return kind(local, *on_local, cluster=topology.cluster)


def _storage_table(table: Table, name: str) -> Table:
    """A table named ``name`` with ``table``'s columns (types included, for bind processing)."""
    return Table(name, MetaData(), *(Column(column.name, column.type) for column in table.columns))


def _retarget(condition: ColumnElement[bool], source: Table, target: Table) -> ColumnElement[bool]:
    """``condition`` with every column of ``source`` replaced by the column of the same name in ``target``."""

    def replace(element: Any, **_: Any) -> Any:
        if isinstance(element, Column) and element.table is source:
            return target.c[element.name]
        return None

    return replacement_traverse(condition, {}, replace)

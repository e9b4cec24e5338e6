"""``ALTER TABLE ... DELETE WHERE ...`` as a SQLAlchemy statement.

SQLAlchemy's ``delete()`` compiles to ClickHouse's lightweight ``DELETE FROM``, which only masks rows. Erasing
them needs the mutation, and building it as a statement (rather than pasting compiled SQL into a string) keeps
the conditions' values bound parameters that pass through their types' bind processing: that is what keeps
the microseconds of a DateTime64 bound.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Table, and_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable


class AlterTableDelete(Executable, ClauseElement):
    """``ALTER TABLE <table> DELETE WHERE <conditions>``: rewrites the parts holding matching rows without them."""

    inherit_cache = False  # a rare, per-request statement: not worth a cache key

    def __init__(self, table: Table, *conditions: ColumnElement[bool]) -> None:
        if not conditions:
            raise ValueError("AlterTableDelete needs at least one condition")
        self.table = table
        self.condition = and_(*conditions)


@compiles(AlterTableDelete)
def _compile_alter_table_delete(element: AlterTableDelete, compiler: SQLCompiler, **options: Any) -> str:
    table = compiler.preparer.format_table(element.table)
    return f"ALTER TABLE {table} DELETE WHERE {compiler.process(element.condition, **options)}"

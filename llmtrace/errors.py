"""The errors llmtrace raises. Every one derives from :class:`LLMTraceError`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager


class LLMTraceError(Exception):
    """Base class of every error llmtrace raises on purpose."""


class ConfigurationError(LLMTraceError):
    """The database URL or another setting cannot be used as given."""


class EmbeddedEngineError(ConfigurationError):
    """The embedded ClickHouse engine (chDB) cannot be opened.

    Raised when chDB is not installed, when its data directory cannot be written, or when another process
    already holds the directory (chDB allows one process per data directory).
    """


class MigrationError(LLMTraceError):
    """The Alembic migrations could not be found or applied."""


class DatabaseError(LLMTraceError):
    """ClickHouse rejected or failed a statement, or could not be reached; the driver's exception is the ``__cause__``.

    Attributes:
        transient: Whether the same statement may succeed if tried again later (the server was unreachable,
            timed out or overloaded), as opposed to a failure that repeats (bad SQL, a missing table, a value
            the column rejects).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class SchemaNotMigratedError(DatabaseError):
    """The traces table does not exist in the database: the migrations have not been run against it."""


class TraceNotFound(LLMTraceError, LookupError):  # noqa: N818 (the public name the API promises)
    """No trace with the given id exists in the given organization."""


class TraceValidationError(LLMTraceError, ValueError):
    """One or more traces of a batch are invalid; nothing of that batch was written.

    Attributes:
        problems: ``(index, field, message)`` for every invalid field of every invalid item, where ``index``
            is the item's position in the iterable given to ``add_many``.
    """

    def __init__(self, problems: list[tuple[int, str, str]]) -> None:
        self.problems = problems
        lines = [f"  item {index}, {field}: {message}" for index, field, message in problems]
        items = len({index for index, _, _ in problems})
        super().__init__(f"{items} invalid trace(s); nothing from this batch was written:\n" + "\n".join(lines))


class InvalidCursor(LLMTraceError, ValueError):  # noqa: N818 (named like TraceNotFound)
    """A pagination cursor is malformed, or was issued for another organization or other filters."""


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Map the driver's and SQLAlchemy's database errors to :class:`DatabaseError`, keeping the original.

    Programming errors (``TypeError``, ``AttributeError``, ...) pass through untouched.

    Args:
        action: What was being done, for the message (e.g. ``"inserting 1000 traces"``).
    """
    # Imported here so that importing llmtrace.errors stays free of driver imports.
    from clickhouse_connect.driver.exceptions import Error as DriverError
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except (DBAPIError, DriverError) as exc:
        original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        message = f"ClickHouse failed while {action}: {_first_line(original)}"
        if _names_missing_traces_table(str(original)):
            raise SchemaNotMigratedError(
                "The llm_traces table does not exist in this database. Create it with `alembic upgrade head`, "
                "`llmtrace migrate` or llmtrace.migrations.upgrade(engine).\n" + message
            ) from exc
        raise DatabaseError(message) from exc


def _names_missing_traces_table(text: str) -> bool:
    # ClickHouse says "Unknown table expression identifier 'llm_traces'" in a query and "Table db.llm_traces
    # does not exist" in an insert. Matching the table's own name keeps a missing temporary table, whose
    # message also quotes the query around it, from being taken for an unmigrated database.
    from llmtrace.record import TABLE_NAME

    pattern = rf"identifier '{TABLE_NAME}'|Table \S*\b{TABLE_NAME} does not exist"
    return "UNKNOWN_TABLE" in text and re.search(pattern, text) is not None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

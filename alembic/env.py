"""Alembic environment for llmtrace's ClickHouse schema.

The database URL is resolved the same way as :func:`llmtrace.get_engine`, with alembic.ini in between:
``LLMTRACE_DATABASE_URL``, else ``sqlalchemy.url`` from alembic.ini, else the embedded default. Code that
already holds a connection (tests, :func:`llmtrace.migrations.upgrade`) passes it in
``config.attributes["connection"]`` so that migrations run inside the same process and chDB engine, and may
pass ``config.attributes["target_metadata"]`` to autogenerate against an extended copy of the model.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from clickhouse_connect.cc_sqlalchemy.alembic import clickhouse_writer
from clickhouse_connect.cc_sqlalchemy.alembic import include_object as include_clickhouse_object
from sqlalchemy import Connection

from llmtrace.engine import DEFAULT_URL, ENV_VAR, get_engine
from llmtrace.record import HIDDEN_COLUMNS, Base

config = context.config
if config.config_file_name is not None and "connection" not in config.attributes:
    # The alembic command line: log as alembic.ini says ("Running upgrade ..."). Code that passes its own
    # connection keeps its own logging configuration.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = config.attributes.get("target_metadata", Base.metadata)


def include_object(object_: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """clickhouse-connect's filter, plus llmtrace's hidden bookkeeping columns (see llmtrace.record).

    They are MATERIALIZED columns that migrations create and the declarative model leaves out on purpose, so
    autogenerate must neither drop them nor report them as drift.
    """
    if type_ == "column" and reflected and name in HIDDEN_COLUMNS:
        return False
    return include_clickhouse_object(object_, name, type_, reflected, compare_to)


CONFIGURE_OPTIONS = {
    "target_metadata": target_metadata,
    "include_object": include_object,
    "process_revision_directives": clickhouse_writer,
}


def database_url() -> str:
    """The environment variable wins over alembic.ini, which wins over the built-in default."""
    return os.environ.get(ENV_VAR) or config.get_main_option("sqlalchemy.url") or DEFAULT_URL


def run_migrations_offline() -> None:
    """Print the DDL instead of running it (``alembic upgrade head --sql``); no database is opened."""
    context.configure(dialect_name="clickhousedb", literal_binds=True, **CONFIGURE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_with_connection(connection: Connection) -> None:
    context.configure(connection=connection, **CONFIGURE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        run_with_connection(given)
        return
    engine = get_engine(database_url())
    try:
        with engine.connect() as connection:
            run_with_connection(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

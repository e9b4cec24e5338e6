"""Alembic environment for llmtrace's ClickHouse schema.

The database URL is resolved the same way as :func:`llmtrace.get_engine`, with alembic.ini in between:
``LLMTRACE_DATABASE_URL``, else ``sqlalchemy.url`` from alembic.ini, else the embedded default. Code that
already holds a connection (tests, :func:`llmtrace.migrations.upgrade`) passes it in
``config.attributes["connection"]`` so that migrations run inside the same process and chDB engine, and may
pass ``config.attributes["target_metadata"]`` to autogenerate against an extended copy of the model.

The deployment topology (:mod:`llmtrace.topology`) is ``config.attributes["topology"]`` when code passes one,
else ``LLMTRACE_TOPOLOGY``, else detected on the connection. Offline (``--sql``) nothing is detected: the
topology is the setting or ``single``, and a cluster's tables are qualified with the URL's database. Both reach
the migrations (:func:`llmtrace.ddl.migration_ddl`) and the version table (:mod:`llmtrace.alembic_impl`) as
context options.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.util import CommandError
from clickhouse_connect.cc_sqlalchemy.alembic import clickhouse_writer
from clickhouse_connect.cc_sqlalchemy.alembic import include_object as include_clickhouse_object
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

import llmtrace.alembic_impl
import llmtrace.prices  # noqa: F401  (puts the price table in Base.metadata)
from llmtrace.ddl import DATABASE_OPTION, TOPOLOGY_OPTION
from llmtrace.engine import DEFAULT_URL, EMBEDDED_SCHEME, ENV_VAR, driver_client, get_engine, is_embedded
from llmtrace.engine import parse_embedded_url as embedded_target
from llmtrace.errors import ConfigurationError
from llmtrace.record import HIDDEN_COLUMNS, Base
from llmtrace.rollup import HAND_WRITTEN
from llmtrace.topology import LOCAL_TABLE_SUFFIX, SINGLE, Topology, configured, resolve

config = context.config
if config.config_file_name is not None and "connection" not in config.attributes:
    # The alembic command line: log as alembic.ini says ("Running upgrade ..."). Code that passes its own
    # connection keeps its own logging configuration.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = config.attributes.get("target_metadata", Base.metadata)


def include_object(object_: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """clickhouse-connect's filter, plus what llmtrace creates outside the declarative model.

    Hidden bookkeeping columns (see llmtrace.record) are MATERIALIZED columns that migrations create and the model
    leaves out on purpose, so autogenerate must neither drop them nor report them as drift. The usage rollup and
    its materialized view are written by hand in their migrations (autogenerate knows neither aggregate columns
    nor views), so they are left out too. On a cluster, a
    model table is the Distributed table, and its local table (``<table>_local``) is compared through it.
    """
    if type_ == "column" and reflected and name in HIDDEN_COLUMNS:
        return False
    if type_ == "table" and reflected and name is not None and is_local_table_of_model(name):
        return False
    if type_ == "table" and reflected and name is not None and name.removesuffix(LOCAL_TABLE_SUFFIX) in HAND_WRITTEN:
        return False
    return include_clickhouse_object(object_, name, type_, reflected, compare_to)


def is_local_table_of_model(name: str) -> bool:
    """Whether ``name`` is the local table behind a model table's Distributed table (the cluster topology)."""
    model_table = name.removesuffix(LOCAL_TABLE_SUFFIX)
    return model_table != name and model_table in target_metadata.tables


CONFIGURE_OPTIONS = {
    "target_metadata": target_metadata,
    "include_object": include_object,
    "process_revision_directives": clickhouse_writer,
}


def database_url() -> str:
    """The environment variable wins over alembic.ini, which wins over the built-in default."""
    return os.environ.get(ENV_VAR) or config.get_main_option("sqlalchemy.url") or DEFAULT_URL


def topology_setting() -> Topology | None:
    """The topology given by the caller (``config.attributes["topology"]``) or ``LLMTRACE_TOPOLOGY``, if any."""
    return configured(config.attributes.get("topology"), source="topology")


def url_database(url: str) -> str:
    """The database a URL names (``default`` when it names none): what offline cluster DDL qualifies names with."""
    parsed = make_url(url)
    if parsed.drivername == EMBEDDED_SCHEME:
        return embedded_target(parsed).database
    return parsed.database or "default"


def run_migrations_offline() -> None:
    """Print the DDL instead of running it (``alembic upgrade head --sql``); no database is opened."""
    topology = topology_setting() or SINGLE
    database = url_database(database_url())
    context.configure(
        dialect_name="clickhousedb",
        literal_binds=True,
        **{TOPOLOGY_OPTION: topology, DATABASE_OPTION: database},
        **CONFIGURE_OPTIONS,
    )
    context.get_context().impl.static_output(
        f"-- llmtrace: rendered for the {topology} topology"
        + (f", tables in database {database}" if topology.distributed else "")
        + " (LLMTRACE_TOPOLOGY selects another: single, cluster:<name>, replicated, cloud)"
    )
    with context.begin_transaction():
        context.run_migrations()


def run_with_connection(connection: Connection) -> None:
    topology = resolve(
        config.attributes.get("topology"),
        embedded=is_embedded(connection.engine),
        client=driver_client(connection),
    )
    database = connection.execute(text("SELECT currentDatabase()")).scalar_one()
    context.configure(
        connection=connection, **{TOPOLOGY_OPTION: topology, DATABASE_OPTION: database}, **CONFIGURE_OPTIONS
    )
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


def main() -> None:
    try:
        if context.is_offline_mode():
            run_migrations_offline()
        else:
            run_migrations_online()
    except ConfigurationError as exc:
        if config.cmd_opts is None:
            raise  # code calling Alembic (llmtrace.migrations) gets llmtrace's own error
        # The alembic command line prints a CommandError as "FAILED: <message>", without a traceback: the
        # message says what to fix.
        raise CommandError(str(exc)) from exc


main()

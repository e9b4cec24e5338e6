"""Run llmtrace's Alembic migrations from Python, on an engine or connection the caller already holds.

The command line (``alembic upgrade head`` in the repository root) does the same through alembic.ini; these
helpers exist for services and tests that must migrate inside their own process, which the embedded engine
requires (one process per data directory).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine

from llmtrace.errors import MigrationError
from llmtrace.topology import Topology, configured

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# In a checkout (or an editable install) the scripts are the repository's alembic/; a built wheel carries
# the same files as llmtrace/_alembic.
SCRIPT_LOCATIONS = (PROJECT_ROOT / "alembic", Path(__file__).resolve().parent / "_alembic")


def script_location() -> Path:
    """The directory of llmtrace's Alembic environment and versions.

    Raises:
        MigrationError: Neither a checkout's alembic/ nor the packaged copy is present.
    """
    for location in SCRIPT_LOCATIONS:
        if (location / "env.py").is_file():
            return location
    raise MigrationError(
        f"llmtrace's migration scripts were not found (looked in {', '.join(map(str, SCRIPT_LOCATIONS))}); "
        "reinstall llmtrace."
    )


def alembic_config(connection: Connection | None = None, *, topology: Topology | str | None = None) -> Config:
    """Return the Alembic configuration of llmtrace's migrations, optionally bound to a live connection.

    Args:
        connection: A connection for the migrations to run on (else alembic/env.py opens the configured URL).
        topology: The deployment topology to render the migrations for (see :mod:`llmtrace.topology`); ``None``
            falls back to ``LLMTRACE_TOPOLOGY``, then to detection on the connection.

    Raises:
        ConfigurationError: ``topology`` is not one of the accepted forms.
    """
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    if connection is not None:
        config.attributes["connection"] = connection
    if topology is not None:
        config.attributes["topology"] = configured(topology, source="topology")
    return config


def upgrade(bind: Engine | Connection, revision: str = "head", *, topology: Topology | str | None = None) -> None:
    """Apply migrations up to ``revision`` (default: the newest) on ``bind``.

    Args:
        bind: The engine or connection of the database to migrate.
        revision: The revision to stop at.
        topology: ``"single"``, ``"cluster:<name>"``, ``"replicated"`` or ``"cloud"`` (or a
            :class:`~llmtrace.topology.Topology`); ``None`` uses ``LLMTRACE_TOPOLOGY``, else detects it.

    Raises:
        ConfigurationError: The topology is malformed, cannot apply to ``bind``, or cannot be detected.
    """
    _run(bind, lambda config: command.upgrade(config, revision), topology)


def downgrade(bind: Engine | Connection, revision: str, *, topology: Topology | str | None = None) -> None:
    """Revert migrations down to ``revision`` (``"base"`` removes llmtrace's tables) on ``bind``.

    ``topology`` is as for :func:`upgrade`; a migrated database states its own, so it is rarely needed.
    """
    _run(bind, lambda config: command.downgrade(config, revision), topology)


def check(bind: Engine | Connection, *, topology: Topology | str | None = None) -> None:
    """Raise if the database schema differs from :class:`llmtrace.LLMTraceRecord` (``alembic check``)."""
    _run(bind, command.check, topology)


def _run(bind: Engine | Connection, action: Callable[[Config], object], topology: Topology | str | None) -> None:
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            action(alembic_config(connection, topology=topology))
    else:
        action(alembic_config(bind, topology=topology))

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

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = PROJECT_ROOT / "alembic.ini"


def alembic_config(connection: Connection | None = None) -> Config:
    """Return the Alembic configuration of llmtrace's migrations, optionally bound to a live connection.

    Raises:
        MigrationError: The migration scripts are not next to the package (e.g. an install without them).
    """
    if not ALEMBIC_INI.is_file():
        raise MigrationError(
            f"llmtrace's Alembic configuration was not found at {ALEMBIC_INI}. Run migrations from a checkout "
            "of the llmtrace repository (or an editable install of it), where alembic.ini and alembic/ live."
        )
    config = Config(str(ALEMBIC_INI))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(bind: Engine | Connection, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (default: the newest) on ``bind``."""
    _run(bind, lambda config: command.upgrade(config, revision))


def downgrade(bind: Engine | Connection, revision: str) -> None:
    """Revert migrations down to ``revision`` (``"base"`` removes llmtrace's tables) on ``bind``."""
    _run(bind, lambda config: command.downgrade(config, revision))


def check(bind: Engine | Connection) -> None:
    """Raise if the database schema differs from :class:`llmtrace.LLMTraceRecord` (``alembic check``)."""
    _run(bind, command.check)


def _run(bind: Engine | Connection, action: Callable[[Config], object]) -> None:
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            action(alembic_config(connection))
    else:
        action(alembic_config(bind))

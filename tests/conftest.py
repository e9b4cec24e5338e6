"""Shared fixtures.

chDB hosts one data directory per process, so each test process (each xdist worker) gets one directory for
the whole session, and tests are isolated from each other by ClickHouse database, not by path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from llmtrace import get_engine
from llmtrace.migrations import upgrade

# Backends the integration fixtures run against, by name. A ClickHouse server backend is added here (with its
# URL and database creation) without touching any test body.
BACKENDS = ["chdb"]


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This test process's embedded data directory, one per process (so per xdist worker).

    In memory (/dev/shm) where there is one, since the tests are about what ClickHouse computes and keeps, not about
    the disk; elsewhere, under pytest's temporary directory.
    """
    in_memory = os.access("/dev/shm", os.W_OK)
    if in_memory:
        directory = Path(tempfile.mkdtemp(prefix="llmtrace-tests-chdb-", dir="/dev/shm"))
    else:
        directory = tmp_path_factory.mktemp("chdb")
    # chDB starts its engine when a process opens its first connection and stops it when the last one closes;
    # starting it again reads every database of the directory (about 0.2 s here, for every engine a test makes).
    # One connection held open for the session keeps it running.
    from chdb.state import sqlitelike

    keeper = sqlitelike.connect(str(directory))
    yield directory
    keeper.close()
    if in_memory:
        shutil.rmtree(directory, ignore_errors=True)


def embedded_url(directory: Path, database: str) -> str:
    return f"chdb:///{directory}?database={database}"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, chdb_dir: Path) -> str:
    """A URL to a fresh, empty database of the parametrised backend."""
    assert request.param == "chdb"
    return embedded_url(chdb_dir, f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on a fresh database, dropped after the test."""
    engine = get_engine(database_url)
    yield engine
    with engine.connect() as connection:
        database = connection.execute(text("SELECT currentDatabase()")).scalar_one()
        connection.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
    engine.dispose()


@pytest.fixture(scope="session")
def migrated_template(chdb_dir: Path) -> str:
    """A database of this test process migrated to the newest schema once, that tests get copies of.

    Running the migrations takes about a second per database, most of it ClickHouse scheduling the synchronous
    mutations Alembic's version bookkeeping runs; copying the result takes a few milliseconds. The migrations
    themselves are tested on fresh databases (tests/integration/test_migrations.py and others).
    """
    name = f"template_{uuid.uuid4().hex[:12]}"
    upgrade(get_engine(embedded_url(chdb_dir, name)))
    return name


@pytest.fixture
def migrated_engine(engine: Engine, migrated_template: str) -> Engine:
    """An engine on a fresh database at the newest schema: a copy of the migrated template (its tables, their
    rows, and its materialized views reading and writing the copy's own tables)."""
    objects = text(
        "SELECT name, create_table_query, engine = 'MaterializedView' AS is_view, total_rows FROM system.tables "
        "WHERE database = :template ORDER BY is_view, name"
    )
    with engine.connect() as connection:
        database = connection.execute(text("SELECT currentDatabase()")).scalar_one()
        for name, create, _, rows in connection.execute(objects, {"template": migrated_template}).all():
            connection.execute(text(create.replace(f"{migrated_template}.", f"{database}.")))
            if rows:
                connection.execute(text(f"INSERT INTO {database}.{name} SELECT * FROM {migrated_template}.{name}"))
    return engine


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory (/dev/shm) where there is one, else ``tmp_path``.

    For tests of processes and races around files rather than of the disk: fsync costs nothing there, so races
    repeat faster, and a process killed with SIGKILL loses nothing the kernel already holds on any file system.
    """
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="llmtrace-test-", dir="/dev/shm"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)

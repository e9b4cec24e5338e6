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
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test process's embedded data directory (xdist gives every worker its own basetemp)."""
    return tmp_path_factory.mktemp("chdb")


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


@pytest.fixture
def migrated_engine(engine: Engine) -> Engine:
    """An engine on a fresh database migrated to the newest schema."""
    upgrade(engine)
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

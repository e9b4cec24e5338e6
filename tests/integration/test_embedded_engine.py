"""The embedded engine's one-process-per-directory rule turns into errors that say what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from llmtrace import EmbeddedEngineError, get_engine

OPEN_IN_CHILD = """
import sys
from llmtrace import get_engine, EmbeddedEngineError
try:
    get_engine(sys.argv[1])
except EmbeddedEngineError as exc:
    print(exc)
    sys.exit(3)
print("opened")
"""


def open_in_another_process(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", OPEN_IN_CHILD, url], capture_output=True, text=True, timeout=120, check=False
    )


def test_second_process_gets_a_clear_error(engine: Engine, chdb_dir: Path) -> None:
    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar_one() == 1
    result = open_in_another_process(f"chdb:///{chdb_dir}?database=other")
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout
    assert (
        f"The embedded ClickHouse data directory {chdb_dir} is in use by another process (pid {os.getpid()})" in message
    )
    assert "LLMTRACE_DATABASE_URL=chdb:///" in message and "clickhousedb://" in message


def test_other_directory_in_another_process_opens(engine: Engine, tmp_path: Path) -> None:
    result = open_in_another_process(f"chdb:///{tmp_path / 'own'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "opened"


def test_second_directory_in_the_same_process_is_refused(engine: Engine, tmp_path: Path, chdb_dir: Path) -> None:
    with pytest.raises(EmbeddedEngineError, match="only one data directory per process") as caught:
        get_engine(f"chdb:///{tmp_path / 'second'}")
    assert str(chdb_dir) in str(caught.value)


def test_database_is_created_on_first_use(chdb_dir: Path) -> None:
    engine = get_engine(f"chdb:///{chdb_dir}?database=created_on_demand")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT currentDatabase()")).scalar_one() == "created_on_demand"
            connection.execute(text("DROP DATABASE created_on_demand"))
    finally:
        engine.dispose()

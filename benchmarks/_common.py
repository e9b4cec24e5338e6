"""Helpers shared by the benchmark scripts: a scratch embedded database and timing."""

from __future__ import annotations

import atexit
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text

from llmtrace import get_engine
from llmtrace.migrations import upgrade

# One scratch directory per benchmark process: chDB allows one process per data directory.
SCRATCH = Path(tempfile.mkdtemp(prefix="llmtrace-bench-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)


def fresh_engine() -> Engine:
    """An engine on a new, migrated database in the benchmarks' scratch directory."""
    engine = get_engine(f"chdb:///{SCRATCH}?database=bench_{uuid.uuid4().hex[:8]}")
    upgrade(engine)
    return engine


def drop(engine: Engine) -> None:
    with engine.connect() as connection:
        database = connection.execute(text("SELECT currentDatabase()")).scalar_one()
        connection.execute(text(f"DROP DATABASE `{database}`"))
    engine.dispose()


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)

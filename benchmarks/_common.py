"""Helpers shared by the benchmark scripts: a scratch embedded database and timing."""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Engine, text

from llmtrace import LLMTrace, TraceRepository, get_engine
from llmtrace.migrations import upgrade
from llmtrace.rollup import ROLLUPS

# One scratch directory per benchmark process: chDB allows one process per data directory. It lives in memory
# (/dev/shm) where available: the contenders differ in CPU work, and disk writeback from earlier rounds made
# the same run vary by +/-20% on this machine's virtual disk. LLMTRACE_BENCH_DIR overrides the parent.
_PARENT = os.environ.get("LLMTRACE_BENCH_DIR") or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
SCRATCH = Path(tempfile.mkdtemp(prefix="llmtrace-bench-", dir=_PARENT))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)


def fresh_engine(*, merges: bool = True, views: bool = True) -> Engine:
    """An engine on a new, migrated database in the benchmarks' scratch directory.

    Args:
        merges: Leave background merges on. Ingest comparisons turn them off: merges start at random moments
            on the machine's second core and made identical runs differ by 20%.
        views: Keep the rollups' materialized views; without them an insert writes only the traces, which shows
            what the views cost.
    """
    engine = get_engine(f"chdb:///{SCRATCH}?database=bench_{uuid.uuid4().hex[:8]}")
    upgrade(engine)
    with engine.connect() as connection:
        if not merges:
            for table in ("llm_traces", *(rollup.table for rollup in ROLLUPS)):
                connection.execute(text(f"SYSTEM STOP MERGES {table}"))
        if not views:
            for rollup in ROLLUPS:
                connection.execute(text(f"DROP VIEW {rollup.view}"))
    return engine


def drop(engine: Engine) -> None:
    with engine.connect() as connection:
        database = connection.execute(text("SELECT currentDatabase()")).scalar_one()
        connection.execute(text(f"DROP DATABASE `{database}`"))
    engine.dispose()


def add_many_seconds(
    traces: Sequence[LLMTrace], batch_size: int, *, merges: bool = True, views: bool = True, **options: bool
) -> float:
    """Seconds TraceRepository.add_many takes to write ``traces`` into a fresh table."""
    engine = fresh_engine(merges=merges, views=views)
    repository = TraceRepository(engine)
    seconds = timed(lambda: repository.add_many(traces, batch_size=batch_size, **options))
    drop(engine)
    return seconds


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)

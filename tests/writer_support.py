"""Helpers for the writer and spool tests: databases that refuse connections, what is stored, the accounting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from llmtrace import LLMTrace, TraceRepository, WriterStats, get_engine
from tests.factories import make_trace

# Nothing listens on port 1 (binding it needs privileges no test takes): every connection is refused at once,
# through the real HTTP client.
REFUSED_URL = "clickhousedb://default:@127.0.0.1:1/{database}"


def refused_repository(database: str) -> TraceRepository:
    """A repository on a server URL where nothing listens, for a database named like an embedded one.

    Spool files are tagged with ``database.table``, so what it spools is replayed by a writer on the embedded
    database of the same name once "the server is back".
    """
    return TraceRepository(get_engine(REFUSED_URL.format(database=database)))


def database_of(engine: Engine) -> str:
    assert engine.url.database is not None
    return engine.url.database


def traces(count: int, start: int = 0) -> list[LLMTrace]:
    return [make_trace(i) for i in range(start, start + count)]


def ids(items: list[LLMTrace]) -> list[str]:
    return sorted(trace.id for trace in items)


def stored(engine: Engine) -> tuple[int, int]:
    """(rows, distinct ids) in llm_traces."""
    with engine.connect() as connection:
        rows, distinct = connection.execute(text("SELECT count(), uniqExact(id) FROM llm_traces")).one()
    return int(rows), int(distinct)


def stored_ids(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(text("SELECT id FROM llm_traces")).scalars())


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def balanced(stats: WriterStats) -> bool:
    """The accounting identity: every submitted trace is in exactly one state."""
    settled = stats.written + stats.spooled + stats.dropped + stats.failed + stats.unconfirmed
    return stats.submitted == settled + stats.queue_depth + stats.overflow_pending + stats.in_flight


def finishes(action: Callable[[], object], timeout: float = 30.0) -> bool:
    """Whether ``action`` returns within ``timeout`` seconds (run on a daemon thread, so a hang fails the test)."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()

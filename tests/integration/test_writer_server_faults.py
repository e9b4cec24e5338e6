"""TraceWriter against ClickHouse servers that fail, through the real HTTP client; then recovery on the embedded engine.

For every fault of tests/fault_servers.py, at connection set-up and after a good handshake: nothing reaches the
caller of submit(), the writer's thread survives, the accounting identity holds, the last error names the cause,
and a writer on the embedded engine (a database of the same name, so the spool files' destination matches)
later stores every trace exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from llmtrace import TraceRepository, TraceWriter, get_engine
from llmtrace.spool import SUFFIX
from tests.fault_servers import Fault, fault_server
from tests.integration.test_server_faults import CAUSES, PASSWORD
from tests.writer_support import balanced, stored, traces, wait_until

TRACES = 25
FAST_RETRIES = {"max_retries": 2, "retry_backoff": 0.01, "max_backoff": 0.05}


def url_of(port: int, database: str, *, receive_timeout: int | None = None) -> str:
    query = f"?send_receive_timeout={receive_timeout}" if receive_timeout else ""
    return f"clickhousedb://default:{PASSWORD}@127.0.0.1:{port}/{database}{query}"


def recover(migrated_engine: Engine, spool_dir: Path, expected: int) -> None:
    """Replay the spool on the embedded engine and check that every trace is stored once."""
    with TraceWriter(TraceRepository(migrated_engine), spool_dir=spool_dir) as writer:
        wait_until(lambda: not list(spool_dir.glob(f"*{SUFFIX}")))
        assert writer.flush(timeout=30)
    assert stored(migrated_engine) == (expected, expected)


@pytest.mark.parametrize("after_handshake", [False, True], ids=["at-setup", "after-handshake"])
@pytest.mark.parametrize("fault", list(Fault), ids=[fault.value for fault in Fault])
def test_a_failing_server_loses_nothing_and_kills_nothing(
    migrated_engine: Engine, tmp_path: Path, fault: Fault, after_handshake: bool
) -> None:
    database = migrated_engine.url.database
    assert database is not None
    receive_timeout = 1 if fault is Fault.HANG else None
    with fault_server(fault, after_handshake=after_handshake) as port:
        engine = get_engine(url_of(port, database, receive_timeout=receive_timeout))
        try:
            writer = TraceWriter(
                TraceRepository(engine), batch_size=10, flush_interval=0.05, spool_dir=tmp_path, **FAST_RETRIES
            )
            for trace in traces(TRACES):
                writer.submit(trace)  # never raises: the failures happen on the writer's thread
                assert balanced(writer.stats)
            assert writer.flush(timeout=120)
            writer.submit(traces(1, start=TRACES)[0])  # the thread is still there to take more
            stats = writer.close(timeout=120)
        finally:
            engine.dispose()
    assert balanced(stats) and stats.pending == 0
    assert (stats.written, stats.spooled, stats.lost, stats.unconfirmed) == (0, TRACES + 1, 0, 0)
    assert stats.errors == 0, stats.last_error  # every failure was a classified database error
    assert stats.last_error is not None and CAUSES[fault][after_handshake] in stats.last_error
    assert PASSWORD not in stats.last_error
    recover(migrated_engine, tmp_path, TRACES + 1)


def test_close_returns_on_time_while_the_server_hangs(migrated_engine: Engine, tmp_path: Path) -> None:
    # The default receive timeout (30 s) is far longer than close() may wait: the stalled batch goes to the spool.
    database = migrated_engine.url.database
    assert database is not None
    with fault_server(Fault.HANG, after_handshake=True) as port:
        engine = get_engine(url_of(port, database))
        try:
            writer = TraceWriter(TraceRepository(engine), batch_size=10, flush_interval=0.05, spool_dir=tmp_path)
            for trace in traces(TRACES):
                writer.submit(trace)
            started = time.monotonic()
            stats = writer.close(timeout=1.0)
            assert time.monotonic() - started < 10
        finally:
            engine.dispose()  # ends the stalled request with the server's teardown
    assert balanced(stats)
    assert stats.spooled == TRACES and stats.lost == 0 and stats.written == 0
    recover(migrated_engine, tmp_path, TRACES)

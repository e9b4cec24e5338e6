"""TraceWriter and AsyncTraceWriter under injected faults, on the real embedded engine.

The repository is wrapped so that inserts fail, lose their acknowledgement, or stall on purpose; everything
else (batching, deduplication, spooling, replay) runs for real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text

from llmtrace import (
    AsyncTraceWriter,
    ConfigurationError,
    DatabaseError,
    LLMTrace,
    TraceRepository,
    TraceWriter,
    WriterClosed,
    WriterEvent,
    WriterQueueFull,
    WriterStats,
)
from llmtrace.spool import SUFFIX, Spool
from tests.factories import make_trace
from tests.spool_files import spooled_traces

FAST_RETRIES: dict[str, Any] = {"max_retries": 5, "retry_backoff": 0.01, "max_backoff": 0.05}


class FaultyRepository(TraceRepository):
    """A repository whose add_many fails, loses acknowledgements, or stalls as the test says."""

    def __init__(self, engine: Engine, *, failures: int = 0, lost_acks: int = 0) -> None:
        super().__init__(engine)
        self.failures = failures
        self.lost_acks = lost_acks
        self.down = False
        self.stall = threading.Event()
        self.stall.set()
        self.calls = 0
        self.fail_on_calls: set[int] = set()

    def add_many(self, traces: Iterable[Any], **options: Any) -> int:
        self.calls += 1
        self.stall.wait()
        if self.down or self.failures > 0 or self.calls in self.fail_on_calls:
            self.failures = max(0, self.failures - 1)
            raise DatabaseError("injected failure", transient=True)
        written = super().add_many(traces, **options)
        if self.lost_acks > 0:
            self.lost_acks -= 1
            raise DatabaseError("injected failure after the insert landed", transient=True)
        return written


def nothing_lost(stats: WriterStats) -> bool:
    """Whether close() found every submitted trace written or spooled (none lost or pending)."""
    return stats.written + stats.spooled == stats.submitted and stats.lost == stats.pending == 0


def all_written(stats: WriterStats) -> bool:
    """Whether close() found every submitted trace written (none spooled, lost or pending)."""
    return stats.written == stats.submitted and stats.spooled == stats.lost == stats.pending == 0


def stored(engine: Engine) -> tuple[int, int]:
    """(rows, distinct ids) in llm_traces."""
    with engine.connect() as connection:
        rows, distinct = connection.execute(text("SELECT count(), uniqExact(id) FROM llm_traces")).one()
    return int(rows), int(distinct)


def traces(count: int, start: int = 0) -> list[LLMTrace]:
    return [make_trace(i) for i in range(start, start + count)]


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_database_fails_three_times_then_recovers(migrated_engine: Engine) -> None:
    repository = FaultyRepository(migrated_engine, failures=3)
    events: list[WriterEvent] = []
    with TraceWriter(repository, batch_size=100, on_error=events.append, **FAST_RETRIES) as writer:
        for trace in traces(250):
            writer.submit(trace)
        assert writer.flush(timeout=30)
        stats = writer.stats
    assert stored(migrated_engine) == (250, 250)
    assert stats.retried == 3 and stats.written == 250 and stats.submitted == 250
    assert [event.kind for event in events] == ["retry"] * 3


def test_retries_after_lost_acknowledgements_store_once(migrated_engine: Engine) -> None:
    repository = FaultyRepository(migrated_engine, lost_acks=2)
    with TraceWriter(repository, batch_size=50, **FAST_RETRIES) as writer:
        for trace in traces(120):
            writer.submit(trace)
    assert stored(migrated_engine) == (120, 120)


def test_down_past_the_retry_budget_spools_then_replays_once(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.down = True
    writer = TraceWriter(repository, batch_size=100, spool_dir=tmp_path, max_retries=2, retry_backoff=0.01)
    for trace in traces(300):
        writer.submit(trace)
    assert writer.flush(timeout=30)
    assert writer.stats.spooled == 300 and stored(migrated_engine) == (0, 0)

    repository.down = False
    # The next write attempt (this trace's batch, or a replay pass within max_backoff) finds the database back.
    writer.submit(make_trace(1000))
    assert writer.flush(timeout=30)
    wait_until(lambda: writer.stats.replayed + writer.stats.written == 301 and not list(tmp_path.glob(f"*{SUFFIX}")))
    assert nothing_lost(writer.close(timeout=30))
    assert stored(migrated_engine) == (301, 301)
    assert list(tmp_path.glob(f"*{SUFFIX}")) == []


def test_an_idle_writer_replays_on_a_timer_once_the_database_is_back(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.down = True
    writer = TraceWriter(
        repository, batch_size=100, flush_interval=0.05, spool_dir=tmp_path, max_retries=0, replay_interval=0.2
    )
    for trace in traces(150):
        writer.submit(trace)
    assert writer.flush(timeout=30)
    assert writer.stats.spooled == 150
    # Nothing more is submitted. While the database is down, the timer keeps trying (and failing)...
    calls = repository.calls
    wait_until(lambda: repository.calls >= calls + 2)
    assert writer.stats.replayed == 0
    # ...and once it is back, the next attempt stores the spooled traces, with no write to set it off.
    repository.down = False
    wait_until(lambda: writer.stats.replayed == 150)
    assert nothing_lost(writer.close(timeout=30))
    assert stored(migrated_engine) == (150, 150)
    assert list(tmp_path.glob(f"*{SUFFIX}")) == []


def test_interrupted_replay_repeated_stores_each_trace_once(migrated_engine: Engine, tmp_path: Path) -> None:
    down = FaultyRepository(migrated_engine)
    down.down = True
    with TraceWriter(down, batch_size=50, spool_dir=tmp_path, max_retries=0) as writer:
        for trace in traces(250):
            writer.submit(trace)
    assert writer.stats.spooled == 250

    flaky = FaultyRepository(migrated_engine)
    flaky.fail_on_calls = {3}  # replay dies after two of the five batches
    with TraceWriter(flaky, batch_size=50, spool_dir=tmp_path, max_retries=0) as replaying:
        wait_until(lambda: flaky.calls >= 3)
    assert stored(migrated_engine) == (100, 100)
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1
    assert replaying.stats.replayed == 100

    healthy = FaultyRepository(migrated_engine)
    with TraceWriter(healthy, spool_dir=tmp_path) as again:
        wait_until(lambda: not list(tmp_path.glob(f"*{SUFFIX}")))
    assert again.stats.replayed == 250
    assert stored(migrated_engine) == (250, 250)


def test_spool_with_a_torn_final_record(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = TraceRepository(migrated_engine)
    spool = Spool(tmp_path, destination=repository.destination)
    for start in (0, 10, 20):
        spool.append(traces(10, start))
    spool.rotate()
    (path,) = tmp_path.glob(f"*{SUFFIX}")
    path.write_bytes(path.read_bytes()[:-7])

    events: list[WriterEvent] = []
    with TraceWriter(repository, spool_dir=tmp_path, on_error=events.append) as writer:
        wait_until(lambda: not path.exists())
    assert stored(migrated_engine) == (20, 20)
    assert writer.stats.replayed == 20 and writer.stats.unreadable == 0  # a torn tail is not damage
    (torn,) = [event for event in events if event.kind == "torn_tail"]
    assert "record cut short" in torn.message and str(path) in torn.message


def test_eight_threads_submitting_100k(migrated_engine: Engine) -> None:
    per_thread = 12_500
    batches = [[make_trace(t * per_thread + i) for i in range(per_thread)] for t in range(8)]
    writer = TraceWriter(TraceRepository(migrated_engine), batch_size=5_000, max_queue=20_000)

    def produce(items: list[LLMTrace]) -> None:
        for trace in items:
            writer.submit(trace)

    threads = [threading.Thread(target=produce, args=(items,)) for items in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all_written(writer.close(timeout=120))
    stats = writer.stats
    assert stored(migrated_engine) == (100_000, 100_000)
    assert stats.submitted == stats.written == 100_000
    assert stats.spooled == stats.dropped == stats.failed == stats.queue_depth == stats.in_flight == 0


def test_asyncio_tasks_cancelled_midway_lose_nothing_submitted(migrated_engine: Engine) -> None:
    submitted: list[str] = []

    async def main() -> None:
        writer = AsyncTraceWriter(TraceRepository(migrated_engine), batch_size=500, flush_interval=0.05)
        rng = random.Random(7)

        async def task(number: int) -> None:
            for step in range(5):
                trace = make_trace(number * 10 + step)
                writer.submit(trace)
                submitted.append(trace.id)
                await asyncio.sleep(rng.uniform(0, 0.02))

        tasks = [asyncio.create_task(task(n)) for n in range(1_000)]
        await asyncio.sleep(0.03)
        for victim in tasks[::3]:
            victim.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(t.cancelled() for t in tasks) > 0
        assert all_written(await writer.aclose(timeout=60))

    asyncio.run(main())
    assert len(submitted) < 5_000
    with migrated_engine.connect() as connection:
        ids = set(connection.execute(text("SELECT id FROM llm_traces")).scalars())
    assert ids == set(submitted) and stored(migrated_engine)[0] == len(submitted)


def test_reads_from_worker_threads_while_the_writer_writes(migrated_engine: Engine) -> None:
    # What the README tells asyncio users to do: repository reads through asyncio.to_thread, writes through
    # AsyncTraceWriter, all at once on one embedded engine.
    repository = TraceRepository(migrated_engine)
    stored_first = traces(600)
    repository.add_many(stored_first)

    async def main() -> list[int]:
        async with AsyncTraceWriter(repository, batch_size=100, flush_interval=0.02) as writer:

            async def read(seed: int) -> int:
                rng = random.Random(seed)
                for _ in range(15):
                    trace = rng.choice(stored_first)
                    assert await asyncio.to_thread(repository.get, "org-1", trace.id) == trace
                    page = await asyncio.to_thread(repository.list, "org-1", limit=20)
                    assert len(page.items) == 20
                    await asyncio.to_thread(repository.usage, "org-1", group_by=("model",))
                return 15

            async def write() -> int:
                for trace in traces(1_500, start=600):
                    writer.submit(trace)
                    await asyncio.sleep(0)
                return 1_500

            return await asyncio.gather(write(), *(read(seed) for seed in range(4)))

    assert asyncio.run(main()) == [1_500, 15, 15, 15, 15]
    assert stored(migrated_engine) == (2_100, 2_100)


@pytest.mark.parametrize("stalled_write", ["fails later", "succeeds later"])
def test_close_with_a_stalled_database_returns_in_time_and_counts_once(
    migrated_engine: Engine, tmp_path: Path, stalled_write: str
) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.stall.clear()
    writer = TraceWriter(repository, batch_size=10, spool_dir=tmp_path)
    for trace in traces(35):
        writer.submit(trace)
    wait_until(lambda: repository.calls >= 1)
    started = time.monotonic()
    final = writer.close(timeout=0.5)
    assert time.monotonic() - started < 3
    # The stalled batch and everything behind it went to the spool, and are counted there once.
    assert (final.spooled, final.written, final.lost, final.pending) == (35, 0, 0, 0)

    repository.down = stalled_write == "fails later"
    repository.stall.set()  # the stuck write now fails, or lands
    writer._thread.join(timeout=30)
    # Neither counted again nor spooled again (only last_error may have changed).
    assert dataclasses.replace(writer.stats, last_error=None) == dataclasses.replace(final, last_error=None)
    assert sorted(trace.id for trace in spooled_traces(tmp_path)) == sorted(trace.id for trace in traces(35))
    assert stored(migrated_engine) == ((10, 10) if stalled_write == "succeeds later" else (0, 0))
    with TraceWriter(TraceRepository(migrated_engine), spool_dir=tmp_path) as replaying:
        wait_until(lambda: not list(tmp_path.glob(f"*{SUFFIX}")))
    assert replaying.stats.replayed == 35
    assert stored(migrated_engine) == (35, 35)


def test_failures_without_a_spool_are_counted_and_logged(
    migrated_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.down = True
    events: list[WriterEvent] = []
    writer = TraceWriter(repository, max_retries=1, retry_backoff=0.01, on_error=events.append)
    with caplog.at_level(logging.WARNING, logger="llmtrace"), writer:
        for trace in traces(20):
            writer.submit(trace)
        writer.flush(timeout=10)
    assert writer.stats.failed == 20 and writer.stats.last_error == "injected failure"
    assert [event.kind for event in events] == ["retry", "failed"]
    assert "write failed and no spool_dir: traces lost (20 traces)" in caplog.text


def test_batches_flush_on_size_and_on_interval(migrated_engine: Engine) -> None:
    with TraceWriter(TraceRepository(migrated_engine), batch_size=10, flush_interval=60) as writer:
        for trace in traces(25):
            writer.submit(trace)
        wait_until(lambda: stored(migrated_engine)[0] == 20)
        assert writer.stats.queue_depth == 5
    with TraceWriter(TraceRepository(migrated_engine), batch_size=1_000, flush_interval=0.05) as writer:
        for trace in traces(3, start=100):
            writer.submit(trace)
        wait_until(lambda: stored(migrated_engine)[0] == 28)


@pytest.mark.parametrize(("policy", "kept"), [("drop_newest", range(0, 5)), ("drop_oldest", range(15, 20))])
def test_drop_policies(migrated_engine: Engine, policy: str, kept: range) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.stall.clear()
    events: list[WriterEvent] = []
    writer = TraceWriter(repository, batch_size=5, max_queue=5, overflow=policy, on_error=events.append)  # type: ignore[arg-type]
    writer.submit(make_trace(1000))  # taken by the stalled writer thread
    wait_until(lambda: writer.stats.in_flight == 1)
    for trace in traces(20):
        writer.submit(trace)
    assert writer.stats.dropped == 15 and writer.stats.queue_depth == 5
    repository.stall.set()
    final = writer.close(timeout=30)
    assert (final.written, final.dropped, final.lost, final.pending) == (6, 15, 15, 0)
    with migrated_engine.connect() as connection:
        ids = set(connection.execute(text("SELECT id FROM llm_traces")).scalars())
    assert ids == {make_trace(i).id for i in kept} | {make_trace(1000).id}
    assert sum(event.count for event in events if event.kind == "dropped") == 15


def test_block_policy_times_out_with_a_clear_error(migrated_engine: Engine) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.stall.clear()
    writer = TraceWriter(repository, batch_size=2, max_queue=2, submit_timeout=0.1)
    writer.submit(make_trace(0))
    wait_until(lambda: writer.stats.in_flight == 1)
    writer.submit(make_trace(1))
    writer.submit(make_trace(2))
    with pytest.raises(WriterQueueFull, match=r"buffer \(2 traces\) stayed full for 0.1 s"):
        writer.submit(make_trace(3))
    assert writer.stats.submitted == 3
    repository.stall.set()
    writer.close(timeout=30)


def test_closing_wakes_a_blocked_submit(migrated_engine: Engine) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.stall.clear()
    writer = TraceWriter(repository, batch_size=1, max_queue=1)
    writer.submit(make_trace(0))
    wait_until(lambda: writer.stats.in_flight == 1)
    writer.submit(make_trace(1))
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            writer.submit(make_trace(2))
        except WriterClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.1)
    writer.close(timeout=0.2)
    thread.join(timeout=5)
    assert [str(e) for e in errors] == ["This TraceWriter closed while submit() waited for room."]
    repository.stall.set()


def test_spool_policy_writes_overflow_to_disk(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = FaultyRepository(migrated_engine)
    repository.stall.clear()
    writer = TraceWriter(repository, batch_size=5, max_queue=5, overflow="spool", spool_dir=tmp_path)
    writer.submit(make_trace(1000))
    wait_until(lambda: writer.stats.in_flight == 1)
    for trace in traces(12):
        writer.submit(trace)
    # Overflowing traces are collected into one record; flush() writes it even while the database stalls.
    assert writer.stats.overflow_pending == 7 and writer.stats.spooled == 0
    assert not writer.flush(timeout=0.1)
    assert writer.stats.overflow_pending == 0 and writer.stats.spooled == 7
    repository.stall.set()
    assert nothing_lost(writer.close(timeout=30))
    with TraceWriter(TraceRepository(migrated_engine), spool_dir=tmp_path):
        wait_until(lambda: not list(tmp_path.glob(f"*{SUFFIX}")))
    assert stored(migrated_engine) == (13, 13)


def test_submit_errors(migrated_engine: Engine) -> None:
    writer = TraceWriter(TraceRepository(migrated_engine))
    with pytest.raises(ValidationError, match="prompt_tokens"):
        writer.submit({**make_trace(1).model_dump(), "prompt_tokens": -1})
    with pytest.raises(TypeError, match="submit\\(\\) takes an LLMTrace or a mapping, got int"):
        writer.submit(5)  # type: ignore[arg-type]
    writer.close()
    with pytest.raises(WriterClosed, match="closed"):
        writer.submit(make_trace(1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"overflow": "spill"}, "overflow must be one of block, drop_oldest, drop_newest, spool; got 'spill'"),
        ({"overflow": "spool"}, "overflow='spool' needs spool_dir"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"flush_interval": 0}, "flush_interval must be positive"),
        ({"max_queue": 0}, "max_queue must be at least 1, got 0"),
        ({"max_retries": -1}, "max_retries must be 0 or more, got -1"),
        ({"replay_interval": 0}, "replay_interval must be positive, got 0"),
    ],
)
def test_bad_options(migrated_engine: Engine, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TraceWriter(TraceRepository(migrated_engine), **options)


def test_a_spool_dir_that_cannot_be_used_is_refused_at_once(migrated_engine: Engine, tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    with pytest.raises(ConfigurationError, match=r"spool_dir '.*a-file' cannot be used: .*Give a directory"):
        TraceWriter(TraceRepository(migrated_engine), spool_dir=taken)
    with pytest.raises(ValueError, match="max_spool_file_bytes must be at least 1, got 0"):
        TraceWriter(TraceRepository(migrated_engine), spool_dir=tmp_path, max_spool_file_bytes=0)


EXITING_SCRIPT = """
import sys
from llmtrace import TraceRepository, TraceWriter, get_engine
from llmtrace.migrations import upgrade
from tests.factories import make_trace
from tests.spool_files import spooled_traces
engine = get_engine(sys.argv[1])
upgrade(engine)
writer = TraceWriter(TraceRepository(engine), flush_interval=60)
for i in range(100):
    writer.submit(make_trace(i))
# no close(): the atexit hook must flush
"""
COUNTING_SCRIPT = """
import sys
from sqlalchemy import text
from llmtrace import get_engine
with get_engine(sys.argv[1]).connect() as connection:
    print(connection.execute(text("SELECT count() FROM llm_traces")).scalar_one())
"""


def test_process_exit_flushes(tmp_path: Path) -> None:
    url = f"chdb:///{tmp_path / 'exit'}"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", EXITING_SCRIPT, url], check=True, cwd=root, timeout=120)
    counted = subprocess.run(
        [sys.executable, "-c", COUNTING_SCRIPT, url], check=True, cwd=root, timeout=120, capture_output=True, text=True
    )
    assert counted.stdout.strip() == "100"

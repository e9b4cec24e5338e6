"""TraceWriter: submit() latency seen by the caller while batches are written, and end-to-end throughput.

Latency: one thread submits traces at about the rate the writer can store them (so that submits keep
overlapping the writer's inserts rather than finishing before the first batch is written); every submit()
is timed. The baseline, measured in the same run, is the cheapest possible hand-off: appending to a deque
under a lock. Target: p99 under 100 microseconds.

Throughput: the same traces through TraceWriter (submit all, then close) against
TraceRepository.add_many with the same batch size. Target: >= 0.9x.

Overflow to the spool: submit() latency when the buffer is full and overflow="spool" (the database stalls),
against the baseline of appending each trace to a spool file with its own fsync, on the same disk.

    .venv/bin/python benchmarks/writer.py [--traces N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _common import add_many_seconds, drop, fresh_engine, median, timed

from llmtrace import LLMTrace, TraceRepository, TraceWriter
from llmtrace.spool import Spool
from llmtrace.synthetic import synthetic_traces


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    ordered = sorted(samples_ns)

    def at(level: float) -> float:
        return ordered[min(int(level * len(ordered)), len(ordered) - 1)] / 1000

    return at(0.5), at(0.99), ordered[-1] / 1000


class StalledRepository(TraceRepository):
    """A repository whose writes hang until released, so that the writer's buffer fills up."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.release = threading.Event()

    def add_many(self, traces: Iterable[Any], **options: Any) -> int:
        self.release.wait()
        return super().add_many(traces, **options)


def overflow_latencies(traces: list[LLMTrace]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """submit() latencies with overflow="spool" and a full buffer, and the per-trace-fsync baseline."""
    # On the disk (not /dev/shm, where fsync costs nothing): the point is what a caller pays for durability.
    directory = Path(tempfile.mkdtemp(prefix="llmtrace-bench-spool-"))
    clock = time.perf_counter_ns
    try:
        spool, baseline = Spool(directory / "baseline"), []
        for trace in traces:
            started = clock()
            spool.append([trace])
            baseline.append(clock() - started)
        spool.rotate()

        engine = fresh_engine()
        repository = StalledRepository(engine)
        writer = TraceWriter(repository, batch_size=10, max_queue=10, overflow="spool", spool_dir=directory / "writer")
        samples = []
        for trace in traces:
            started = clock()
            writer.submit(trace)
            samples.append(clock() - started)
        repository.release.set()
        writer.close()
        drop(engine)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return percentiles(samples), percentiles(baseline)


def baseline_latencies(traces: list[LLMTrace]) -> list[int]:
    lock, queue = threading.Lock(), deque()  # type: ignore[var-annotated]
    samples = []
    clock = time.perf_counter_ns
    for trace in traces:
        started = clock()
        with lock:
            queue.append(trace)
        samples.append(clock() - started)
    return samples


def writer_latencies(traces: list[LLMTrace], batch_size: int, rate: float) -> tuple[list[int], int]:
    """Submit at ``rate`` traces/s; return the submit() latencies and how many batches were written meanwhile."""
    engine = fresh_engine()
    repository = TraceRepository(engine)
    writer = TraceWriter(repository, batch_size=batch_size, max_queue=len(traces))
    samples = []
    clock = time.perf_counter_ns
    started_all = time.perf_counter()
    for index, trace in enumerate(traces):
        started = clock()
        writer.submit(trace)
        samples.append(clock() - started)
        if index % 100 == 99:
            time.sleep(max(0.0, started_all + (index + 1) / rate - time.perf_counter()))
    written_meanwhile = writer.stats.written
    writer.close()
    assert writer.stats.written == len(traces), writer.stats
    drop(engine)
    return samples, written_meanwhile


def writer_seconds(traces: list[LLMTrace], batch_size: int) -> float:
    engine = fresh_engine()
    writer = TraceWriter(TraceRepository(engine), batch_size=batch_size, max_queue=len(traces))

    def run() -> None:
        for trace in traces:
            writer.submit(trace)
        writer.close()

    seconds = timed(run)
    assert writer.stats.written == len(traces), writer.stats
    drop(engine)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10_000, help="submits per second in the latency run")
    args = parser.parse_args()
    traces = list(synthetic_traces(args.traces, payload_bytes=(1_000, 3_000)))
    print(f"{args.traces:,} traces, batch size {args.batch_size:,}")

    base = percentiles(baseline_latencies(traces))
    samples, written_meanwhile = writer_latencies(traces, args.batch_size, args.rate)
    submit = percentiles(samples)
    print(
        f"submit() latency at {args.rate:,.0f}/s, {written_meanwhile:,} traces written meanwhile: "
        f"p50 {submit[0]:.1f} us, p99 {submit[1]:.1f} us, max {submit[2]:.0f} us (target p99 < 100 us)"
    )
    print(
        f"  baseline (deque append under a lock): p50 {base[0]:.1f} us, p99 {base[1]:.1f} us "
        f"-> p99 {submit[1] / base[1]:.1f}x the baseline"
    )

    overflow, fsync_each = overflow_latencies(traces[:2_000])
    print(
        f"submit() with a full buffer, overflow='spool' (stalled database, spool on disk): p50 {overflow[0]:.1f} us, "
        f"p99 {overflow[1]:.1f} us"
    )
    print(
        f"  baseline (each trace appended with its own fsync): p50 {fsync_each[0]:.1f} us, p99 {fsync_each[1]:.1f} us "
        f"-> p50 {fsync_each[0] / overflow[0]:.0f}x faster than the baseline"
    )

    through_writer = median([writer_seconds(traces, args.batch_size) for _ in range(args.rounds)])
    direct = median([add_many_seconds(traces, args.batch_size) for _ in range(args.rounds)])
    print(
        f"throughput (median of {args.rounds}): TraceWriter {args.traces / through_writer:,.0f}/s, "
        f"add_many {args.traces / direct:,.0f}/s -> {direct / through_writer:.2f}x (target >= 0.9x)"
    )


if __name__ == "__main__":
    main()

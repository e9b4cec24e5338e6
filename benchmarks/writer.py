"""TraceWriter: submit() latency seen by the caller while batches are written, and end-to-end throughput.

Latency: one thread submits traces at about the rate the writer can store them (so that submits keep
overlapping the writer's inserts rather than finishing before the first batch is written); every submit()
is timed. The baseline, measured in the same run, is the cheapest possible hand-off: appending to a deque
under a lock. Target: p99 under 100 microseconds.

Throughput: the same traces through TraceWriter (submit all, then close) against
TraceRepository.add_many with the same batch size. Target: >= 0.9x.

    .venv/bin/python benchmarks/writer.py [--traces N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import deque

from _common import add_many_seconds, drop, fresh_engine, median, timed

from llmtrace import LLMTrace, TraceRepository, TraceWriter
from llmtrace.synthetic import synthetic_traces


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    ordered = sorted(samples_ns)

    def at(level: float) -> float:
        return ordered[min(int(level * len(ordered)), len(ordered) - 1)] / 1000

    return at(0.5), at(0.99), ordered[-1] / 1000


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

    through_writer = median([writer_seconds(traces, args.batch_size) for _ in range(args.rounds)])
    direct = median([add_many_seconds(traces, args.batch_size) for _ in range(args.rounds)])
    print(
        f"throughput (median of {args.rounds}): TraceWriter {args.traces / through_writer:,.0f}/s, "
        f"add_many {args.traces / direct:,.0f}/s -> {direct / through_writer:.2f}x (target >= 0.9x)"
    )


if __name__ == "__main__":
    main()

"""TraceWriter: submit() latency, end-to-end throughput, spool replay, and overflow to the spool under load.

Each result is a ratio against a baseline measured in the same run:

- submit() latency while batches are written, against appending to a deque under a lock (the cheapest
  possible hand-off). One thread submits at about the rate the writer can store (so that submits keep
  overlapping inserts). Target: p99 under 100 microseconds.
- Throughput: the same traces through TraceWriter (submit all, then close) against TraceRepository.add_many
  with the same batch size, each run in a fresh process, interleaved. Measured twice: with the benchmark's
  pre-built traces tracked by the garbage collector, and frozen (gc.freeze), as a service's long-lived
  objects would be (see child_throughput). Target: >= 0.9x.
- Replay: a spool file of N traces replayed by a TraceWriter, against add_many of the same traces, each in a
  fresh process (its own embedded engine) so that peak RSS is the process's own; run for two file sizes to
  show that replay memory does not grow with the file. Target: >= 0.5x add_many, memory flat.
- Overflow to the spool on a healthy database: traces submitted at a steady rate (default 5,000/s) into a
  small buffer, so that bursts overflow to the spool and are replayed while traffic goes on. The backlog
  (spooled, not yet replayed) must stay bounded, and drain once the traffic stops.
- submit() with a full buffer and overflow="spool" (stalled database), against appending each trace to a spool
  file with its own fsync, on the same disk.

    .venv/bin/python benchmarks/writer.py [--traces N] [--batch-size B] [--only submit,throughput,replay,overflow]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _common import SCRATCH, drop, fresh_engine, median, timed

from llmtrace import LLMTrace, TraceRepository, TraceWriter, get_engine
from llmtrace.migrations import upgrade
from llmtrace.spool import SUFFIX, Spool
from llmtrace.synthetic import synthetic_traces

PAYLOAD_BYTES = (1_000, 3_000)


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


# -- submit() latency and throughput --------------------------------------------------------------------------


def baseline_latencies(traces: Iterable[LLMTrace]) -> list[int]:
    lock, queue = threading.Lock(), deque()  # type: ignore[var-annotated]
    samples = []
    clock = time.perf_counter_ns
    for trace in traces:
        started = clock()
        with lock:
            queue.append(trace)
        samples.append(clock() - started)
    return samples


def writer_latencies(count: int, batch_size: int, rate: float) -> tuple[list[int], int]:
    """Submit at ``rate`` traces/s; return the submit() latencies and how many traces were written meanwhile.

    Each trace is built just before it is submitted and dropped after, as a service does (a list of them all,
    kept alive, would make the garbage collector's full passes, and so the pauses they cause, far longer).
    """
    engine = fresh_engine()
    writer = TraceWriter(TraceRepository(engine), batch_size=batch_size, max_queue=count)
    traces = synthetic_traces(count, payload_bytes=PAYLOAD_BYTES)
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
    final = writer.close()
    assert final.written == count, final
    drop(engine)
    return samples, written_meanwhile


def child_throughput(contender: str, count: int, batch_size: int, freeze: bool) -> dict[str, float]:
    """In a fresh process: seconds ``contender`` takes to store ``count`` traces built beforehand (not timed).

    With ``freeze``, the traces are frozen (gc.freeze) first. A service does not keep every trace it ever
    submitted alive; this benchmark does (both contenders are handed the same list). Those objects make each
    full garbage collection long, and the writer's own copies (submit() keeps one of each trace) trigger more
    of them than add_many does. Freezing them, as servers do with what they load at start-up, leaves only each
    contender's own allocations to collect. Both variants are reported.
    """
    engine = fresh_engine()
    traces = list(synthetic_traces(count, payload_bytes=PAYLOAD_BYTES))
    if freeze:
        gc.collect()
        gc.freeze()
    if contender == "add_many":
        return {"seconds": timed(lambda: TraceRepository(engine).add_many(traces, batch_size=batch_size))}
    writer = TraceWriter(TraceRepository(engine), batch_size=batch_size, max_queue=len(traces))

    def run() -> None:
        for trace in traces:
            writer.submit(trace)
        writer.close()

    seconds = timed(run)
    assert writer.stats.written == len(traces), writer.stats
    return {"seconds": seconds}


def submit_latency(args: argparse.Namespace) -> None:
    base = percentiles(baseline_latencies(synthetic_traces(args.traces, payload_bytes=PAYLOAD_BYTES)))
    samples, written_meanwhile = writer_latencies(args.traces, args.batch_size, args.rate)
    submit = percentiles(samples)
    print(
        f"submit() latency at {args.rate:,.0f}/s, {written_meanwhile:,} traces written meanwhile: "
        f"p50 {submit[0]:.1f} us, p99 {submit[1]:.1f} us, max {submit[2]:.0f} us (target p99 < 100 us)"
    )
    print(
        f"  baseline (deque append under a lock): p50 {base[0]:.1f} us, p99 {base[1]:.1f} us "
        f"-> p99 {submit[1] / base[1]:.1f}x the baseline"
    )


def throughput(args: argparse.Namespace) -> None:
    for freeze, variant in ((False, "traces tracked by the garbage collector"), (True, "traces frozen (gc.freeze)")):
        # Each run in a fresh process (a fresh embedded engine), the contenders interleaved, so that the load
        # other programs put on the machine falls on both alike.
        rounds = [
            tuple(
                in_child("throughput", contender, args.traces, args.batch_size, int(freeze))["seconds"]
                for contender in ("writer", "add_many")
            )
            for _ in range(args.rounds)
        ]
        ratios = sorted(direct / through_writer for through_writer, direct in rounds)
        through_writer = median([through_writer for through_writer, _ in rounds])
        direct = median([direct for _, direct in rounds])
        print(
            f"throughput, {variant} (median of {args.rounds} interleaved rounds): TraceWriter "
            f"{args.traces / through_writer:,.0f}/s, add_many {args.traces / direct:,.0f}/s -> {median(ratios):.2f}x "
            f"(rounds {ratios[0]:.2f}x-{ratios[-1]:.2f}x; target >= 0.9x)"
        )


# -- replay ---------------------------------------------------------------------------------------------------

REPLAY_DATABASE = "bench_replay"


def peak_rss_mb() -> float:
    """This process's peak resident set size.

    From /proc (VmHWM, reset when a program starts) rather than getrusage: ru_maxrss keeps the high-water mark
    of the parent a child was forked from, which here holds 100k traces.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_replay(spool_dir: str, count: int, batch_size: int) -> dict[str, float]:
    """In a fresh process: replay ``spool_dir`` into a new database; seconds and peak RSS."""
    engine = get_engine(f"chdb:///{SCRATCH}?database={REPLAY_DATABASE}")
    upgrade(engine)
    directory = Path(spool_dir)
    started = time.perf_counter()
    with TraceWriter(TraceRepository(engine), batch_size=batch_size, spool_dir=directory) as writer:
        while list(directory.glob(f"*{SUFFIX}")):
            time.sleep(0.01)
    seconds = time.perf_counter() - started
    assert writer.stats.replayed == count, writer.stats
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def child_add_many(count: int, batch_size: int) -> dict[str, float]:
    """In a fresh process: add_many of the same traces (generated first, not timed); seconds and peak RSS."""
    engine = fresh_engine()
    traces = list(synthetic_traces(count, payload_bytes=PAYLOAD_BYTES))
    seconds = timed(lambda: TraceRepository(engine).add_many(traces, batch_size=batch_size))
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def child_add_many_streamed(count: int, batch_size: int) -> dict[str, float]:
    """In a fresh process: add_many of the same traces from a generator (bounded memory); peak RSS."""
    engine = fresh_engine()
    TraceRepository(engine).add_many(synthetic_traces(count, payload_bytes=PAYLOAD_BYTES), batch_size=batch_size)
    return {"seconds": 0.0, "peak_rss_mb": peak_rss_mb()}


def in_child(*arguments: object) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", *map(str, arguments)]
    run = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(run.stdout.splitlines()[-1])
    return result


def write_spool(directory: Path, count: int, batch_size: int) -> int:
    """A spool directory holding ``count`` traces in batches (what a long outage leaves); its size in bytes."""
    spool = Spool(directory, destination=f"{REPLAY_DATABASE}.llm_traces", max_file_bytes=1 << 40)
    batch: list[LLMTrace] = []
    for trace in synthetic_traces(count, payload_bytes=PAYLOAD_BYTES):
        batch.append(trace)
        if len(batch) == batch_size:
            spool.append(batch, sync=False)
            batch = []
    if batch:
        spool.append(batch, sync=False)
    spool.rotate()
    return sum(path.stat().st_size for path in directory.glob(f"*{SUFFIX}"))


def replay(args: argparse.Namespace) -> None:
    for count in (args.replay_traces // 5, args.replay_traces):
        directory = Path(tempfile.mkdtemp(prefix="llmtrace-bench-replay-", dir=SCRATCH))
        try:
            size = write_spool(directory, count, args.batch_size)
            replayed = in_child("replay", directory, count, args.batch_size)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        direct = in_child("add_many", count, args.batch_size)
        streamed = in_child("add_many_streamed", count, args.batch_size)
        print(
            f"replay of a {size / 2**20:,.0f} MB spool file ({count:,} traces): "
            f"{count / replayed['seconds']:,.0f}/s, add_many {count / direct['seconds']:,.0f}/s "
            f"-> {direct['seconds'] / replayed['seconds']:.2f}x (target >= 0.5x); peak RSS "
            f"{replayed['peak_rss_mb']:,.0f} MB (add_many of the traces in a list: {direct['peak_rss_mb']:,.0f} MB, "
            f"from a generator: {streamed['peak_rss_mb']:,.0f} MB)"
        )


# -- overflow to the spool ------------------------------------------------------------------------------------


def overflow_under_load(args: argparse.Namespace) -> None:
    """Steady traffic into a small buffer on a healthy database: does the spooled backlog stay bounded?"""
    engine = fresh_engine()
    directory = Path(tempfile.mkdtemp(prefix="llmtrace-bench-overflow-"))  # on the disk: fsyncs cost here
    writer = TraceWriter(
        TraceRepository(engine),
        batch_size=args.batch_size,
        max_queue=args.overflow_queue,
        flush_interval=0.05,
        overflow="spool",
        spool_dir=directory,
        replay_interval=1.0,
    )
    total = int(args.overflow_rate * args.overflow_seconds)
    traces = list(synthetic_traces(total, payload_bytes=PAYLOAD_BYTES))
    backlog: list[int] = []
    started = time.perf_counter()
    next_sample = 1.0
    for index, trace in enumerate(traces):
        writer.submit(trace)
        if index % 50 == 49:
            elapsed = time.perf_counter() - started
            if elapsed >= next_sample:
                stats = writer.stats
                backlog.append(stats.spooled - stats.replayed)
                next_sample += 1.0
            time.sleep(max(0.0, (index + 1) / args.overflow_rate - elapsed))
    achieved = total / (time.perf_counter() - started)
    stopped = time.perf_counter()
    while (stats := writer.stats).spooled > stats.replayed or stats.pending:
        time.sleep(0.05)
        if time.perf_counter() - stopped > 120:
            break
    drained_in = time.perf_counter() - stopped
    final = writer.close()
    assert final.lost == 0, final
    shutil.rmtree(directory, ignore_errors=True)
    drop(engine)
    print(
        f"overflow='spool' at {achieved:,.0f}/s for {args.overflow_seconds:.0f} s, buffer {args.overflow_queue:,}, "
        f"batches {args.batch_size:,}: {final.spooled:,} of {final.submitted:,} traces overflowed to the spool; "
        f"backlog (spooled, not yet replayed) each second: {', '.join(map(str, backlog))}; "
        f"max {max(backlog, default=0):,}, drained {drained_in:.1f} s after the traffic stopped"
    )


def overflow_latencies(traces: list[LLMTrace]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """submit() latencies with overflow="spool" and a full buffer, and the per-trace-fsync baseline."""
    # On the disk (not /dev/shm, where fsync costs nothing): the point is what a caller pays for durability.
    directory = Path(tempfile.mkdtemp(prefix="llmtrace-bench-spool-"))
    clock = time.perf_counter_ns
    try:
        spool, baseline = Spool(directory / "baseline", destination="bench.llm_traces"), []
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


def overflow(args: argparse.Namespace) -> None:
    overflow_under_load(args)
    traces = list(synthetic_traces(5_000, payload_bytes=PAYLOAD_BYTES))
    full, fsync_each = overflow_latencies(traces)
    print(
        f"submit() with a full buffer, overflow='spool' (stalled database, spool on disk): p50 {full[0]:.1f} us, "
        f"p99 {full[1]:.1f} us, max {full[2]:,.0f} us (one submit in 128 writes the record)"
    )
    print(
        f"  baseline (each trace appended with its own fsync): p50 {fsync_each[0]:.1f} us, p99 {fsync_each[1]:.1f} us "
        f"-> p99 {fsync_each[1] / full[1]:.0f}x faster than the baseline"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, *rest = sys.argv[2:]
        if mode == "throughput":
            result = child_throughput(rest[0], int(rest[1]), int(rest[2]), freeze=rest[3] == "1")
        elif mode == "replay":
            result = child_replay(rest[0], int(rest[1]), int(rest[2]))
        elif mode == "add_many":
            result = child_add_many(int(rest[0]), int(rest[1]))
        else:
            result = child_add_many_streamed(int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10_000, help="submits per second in the latency run")
    parser.add_argument("--replay-traces", type=int, default=150_000, help="traces in the larger replayed file")
    parser.add_argument("--overflow-rate", type=float, default=5_000, help="submits per second, overflow run")
    parser.add_argument("--overflow-seconds", type=float, default=20)
    parser.add_argument("--overflow-queue", type=int, default=1_000, help="max_queue in the overflow run")
    parser.add_argument("--only", default="submit,throughput,replay,overflow")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    print(f"{args.traces:,} traces, batch size {args.batch_size:,}")
    if "submit" in parts:
        submit_latency(args)
    if "throughput" in parts:
        throughput(args)
    if "replay" in parts:
        replay(args)
    if "overflow" in parts:
        overflow(args)


if __name__ == "__main__":
    main()

"""Peak memory while ingesting 1M traces from a generator: it must not grow with the number of rows.

add_many consumes the generator batch by batch, so the peak resident set size after 1M rows should
equal the peak after the first few batches. Prints the peak RSS at checkpoints and its ratio to the
first checkpoint (the baseline of the same run).

    .venv/bin/python benchmarks/memory.py [--traces N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import resource
from collections.abc import Iterator

from _common import fresh_engine, timed

from llmtrace import LLMTrace, TraceRepository
from llmtrace.synthetic import synthetic_traces


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    args = parser.parse_args()

    engine = fresh_engine()
    repository = TraceRepository(engine)
    checkpoints = sorted({args.traces // 10, args.traces // 4, args.traces // 2, args.traces})
    peaks: dict[int, float] = {}
    before = peak_rss_mb()

    def traces() -> Iterator[LLMTrace]:
        for index, trace in enumerate(synthetic_traces(args.traces, payload_bytes=(1_000, 3_000)), 1):
            yield trace
            if index in checkpoints:
                peaks[index] = peak_rss_mb()

    seconds = timed(lambda: repository.add_many(traces(), batch_size=args.batch_size))
    print(f"ingested {args.traces:,} traces in batches of {args.batch_size:,} in {seconds:.0f} s")
    print(f"peak RSS before ingesting: {before:,.0f} MB")
    baseline = peaks[checkpoints[0]]
    for count in checkpoints:
        print(f"  peak RSS after {count:>9,} traces: {peaks[count]:>7,.0f} MB  ({peaks[count] / baseline:.2f}x)")


if __name__ == "__main__":
    main()

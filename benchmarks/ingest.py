"""Ingest throughput: TraceRepository.add_many vs a raw clickhouse-connect insert of the same rows.

Both write the same 100k traces (~2 KB payloads) in batches of 10,000 into fresh tables of the same embedded
engine, alternating, several rounds; the ratio of medians is the result (target: >= 0.8).

    .venv/bin/python benchmarks/ingest.py [--traces N] [--rounds R]
"""

from __future__ import annotations

import argparse

from _common import drop, fresh_engine, median, timed

from llmtrace import LLMTrace, TraceRepository
from llmtrace.engine import driver_client
from llmtrace.synthetic import synthetic_traces

BATCH = 10_000


def raw_insert(rows: list[list[object]]) -> float:
    engine = fresh_engine()
    columns = LLMTrace.clickhouse_columns()
    with engine.connect() as connection:
        client = driver_client(connection)

        def run() -> None:
            for start in range(0, len(rows), BATCH):
                client.insert("llm_traces", rows[start : start + BATCH], column_names=columns)

        seconds = timed(run)
    drop(engine)
    return seconds


def repository_insert(traces: list[LLMTrace], **options: bool) -> float:
    engine = fresh_engine()
    repository = TraceRepository(engine)
    seconds = timed(lambda: repository.add_many(traces, batch_size=BATCH, **options))
    drop(engine)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    traces = list(synthetic_traces(args.traces, payload_bytes=(1_000, 3_000)))
    rows = [list(trace.to_clickhouse_row()) for trace in traces]
    average_row = sum(trace.request_size_bytes + trace.response_size_bytes for trace in traces) / len(traces)
    print(f"{len(traces):,} traces, ~{average_row / 1000:.1f} KB of payload each, batches of {BATCH:,}")

    results: dict[str, list[float]] = {"raw client.insert": [], "add_many": [], "add_many(skip_stored=False)": []}
    for _ in range(args.rounds):
        results["raw client.insert"].append(raw_insert(rows))
        results["add_many"].append(repository_insert(traces))
        results["add_many(skip_stored=False)"].append(repository_insert(traces, skip_stored=False))

    baseline = median(results["raw client.insert"])
    for name, seconds in results.items():
        best = median(seconds)
        print(f"{name:<30} {len(traces) / best:>10,.0f} rows/s   {baseline / best:.2f}x raw")


if __name__ == "__main__":
    main()

"""Ingest throughput: TraceRepository.add_many vs a raw clickhouse-connect insert of the same rows.

All contenders write the same 100k traces (~2 KB payloads) in batches of 10,000 into fresh tables of the same
embedded engine, in rotating order, several rounds, with background merges stopped (they start at random
moments and blur the comparison); the ratio of medians is the result (target: >= 0.8).

Two tenant shapes are measured: a few tenants (3 organizations of 5 agents), and a multi-tenant platform
(3,000 organizations and ~40,000 agents, Zipf-distributed so that a few heavy tenants sit among thousands of
small ones: every batch of 10,000 spans ~1,500 organizations and ~9,000 agents). And two arrival orders: "time
order" is what a live service produces, traces arriving in the order they were created; "random order" (a
backfill of shuffled history) is the worst case for add_many's stored-trace lookup, whose cost follows how
many granules of the sort key a batch's keys fall into.

    .venv/bin/python benchmarks/ingest.py [--traces N] [--rounds R] [--tenants few|many|both] [--without-views]

Both sides of the ratio write through the rollups' materialized views, as every insert does; ``--without-views``
drops them, to show how much of the gap is theirs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from _common import add_many_seconds, drop, fresh_engine, median, timed

from llmtrace import LLMTrace
from llmtrace.engine import driver_client
from llmtrace.synthetic import synthetic_traces

BATCH = 10_000
TENANTS = {
    "few": {"organizations": 3, "agents_per_organization": 5},
    "many": {"organizations": 3_000, "agents_per_organization": 13, "skew": 1.1},
}


def raw_insert(rows: list[list[object]], views: bool = True) -> float:
    engine = fresh_engine(merges=False, views=views)
    columns = LLMTrace.clickhouse_columns()
    with engine.connect() as connection:
        client = driver_client(connection)

        def run() -> None:
            for start in range(0, len(rows), BATCH):
                client.insert("llm_traces", rows[start : start + BATCH], column_names=columns)

        seconds = timed(run)
    drop(engine)
    return seconds


def compare(traces: list[LLMTrace], rounds: int, views: bool) -> None:
    rows = [list(trace.to_clickhouse_row()) for trace in traces]
    contenders: dict[str, Callable[[], float]] = {
        "raw client.insert": lambda: raw_insert(rows, views),
        "add_many": lambda: add_many_seconds(traces, BATCH, merges=False, views=views),
        "add_many(skip_stored=False)": lambda: add_many_seconds(
            traces, BATCH, merges=False, views=views, skip_stored=False
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_number in range(rounds):
        # Rotate the order so that no contender always runs first (or last) in a round.
        for name in names[round_number % len(names) :] + names[: round_number % len(names)]:
            results[name].append(contenders[name]())
    baseline = median(results["raw client.insert"])
    for name, seconds in results.items():
        typical = median(seconds)
        print(f"  {name:<30} {len(traces) / typical:>10,.0f} rows/s   {baseline / typical:.2f}x raw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tenants", choices=[*TENANTS, "both"], default="both")
    parser.add_argument(
        "--without-views", action="store_true", help="drop the rollups' views: inserts write only the traces"
    )
    args = parser.parse_args()

    warmed_up = False
    for tenants, shape in TENANTS.items():
        if args.tenants not in (tenants, "both"):
            continue
        shuffled = list(synthetic_traces(args.traces, payload_bytes=(1_000, 3_000), **shape))  # type: ignore[arg-type]
        # Generated (not sorted) in time order: sorting the shuffled list would leave the objects scattered in
        # memory, a layout no live service has, and that alone slows any per-trace loop by half.
        in_time_order = list(
            synthetic_traces(args.traces, payload_bytes=(1_000, 3_000), in_time_order=True, **shape)  # type: ignore[arg-type]
        )
        average = sum(trace.request_size_bytes + trace.response_size_bytes for trace in shuffled) / len(shuffled)
        per_batch = [shuffled[start : start + BATCH] for start in range(0, len(shuffled), BATCH)]
        organizations = max(len({trace.organization_id for trace in batch}) for batch in per_batch)
        agents = max(len({trace.agent_id for trace in batch}) for batch in per_batch)
        print(
            f"\n{tenants} tenants: {len(shuffled):,} traces, ~{average / 1000:.1f} KB of payload each, batches of "
            f"{BATCH:,} spanning up to {organizations:,} organizations and {agents:,} agents"
        )
        if not warmed_up:
            # The first insert of a process pays for lazy imports and engine start-up; keep that out.
            raw_insert([list(trace.to_clickhouse_row()) for trace in shuffled[:1_000]])
            add_many_seconds(shuffled[:1_000], BATCH)
            warmed_up = True
        for label, traces in (("random order (backfill)", shuffled), ("time order (live ingestion)", in_time_order)):
            print(f"{label}, median of {args.rounds}:")
            compare(traces, args.rounds, views=not args.without_views)


if __name__ == "__main__":
    main()

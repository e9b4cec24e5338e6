"""Read latency and rows read: get() by id and usage() by model over a table of 1M traces.

Each repository call is timed, and the same query is run on chDB's own handle to read ClickHouse's
rows_read for it. Baselines measured in the same run: the same lookup with skip indexes disabled, and
the table's total row count (a full scan reads all of them).

    .venv/bin/python benchmarks/reads.py [--traces N] [--lookups K]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import chdb
from _common import SCRATCH, fresh_engine, timed
from sqlalchemy import text

from llmtrace import ALL_ORGANIZATIONS, TraceRepository
from llmtrace.synthetic import synthetic_traces

END = datetime(2026, 11, 1, tzinfo=UTC)


def rows_read(handle: Any, database: str, sql: str) -> int:
    """ClickHouse's read_rows for ``sql``, from the statistics block of the JSON output format."""
    output = handle.query(sql.replace("llm_traces", f"{database}.llm_traces"), "JSON")
    return int(json.loads(output.bytes())["statistics"]["rows_read"])


def percentile(values: list[float], level: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(level * len(ordered)), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=200)
    args = parser.parse_args()

    engine = fresh_engine()
    database = engine.url.database
    assert database is not None  # fresh_engine names one
    repository = TraceRepository(engine)
    traces = synthetic_traces(
        args.traces, organizations=20, payload_bytes=(100, 1_000), end=END, span=timedelta(days=90)
    )
    sample: list[tuple[str, str]] = []
    rng = random.Random(1)

    def keep_some() -> Any:
        for trace in traces:
            if rng.random() < args.lookups / args.traces:
                sample.append((trace.organization_id, trace.id))
            yield trace

    seconds = timed(lambda: repository.add_many(keep_some(), progress=True))
    print(f"loaded {args.traces:,} traces in {seconds:.1f} s ({args.traces / seconds:,.0f}/s); {len(sample)} lookups")

    # Measure the steady state: merged parts, as a table has once background merges catch up. Right after a
    # load, how many small parts are still unmerged depends on timing and made runs differ by 3x.
    with engine.connect() as connection:
        connection.execute(text("OPTIMIZE TABLE llm_traces FINAL"))
    handle = chdb.connect(str(SCRATCH))
    latencies = []
    for organization_id, trace_id in sample:
        started = time.perf_counter()
        repository.get(organization_id, trace_id)
        latencies.append((time.perf_counter() - started) * 1000)
    organization_id, trace_id = sample[0]
    lookup = f"SELECT * FROM llm_traces WHERE organization_id = '{organization_id}' AND id = '{trace_id}' LIMIT 1"
    with_index = rows_read(handle, database, lookup)
    without_index = rows_read(handle, database, lookup + " SETTINGS use_skip_indexes = 0")
    by_id_only = rows_read(handle, database, f"SELECT * FROM llm_traces WHERE id = '{trace_id}' LIMIT 1")
    total = args.traces
    print(
        f"\nget() by id, {len(latencies)} lookups: p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {percentile(latencies, 0.99):.1f} ms"
    )
    print(f"  rows read: {with_index:,} of {total:,} ({with_index / total:.4%} of the table)")
    print(
        f"  baseline, same lookup without skip indexes: {without_index:,} rows "
        f"({without_index / max(with_index, 1):.0f}x more)"
    )
    print(f"  id alone (no organization): {by_id_only:,} rows (bloom filter only)")

    usage_times = [timed(lambda: repository.usage(ALL_ORGANIZATIONS, group_by=("model",))) * 1000 for _ in range(5)]
    usage_sql = (
        "SELECT model, count(), sum(total_tokens), quantilesExact(0.5, 0.95, 0.99)(latency_ms) "
        "FROM llm_traces GROUP BY model"
    )
    org_usage_times = [
        timed(lambda: repository.usage("org-3", group_by=("model",), granularity="day")) * 1000 for _ in range(5)
    ]
    org_sql = f"{usage_sql.replace('GROUP BY', 'WHERE organization_id = ' + repr('org-3') + ' GROUP BY')}"
    print(
        f"\nusage() by model, all organizations: median {statistics.median(usage_times):.0f} ms, "
        f"rows read {rows_read(handle, database, usage_sql):,}"
    )
    print(
        f"usage() by model and day, one organization: median {statistics.median(org_usage_times):.0f} ms, "
        f"rows read {rows_read(handle, database, org_sql):,}"
    )
    handle.close()


if __name__ == "__main__":
    main()

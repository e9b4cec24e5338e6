"""Usage reports from the rollups (daily and hourly) against a scan of the traces, over millions of traces.

Traces are generated inside ClickHouse (INSERT ... SELECT from numbers()), so that ten million take a minute
rather than an hour of Python: a skewed multi-tenant platform (Zipf-like organizations, a few agents each,
five models, 90 days, small payloads), written through the materialized views like any insert. Each report
runs from the traces (``source="raw"``) and from each rollup that can answer it, results are compared
(everything but the percentiles must be equal), and the medians of
``--rounds`` runs are printed with the speed-up over the scan. Each report runs twice: with approximate latency
percentiles (merging the rollups' t-digest states is most of their time) and without percentiles
(``percentiles=None``: cost and token reports, exact from every source). It also prints what the views cost an
insert: the same INSERT ... SELECT with and without them.

    .venv/bin/python benchmarks/rollup.py --traces 10000000             # 90 days: about 110k traces a day
    .venv/bin/python benchmarks/rollup.py --traces 10000000 --days 1    # a busy platform: 10M traces a day
    LLMTRACE_BENCH_DIR=/var/tmp .venv/bin/python benchmarks/rollup.py --traces 100000000 --days 30 --rounds 3

How much a rollup gains depends on how many traces share a row: over 90 days the 2,000 organizations' agents
see about one trace an hour each, and a rollup row holds little more than a trace.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop, fresh_engine, timed

from llmtrace import ALL_ORGANIZATIONS, TraceRepository, UsageRow
from llmtrace.rollup import DAILY, HOURLY, ROLLUPS
from llmtrace.synthetic import synthetic_traces
from llmtrace.usage import PERCENTILE_FIELDS

END = datetime(2026, 11, 20, tzinfo=UTC)
DAYS = 90
# 2,000 organizations; organization n gets traffic in proportion to about 1/n (Zipf): org-1 is the heaviest.
# The column list names what is inserted; model_index is a helper the SELECT computes and leaves out.
GENERATE = """
INSERT INTO llm_traces (id, organization_id, project_id, agent_id, agent_tags, run_id, step_id, trace_id,
    call_type, provider, model, is_byok, prompt_tokens, completion_tokens, total_tokens, cached_input_tokens,
    cache_write_tokens, reasoning_tokens, latency_ms, is_error, error_type, error_message, request_json,
    response_json, llm_config_json, request_size_bytes, response_size_bytes, created_at)
SELECT * EXCEPT model_index FROM (SELECT
    toString(generateUUIDv4()) AS id,
    concat('org-', toString(toUInt32(floor(exp(log(2000) * (rand(1) / 4294967295.0)))))) AS organization_id,
    concat('project-', organization_id) AS project_id,
    concat(organization_id, '-agent-', toString(rand(2) % 5)) AS agent_id,
    ['bench'] AS agent_tags,
    concat('run-', toString(number % 100000)) AS run_id,
    concat('step-', toString(number)) AS step_id,
    lower(hex(rand64(3))) AS trace_id,
    -- As on a real platform, an agent has one job and (mostly) one model, and BYOK is an organization's choice.
    ['agent_step', 'agent_step', 'agent_step', 'summarization', 'agent_step'][cityHash64(agent_id) % 5 + 1]
        AS call_type,
    if(rand(5) % 10 = 0, rand(14) % 5, cityHash64(agent_id, 'model') % 5) AS model_index,
    ['openai', 'openai', 'anthropic', 'anthropic', 'google'][model_index + 1] AS provider,
    ['gpt-4.1', 'gpt-4.1-mini', 'claude-sonnet-4', 'claude-haiku-4-5', 'gemini-2.5-pro'][model_index + 1] AS model,
    cityHash64(organization_id, 'byok') % 10 = 0 AS is_byok,
    50 + rand(7) % 20000 AS prompt_tokens,
    10 + rand(8) % 2000 AS completion_tokens,
    prompt_tokens + completion_tokens AS total_tokens,
    if(provider = 'anthropic', toNullable(rand(9) % 5000), NULL) AS cached_input_tokens,
    CAST(NULL, 'Nullable(UInt32)') AS cache_write_tokens,
    if(provider = 'openai', toNullable(rand(10) % completion_tokens), NULL) AS reasoning_tokens,
    150 + rand(11) % 30000 AS latency_ms,
    rand(12) % 50 = 0 AS is_error,
    '' AS error_type, '' AS error_message,
    '{"messages": [{"role": "user", "content": "hello"}]}' AS request_json,
    '{"content": "hi"}' AS response_json,
    '{"temperature": 0.7}' AS llm_config_json,
    length(request_json) AS request_size_bytes,
    length(response_json) AS response_size_bytes,
    fromUnixTimestamp64Micro(END_MICROS - toInt64(rand64(13) % SPAN_MICROS), 'UTC') AS created_at
FROM numbers(COUNT))
"""


def generate(engine: Engine, count: int, days: int = DAYS, chunk: int = 1_000_000) -> float:
    """Insert ``count`` traces over ``days`` days in chunks; returns the seconds it took."""
    end_micros = int(END.timestamp() * 1_000_000)
    span_micros = days * 86_400 * 1_000_000
    started = time.perf_counter()
    with engine.connect() as connection:
        for done in range(0, count, chunk):
            values = {"END_MICROS": end_micros, "SPAN_MICROS": span_micros, "COUNT": min(chunk, count - done)}
            statement = GENERATE
            for name, value in values.items():
                statement = statement.replace(name, str(value))
            connection.execute(text(statement))
            print(f"  {done + min(chunk, count - done):>12,} traces", end="\r", flush=True)
    print()
    return time.perf_counter() - started


def comparable(rows: list[UsageRow]) -> list[dict[str, Any]]:
    skip = {"source", *PERCENTILE_FIELDS}
    return [{name: value for name, value in row.__dict__.items() if name not in skip} for row in rows]


def median_seconds(action: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=DAYS, help="the days the traces are spread over")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--add-many", type=int, default=100_000, help="traces for the add_many comparison")
    parser.add_argument("--skip-writes", action="store_true", help="leave out what the views cost inserts")
    args = parser.parse_args()

    if not args.skip_writes:
        write_costs(args)
    reads(args)


def write_costs(args: argparse.Namespace) -> None:
    """What the views cost an insert: the same generated traces into a table with and without them."""
    sample = min(args.traces, 1_000_000)
    with_view = fresh_engine()
    seconds_with = generate(with_view, sample)
    drop(with_view)
    without_view = fresh_engine(views=False)
    seconds_without = generate(without_view, sample)
    drop(without_view)
    print(
        f"INSERT ... SELECT of {sample:,} generated traces: {seconds_without:.1f} s without the views, "
        f"{seconds_with:.1f} s with them -> {seconds_without / seconds_with:.2f}x the throughput"
    )
    # The same through add_many, as a service writes: Python-built traces, in batches.
    traces = list(
        synthetic_traces(
            args.add_many, organizations=500, payload_bytes=(100, 2_000), end=END, span=timedelta(days=1), seed=1
        )
    )
    halves = (traces[: len(traces) // 2], traces[len(traces) // 2 :])
    seconds = {}
    for views in (True, False):
        engine = fresh_engine(views=views)
        repository = TraceRepository(engine)
        # Each half once (a trace is stored once): the faster of the two.
        seconds[views] = min(timed(partial(repository.add_many, half, batch_size=10_000)) for half in halves)
        drop(engine)
    print(
        f"add_many of {len(traces) // 2:,} traces (500 organizations, batches of 10k), best of two: "
        f"{seconds[False]:.2f} s without the views, {seconds[True]:.2f} s with them "
        f"-> {seconds[False] / seconds[True]:.2f}x the throughput"
    )


def reads(args: argparse.Namespace) -> None:
    """Each report from the traces and from each rollup that can answer it, with and without percentiles."""
    engine = fresh_engine()
    print(f"generating {args.traces:,} traces over {args.days} days")
    generate(engine, args.traces, args.days)
    with engine.connect() as connection:
        connection.execute(text("OPTIMIZE TABLE llm_traces FINAL"))
        for rollup in ROLLUPS:
            connection.execute(text(f"OPTIMIZE TABLE {rollup.table} FINAL"))
            rows = connection.execute(text(f"SELECT count() FROM {rollup.table}")).scalar_one()
            print(f"{rollup.name} rollup rows: {rows:,} ({args.traces / rows:.1f} traces per row)")
    repository = TraceRepository(engine)
    since = (END - timedelta(days=args.days + 1)).replace(hour=0)  # a whole day, so that both rollups can answer
    reports: dict[str, dict[str, Any]] = {
        "by model, all organizations": {"organization_id": ALL_ORGANIZATIONS, "group_by": ("model",)},
        "by model and day, all organizations": {
            "organization_id": ALL_ORGANIZATIONS,
            "group_by": ("model",),
            "granularity": "day",
        },
        "by model, heaviest organization": {"organization_id": "org-1", "group_by": ("model",)},
        "by model and day, heaviest organization": {
            "organization_id": "org-1",
            "group_by": ("model",),
            "granularity": "day",
        },
        "by agent and day, one small organization": {
            "organization_id": "org-50",
            "group_by": ("agent_id",),
            "granularity": "day",
        },
    }
    for percentiles in ("approximate", None):
        print(f"median of {args.rounds} runs, percentiles={percentiles!r}:")
        for name, report in reports.items():
            print(f"  {name:<42} " + compare(repository, since, percentiles, report, args.rounds), flush=True)


def compare(
    repository: TraceRepository, since: datetime, percentiles: str | None, report: dict[str, Any], rounds: int
) -> str:
    """One report from the traces and from each rollup: times, speed-ups, and whether the results are equal."""

    def run(source: str) -> list[UsageRow]:
        return repository.usage(since=since, percentiles=percentiles, source=source, **report)

    raw_rows = run("raw")
    raw = median_seconds(lambda: run("raw"), rounds)
    line = f"raw {raw * 1000:7.0f} ms"
    for rollup in (HOURLY, DAILY):
        try:
            rolled_rows = run(rollup.name)
        except ValueError:
            line += f"   {rollup.name} (cannot answer)"
            continue
        if comparable(raw_rows) != comparable(rolled_rows):
            sys.exit(f"the {rollup.name} rollup's answer differs from the traces' for {report}")
        rolled = median_seconds(lambda: run(rollup.name), rounds)  # noqa: B023
        line += f"   {rollup.name} {rolled * 1000:6.0f} ms {raw / rolled:6.1f}x"
    return line + "   results equal"


if __name__ == "__main__":
    main()

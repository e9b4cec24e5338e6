"""The ``llmtrace`` command: ``llmtrace migrate``, ``llmtrace retention`` and ``llmtrace demo``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from llmtrace.engine import get_engine, redacted, resolve_url
from llmtrace.errors import LLMTraceError
from llmtrace.filters import ALL_ORGANIZATIONS
from llmtrace.migrations import upgrade
from llmtrace.repository import TraceRepository
from llmtrace.retention import Retention, get_retention, set_retention
from llmtrace.synthetic import synthetic_traces
from llmtrace.topology import configured
from llmtrace.usage import UsageRow

ResultT = TypeVar("ResultT")
ItemT = TypeVar("ItemT")


def migrate(url: str | None, topology: str | None = None) -> None:
    """Upgrade the schema to the newest revision, for ``topology`` (else LLMTRACE_TOPOLOGY, else detected)."""
    chosen = configured(topology, source="--topology")
    engine = get_engine(url)
    upgrade(engine, topology=chosen)
    print(f"Schema is at the newest revision{f' ({chosen} topology)' if chosen else ''}.")


def retention(
    url: str | None, rows_days: str | None, payload_days: str | None, topology: str | None, materialize: bool
) -> None:
    """Print the retention, after setting it when both days are given (``"none"``: no limit)."""
    if rows_days is None and payload_days is None:
        print(describe(get_retention(get_engine(url), topology=topology)))
        return
    if rows_days is None or payload_days is None:
        raise ValueError(
            "give both --rows-days and --payload-days (a number of days, or none to keep data for as long as the "
            "table exists), or neither to show the retention"
        )
    # Validated before anything is opened.
    wanted = Retention(days_or_none("--rows-days", rows_days), days_or_none("--payload-days", payload_days))
    applied = set_retention(
        get_engine(url),
        rows_days=wanted.rows_days,
        payload_days=wanted.payload_days,
        topology=topology,
        materialize=materialize,
    )
    print(describe(applied))


def describe(retention: Retention) -> str:
    rows = "kept" if retention.rows_days is None else f"dropped after {retention.rows_days} days"
    payloads = "kept" if retention.payload_days is None else f"emptied after {retention.payload_days} days"
    return f"Traces: {rows}; payloads: {payloads}."


def days_or_none(option: str, value: str) -> int | None:
    """A whole number of days, or ``None`` for ``none``."""
    if value.strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{option} takes a whole number of days or none, got {value!r}") from None


def timed_step(name: str, timings: dict[str, float], action: Callable[[], ResultT]) -> ResultT:
    started = time.perf_counter()
    result = action()
    timings[name] = time.perf_counter() - started
    return result


def demo(url: str | None, traces: int, seed: int | None) -> None:
    """Migrate, write generated traces through the repository, and print the last day's usage."""
    timings: dict[str, float] = {}
    engine = get_engine(url)
    print(f"Database: {redacted(resolve_url(url))}")
    timed_step("migrate (alembic upgrade head)", timings, lambda: upgrade(engine))
    repository = TraceRepository(engine)
    generated = TimedSource(synthetic_traces(traces, organizations=3, agents_per_organization=4, seed=seed), traces)
    started = time.perf_counter()
    written = repository.add_many(generated, progress=True)
    # Traces are generated while add_many consumes them; the two are reported apart.
    timings[f"generate {traces:,} synthetic traces"] = generated.seconds
    writing = timings[f"write {traces:,} traces (add_many)"] = time.perf_counter() - started - generated.seconds
    print(f"Wrote {written:,} traces ({written / writing:,.0f} traces/s, not counting their generation).\n")

    since = datetime.now(UTC) - timedelta(days=1)
    by_model = timed_step(
        "usage by model", timings, lambda: repository.usage(ALL_ORGANIZATIONS, group_by=("model",), since=since)
    )
    print_usage("Last 24 hours, all organizations, by model", by_model, "model")
    by_agent = timed_step(
        "usage by agent",
        timings,
        lambda: repository.usage(ALL_ORGANIZATIONS, group_by=("organization_id", "agent_id"), since=since),
    )
    print_usage("Last 24 hours, by agent", by_agent, "agent_id")

    print("Time per step:")
    for name, seconds in timings.items():
        print(f"  {name:<36} {seconds:8.2f} s")


class TimedSource(Iterator[ItemT]):
    """Passes on ``count`` items and adds up the time spent producing them.

    Its length hint (what is left of ``count``) gives add_many's progress bar a total.
    """

    def __init__(self, items: Iterable[ItemT], count: int) -> None:
        self._items = iter(items)
        self._left = count
        self.seconds = 0.0

    def __next__(self) -> ItemT:
        started = time.perf_counter()
        try:
            item = next(self._items)
        finally:
            self.seconds += time.perf_counter() - started
        self._left -= 1
        return item

    def __length_hint__(self) -> int:
        return max(self._left, 0)


def print_usage(title: str, rows: Sequence[UsageRow], key: str) -> None:
    print(title)
    header = f"  {key:<20}{'requests':>10}{'errors':>8}{'prompt tok':>14}{'compl. tok':>12}{'cached tok':>12}"
    print(header + f"{'MB in':>9}{'p50 ms':>9}{'p95 ms':>9}")
    for row in rows:
        cached = "-" if row.cached_input_tokens is None else f"{row.cached_input_tokens:,}"
        print(
            f"  {row.group[key] or '(none)':<20}{row.requests:>10,}{row.errors:>8,}{row.prompt_tokens:>14,}"
            f"{row.completion_tokens:>12,}{cached:>12}{row.request_bytes / 1e6:>9.1f}"
            f"{row.latency_p50_ms:>9.0f}{row.latency_p95_ms:>9.0f}"
        )
    print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmtrace", description="LLM traces in ClickHouse.")
    parser.add_argument("--url", help="database URL (default: $LLMTRACE_DATABASE_URL, else the embedded engine)")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate_parser = commands.add_parser("migrate", help="upgrade the schema to the newest revision")
    migrate_parser.add_argument(
        "--topology",
        help="single, cluster:<name>, replicated or cloud (default: $LLMTRACE_TOPOLOGY, else detected)",
    )
    retention_parser = commands.add_parser(
        "retention", help="show how long traces and their payloads are kept, or set it with both options"
    )
    for option, what in (("--rows-days", "traces are dropped"), ("--payload-days", "payloads are emptied")):
        retention_parser.add_argument(option, metavar="DAYS|none", help=f"days after which {what}")
    retention_parser.add_argument(
        "--no-materialize",
        dest="materialize",
        action="store_false",
        help="leave parts written before the change alone until they are merged",
    )
    retention_parser.add_argument("--topology", help="as for migrate (default: $LLMTRACE_TOPOLOGY, else detected)")
    demo_parser = commands.add_parser("demo", help="write generated traces and print a usage report")
    demo_parser.add_argument("--traces", type=int, default=100_000, help="how many traces to generate")
    demo_parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one)")
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            migrate(args.url, args.topology)
        elif args.command == "retention":
            retention(args.url, args.rows_days, args.payload_days, args.topology, args.materialize)
        else:
            demo(args.url, args.traces, args.seed)
    except (LLMTraceError, ValueError, TypeError) as exc:
        print(f"llmtrace: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

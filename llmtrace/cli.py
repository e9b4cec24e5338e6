"""The ``llmtrace`` command: ``llmtrace migrate`` and ``llmtrace demo``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llmtrace.conversion import trace_to_record
from llmtrace.engine import get_engine
from llmtrace.errors import LLMTraceError
from llmtrace.migrations import upgrade
from llmtrace.record import LLMTraceRecord
from llmtrace.synthetic import synthetic_traces


def migrate(url: str | None) -> None:
    engine = get_engine(url)
    upgrade(engine)
    print("Schema is at the newest revision.")


def demo(url: str | None, traces: int) -> None:
    engine = get_engine(url)
    upgrade(engine)
    started = time.perf_counter()
    with Session(engine) as session:
        session.add_all(trace_to_record(t) for t in synthetic_traces(traces, payload_bytes=(200, 2_000)))
        session.commit()
    print(f"Inserted {traces} traces through the ORM in {time.perf_counter() - started:.2f}s.\n")
    statement = (
        select(
            LLMTraceRecord.model,
            func.count().label("requests"),
            func.sum(LLMTraceRecord.total_tokens).label("tokens"),
            func.avg(LLMTraceRecord.latency_ms).label("latency"),
        )
        .group_by(LLMTraceRecord.model)
        .order_by(LLMTraceRecord.model)
    )
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
    print(f"{'model':<20}{'requests':>10}{'tokens':>14}{'avg ms':>10}")
    for row in rows:
        print(f"{row.model:<20}{row.requests:>10}{row.tokens:>14}{row.latency:>10.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmtrace", description="LLM traces in ClickHouse.")
    parser.add_argument("--url", help="database URL (default: $LLMTRACE_DATABASE_URL, else the embedded engine)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="upgrade the schema to the newest revision")
    demo_parser = commands.add_parser("demo", help="write generated traces and print a usage report")
    demo_parser.add_argument("--traces", type=int, default=1_000, help="how many traces to generate")
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            migrate(args.url)
        else:
            demo(args.url, args.traces)
    except LLMTraceError as exc:
        print(f"llmtrace: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

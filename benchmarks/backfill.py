"""What the stored-trace lookup costs when a table is already large: recent traces against scattered history.

A table is filled with N traces spread over 60 days and merged. Then batches of 10,000 new traces are written
with add_many, with the lookup (the default) and without it (``skip_stored=False``, the baseline of the same
run), in two shapes:

- recent: each batch newer than anything stored, as a live service writes them; the probe shows that no
  stored row can be a copy, so the lookup is skipped;
- scattered: traces spread over the same 60 days in random order, as a shuffled backfill writes them; their
  keys fall into most granules of the table, so the lookup reads most of its key columns.

    .venv/bin/python benchmarks/backfill.py [--stored N] [--rounds R]
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from functools import partial

from _common import drop, fresh_engine, median, timed
from sqlalchemy import text

from llmtrace import LLMTrace, TraceRepository
from llmtrace.synthetic import synthetic_traces

BATCH = 10_000
HISTORY = timedelta(days=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    now = datetime.now(UTC)
    engine = fresh_engine()
    repository = TraceRepository(engine)
    history = synthetic_traces(args.stored, payload_bytes=(1_000, 3_000), end=now, span=HISTORY, seed=1)
    repository.add_many(history, skip_stored=False)
    with engine.connect() as connection:
        # Settle the table, then keep background merges from landing in the middle of one contender's run.
        connection.execute(text("OPTIMIZE TABLE llm_traces FINAL"))
        connection.execute(text("SYSTEM STOP MERGES llm_traces"))
    print(f"{args.stored:,} traces stored over {HISTORY.days} days; batches of {BATCH:,} new traces")
    with engine.connect() as connection:
        attempt_bytes, table_bytes = connection.execute(
            text(
                "SELECT sumIf(data_compressed_bytes, name = 'insert_attempt'), sum(data_compressed_bytes) "
                "FROM system.columns WHERE database = currentDatabase() AND table = 'llm_traces'"
            )
        ).one()
    print(
        f"the hidden insert_attempt column takes {attempt_bytes / args.stored:.2f} bytes per row on disk, "
        f"{attempt_bytes / table_bytes:.3%} of the table"
    )

    count = 2 * BATCH * args.rounds
    shapes: dict[str, list[LLMTrace]] = {
        "recent": list(
            synthetic_traces(
                count,
                payload_bytes=(1_000, 3_000),
                end=now + timedelta(hours=1),
                span=timedelta(hours=1),
                seed=2,
                in_time_order=True,  # each batch newer than the one before, as a live service writes them
            )
        ),
        "scattered": list(synthetic_traces(count, payload_bytes=(1_000, 3_000), end=now, span=HISTORY, seed=3)),
    }
    for shape, traces in shapes.items():
        with_lookup, without = [], []
        for round_number in range(args.rounds):
            start = 2 * round_number * BATCH
            older, newer = traces[start : start + BATCH], traces[start + BATCH : start + 2 * BATCH]
            # Alternate which contender goes first; the first takes the older batch, so that "recent" batches
            # keep arriving in time order.
            if round_number % 2 == 0:
                with_lookup.append(timed(partial(repository.add_many, older)))
                without.append(timed(partial(repository.add_many, newer, skip_stored=False)))
            else:
                without.append(timed(partial(repository.add_many, older, skip_stored=False)))
                with_lookup.append(timed(partial(repository.add_many, newer)))
        lookup, baseline = median(with_lookup), median(without)
        print(
            f"  {shape:<10} add_many {lookup * 1000:5.0f} ms, skip_stored=False {baseline * 1000:5.0f} ms "
            f"-> {baseline / lookup:.2f}x the throughput without the lookup (median of {args.rounds})"
        )
    drop(engine)


if __name__ == "__main__":
    main()

"""Storage per trace, before and after payload retention: bytes on disk, compressed and uncompressed, by column group.

Writes N synthetic traces spread over the last 60 days, merges each month into one part, measures; then sets a
payload retention that expires about half of the payloads, lets ClickHouse apply it (MATERIALIZE TTL and the
merges that rewrite the parts), and measures the same table again.

llmtrace.synthetic's payloads are prefixes of one random string, which ZSTD compresses far better than real
prompts (repeats across rows). By default each payload here is instead a random stretch of a 16 MB text of words
drawn from a Zipf-distributed vocabulary, so that rows do not repeat each other; ``--payloads synthetic`` keeps the
generator's own.

    .venv/bin/python benchmarks/storage.py [--traces N] [--payload-days D] [--span-days S]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from _common import fresh_engine
from sqlalchemy import Engine, text

from llmtrace import LLMTrace, TraceRepository, set_retention
from llmtrace.retention import PAYLOAD_COLUMNS
from llmtrace.synthetic import synthetic_traces

_PARTS = (
    "SELECT sum(rows), sum(bytes_on_disk), count(), "
    "arrayStringConcat(arraySort(groupUniqArray(default_compression_codec)), '+') FROM system.parts "
    "WHERE database = currentDatabase() AND table = 'llm_traces' AND active"
)
_COLUMNS = (
    "SELECT name IN :payloads AS payload, sum(data_compressed_bytes), sum(data_uncompressed_bytes) FROM system.columns "
    "WHERE database = currentDatabase() AND table = 'llm_traces' GROUP BY payload"
)


CORPUS_BYTES = 16 << 20
VOCABULARY = 5_000


def word_corpus(rng: random.Random) -> str:
    """Text of words from a Zipf-distributed vocabulary, as prose and code are, with no escaping needed in JSON."""
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(VOCABULARY)]
    weights = [1 / rank for rank in range(1, VOCABULARY + 1)]
    text = " ".join(rng.choices(words, weights, k=CORPUS_BYTES // 6))
    return text[:CORPUS_BYTES]


def with_text_payloads(traces: Iterable[LLMTrace], seed: int) -> Iterator[LLMTrace]:
    """``traces`` with each payload's content replaced by a random stretch of :func:`word_corpus` of the same size."""
    rng = random.Random(seed)
    corpus = word_corpus(rng)
    for trace in traces:
        request, response = json.loads(trace.request_json), json.loads(trace.response_json)
        for payload in (request["messages"][0], response):
            start = rng.randrange(len(corpus) - len(payload["content"]))
            payload["content"] = corpus[start : start + len(payload["content"])]
        fields = trace.model_dump()
        # Sizes left at 0 are computed from the new payloads when the trace is built.
        fields.update(request_json=json.dumps(request), response_json=json.dumps(response))
        fields.update(request_size_bytes=0, response_size_bytes=0)
        yield LLMTrace(**fields)


@dataclass(frozen=True)
class Storage:
    rows: int
    parts: int
    on_disk: int
    # Columns without a CODEC get the server's default for the part, which its <compression> rules may make
    # ZSTD for big parts instead of LZ4 (the embedded engine does).
    default_codecs: str
    compressed: dict[bool, int]  # by "is a payload column"
    uncompressed: dict[bool, int]

    def per_trace(self, value: int) -> float:
        return value / self.rows

    def ratio(self, payload: bool | None = None) -> float:
        keys = [True, False] if payload is None else [payload]
        return sum(self.uncompressed[k] for k in keys) / max(1, sum(self.compressed[k] for k in keys))


def measure(engine: Engine) -> Storage:
    with engine.connect() as connection:
        rows, on_disk, parts, codecs = connection.execute(text(_PARTS)).one()
        by_group = connection.execute(text(_COLUMNS), {"payloads": PAYLOAD_COLUMNS}).all()
    return Storage(
        rows=int(rows),
        parts=int(parts),
        on_disk=int(on_disk),
        default_codecs=str(codecs),
        compressed={bool(payload): int(c) for payload, c, _ in by_group},
        uncompressed={bool(payload): int(u) for payload, _, u in by_group},
    )


def wait_for_payload_ttl(engine: Engine, days: int, timeout: float = 600) -> float:
    """Seconds until no payload older than ``days`` is left (the background merges' work), after MATERIALIZE TTL."""
    started = time.perf_counter()
    pending = text(
        "SELECT count() FROM llm_traces WHERE created_at < now64(6) - toIntervalDay(:days) AND request_json != ''"
    )
    with engine.connect() as connection:
        connection.execute(text("ALTER TABLE llm_traces MATERIALIZE TTL SETTINGS mutations_sync = 2"))
        while connection.execute(pending, {"days": days}).scalar_one():
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"payloads older than {days} days still stored after {timeout} s")
            time.sleep(0.5)
    return time.perf_counter() - started


def report(label: str, storage: Storage) -> None:
    print(
        f"{label:<34} {storage.rows:>8,} traces {storage.parts:>3} parts"
        f" | on disk {storage.per_trace(storage.on_disk):>8,.0f} B/trace"
        f" | compressed: payloads {storage.per_trace(storage.compressed[True]):>7,.0f} B, other columns"
        f" {storage.per_trace(storage.compressed[False]):>4,.0f} B | compression ratio {storage.ratio():.1f}x"
        f" (payloads {storage.ratio(True):.1f}x, other {storage.ratio(False):.1f}x;"
        f" default codec {storage.default_codecs})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--payload-days", type=int, default=30)
    parser.add_argument("--span-days", type=int, default=60)
    parser.add_argument("--payloads", choices=("text", "synthetic"), default="text")
    args = parser.parse_args()

    engine = fresh_engine()
    traces: Iterable[LLMTrace] = synthetic_traces(
        args.traces, organizations=20, end=datetime.now(UTC), span=timedelta(days=args.span_days), seed=7
    )
    if args.payloads == "text":
        traces = with_text_payloads(traces, seed=7)
    TraceRepository(engine).add_many(traces)
    with engine.connect() as connection:
        connection.execute(text("OPTIMIZE TABLE llm_traces FINAL"))
        expiring = connection.execute(
            text("SELECT countIf(created_at < now64(6) - toIntervalDay(:days)) / count() FROM llm_traces"),
            {"days": args.payload_days},
        ).scalar_one()
    before = measure(engine)

    set_retention(engine, rows_days=None, payload_days=args.payload_days)
    seconds = wait_for_payload_ttl(engine, args.payload_days)
    after = measure(engine)

    print(
        f"{args.traces:,} traces over {args.span_days} days, {args.payloads} payloads; "
        f"payload retention {args.payload_days} days"
    )
    report("before payload retention", before)
    report(f"after ({expiring:.0%} of payloads emptied)", after)
    print(
        f"after / before: on disk {after.on_disk / before.on_disk:.2f}x, compressed payloads "
        f"{after.compressed[True] / before.compressed[True]:.2f}x, other columns "
        f"{after.compressed[False] / before.compressed[False]:.2f}x; payloads emptied {seconds:.1f} s after "
        "set_retention (MATERIALIZE TTL, then background TTL merges)"
    )


if __name__ == "__main__":
    main()

"""Review: what close(timeout) (or a stopped thread) saves is written as ONE spool record holding the whole buffer.

_salvage() appends every trace held in memory, up to max_queue (100,000 by default), as a single record. Replay
reads, validates and inserts a record whole ("memory is bounded by the largest record"), so a file holding that
record is replayed in one group of max_queue traces, not in groups of batch_size: memory at shutdown (one JSON body
of the whole buffer) and at replay grows with the buffer, against the README's "in groups of batch_size: memory does
not grow with the file". A record's length field is 32 bits: a buffer whose JSON exceeds 4 GiB (100,000 traces of
~43 KB, within the demo's payload range) cannot be framed at all (struct.error), and the whole buffer is counted as
failed, i.e. lost, at the moment it most needed the spool.

Here: batch_size=10, a server that never answers, 3,000 traces in the buffer, close(timeout=0.5).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from llmtrace import TraceRepository, TraceWriter, get_engine
from llmtrace.spool import SUFFIX
from llmtrace.spool_format import Record, read_file_header, read_records
from llmtrace.writer import OVERFLOW_RECORD_TRACES
from tests.fault_servers import Fault, fault_server
from tests.writer_support import traces

BATCH = 10


def record_sizes(directory: Path) -> list[int]:
    sizes = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        with open(path, "rb") as handle:
            header, start = read_file_header(handle.fileno())
            sizes += [
                len(item.traces) for item in read_records(handle.fileno(), header, start) if isinstance(item, Record)
            ]
    return sizes


def test_what_close_saves_is_spooled_in_records_of_bounded_size(migrated_engine: Engine, tmp_path: Path) -> None:
    database = migrated_engine.url.database
    with fault_server(Fault.HANG, after_handshake=True) as port:
        engine = get_engine(f"clickhousedb://default:@127.0.0.1:{port}/{database}")
        try:
            writer = TraceWriter(
                TraceRepository(engine), batch_size=BATCH, max_queue=5000, flush_interval=0.01, spool_dir=tmp_path
            )
            for trace in traces(3000):
                writer.submit(trace)
            stats = writer.close(timeout=0.5)
        finally:
            engine.dispose()
    assert stats.spooled == 3000 and stats.lost == 0
    sizes = record_sizes(tmp_path)
    assert sum(sizes) == 3000
    assert max(sizes) <= max(BATCH, OVERFLOW_RECORD_TRACES), sizes

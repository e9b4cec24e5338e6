"""What close(timeout) (or a stopped thread) saves is spooled in records of at most batch_size traces.

Replay reads, validates and inserts a record whole, so a single record holding the whole buffer (up to max_queue
traces) would make memory at shutdown and at replay grow with the buffer, and a buffer whose JSON exceeds the
frame's 32-bit length could not be framed at all.

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

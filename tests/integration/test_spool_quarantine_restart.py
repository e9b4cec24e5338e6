"""Damaged bytes are quarantined once, not again by every writer that starts while the database is down.

A spool file with a damaged record and a good one: replay sets the damaged stretch aside, then the database is
unreachable, so the file is kept. A writer that starts later (a deploy, a crash loop) reads the quarantine's
entries and skips what is already set aside: after three starts the quarantine shows one damaged record.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmtrace import TraceWriter
from llmtrace.spool import Spool
from tests.spool_files import quarantine_entries
from tests.writer_support import refused_repository, traces


def test_a_restart_during_an_outage_does_not_quarantine_the_same_bytes_again(tmp_path: Path) -> None:
    repository = refused_repository("spool_requarantine")
    spool = Spool(tmp_path, destination=repository.destination)
    spool.append(traces(3))
    spool.append(traces(3, start=3))
    path = spool.current_path
    assert path is not None
    spool.rotate()
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2 - 200] ^= 0xFF  # inside the first record's body
    path.write_bytes(bytes(damaged))

    for _ in range(3):  # three starts while the database is still down
        writer = TraceWriter(refused_repository("spool_requarantine"), spool_dir=tmp_path, max_retries=0)
        time.sleep(1.0)  # the start-up pass: sets the damaged bytes aside, then fails on the good record
        writer.close(timeout=5)
    assert path.exists()  # kept: its good record waits for the database
    entries = quarantine_entries(tmp_path)
    assert len(entries) == 1, [(entry["source"], entry["offset"], entry["reason"]) for entry in entries]

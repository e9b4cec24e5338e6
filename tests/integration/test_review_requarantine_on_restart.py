"""Review: damaged bytes are quarantined again by every writer that starts while the database is down.

A spool file with a damaged record and a good one: replay sets the damaged stretch aside, then the database is
unreachable, so the file is kept. Which stretches were set aside is remembered only in the replaying process
(SpoolReplayer._settled), so each restart during the outage (a deploy, a crash loop) copies the same bytes to the
quarantine again and adds another quarantine.jsonl entry, and each process counts them as unreadable again. The
quarantine is "for a person to look at": after three restarts it shows three damaged records where there is one.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmtrace import TraceWriter
from llmtrace.spool import Spool
from tests.spool_files import quarantine_entries
from tests.writer_support import refused_repository, traces


def test_a_restart_during_an_outage_does_not_quarantine_the_same_bytes_again(tmp_path: Path) -> None:
    repository = refused_repository("review_requarantine")
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
        writer = TraceWriter(refused_repository("review_requarantine"), spool_dir=tmp_path, max_retries=0)
        time.sleep(1.0)  # the start-up pass: sets the damaged bytes aside, then fails on the good record
        writer.close(timeout=5)
    assert path.exists()  # kept: its good record waits for the database
    entries = quarantine_entries(tmp_path)
    assert len(entries) == 1, [(entry["source"], entry["offset"], entry["reason"]) for entry in entries]

"""Review: during an outage the writer drains its buffer to the spool only as fast as its retry schedule allows.

With the database down, every batch goes through all of its retries (max_retries=5, backoff 0.2 s doubling: about
6 s per batch with jitter; against a server that accepts and never answers, 6 x send_receive_timeout = 3 minutes per
batch at the default 30 s) before it is spooled, even when the previous batch has just exhausted its retries against
the same dead destination. The buffer therefore drains at batch_size / 6 s (about 160 traces/s at the default
batch_size, 5.5 traces/s against a hanging server); steady traffic above that fills max_queue and then, with the
default overflow="block" and submit_timeout=None, submit() blocks the caller for as long as the outage lasts,
although a spool_dir is set to take exactly these traces. Issue 8 lists "submit() blocks once the buffer fills"
under the outage symptoms; README: "submit() returns at once".

Here (all defaults except a smaller buffer and batch): 2,000 traces into a writer whose server refuses connections.
"""

from __future__ import annotations

import threading
from pathlib import Path

from llmtrace import TraceWriter, WriterClosed
from tests.writer_support import refused_repository, traces


def test_an_outage_with_a_spool_does_not_block_submit(tmp_path: Path) -> None:
    writer = TraceWriter(refused_repository("review_drain"), spool_dir=tmp_path, batch_size=100, max_queue=500)
    items = traces(2000)
    submitted = [0]

    def submit_all() -> None:
        for trace in items:
            try:
                writer.submit(trace)
            except WriterClosed:
                return  # close() below woke it
            submitted[0] += 1

    submitter = threading.Thread(target=submit_all, daemon=True)
    submitter.start()
    submitter.join(20)
    blocked = submitter.is_alive()
    stats = writer.close(timeout=2)  # also wakes the blocked submit (WriterClosed)
    assert not blocked, f"submit() still blocked after 20 s: {submitted[0]} of 2000 accepted, {stats.spooled} spooled"

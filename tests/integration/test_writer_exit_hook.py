"""The exit hook closes writers after Python has joined the threads, and run the executor work, that submit to them.

A program whose main thread returns while worker threads or executor tasks still handle requests (a common shape
for servers and batch jobs) has the traces those submit afterwards accepted, and the exit hook then spools them
(the database is down here).

Runs in a fresh interpreter; the repository points at a port where nothing listens, with a spool directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.spool_files import spooled_traces

SCENARIO = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[3])
from concurrent.futures import ThreadPoolExecutor
from llmtrace import TraceWriter, WriterClosed
from tests.writer_support import refused_repository, traces

writer = TraceWriter(refused_repository("writer_exit_order"), spool_dir=sys.argv[1], max_retries=0)
items = traces(10)

def handle(number):
    time.sleep(0.3 + number * 0.01)  # still working when the main thread returns
    try:
        writer.submit(items[number])
        print("accepted", flush=True)
    except WriterClosed:
        print("refused", flush=True)

if sys.argv[2] == "threads":
    for number in range(10):
        threading.Thread(target=handle, args=(number,)).start()
else:
    pool = ThreadPoolExecutor(4)
    for number in range(10):
        pool.submit(handle, number)
"""


@pytest.mark.parametrize("workers", ["threads", "executor"])
def test_traces_from_threads_still_running_at_exit_are_accepted(tmp_path: Path, workers: str) -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(tmp_path), workers, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outcomes = result.stdout.split()
    assert len(outcomes) == 10
    assert outcomes.count("refused") == 0, f"{outcomes.count('refused')} of 10 submits raised WriterClosed"
    assert len(spooled_traces(tmp_path)) == 10  # the exit hook closed the writer, spooling them

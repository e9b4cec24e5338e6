"""Review: a TraceWriter used in a process forked after the writer was created (gunicorn --preload, fork pools).

The writer's thread does not survive fork(). In the child, submit() still accepts traces (no WriterStopped),
flush() without a timeout waits for ever, and close() neither writes nor spools what the child submitted, although a
spool_dir is set: the traces stay "queue_depth" and are lost when the child exits. The README promises that if the
thread ends, submit() raises WriterStopped at once, flush() returns, and what was held is spooled.

The scenario runs in a fresh interpreter (no chDB: the repository points at a port where nothing listens), with a
deadline, so that a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.spool_files import spooled_traces

SCENARIO = r"""
import json, os, sys, threading
sys.path.insert(0, sys.argv[2])
from llmtrace import TraceWriter, WriterClosed
from tests.writer_support import refused_repository, traces

spool_dir = sys.argv[1]
writer = TraceWriter(refused_repository("review_fork"), spool_dir=spool_dir, max_retries=0, flush_interval=0.05)
reader, pipe = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(reader)
    report = {"refused": None}
    try:
        for trace in traces(20, start=1000):
            writer.submit(trace)
    except WriterClosed as exc:
        report["refused"] = repr(exc)
    flusher = threading.Thread(target=writer.flush, daemon=True)  # flush() without a timeout
    flusher.start()
    flusher.join(10)
    report["flush_returned"] = not flusher.is_alive()
    stats = writer.close(timeout=5)
    names = ("submitted", "written", "spooled", "failed", "queue_depth")
    report["stats"] = {name: getattr(stats, name) for name in names}
    report["pending"] = stats.pending
    os.write(pipe, json.dumps(report).encode())
    os._exit(0)
os.close(pipe)
os.waitpid(pid, 0)
print(os.read(reader, 1 << 20).decode())
writer.close(timeout=5)
"""


def test_a_forked_child_neither_refuses_nor_saves_what_it_submits(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["flush_returned"], "flush() without a timeout hangs for ever in the forked child"
    if report["refused"] is None:
        # Accepted: then close() must have spooled them (spool_dir is set), not left them in memory.
        assert report["pending"] == 0, report
        assert report["stats"]["spooled"] + report["stats"]["written"] == 20, report
        assert len([t for t in spooled_traces(tmp_path) if t.id.startswith("00000000")]) >= 20

"""A TraceWriter used in a process forked after the writer was created (gunicorn --preload, fork pools).

The writer's thread, buffer and connections do not survive fork(). In the child, submit() raises WriterStopped at
once, saying to create the writer after the fork; flush() (even without a timeout) and close() return at once, and
the child's counters are its own (nothing accepted). The parent's writer is unaffected.

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
writer = TraceWriter(refused_repository("writer_fork"), spool_dir=spool_dir, max_retries=0, flush_interval=0.05)
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
report = json.loads(os.read(reader, 1 << 20).decode())
writer.submit(traces(1)[0])  # the parent's writer still works
stats = writer.close(timeout=5)
report["parent"] = {"submitted": stats.submitted, "spooled": stats.spooled}
print(json.dumps(report))
"""


def test_a_writer_refuses_traces_in_a_forked_child_and_never_hangs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["refused"] is not None and "WriterStopped" in report["refused"], report
    assert "after the fork" in report["refused"]
    assert report["flush_returned"], "flush() without a timeout hangs in the forked child"
    assert report["stats"] == {"submitted": 0, "written": 0, "spooled": 0, "failed": 0, "queue_depth": 0}
    assert report["pending"] == 0
    assert report["parent"] == {"submitted": 1, "spooled": 1}
    assert len(spooled_traces(tmp_path)) == 1

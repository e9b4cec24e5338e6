"""A process forked while a writer holds a spool file does not keep that file locked.

Spool files are opened with O_CLOEXEC, which protects exec() but not fork(): a child forked without exec
(multiprocessing's fork start method, a gunicorn --preload master's workers) inherits the descriptor and with it the
flock, which belongs to every copy of the descriptor. The writer closes the child's copies right after the fork, so
once the parent rotates the file, a replayer can claim it while the child still lives.

Runs in a fresh interpreter (the test process hosts chDB for its own directory) with deadlines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCENARIO = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from llmtrace import TraceRepository, TraceWriter, get_engine
from llmtrace.migrations import upgrade
from tests.writer_support import refused_repository, stored, traces

root = Path(sys.argv[1])
spool = root / "spool"
engine = get_engine(f"chdb:///{root}/chdb?database=spool_fork_lock")
upgrade(engine)
# An outage: the writer spools 20 traces to a file it keeps open (and locked) for further appends.
outage = TraceWriter(refused_repository("spool_fork_lock"), spool_dir=spool, max_retries=0, flush_interval=0.05)
for trace in traces(20):
    outage.submit(trace)
assert outage.flush(timeout=30)
pid = os.fork()
if pid == 0:
    time.sleep(60)  # a long-lived worker that never touches the writer
    os._exit(0)
outage.close(timeout=10)  # rotates: the parent lets go of the file

# The database is back: a writer on it replays the spool.
writer = TraceWriter(TraceRepository(engine), spool_dir=spool, replay_interval=0.3)
deadline = time.monotonic() + 10
while stored(engine)[0] < 20 and time.monotonic() < deadline:
    time.sleep(0.1)
report = {"stored_while_child_lives": stored(engine)[0]}
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
deadline = time.monotonic() + 10
while stored(engine)[0] < 20 and time.monotonic() < deadline:
    time.sleep(0.1)
report["stored_after_child_died"] = stored(engine)[0]
writer.close(timeout=10)
print(json.dumps(report), flush=True)
os._exit(0)
"""


def test_a_forked_child_does_not_keep_the_parents_spool_file_locked(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["stored_after_child_died"] == 20, report  # the traces were fine all along
    assert report["stored_while_child_lives"] == 20, report

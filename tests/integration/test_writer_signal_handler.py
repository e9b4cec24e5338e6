"""close() (or stats) from a signal handler that interrupts submit() on the same thread does not deadlock.

A graceful shutdown commonly installs ``signal.signal(SIGTERM, lambda *_: writer.close(timeout=5))``. Python runs
signal handlers on the main thread between bytecodes, so a SIGTERM can arrive while the main thread is inside
submit(), holding the writer's lock. The lock is re-entrant, and close() sees that its own thread holds it: it
does not wait for the writer's thread (which needs that lock), but spools the buffer itself and returns.

Each attempt runs in a fresh interpreter with a deadline (faulthandler ends a hung one and prints its stacks).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCENARIO = r"""
import faulthandler, os, signal, sys, tempfile, threading
faulthandler.dump_traceback_later(8, exit=True)  # a deadlock ends the process with exit code 1
sys.path.insert(0, sys.argv[1])
from llmtrace import TraceWriter, WriterClosed
from tests.writer_support import refused_repository, traces

writer = TraceWriter(
    refused_repository("writer_signal"), spool_dir=tempfile.mkdtemp(), max_queue=10**7, overflow="drop_oldest"
)

def on_sigterm(*_):
    stats = writer.close(timeout=2)
    print("closed", stats.lost, stats.spooled > 0, flush=True)
    os._exit(0)

signal.signal(signal.SIGTERM, on_sigterm)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
items = traces(1000)
number = 0
while True:  # a request loop that submits traces on the main thread
    try:
        writer.submit(items[number % 1000])
    except WriterClosed:
        pass
    number += 1
"""


def test_close_from_a_sigterm_handler_does_not_deadlock() -> None:
    root = Path(__file__).resolve().parents[2]
    for attempt in range(6):
        result = subprocess.run(
            [sys.executable, "-c", SCENARIO, str(root)], capture_output=True, text=True, timeout=60, check=False
        )
        hung = "closed" not in result.stdout
        if not hung:
            assert result.stdout.split() == ["closed", "0", "True"], result.stdout  # spooled, nothing lost
        assert not hung, (
            f"attempt {attempt + 1}: close() in the SIGTERM handler never returned\n{result.stderr[-3000:]}"
        )

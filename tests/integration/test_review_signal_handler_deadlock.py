"""Review: close() (or stats) from a signal handler deadlocks the process when the signal lands inside submit().

A graceful shutdown commonly installs ``signal.signal(SIGTERM, lambda *_: writer.close(timeout=5))``. Python runs
signal handlers on the main thread between bytecodes, so a SIGTERM that arrives while the main thread is inside
submit() runs close() inside submit()'s ``with self._lock`` block; close() then takes the same non-reentrant lock
and waits for ever. The writer's thread blocks on that lock too: nothing is written or spooled, the process never
exits on SIGTERM, and the orchestrator's SIGKILL later loses the whole buffer. (``writer.stats`` from a SIGUSR1
handler deadlocks the same way.) In this scenario about half the runs hang.

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
    refused_repository("review_signal"), spool_dir=tempfile.mkdtemp(), max_queue=10**7, overflow="drop_oldest"
)

def on_sigterm(*_):
    writer.close(timeout=2)
    print("closed", flush=True)
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
        assert not hung, (
            f"attempt {attempt + 1}: close() in the SIGTERM handler never returned\n{result.stderr[-3000:]}"
        )

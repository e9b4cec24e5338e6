"""Running the ``llmtrace`` command, and reading its database back, each in a child process of its own.

chDB allows one process per data directory and one data directory per process, and the test process holds its
own: so the command under test runs in a child process on a directory of its own, and what the repository
says about that directory (the oracle the command's output is compared with) is read in another child process,
run after the command has ended, and handed back pickled.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmtrace.migrations import PROJECT_ROOT

BIN = Path(sys.executable).parent
LLMTRACE = str(BIN / "llmtrace")


def llmtrace(
    *args: str, url: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``llmtrace ARGS`` with ``LLMTRACE_DATABASE_URL=url``; text output, never raising on a failure."""
    result = subprocess.run(
        [LLMTRACE, *args],
        cwd=PROJECT_ROOT,
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
        env={**os.environ, "LLMTRACE_DATABASE_URL": url, "COLUMNS": "200", **(env or {})},
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def repository_call(url: str, tmp_path: Path, kind: str, **arguments: Any) -> Any:
    """What ``tests.cli_oracle`` computes with a :class:`TraceRepository` on ``url`` (see that module)."""
    out = tmp_path / f"oracle-{kind}-{os.urandom(4).hex()}.pickle"
    source = None
    if "traces" in arguments:
        source = tmp_path / f"oracle-input-{os.urandom(4).hex()}.pickle"
        source.write_bytes(pickle.dumps(arguments.pop("traces")))
        arguments["source"] = str(source)
    result = subprocess.run(
        [sys.executable, "-m", "tests.cli_oracle", url, str(out), kind, json.dumps(arguments)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return pickle.loads(out.read_bytes())

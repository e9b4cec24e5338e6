"""A process forked after the embedded engine was opened gets EmbeddedEngineError at once instead of hanging.

Each scenario runs in a fresh interpreter (the test process already hosts chDB for its own directory) that opens
the engine, forks, and reports what the child saw. The parent script gives every child a deadline and kills it when
it runs over, and the test gives the script one too: a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = r"""
import json, multiprocessing, os, signal, sys, time
from sqlalchemy import text
from llmtrace import EmbeddedEngineError, TraceRepository, get_engine

url, how = sys.argv[1], sys.argv[2]
engine = get_engine(url)
with engine.connect() as connection:
    connection.execute(text("SELECT 1"))

def attempts():
    yield "get_engine", lambda: get_engine(url)
    yield "connect", lambda: engine.connect().close()
    yield "raw_connection", lambda: engine.raw_connection().close()
    yield "repository", lambda: TraceRepository(engine).count("org-1")

def in_child(report):
    for name, attempt in attempts():
        try:
            attempt()
            report[name] = "no error"
        except EmbeddedEngineError as exc:
            report[name] = str(exc)
        except Exception as exc:
            report[name] = f"{type(exc).__name__}: {exc}"

DEADLINE = 30.0
if how == "os.fork":
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        report = {}
        in_child(report)
        os.write(writer, json.dumps(report).encode())
        # chDB's own shutdown hangs in a forked child too; multiprocessing ends its children this way as well.
        os._exit(0)
    os.close(writer)
    started = time.monotonic()
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() - started > DEADLINE:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print(json.dumps({"hung": True}))
            sys.exit(0)
        time.sleep(0.01)
    with os.fdopen(reader) as pipe:
        report = json.loads(pipe.read())
else:
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        shared = manager.dict()
        child = context.Process(target=in_child, args=(shared,))
        child.start()
        child.join(DEADLINE)
        if child.is_alive():
            child.kill()
            child.join()
            print(json.dumps({"hung": True}))
            sys.exit(0)
        report = dict(shared)

with engine.connect() as connection:
    report["parent still works"] = connection.execute(text("SELECT 2")).scalar_one() == 2
report["parent pid"] = os.getpid()
print(json.dumps(report))
"""


def run_scenario(directory: Path, how: str) -> dict[str, object]:
    process = subprocess.Popen(
        [sys.executable, "-c", SCENARIO, f"chdb:///{directory}?database=forked", how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: a timeout kills the children too
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the scenario ({how}) did not finish in 120 s")
    assert process.returncode == 0, stderr
    report: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_forked_child_gets_a_clear_error_instead_of_hanging(tmp_path: Path, how: str) -> None:
    report = run_scenario(tmp_path / "chdb", how)
    assert "hung" not in report, "the forked child hung"
    parent = report.pop("parent pid")
    assert report.pop("parent still works") is True
    assert set(report) == {"get_engine", "connect", "raw_connection", "repository"}
    for attempt, message in report.items():
        assert isinstance(message, str)
        assert f"was forked from pid {parent} after that process had opened the embedded ClickHouse engine" in (
            message
        ), f"{attempt}: {message}"
        assert str(tmp_path / "chdb") in message
        assert "'spawn' start method" in message and "clickhousedb://" in message

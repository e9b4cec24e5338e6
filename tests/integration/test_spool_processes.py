"""The spool across processes: killed writers, a writer and a replayer side by side, and a full disk.

Children never open the embedded engine (chDB allows one process per data directory): they spool, and this
process replays what they left into its own embedded database.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from llmtrace import TraceRepository, TraceWriter
from llmtrace.spool import SUFFIX
from tests.factories import make_trace
from tests.spool_files import quarantine_entries
from tests.writer_support import balanced, database_of, stored, stored_ids, wait_until

ROOT = Path(__file__).resolve().parents[2]

APPENDER = """
import os, random, sys, time
from llmtrace.spool import Spool
from tests.factories import make_trace
from tests.spool_files import quarantine_entries
directory, destination, start, count, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
rng = random.Random(seed)
# Small files (a few dozen traces): kills also land while files are created, published and rotated.
spool = Spool(directory, destination=destination, max_file_bytes=30_000)
print("ready", flush=True)
sys.stdin.readline()  # "go"
number = start
while number < start + count:
    batch = [make_trace(i) for i in range(number, min(number + rng.randint(1, 8), start + count))]
    spool.append(batch, sync=rng.random() < 0.5)
    # Reported only once append() returned: from here on the traces survive this process being killed.
    print(" ".join(trace.id for trace in batch), flush=True)
    number += len(batch)
    if rng.random() < 0.05:
        spool.rotate()
    time.sleep(rng.uniform(0, 0.002))
spool.rotate()
"""


def appenders(directory: Path, destination: str, count: int, children: int) -> list[subprocess.Popen[str]]:
    """Start ``children`` appender processes (child n spools ids from n * 100,000); return once all append."""
    started = []
    for number in range(children):
        command = [sys.executable, "-c", APPENDER, str(directory), destination, str(number * 100_000), str(count)]
        started.append(
            subprocess.Popen(
                [*command, str(number)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    for child in started:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in started:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    return started


def output_of(child: subprocess.Popen[str]) -> str:
    """Everything the child printed after "ready", once it has ended.

    Read through the same text stream as the "ready" line (communicate() with a timeout would read the pipe
    underneath it, skipping what that stream had already buffered).
    """
    assert child.stdout is not None
    output = child.stdout.read()
    child.wait(timeout=60)
    return output


def completed_ids(output: str) -> list[str]:
    """Ids from complete lines only: a line cut short by a kill does not count."""
    lines = output.split("\n")[:-1]
    return [trace_id for line in lines for trace_id in line.split()]


@pytest.fixture
def spool_dir(memory_dir: Path) -> Path:
    """The spool directory of these tests: what they exercise is processes, not the disk (see ``memory_dir``)."""
    return memory_dir


def test_writers_killed_at_random_moments_lose_no_completed_append(migrated_engine: Engine, spool_dir: Path) -> None:
    """Six processes append to one directory at once; each is killed (SIGKILL) at its own random moment."""
    repository = TraceRepository(migrated_engine)
    rng = random.Random(20261108)
    children = appenders(spool_dir, repository.destination, 100_000, children=6)
    started = time.monotonic()
    for moment, child in sorted(zip((rng.uniform(0.02, 0.3) for _ in children), children, strict=True)):
        time.sleep(max(0.0, started + moment - time.monotonic()))
        os.kill(child.pid, signal.SIGKILL)
    completed: list[str] = []
    for child in children:
        completed += completed_ids(output_of(child))
        assert child.returncode == -signal.SIGKILL, "the child finished before it was killed: raise its count"
    assert len(completed) > 100

    with TraceWriter(repository, batch_size=500, spool_dir=spool_dir) as writer:
        wait_until(lambda: not list(spool_dir.glob(f"*{SUFFIX}")), timeout=120)
    rows, distinct = stored(migrated_engine)
    assert rows == distinct  # none twice
    assert set(completed) <= set(stored_ids(migrated_engine))  # every completed append is stored
    assert balanced(writer.stats)


def test_one_process_appends_while_another_replays(migrated_engine: Engine, spool_dir: Path) -> None:
    repository = TraceRepository(migrated_engine)
    with TraceWriter(repository, batch_size=200, spool_dir=spool_dir, replay_interval=0.02) as writer:
        (child,) = appenders(spool_dir, repository.destination, 1_500, children=1)
        output = output_of(child)
        assert child.returncode == 0
        wait_until(lambda: not list(spool_dir.glob(f"*{SUFFIX}")), timeout=120)
        replayed_while_appending = writer.stats.replayed
    appended = completed_ids(output)
    assert len(appended) == 1_500
    assert stored(migrated_engine) == (1_500, 1_500)
    assert stored_ids(migrated_engine) == sorted(appended)
    assert replayed_while_appending == 1_500


FULL_DISK = """
import json, os, resource, shutil, signal, sys
from pathlib import Path
from llmtrace import TraceWriter, get_engine, TraceRepository
from tests.factories import make_trace
from tests.spool_files import quarantine_entries

mode, disk, database, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
filler = disk / "filler"
if mode == "tmpfs":
    filler.write_bytes(b"x" * 96_000)  # removed later, to free room
else:
    # Files may not grow past 40 kB: writes past it fail with EFBIG (SIGXFSZ ignored), as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))
repository = TraceRepository(get_engine(f"clickhousedb://default:@127.0.0.1:1/{database}"))
events = []
writer = TraceWriter(repository, batch_size=10, flush_interval=0.01, spool_dir=disk / "spool", max_retries=0,
                     replay_interval=3600, on_error=events.append)
number = 0

def submit_batches(batches):
    global number
    for _ in range(batches):
        for _ in range(10):
            writer.submit(make_trace(number))  # must never raise
            number += 1
        assert writer.flush(timeout=30)
        stats = writer.stats
        assert writer._thread.is_alive() and stats.submitted == stats.written + stats.spooled + stats.failed

submit_batches(40)
full = writer.stats
assert full.failed > 0 and full.errors > 0, full
if mode == "tmpfs":
    filler.unlink()
else:
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
submit_batches(5)
final = writer.close(timeout=30)
assert final.spooled == full.spooled + 50 and final.failed == full.failed, (full, final)
(out / "spool").mkdir(parents=True)
for path in (disk / "spool").glob("*.spool"):
    shutil.copy(path, out / "spool" / path.name)
print(json.dumps({"full": full.failed, "spooled": final.spooled, "failed": final.failed, "submitted": final.submitted,
                  "failed_events": sum(e.kind == "failed" for e in events)}))
"""


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.parametrize("mode", ["tmpfs", "rlimit"])
def test_a_full_disk_is_survived_counted_and_recovered_from(migrated_engine: Engine, tmp_path: Path, mode: str) -> None:
    """The spool's disk fills up (a 160 kB tmpfs, or a file size limit where mounting is not allowed)."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    child = [sys.executable, "-c", FULL_DISK, mode, str(disk), database_of(migrated_engine), str(out)]
    if mode == "tmpfs":
        if not can_mount_tmpfs():
            pytest.skip("mounting a tmpfs in a user namespace is not allowed here (the rlimit variant still runs)")
        child = [
            "unshare",
            "-Urm",
            "sh",
            "-c",
            'mount -t tmpfs -o size=160k tmpfs "$0" && exec "$@"',
            str(disk),
            *child,
        ]
    run = subprocess.run(child, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout.splitlines()[-1])
    assert result["full"] > 0 and result["failed"] == result["full"] and result["failed_events"] > 0
    assert result["spooled"] + result["failed"] == result["submitted"]

    with TraceWriter(TraceRepository(migrated_engine), spool_dir=out / "spool") as writer:
        wait_until(lambda: not list((out / "spool").glob(f"*{SUFFIX}")))
    # Exactly what the child counted as spooled is there: failed appends left nothing half-written behind.
    assert stored(migrated_engine) == (result["spooled"], result["spooled"])
    assert writer.stats.unreadable == 0 and quarantine_entries(out / "spool") == []  # not even a torn tail
    submitted = result["submitted"]
    assert set(stored_ids(migrated_engine)) <= {make_trace(i).id for i in range(submitted)}
    after_recovery = {make_trace(i).id for i in range(submitted - 50, submitted)}
    assert after_recovery <= set(stored_ids(migrated_engine))

"""Replay of damaged, foreign, rejected and shared spool files by a running TraceWriter, on the embedded engine."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from llmtrace import LLMTrace, TraceRepository, TraceWriter, WriterEvent, get_engine
from llmtrace.migrations import upgrade
from llmtrace.spool import QUARANTINE_DIRECTORY, SUFFIX, Spool
from llmtrace.spool_format import encode_file_header, encode_record
from tests.conftest import embedded_url
from tests.factories import make_trace
from tests.spool_files import quarantine_entries
from tests.unit.test_spool import record_body
from tests.writer_support import balanced, finishes, ids, stored, stored_ids, traces, wait_until

ROOT = Path(__file__).resolve().parents[2]


def spool_file(directory: Path, destination: str, batches: list[list[LLMTrace]]) -> Path:
    """A closed spool file, as a writer that has let go of it leaves it."""
    spool = Spool(directory, destination=destination)
    for batch in batches:
        spool.append(batch)
    path = spool.current_path
    spool.rotate()
    assert path is not None
    return path


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


def test_items_the_model_rejects_are_quarantined_and_the_rest_replayed(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = TraceRepository(migrated_engine)
    negative = {**make_trace(100).model_dump(mode="json"), "prompt_tokens": -1}
    newer = {**make_trace(101).model_dump(mode="json"), "billing_plan_v9": "pro"}
    body = json.dumps([make_trace(0).model_dump(mode="json"), negative, newer, "not a trace"]).encode()
    path = tmp_path / "0000000000001-1-rejected.spool"
    path.write_bytes(encode_file_header(repository.destination) + record_body(body) + encode_record(traces(5, 1)))

    events: list[WriterEvent] = []
    with TraceWriter(repository, spool_dir=tmp_path, on_error=events.append) as writer:
        wait_until(lambda: not path.exists())
        assert finishes(writer.flush)  # the thread lives on: flush() without a timeout returns
    assert stored_ids(migrated_engine) == ids(traces(6))
    assert (writer.stats.replayed, writer.stats.quarantined) == (6, 3)
    (entry,) = quarantine_entries(tmp_path)
    assert entry["source"] == path.name and entry["destination"] == repository.destination
    reasons = [item["reason"] for item in entry["items"]]
    assert "prompt_tokens: Input should be greater than or equal to 0" in reasons[0]
    assert "billing_plan_v9: Extra inputs are not permitted" in reasons[1]
    assert reasons[2] == "the item is a JSON str, not an object"
    assert [json.loads(item["item"]) for item in entry["items"]] == [negative, newer, "not a trace"]
    assert [event.count for event in events if event.kind == "quarantined"] == [3]


def test_one_flipped_byte_mid_file_quarantines_only_its_record(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = TraceRepository(migrated_engine)
    path = spool_file(tmp_path, repository.destination, [traces(10), traces(10, 10), traces(10, 20)])
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the second record
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))

    with TraceWriter(repository, spool_dir=tmp_path) as writer:
        wait_until(lambda: not path.exists())
    assert stored_ids(migrated_engine) == ids(traces(10) + traces(10, 20))
    assert (writer.stats.replayed, writer.stats.unreadable) == (20, 1)
    (entry,) = quarantine_entries(tmp_path)
    assert entry["reason"] == "checksum mismatch"
    saved = tmp_path / QUARANTINE_DIRECTORY / entry["bytes_file"]
    assert saved.read_bytes() == bytes(data[entry["offset"] : entry["offset"] + entry["length"]])
    assert len(encode_record(traces(10, 10))) == entry["length"]


def test_empty_foreign_and_directory_paths_named_spool(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = TraceRepository(migrated_engine)
    good = spool_file(tmp_path, repository.destination, [traces(10)])
    empty = tmp_path / "empty.spool"
    empty.touch()
    foreign = tmp_path / "notes.spool"
    foreign.write_text("someone else's file that happens to end in .spool")
    directory = tmp_path / "x.spool"
    directory.mkdir()

    events: list[WriterEvent] = []
    with TraceWriter(repository, spool_dir=tmp_path, replay_interval=0.05, on_error=events.append) as writer:
        wait_until(lambda: not good.exists() and not empty.exists())
        passes = writer.stats.replayed
        wait_until(lambda: writer._replayer is not None and writer._replayer._next_pass_at > 0)
        assert finishes(writer.flush)
        assert writer._thread.is_alive()
    assert passes == 10 and stored(migrated_engine) == (10, 10)
    # Foreign paths are left exactly as they were, and warned about once each however many passes ran.
    assert foreign.read_text() == "someone else's file that happens to end in .spool" and directory.is_dir()
    warned = sorted(event.message.split(" is not")[0] for event in events if event.kind == "foreign_file")
    assert warned == sorted([str(foreign), str(directory)])
    assert quarantine_entries(tmp_path) == []


def test_a_spool_file_with_a_damaged_header_is_moved_whole_to_the_quarantine(
    migrated_engine: Engine, tmp_path: Path
) -> None:
    repository = TraceRepository(migrated_engine)
    damaged = spool_file(tmp_path, repository.destination, [traces(10)])
    data = bytearray(damaged.read_bytes())
    data[20] ^= 0xFF  # inside the header's JSON: its destination can no longer be trusted
    damaged.write_bytes(bytes(data))
    good = spool_file(tmp_path, repository.destination, [traces(10, 10)])

    with TraceWriter(repository, spool_dir=tmp_path) as writer:
        wait_until(lambda: not good.exists() and not damaged.exists())
    assert stored_ids(migrated_engine) == ids(traces(10, 10)) and writer.stats.unreadable == 1
    assert (tmp_path / QUARANTINE_DIRECTORY / damaged.name).read_bytes() == bytes(data)
    (entry,) = quarantine_entries(tmp_path)
    assert entry["moved_to"] == damaged.name and "damaged spool header" in entry["reason"]


def test_a_record_clickhouse_keeps_rejecting_is_split_and_quarantined_without_blocking_others(
    migrated_engine: Engine, tmp_path: Path
) -> None:
    with migrated_engine.connect() as connection:
        connection.execute(text("ALTER TABLE llm_traces ADD CONSTRAINT not_666 CHECK prompt_tokens != 666"))
    repository = TraceRepository(migrated_engine)
    poison = [*traces(4, 10), make_trace(14, prompt_tokens=666), *traces(5, 15)]
    first = spool_file(tmp_path, repository.destination, [traces(10), poison, traces(10, 20)])
    later = spool_file(tmp_path, repository.destination, [traces(10, 30)])

    events: list[WriterEvent] = []
    writer = TraceWriter(repository, batch_size=10, spool_dir=tmp_path, replay_interval=0.1, on_error=events.append)
    # The first pass stores everything but the poisoned record, the later file included.
    wait_until(lambda: not later.exists() and stored(migrated_engine)[0] >= 30)
    wait_until(lambda: not first.exists())
    final = writer.close(timeout=10)
    stored_poison = [trace for trace in poison if trace.prompt_tokens != 666]
    assert stored_ids(migrated_engine) == ids(traces(10) + stored_poison + traces(10, 20) + traces(10, 30))
    assert (final.replayed, final.quarantined) == (39, 1)
    rejections = [event for event in events if event.kind == "replay_failed"]
    assert len(rejections) >= 2 and all("ClickHouse rejected the record" in event.message for event in rejections)
    (entry,) = quarantine_entries(tmp_path)
    assert "Constraint `not_666`" in entry["reason"] and entry["source"] == first.name
    assert [trace["id"] for trace in entry["traces"]] == [make_trace(14).id]


@pytest.fixture
def other_engine(chdb_dir: Path) -> Iterator[Engine]:
    """A second migrated database in this test process's embedded directory."""
    engine = get_engine(embedded_url(chdb_dir, f"test_{uuid.uuid4().hex[:12]}"))
    upgrade(engine)
    yield engine
    with engine.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS `{engine.url.database}`"))
    engine.dispose()


def test_writers_of_two_databases_sharing_a_directory_replay_only_their_own(
    migrated_engine: Engine, other_engine: Engine, tmp_path: Path
) -> None:
    ours, theirs = TraceRepository(migrated_engine), TraceRepository(other_engine)
    spool_file(tmp_path, ours.destination, [traces(10)])
    spool_file(tmp_path, theirs.destination, [traces(10, 100)])
    spool_file(tmp_path, ours.destination, [traces(10, 10)])

    with TraceWriter(ours, spool_dir=tmp_path) as writer:
        wait_until(lambda: writer.stats.replayed == 20)
    assert stored_ids(migrated_engine) == ids(traces(20))
    assert len(spool_files(tmp_path)) == 1  # theirs, untouched
    with TraceWriter(theirs, spool_dir=tmp_path):
        wait_until(lambda: not spool_files(tmp_path))
    assert stored_ids(other_engine) == ids(traces(10, 100))
    assert stored_ids(migrated_engine) == ids(traces(20))


SIBLING = """
import os, sys
from llmtrace.spool import Spool
from tests.factories import make_trace
spool = Spool(sys.argv[1], destination=sys.argv[2])
spool.append([make_trace(i) for i in range(int(sys.argv[3]), int(sys.argv[3]) + 20)])
if sys.argv[4] == "rotate":
    spool.rotate()
    print("rotated", flush=True)
else:
    print("holding", flush=True)
    sys.stdin.readline()  # alive, and holding its file, until told to go
os._exit(0)  # no rotate(), no clean-up: the kernel releases the file's lock
"""


def test_a_running_writer_replays_files_siblings_leave(migrated_engine: Engine, tmp_path: Path) -> None:
    repository = TraceRepository(migrated_engine)
    with TraceWriter(repository, spool_dir=tmp_path, replay_interval=0.1) as writer:
        wait_until(lambda: writer._replayer is not None and writer._replayer._next_pass_at > 0)
        # A sibling that exits normally after rotating its file...
        command = [sys.executable, "-c", SIBLING, str(tmp_path), repository.destination]
        subprocess.run([*command, "0", "rotate"], check=True, cwd=ROOT, timeout=60, capture_output=True)
        wait_until(lambda: writer.stats.replayed == 20)
        # ...and one that is alive and still appending: its file waits until the process dies.
        alive = subprocess.Popen(
            [*command, "100", "hold"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert alive.stdout is not None and alive.stdout.readline().strip() == "holding"
        held_for = writer._replayer._next_pass_at if writer._replayer else 0
        wait_until(lambda: writer._replayer is not None and writer._replayer._next_pass_at > held_for + 0.2)
        assert writer.stats.replayed == 20 and len(spool_files(tmp_path)) == 1
        alive.communicate("go\n", timeout=60)
        wait_until(lambda: writer.stats.replayed == 40)
    assert stored_ids(migrated_engine) == ids(traces(20) + traces(20, 100))
    assert spool_files(tmp_path) == []


def test_version_1_spool_files_are_replayed(migrated_engine: Engine, tmp_path: Path) -> None:
    import struct
    import zlib

    payload = json.dumps({"traces": [trace.model_dump(mode="json") for trace in traces(10)]}).encode()
    path = tmp_path / "1234-abcdef.spool"
    path.write_bytes(struct.pack(">4sII", b"LTS1", len(payload), zlib.crc32(payload)) + payload)
    events: list[WriterEvent] = []
    with TraceWriter(TraceRepository(migrated_engine), spool_dir=tmp_path, on_error=events.append) as writer:
        wait_until(lambda: not path.exists())
    assert stored_ids(migrated_engine) == ids(traces(10)) and balanced(writer.stats)
    assert [event.kind for event in events] == ["legacy_file"]

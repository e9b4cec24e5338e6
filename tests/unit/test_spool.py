"""The spool's files: the format reads back exactly, survives damage record by record, and changes hands safely."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtrace import LLMTrace
from llmtrace.spool import STALE_TEMPORARY_SECONDS, TEMPORARY_SUFFIX, NotClaimable, Spool, claim, scan
from llmtrace.spool_format import (
    FRAME,
    RECORD_MAGIC,
    BadSpan,
    NotASpoolFile,
    Record,
    encode_file_header,
    encode_record,
    read_file_header,
    read_records,
)
from tests.factories import make_trace
from tests.strategies import llm_traces

DESTINATION = "db.llm_traces"
BATCHES = [[make_trace(i) for i in range(start, start + 3)] for start in range(0, 30, 10)]


def write_file(path: Path, batches: list[list[LLMTrace]], *, destination: str = DESTINATION) -> list[int]:
    """Write a spool file by hand; return the offset of each record."""
    data = bytearray(encode_file_header(destination))
    offsets = []
    for batch in batches:
        offsets.append(len(data))
        data += encode_record(batch)
    path.write_bytes(bytes(data))
    return offsets


def read_back(path: Path) -> list[Record | BadSpan]:
    with open(path, "rb") as handle:
        header, start = read_file_header(handle.fileno())
        return list(read_records(handle.fileno(), header, start))


def record_body(body: bytes) -> bytes:
    """A record frame around an arbitrary body (valid checksums)."""
    start = struct.pack(">4sII", RECORD_MAGIC, len(body), zlib.crc32(body))
    return start + struct.pack(">I", zlib.crc32(start)) + body


def test_complete_records_read_back_equal(tmp_path: Path) -> None:
    write_file(tmp_path / "a.spool", BATCHES)
    items = read_back(tmp_path / "a.spool")
    assert [item.traces for item in items if isinstance(item, Record)] == BATCHES
    assert all(isinstance(item, Record) and not item.rejected for item in items)


def test_the_header_says_where_the_traces_belong(tmp_path: Path) -> None:
    write_file(tmp_path / "a.spool", BATCHES, destination="analytics.llm_traces")
    with open(tmp_path / "a.spool", "rb") as handle:
        header, start = read_file_header(handle.fileno())
    assert (header.version, header.destination, header.pid) == (2, "analytics.llm_traces", os.getpid())
    assert start == len(encode_file_header("analytics.llm_traces"))


@pytest.mark.parametrize(
    ("cut", "reason"),
    [(5, "incomplete frame header (5 of 16 bytes)"), (FRAME.size + 10, "record cut short (10 of")],
)
def test_a_torn_last_record_is_reported_and_skipped(tmp_path: Path, cut: int, reason: str) -> None:
    path = tmp_path / "a.spool"
    offsets = write_file(path, BATCHES)
    path.write_bytes(path.read_bytes()[: offsets[-1] + cut])
    *records, torn = read_back(path)
    assert [record.traces for record in records if isinstance(record, Record)] == BATCHES[:2]
    assert isinstance(torn, BadSpan) and torn.offset == offsets[-1] and torn.end == path.stat().st_size
    assert torn.reason.startswith(reason) and torn.torn_tail


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(victim=st.integers(0, 9), position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_one_flipped_bit_costs_only_its_own_record(tmp_path: Path, victim: int, position: float, bit: int) -> None:
    batches = [[make_trace(i * 10 + j) for j in range(3)] for i in range(10)]
    path = tmp_path / "flipped.spool"
    offsets = write_file(path, batches)
    data = bytearray(path.read_bytes())
    end = offsets[victim + 1] if victim + 1 < len(offsets) else len(data)
    at = offsets[victim] + int(position * (end - offsets[victim]))
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))

    items = read_back(path)
    good = [item.traces for item in items if isinstance(item, Record)]
    assert good == batches[:victim] + batches[victim + 1 :]
    (bad,) = [item for item in items if isinstance(item, BadSpan)]
    assert (bad.offset, bad.end) == (offsets[victim], end) and not bad.torn_tail


def test_garbage_between_records_is_one_bad_span(tmp_path: Path) -> None:
    path = tmp_path / "a.spool"
    header = encode_file_header(DESTINATION)
    garbage = b"\x00garbage LTR2 with a magic in it" * 100
    path.write_bytes(header + encode_record(BATCHES[0]) + garbage + encode_record(BATCHES[1]))
    items = read_back(path)
    assert [type(item) for item in items] == [Record, BadSpan, Record]
    bad = items[1]
    assert isinstance(bad, BadSpan) and bad.end - bad.offset == len(garbage)
    assert bad.reason == "not a frame header"


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({**make_trace(5).model_dump(mode="json"), "prompt_tokens": -1}, "prompt_tokens: Input should be greater"),
        ({**make_trace(5).model_dump(mode="json"), "added_in_v2": "x"}, "added_in_v2: Extra inputs are not permitted"),
        ("a string", "the item is a JSON str, not an object"),
        ([1, 2], "the item is a JSON list, not an object"),
    ],
)
def test_items_the_model_rejects_are_reported_with_the_valid_ones_kept(
    tmp_path: Path, item: object, reason: str
) -> None:
    good = [make_trace(1).model_dump(mode="json"), make_trace(2).model_dump(mode="json")]
    body = json.dumps([good[0], item, good[1]]).encode()
    path = tmp_path / "a.spool"
    path.write_bytes(encode_file_header(DESTINATION) + record_body(body) + encode_record(BATCHES[0]))
    first, second = read_back(path)
    assert isinstance(first, Record) and first.traces == [make_trace(1), make_trace(2)]
    (rejected,) = first.rejected
    assert rejected.index == 1 and json.loads(rejected.item_json) == item and reason in rejected.reason
    assert isinstance(second, Record) and second.traces == BATCHES[0]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"traces": []}', "not a list of traces"),
        (b"\xff\xfe not json", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),  # the decoder raises beyond its own errors
    ],
)
def test_a_record_that_is_not_a_list_of_traces_is_reported_whole(tmp_path: Path, body: bytes, problem: str) -> None:
    path = tmp_path / "a.spool"
    path.write_bytes(encode_file_header(DESTINATION) + record_body(body) + encode_record(BATCHES[0]))
    first, second = read_back(path)
    assert isinstance(first, Record) and first.body_problem is not None and problem in first.body_problem
    assert first.body == body and first.traces == []
    assert isinstance(second, Record) and second.traces == BATCHES[0]


def test_version_1_files_are_still_read(tmp_path: Path) -> None:
    def legacy_record(traces: list[LLMTrace]) -> bytes:
        payload = json.dumps({"traces": [trace.model_dump(mode="json") for trace in traces]}).encode()
        return struct.pack(">4sII", b"LTS1", len(payload), zlib.crc32(payload)) + payload

    path = tmp_path / "old.spool"
    data = bytearray(b"".join(legacy_record(batch) for batch in BATCHES))
    data[len(legacy_record(BATCHES[0])) + 20] ^= 0xFF  # damage the second record
    path.write_bytes(bytes(data))
    with open(path, "rb") as handle:
        header, start = read_file_header(handle.fileno())
        items = list(read_records(handle.fileno(), header, start))
    assert (header.version, header.destination, start) == (1, None, 0)
    assert [item.traces for item in items if isinstance(item, Record)] == [BATCHES[0], BATCHES[2]]
    assert [item.reason for item in items if isinstance(item, BadSpan)] == ["checksum mismatch"]


@pytest.mark.parametrize(
    ("data", "ours"),
    [(b"", False), (b"hello, I am someone else's file", False), (encode_file_header(DESTINATION)[:-3], True)],
    ids=["empty", "foreign", "damaged header"],
)
def test_files_that_do_not_start_with_a_header_are_told_apart(tmp_path: Path, data: bytes, ours: bool) -> None:
    path = tmp_path / "x.spool"
    path.write_bytes(data)
    with open(path, "rb") as handle, pytest.raises(NotASpoolFile) as raised:
        read_file_header(handle.fileno())
    assert raised.value.ours is ours


@settings(max_examples=50, deadline=None)
@given(batches=st.lists(st.lists(llm_traces(), min_size=1, max_size=3), min_size=1, max_size=3))
def test_any_traces_survive_the_spool(tmp_path_factory: pytest.TempPathFactory, batches: list[list[LLMTrace]]) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = Spool(directory, destination=DESTINATION)
    for batch in batches:
        spool.append(batch)
    spool.rotate()
    (path,) = directory.glob("*.spool")
    assert [item.traces for item in read_back(path) if isinstance(item, Record)] == batches


# -- the directory: publishing, rotating, claiming ----------------------------------------------------------


def test_appends_go_to_one_locked_file_until_it_is_rotated(tmp_path: Path) -> None:
    spool = Spool(tmp_path, destination=DESTINATION)
    spool.append(BATCHES[0])
    spool.append(BATCHES[1])
    (path,) = scan(tmp_path)
    assert path == spool.current_path and spool.current_traces == 6
    assert claim(path, destination=DESTINATION) is None  # still being appended to
    spool.rotate()
    claimed = claim(path, destination=DESTINATION)
    assert claimed is not None
    assert [item.traces for item in read_records(claimed.fd, claimed.header, claimed.records_start)] == BATCHES[:2]
    claimed.remove()
    assert scan(tmp_path) == []


def test_files_rotate_by_size(tmp_path: Path) -> None:
    one_record = len(encode_record(BATCHES[0]))
    spool = Spool(tmp_path, destination=DESTINATION, max_file_bytes=2 * one_record)
    for _ in range(6):
        spool.append(BATCHES[0])
    spool.rotate()
    assert len(scan(tmp_path)) == 3  # two records per file (the header tips each over the limit)


def test_appends_without_sync_reach_the_file_at_once_and_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, destination=DESTINATION)
    spool.append(BATCHES[0])  # publishes the file (its own fsyncs) and fsyncs the record
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    for batch in BATCHES:
        spool.append(batch, sync=False)
    # Already in the file (it would survive the process dying), though not yet fsynced.
    (path,) = tmp_path.glob("*.spool")
    assert [item.traces for item in read_back(path)] == [BATCHES[0], *BATCHES] and fsyncs == []
    spool.sync()
    spool.sync()  # nothing new to sync
    assert len(fsyncs) == 1
    spool.append(BATCHES[1], sync=False)
    spool.rotate()  # closing a file syncs it
    assert len(fsyncs) == 2


def test_only_files_of_the_claimers_destination_are_claimed_and_others_are_not_even_locked(tmp_path: Path) -> None:
    mine, theirs = Spool(tmp_path, destination=DESTINATION), Spool(tmp_path, destination="other.llm_traces")
    mine.append(BATCHES[0])
    theirs.append(BATCHES[1])
    mine_path, theirs_path = mine.current_path, theirs.current_path
    assert mine_path is not None and theirs_path is not None
    mine.rotate()
    theirs.rotate()
    with pytest.raises(NotClaimable, match=r"a spool file of other\.llm_traces") as raised:
        claim(theirs_path, destination=DESTINATION)
    assert raised.value.kind == "elsewhere"
    claimed = claim(mine_path, destination=DESTINATION)
    assert claimed is not None and claimed.header.destination == DESTINATION
    claimed.release()
    other = claim(theirs_path, destination="other.llm_traces")
    assert other is not None
    other.release()


@pytest.mark.parametrize(("content", "kind"), [(None, "foreign"), (b"not ours", "foreign"), (b"", "empty")])
def test_paths_that_are_not_spool_files_cannot_be_claimed(tmp_path: Path, content: bytes | None, kind: str) -> None:
    path = tmp_path / "x.spool"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(NotClaimable) as raised:
        claim(path, destination=DESTINATION)
    assert raised.value.kind == kind
    assert path.exists()


def test_paths_that_are_not_regular_files_are_never_opened(tmp_path: Path) -> None:
    # Opening a named pipe for reading blocks until a writer opens it: claim and the clean-up must not open it.
    pipe, link = tmp_path / "pipe.spool", tmp_path / "link.spool"
    os.mkfifo(pipe)
    write_file(tmp_path / "target", BATCHES)
    link.symlink_to(tmp_path / "target")
    os.mkfifo(tmp_path / f".pipe{TEMPORARY_SUFFIX}")
    old = time.time() - STALE_TEMPORARY_SECONDS - 1
    os.utime(tmp_path / f".pipe{TEMPORARY_SUFFIX}", (old, old))
    outcome: dict[str, str] = {}
    scanned: list[Path] = []

    def attempt() -> None:
        scanned.extend(scan(tmp_path))
        for path in (pipe, link):
            try:
                claim(path, destination=DESTINATION)
            except NotClaimable as exc:
                outcome[path.name] = exc.kind

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # release the stuck open
        pytest.fail("opening a named pipe blocked")
    assert sorted(scanned) == [link, pipe]
    assert outcome == {"pipe.spool": "foreign", "link.spool": "foreign"}
    assert (tmp_path / f".pipe{TEMPORARY_SUFFIX}").exists() and (tmp_path / "target").exists()


def test_a_file_removed_while_appended_to_is_reported_and_a_new_one_started(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", destination=DESTINATION)
    spool.append(BATCHES[0])
    for path in (tmp_path / "spool").iterdir():
        path.unlink()
    (tmp_path / "spool").rmdir()
    spool.append(BATCHES[1])  # recreates the directory
    assert spool.take_vanished() == 3 and spool.take_vanished() == 0
    spool.rotate()
    (path,) = scan(tmp_path / "spool")
    assert [item.traces for item in read_back(path)] == [BATCHES[1]]


def test_only_stale_unlocked_temporary_files_are_cleaned_up(tmp_path: Path) -> None:
    stale, fresh = tmp_path / f".stale{TEMPORARY_SUFFIX}", tmp_path / f".fresh{TEMPORARY_SUFFIX}"
    stale.write_bytes(encode_file_header(DESTINATION))
    fresh.write_bytes(encode_file_header(DESTINATION))
    old = time.time() - STALE_TEMPORARY_SECONDS - 1
    os.utime(stale, (old, old))
    assert scan(tmp_path) == []
    assert not stale.exists() and fresh.exists()


def test_a_claimer_never_takes_a_file_its_writer_still_fills(memory_dir: Path) -> None:
    """Writers create, fill and rotate files in a tight loop while two claimers replay and remove them.

    Each file gets two records, the second appended after the file is published. A claimer that could take a
    file in the instant between its creation and its writer's lock would remove it, and the second record
    would go to an unlinked file (lost); one that did not check that the path still names the inode it
    locked would read a file another claimer had just removed (read twice).
    """
    files = 4_000
    read: list[str] = []
    problems: list[str] = []
    read_lock = threading.Lock()
    done = threading.Event()

    def write() -> None:
        spool = Spool(memory_dir, destination=DESTINATION)
        for number in range(files):
            spool.append([make_trace(2 * number)], sync=False)
            spool.append([make_trace(2 * number + 1)], sync=False)
            spool.rotate()
        done.set()

    def replay() -> None:
        while True:
            finished = done.is_set()
            for path in scan(memory_dir):
                try:
                    claimed = claim(path, destination=DESTINATION)
                except NotClaimable as exc:  # a file seen before it was complete
                    problems.append(str(exc))
                    continue
                if claimed is None:
                    continue
                ids = [
                    trace.id
                    for item in read_records(claimed.fd, claimed.header, claimed.records_start)
                    if isinstance(item, Record)
                    for trace in item.traces
                ]
                claimed.remove()
                with read_lock:
                    read.extend(ids)
            if finished:
                return

    threads = [threading.Thread(target=write), threading.Thread(target=replay), threading.Thread(target=replay)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert sorted(read) == sorted(make_trace(i).id for i in range(2 * files))

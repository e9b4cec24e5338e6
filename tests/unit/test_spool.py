"""The spool file format: complete records read back exactly; a torn or corrupt tail is reported, not misread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtrace.spool import HEADER, Spool, encode_record, read_spool_file
from tests.factories import make_trace
from tests.strategies import llm_traces

BATCHES = [[make_trace(i) for i in range(start, start + 3)] for start in (0, 10, 20)]


def write_file(path: Path, batches: list[list]) -> bytes:  # type: ignore[type-arg]
    data = b"".join(encode_record(batch) for batch in batches)
    path.write_bytes(data)
    return data


def test_complete_records_read_back_equal(tmp_path: Path) -> None:
    write_file(tmp_path / "a.spool", BATCHES)
    contents = read_spool_file(tmp_path / "a.spool")
    assert contents.batches == BATCHES and contents.torn is None


@pytest.mark.parametrize(
    ("cut", "reason"),
    [(5, "incomplete header (5 of 12 bytes)"), (HEADER.size + 10, "payload cut short (10 of")],
)
def test_a_torn_last_record_is_reported_and_skipped(tmp_path: Path, cut: int, reason: str) -> None:
    path = tmp_path / "a.spool"
    data = write_file(path, BATCHES)
    last_start = len(data) - len(encode_record(BATCHES[-1]))
    path.write_bytes(data[: last_start + cut])
    contents = read_spool_file(path)
    assert contents.batches == BATCHES[:2]
    assert contents.torn is not None and contents.torn.offset == last_start
    assert contents.torn.reason.startswith(reason)


def test_a_corrupt_payload_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "a.spool"
    data = bytearray(write_file(path, BATCHES))
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    contents = read_spool_file(path)
    assert contents.batches == BATCHES[:2]
    assert contents.torn is not None and contents.torn.reason == "checksum mismatch"


def test_appends_go_to_one_file_per_spool_and_rotate_closes_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(BATCHES[0])
    spool.append(BATCHES[1])
    assert list(spool.claim_closed_files()) == []  # still being appended to
    spool.rotate()
    (path,) = spool.claim_closed_files()
    assert read_spool_file(path).batches == BATCHES[:2]


def test_appends_without_sync_reach_the_file_at_once_and_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    spool = Spool(tmp_path)
    for batch in BATCHES:
        spool.append(batch, sync=False)
    # Already in the file (it would survive the process dying), though not yet fsynced.
    (path,) = tmp_path.glob("*.spool")
    assert read_spool_file(path).batches == BATCHES and fsyncs == []
    spool.sync()
    spool.sync()  # nothing new to sync
    assert len(fsyncs) == 1
    spool.append(BATCHES[0])  # the default: fsynced before it returns
    assert len(fsyncs) == 2
    spool.append(BATCHES[1], sync=False)
    spool.rotate()  # closing a file syncs it
    assert len(fsyncs) == 3


def test_a_file_held_by_another_spool_is_not_claimed(tmp_path: Path) -> None:
    writing, replaying = Spool(tmp_path), Spool(tmp_path)
    writing.append(BATCHES[0])
    assert list(replaying.claim_closed_files()) == []
    writing.rotate()
    assert len(list(replaying.claim_closed_files())) == 1


@settings(max_examples=50, deadline=None)
@given(batches=st.lists(st.lists(llm_traces(), min_size=1, max_size=3), min_size=1, max_size=3))
def test_any_traces_survive_the_spool(tmp_path_factory: pytest.TempPathFactory, batches: list[list]) -> None:  # type: ignore[type-arg]
    path = tmp_path_factory.mktemp("spool") / "x.spool"
    write_file(path, batches)
    assert read_spool_file(path).batches == batches

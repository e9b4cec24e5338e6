"""Cursors: opaque, bound to their organization and filters, and rejected with a message that says why."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from llmtrace import InvalidCursor
from llmtrace.pagination import Position, decode_cursor, encode_cursor

POSITION = Position(created_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), id="trace-'\\\"-😀")


def test_a_cursor_decodes_to_its_exact_position() -> None:
    cursor = encode_cursor(POSITION, organization_id="org", fingerprint="f1")
    assert decode_cursor(cursor, organization_id="org", fingerprint="f1") == POSITION
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor


def test_a_cursor_from_another_version_is_refused() -> None:
    payload = {"v": 99, "o": "org", "f": "f1", "t": POSITION.created_at.isoformat(), "i": "x"}
    cursor = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(InvalidCursor, match=r"issued by another version of llmtrace \(version 99\)"):
        decode_cursor(cursor, organization_id="org", fingerprint="f1")


@pytest.mark.parametrize("cursor", ["", "%%%", base64.urlsafe_b64encode(b'{"v": 1}').decode(), "bnVsbA"])
def test_malformed_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursor, match="Malformed cursor: pass back exactly the next_cursor"):
        decode_cursor(cursor, organization_id="org", fingerprint="f1")

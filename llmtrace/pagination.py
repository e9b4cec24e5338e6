"""Keyset pagination over (created_at, id), newest first, with opaque cursors bound to their query."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_
from sqlalchemy.sql import ColumnElement

from llmtrace.errors import InvalidCursor
from llmtrace.model import EARLIEST_CREATED_AT, LATEST_CREATED_AT, LLMTrace, as_utc
from llmtrace.record import TRACES_TABLE

TABLE = TRACES_TABLE
CURSOR_VERSION = 1
# A real cursor is a few hundred characters (its trace id included); anything much longer was not issued here.
MAX_CURSOR_LENGTH = 4096


@dataclass(frozen=True)
class TracePage:
    """One page of :meth:`TraceRepository.list`.

    Attributes:
        items: The traces of this page, newest first.
        next_cursor: Pass it as ``cursor=`` to get the next page; ``None`` when this is the last page.
    """

    items: list[LLMTrace]
    next_cursor: str | None


@dataclass(frozen=True)
class Position:
    """The (created_at, id) of the last trace a page returned; the next page starts strictly after it."""

    created_at: datetime
    id: str

    def after(self) -> ColumnElement[bool]:
        """Rows that sort after this position in newest-first order.

        Written as a range on created_at plus a tie-break, rather than a tuple comparison, so that ClickHouse
        can use the created_at bound for partition and primary-key pruning.
        """
        created_at, row_id = TABLE.c.created_at, TABLE.c.id
        return and_(
            created_at <= self.created_at,
            or_(created_at < self.created_at, row_id < self.id),
        )


def encode_cursor(position: Position, *, organization_id: str, fingerprint: str) -> str:
    """An opaque cursor for the page after ``position``."""
    payload = {
        "v": CURSOR_VERSION,
        "o": organization_id,
        "f": fingerprint,
        "t": position.created_at.isoformat(),
        "i": position.id,
    }
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, *, organization_id: str, fingerprint: str) -> Position:
    """Read a cursor issued by :func:`encode_cursor` for the same organization and filters.

    Raises:
        InvalidCursor: The cursor is malformed, or belongs to another organization or other filters.
    """
    if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_LENGTH:
        raise InvalidCursor("Malformed cursor: pass back exactly the next_cursor of a previous page.")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if payload["v"] != CURSOR_VERSION:
            raise InvalidCursor(f"This cursor was issued by another version of llmtrace (version {payload['v']}).")
        owner, issued_for = payload["o"], payload["f"]
        position = Position(created_at=as_utc(datetime.fromisoformat(payload["t"])), id=str(payload["i"]))
    except InvalidCursor:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error, OverflowError, RecursionError) as exc:
        # OverflowError: a time zone pushed a date past year 1 or 9999; RecursionError: deeply nested JSON.
        raise InvalidCursor("Malformed cursor: pass back exactly the next_cursor of a previous page.") from exc
    if not EARLIEST_CREATED_AT <= position.created_at <= LATEST_CREATED_AT:
        # No trace can sit there (created_at's range), so no page could have ended there: the cursor was forged.
        raise InvalidCursor("Malformed cursor: pass back exactly the next_cursor of a previous page.")
    if owner != organization_id:
        raise InvalidCursor("This cursor was issued for another organization; start again without a cursor.")
    if issued_for != fingerprint:
        raise InvalidCursor("This cursor was issued for other filters; use the same filters as the first page.")
    return position

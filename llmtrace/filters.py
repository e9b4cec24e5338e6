"""Row filters shared by the repository's reads: one frozen dataclass that adds WHERE clauses."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_
from sqlalchemy.sql import ColumnElement

from llmtrace.model import as_utc
from llmtrace.record import TRACES_TABLE

SelectT = TypeVar("SelectT", bound=Select[Any])
TABLE = TRACES_TABLE


@dataclass(frozen=True, kw_only=True)
class TraceFilter:
    """Which traces a read covers. ``None`` means "any"; ``since`` is inclusive and ``until`` exclusive.

    Datetimes are compared in UTC; naive ones are taken as UTC, like ``LLMTrace.created_at``.
    """

    organization_id: str | None = None
    agent_id: str | None = None
    project_id: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    trace_id: str | None = None
    model: str | None = None
    provider: str | None = None
    call_type: str | None = None
    is_error: bool | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, datetime):
                    raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
                object.__setattr__(self, name, as_utc(value))
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"since ({self.since.isoformat()}) must be earlier than until ({self.until.isoformat()})")

    def clauses(self) -> list[ColumnElement[bool]]:
        """The WHERE conditions this filter stands for (all bound parameters, no SQL text from values)."""
        conditions: list[ColumnElement[bool]] = []
        for name in ("organization_id", "agent_id", "project_id", "run_id", "step_id", "trace_id", "model",
                     "provider", "call_type", "is_error"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                conditions.append(TABLE.c[name] == value)
        if self.since is not None:
            conditions.append(TABLE.c.created_at >= self.since)
        if self.until is not None:
            conditions.append(TABLE.c.created_at < self.until)
        return conditions

    def apply(self, statement: SelectT) -> SelectT:
        """Return ``statement`` with this filter's conditions added to its WHERE clause."""
        conditions = self.clauses()
        return statement.where(and_(*conditions)) if conditions else statement

    def fingerprint(self) -> str:
        """A short stable digest of the filter, binding pagination cursors to the query that issued them."""
        values = {
            key: value.isoformat() if isinstance(value, datetime) else value for key, value in asdict(self).items()
        }
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

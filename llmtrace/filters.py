"""Row filters shared by the repository's reads and deletes: one frozen dataclass that adds WHERE clauses.

Every filter is scoped to one organization, checked at run time: a service that lost its caller's
organization (``None``, ``""``) must get an error, not every tenant's traces. The operator's view across
organizations is asked for by name, with :data:`ALL_ORGANIZATIONS`, and only where it makes sense (reports and
counts), never by omission and never for a delete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from sqlalchemy import Select, and_
from sqlalchemy.sql import ColumnElement

from llmtrace.model import as_utc
from llmtrace.record import TRACES_TABLE

SelectT = TypeVar("SelectT", bound=Select[Any])
TABLE = TRACES_TABLE


class AllOrganizations:
    """The type of :data:`ALL_ORGANIZATIONS`; there is one instance."""

    _instance: AllOrganizations | None = None

    def __new__(cls) -> AllOrganizations:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ALL_ORGANIZATIONS"


ALL_ORGANIZATIONS: Final = AllOrganizations()
"""Pass as ``organization_id`` to :meth:`TraceRepository.usage` or :meth:`~TraceRepository.count` for a
report over every organization (the operator's view). No other method accepts it."""

OrganizationScope = str | AllOrganizations
# The filters that match a column by equality (organization_id and the time range are handled apart).
EQUALITY_FILTERS = (
    "agent_id",
    "project_id",
    "run_id",
    "step_id",
    "trace_id",
    "model",
    "provider",
    "call_type",
    "billing_plan_type",
    "billing_cost_source",
    "billing_customer_id",
    "is_byok",
    "is_error",
)
FLAG_FILTERS = frozenset({"is_byok", "is_error"})


def require_organization(organization_id: object, *, method: str, across: bool = False) -> OrganizationScope:
    """Check that ``organization_id`` names one organization (or, with ``across``, is ALL_ORGANIZATIONS).

    Args:
        organization_id: What the caller passed.
        method: The repository method, for the message.
        across: Whether the method accepts :data:`ALL_ORGANIZATIONS`.

    Raises:
        TypeError: Not a str (``None`` included), or ALL_ORGANIZATIONS where it is not accepted.
        ValueError: An empty or blank string.
    """
    hint = (
        "; for a report over every organization pass llmtrace.ALL_ORGANIZATIONS"
        if across
        else f"; {method}() works on one organization at a time"
    )
    if isinstance(organization_id, AllOrganizations):
        if across:
            return organization_id
        raise TypeError(f"{method}() does not accept ALL_ORGANIZATIONS: it works on one organization at a time")
    if not isinstance(organization_id, str):
        raise TypeError(
            f"{method}() needs organization_id, the organization whose traces to use, as a str; got "
            f"{organization_id!r}{hint}"
        )
    if not organization_id.strip():
        raise ValueError(f"{method}() needs a non-empty organization_id; got {organization_id!r}{hint}")
    return organization_id


@dataclass(frozen=True, kw_only=True)
class TraceFilter:
    """Which traces a read covers: one organization (or all of them, by name) and optional conditions.

    ``None`` for a condition means "any"; ``since`` is inclusive and ``until`` exclusive. Datetimes are compared
    in UTC; naive ones are taken as UTC, like ``LLMTrace.created_at``. Build it through
    :func:`require_organization`: the dataclass checks only the type of ``organization_id``.
    """

    organization_id: OrganizationScope
    agent_id: str | None = None
    project_id: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    trace_id: str | None = None
    model: str | None = None
    provider: str | None = None
    call_type: str | None = None
    billing_plan_type: str | None = None
    billing_cost_source: str | None = None
    billing_customer_id: str | None = None
    is_byok: bool | None = None
    is_error: bool | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.organization_id, (str, AllOrganizations)):
            raise TypeError(f"organization_id must be a str or ALL_ORGANIZATIONS, got {self.organization_id!r}")
        for name in EQUALITY_FILTERS:
            # Checked here, not left to the driver: it formats values into the SQL text on the client, and an
            # object it does not know (not a str) would be written there unquoted.
            value = getattr(self, name)
            flag = name in FLAG_FILTERS
            if value is not None and not (type(value) is bool if flag else isinstance(value, str)):
                expected = "True, False" if flag else "a str"
                raise TypeError(f"{name} must be {expected} or None, got {type(value).__name__}: {value!r}")
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
        if isinstance(self.organization_id, str):
            conditions.append(TABLE.c.organization_id == self.organization_id)
        for name in EQUALITY_FILTERS:
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
        values = {key: getattr(self, key) for key in self.__dataclass_fields__}
        values = {key: value.isoformat() if isinstance(value, datetime) else value for key, value in values.items()}
        if isinstance(self.organization_id, AllOrganizations):
            values["organization_id"] = {"all": True}  # cannot be confused with any organization's name
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

"""TraceRepository reads: tenant isolation, filters, keyset pagination, hostile values, deletes, errors."""

from __future__ import annotations

import base64
import json
from collections import UserString
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from llmtrace import (
    ALL_ORGANIZATIONS,
    DatabaseError,
    InvalidCursor,
    LLMTrace,
    SchemaNotMigratedError,
    TraceNotFound,
    TraceRepository,
)
from llmtrace.engine import driver_client
from llmtrace.errors import database_errors
from llmtrace.filters import TraceFilter
from llmtrace.migrations import upgrade
from tests.factories import BASE_TIME, make_trace


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    return TraceRepository(migrated_engine)


def list_all(repository: TraceRepository, organization_id: str, limit: int = 7, **filters: object) -> list[LLMTrace]:
    items: list[LLMTrace] = []
    cursor = None
    while True:
        page = repository.list(organization_id, limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
        items.extend(page.items)
        if page.next_cursor is None:
            return items
        cursor = page.next_cursor


def newest_first(traces: list[LLMTrace]) -> list[LLMTrace]:
    return sorted(traces, key=lambda t: (t.created_at, t.id), reverse=True)


def test_get_of_a_missing_trace(repository: TraceRepository) -> None:
    with pytest.raises(TraceNotFound, match="No trace with id 'nope' in organization 'org-1'"):
        repository.get("org-1", "nope")


def test_pagination_returns_everything_once_newest_first(repository: TraceRepository) -> None:
    # Several traces share a created_at (ties broken by id) and others differ by one microsecond.
    traces = [make_trace(i, created_at=BASE_TIME + timedelta(microseconds=i // 3)) for i in range(100)]
    repository.add_many(traces)
    assert list_all(repository, "org-1") == newest_first(traces)


def test_pages_are_stable_while_newer_traces_arrive(repository: TraceRepository) -> None:
    traces = [make_trace(i) for i in range(30)]
    repository.add_many(traces)
    first = repository.list("org-1", limit=10)
    repository.add_many([make_trace(i, created_at=BASE_TIME + timedelta(hours=1, seconds=i)) for i in range(100, 110)])
    second = repository.list("org-1", limit=10, cursor=first.next_cursor)
    assert first.items + second.items == newest_first(traces)[:20]


def test_filters(repository: TraceRepository) -> None:
    traces = [make_trace(i, is_error=i % 5 == 0) for i in range(60)]
    repository.add_many(traces)
    checks: list[tuple[dict[str, object], list[LLMTrace]]] = [
        ({"agent_id": "agent-1"}, [t for t in traces if t.agent_id == "agent-1"]),
        ({"model": "gpt-4.1", "is_error": False}, [t for t in traces if t.model == "gpt-4.1" and not t.is_error]),
        ({"provider": "anthropic"}, [t for t in traces if t.provider == "anthropic"]),
        ({"run_id": "run-2"}, [t for t in traces if t.run_id == "run-2"]),
        ({"step_id": "step-7"}, [traces[7]]),
        ({"trace_id": traces[9].trace_id}, [traces[9]]),
        ({"project_id": "proj-1", "call_type": "agent_step"}, traces),
        ({"is_error": True}, [t for t in traces if t.is_error]),
        (
            {"since": BASE_TIME + timedelta(seconds=10), "until": BASE_TIME + timedelta(seconds=20)},
            [
                t
                for t in traces
                if BASE_TIME + timedelta(seconds=10) <= t.created_at < BASE_TIME + timedelta(seconds=20)
            ],
        ),
    ]
    for filters, expected in checks:
        assert list_all(repository, "org-1", limit=50, **filters) == newest_first(expected), filters
        assert repository.count("org-1", **filters) == len(expected), filters


def test_naive_and_aware_bounds_mean_the_same_instant(repository: TraceRepository) -> None:
    repository.add_many([make_trace(i) for i in range(20)])
    naive = BASE_TIME.replace(tzinfo=None) + timedelta(seconds=5)
    aware = (BASE_TIME + timedelta(seconds=5)).astimezone(datetime.now().astimezone().tzinfo)
    assert repository.count("org-1", since=naive) == repository.count("org-1", since=aware) == 15


def test_no_read_returns_another_organizations_traces(repository: TraceRepository) -> None:
    mine = [make_trace(i, organization_id="org-a") for i in range(20)]
    theirs = [make_trace(100 + i, organization_id="org-b", agent_id="agent-1") for i in range(20)]
    repository.add_many(mine + theirs)
    assert all(t.organization_id == "org-a" for t in list_all(repository, "org-a"))
    assert repository.count("org-a") == 20
    with pytest.raises(TraceNotFound):
        repository.get("org-a", theirs[0].id)
    (usage,) = repository.usage("org-a", group_by=())
    assert usage.requests == 20

    their_cursor = repository.list("org-b", limit=5).next_cursor
    assert their_cursor is not None
    with pytest.raises(InvalidCursor, match="issued for another organization"):
        repository.list("org-a", cursor=their_cursor)

    # A cursor forged to pass every check for org-a (fingerprints are not secret) still reads only org-a.
    payload = json.loads(base64.urlsafe_b64decode(their_cursor + "=" * (-len(their_cursor) % 4)))
    payload["o"] = "org-a"
    payload["f"] = TraceFilter(organization_id="org-a").fingerprint()
    payload["t"] = (BASE_TIME + timedelta(days=1)).isoformat()
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
    page = repository.list("org-a", limit=100, cursor=forged)
    assert page.items == newest_first(mine)


def test_cursor_errors(repository: TraceRepository) -> None:
    repository.add_many([make_trace(i) for i in range(10)])
    cursor = repository.list("org-1", limit=3, model="gpt-4.1").next_cursor
    assert cursor is not None
    with pytest.raises(InvalidCursor, match="issued for other filters"):
        repository.list("org-1", limit=3, cursor=cursor)
    with pytest.raises(InvalidCursor, match="Malformed cursor"):
        repository.list("org-1", cursor="definitely-not-a-cursor")


def test_list_limit_is_checked(repository: TraceRepository) -> None:
    with pytest.raises(ValueError, match="limit must be between 1 and 10000, got 0"):
        repository.list("org-1", limit=0)
    for not_an_int in (True, "5", 2.0):
        with pytest.raises(TypeError, match="limit must be an int"):
            repository.list("org-1", limit=not_an_int)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00+00:00",
        "9999-12-31T23:59:59+00:00",
        "1899-12-31T23:59:59",
        "0001-01-01T00:00:00+01:00",  # converting to UTC leaves datetime's range
        "9999-12-31T23:59:59-01:00",
    ],
)
def test_a_cursor_dated_where_no_trace_can_be_is_invalid(repository: TraceRepository, moment: str) -> None:
    repository.add_many([make_trace(i) for i in range(10)])
    cursor = repository.list("org-1", limit=3).next_cursor
    assert cursor is not None
    payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    payload["t"] = moment
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(InvalidCursor, match="Malformed cursor"):
        repository.list("org-1", limit=3, cursor=forged)


def test_a_cursor_that_no_page_could_have_issued_is_invalid(repository: TraceRepository) -> None:
    nested = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    for forged in (nested, "A" * 100_000):
        with pytest.raises(InvalidCursor, match="Malformed cursor"):
            repository.list("org-1", limit=3, cursor=forged)


# -- tenant scope: no read, count, report or delete without one organization, named explicitly ----------------

TWO_TENANTS = [make_trace(i, organization_id="org-a", agent_id="a1") for i in range(30)] + [
    make_trace(100 + i, organization_id="org-b", agent_id="a1") for i in range(23)
]
MISSING = [None, "", "   ", 7]


@pytest.mark.parametrize("organization_id", MISSING, ids=repr)
@pytest.mark.parametrize(
    "call",
    [
        lambda repository, organization: repository.get(organization, TWO_TENANTS[0].id),
        lambda repository, organization: repository.list(organization),
        lambda repository, organization: repository.list(organization, agent_id="a1"),
        lambda repository, organization: repository.count(organization),
        lambda repository, organization: repository.count(organization, agent_id="a1"),
        lambda repository, organization: repository.usage(organization, group_by=("organization_id",)),
        lambda repository, organization: repository.delete(organization),
        lambda repository, organization: repository.delete(organization, agent_id="a1"),
        lambda repository, organization: repository.delete(organization, agent_id="a1", erase=False),
    ],
    ids=["get", "list", "list by agent", "count", "count by agent", "usage", "delete", "delete by agent", "mask"],
)
def test_a_missing_organization_is_refused_and_touches_nothing(
    repository: TraceRepository, call: Any, organization_id: object
) -> None:
    # A service that lost its caller's identity passes None or "": that must never mean "every organization".
    repository.add_many(TWO_TENANTS)
    with pytest.raises((TypeError, ValueError), match="organization_id") as caught:
        call(repository, organization_id)
    assert repr(organization_id) in str(caught.value)
    assert repository.count(ALL_ORGANIZATIONS) == 53
    assert repository.count("org-b", agent_id="a1") == 23


@pytest.mark.parametrize(
    "call",
    [
        lambda repository: repository.get(ALL_ORGANIZATIONS, "x"),
        lambda repository: repository.list(ALL_ORGANIZATIONS),
        lambda repository: repository.delete(ALL_ORGANIZATIONS, agent_id="a1"),
    ],
    ids=["get", "list", "delete"],
)
def test_only_reports_and_counts_span_organizations(repository: TraceRepository, call: Any) -> None:
    repository.add_many(TWO_TENANTS)
    with pytest.raises(TypeError, match="does not accept ALL_ORGANIZATIONS"):
        call(repository)
    assert repository.count(ALL_ORGANIZATIONS) == 53


def test_the_operator_view_is_asked_for_by_name(repository: TraceRepository) -> None:
    repository.add_many(TWO_TENANTS)
    by_organization = repository.usage(ALL_ORGANIZATIONS, group_by=("organization_id",))
    assert {row.organization_id: row.requests for row in by_organization} == {"org-a": 30, "org-b": 23}
    assert repository.count(ALL_ORGANIZATIONS, agent_id="a1") == 53
    assert [row.requests for row in repository.usage("org-b", group_by=())] == [23]
    with pytest.raises(TypeError, match=r"pass llmtrace\.ALL_ORGANIZATIONS"):
        repository.usage(None, group_by=())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'organization_id'"):
        repository.usage(group_by=())  # type: ignore[call-arg]


class Crafted(UserString):
    """Not a str: the driver would format it into the SQL text unquoted."""


@pytest.mark.parametrize(
    "call",
    [
        lambda repository: repository.delete("org-a", agent_id=Crafted("'' OR 1 = 1")),
        lambda repository: repository.delete("org-a", run_id=Crafted("'' OR 1 = 1"), erase=False),
        lambda repository: repository.count("org-a", agent_id=Crafted("'' OR 1 = 1")),
        lambda repository: repository.usage("org-a", group_by=(), model=Crafted("'' OR 1 = 1")),
        lambda repository: repository.list("org-a", step_id=Crafted("'' OR 1 = 1")),
        lambda repository: repository.count("org-a", agent_id=0),
        lambda repository: repository.count("org-a", agent_id=ALL_ORGANIZATIONS),
        lambda repository: repository.count("org-a", is_error="yes"),
        lambda repository: repository.count("org-a", is_byok=1),
    ],
    ids=["erase", "mask", "count", "usage", "list", "int", "sentinel", "str flag", "int flag"],
)
def test_a_filter_value_of_the_wrong_type_is_refused(repository: TraceRepository, call: Any) -> None:
    repository.add_many(TWO_TENANTS)
    with pytest.raises(TypeError, match=r"must be (a str|True, False) or None, got"):
        call(repository)
    assert repository.count(ALL_ORGANIZATIONS) == 53


def test_a_blank_organization_cannot_be_written_either(repository: TraceRepository) -> None:
    with pytest.raises(ValueError, match="organization_id"):
        make_trace(1, organization_id=" ")


# -- stored values: a row reads back as stored, whoever wrote it -------------------------------------------------


def test_rows_from_other_writers_read_back_as_stored(repository: TraceRepository, migrated_engine: Engine) -> None:
    # The reference platform's writer inserts LLMTrace.to_clickhouse_row() tuples, with the zeros its model
    # holds: no derived total_tokens, no computed sizes, '' for absent ids.
    written = make_trace(1, prompt_tokens=10, completion_tokens=2, project_id=None, run_id=None)
    row = list(written.to_clickhouse_row())
    columns = LLMTrace.clickhouse_columns()
    for name in ("total_tokens", "request_size_bytes", "response_size_bytes"):
        row[columns.index(name)] = 0
    with migrated_engine.connect() as connection:
        driver_client(connection).insert("llm_traces", [row], column_names=columns)

    stored = repository.get("org-1", written.id)
    assert (stored.total_tokens, stored.request_size_bytes, stored.response_size_bytes) == (0, 0, 0)
    assert (stored.project_id, stored.run_id) == (None, None)
    assert stored.to_clickhouse_row() == tuple(row)
    (listed,) = repository.list("org-1").items
    assert listed == stored
    (usage,) = repository.usage("org-1", group_by=())
    assert (usage.total_tokens, usage.request_bytes, usage.response_bytes) == (0, 0, 0)
    assert usage.prompt_tokens == stored.prompt_tokens == 10


HOSTILE = [
    "it's",
    'say "hi"',
    "back\\slash",
    "\\'; DROP TABLE llm_traces; --",
    "nul\x00byte",
    "x' OR '1'='1",
    "SELECT * FROM system.tables",
    "%(organizations)s {id:String}",
    "line\nbreak",
]


def test_hostile_values_are_stored_and_matched_verbatim(repository: TraceRepository, migrated_engine: Engine) -> None:
    traces = [
        make_trace(i, organization_id=value, agent_id=value, run_id=value, model=value, request_json=value)
        for i, value in enumerate(HOSTILE)
    ]
    traces.append(make_trace(99, organization_id="x", agent_id="x"))
    repository.add_many(traces)
    assert repository.add_many(traces) == 0
    for trace, value in zip(traces, HOSTILE, strict=False):
        assert repository.get(value, trace.id) == trace
        assert repository.list(value, agent_id=value, run_id=value, model=value).items == [trace]
        assert repository.count(value, agent_id=value) == 1
    with migrated_engine.connect() as connection:
        assert connection.execute(text("SELECT count() FROM llm_traces")).scalar_one() == len(traces)


def test_delete_by_agent_run_and_time(repository: TraceRepository) -> None:
    traces = [make_trace(i) for i in range(60)] + [make_trace(i, organization_id="org-2") for i in range(60)]
    repository.add_many(traces)
    assert repository.delete("org-1", agent_id="agent-0") == 20
    assert repository.count("org-1", agent_id="agent-0") == 0
    assert repository.delete("org-1", run_id="run-1") == len([i for i in range(10, 20) if i % 3 != 0])
    assert repository.delete("org-1", before=BASE_TIME + timedelta(seconds=30)) == len(
        [i for i in range(30) if i % 3 != 0 and not 10 <= i < 20]
    )
    assert repository.count("org-2") == 60
    assert repository.delete("org-1") == repository.count("org-1") + 20
    assert repository.count("org-1") == 0
    assert repository.delete("org-1") == 0


@pytest.mark.parametrize(("erase", "left_on_disk"), [(True, 0), (False, 5)])
def test_erase_rewrites_the_rows_away_and_masking_only_hides_them(
    repository: TraceRepository, migrated_engine: Engine, erase: bool, left_on_disk: int
) -> None:
    # One microsecond apart: `before` must cut between them exactly.
    repository.add_many([make_trace(i, created_at=BASE_TIME + timedelta(microseconds=i)) for i in range(10)])
    assert repository.delete("org-1", before=BASE_TIME + timedelta(microseconds=5), erase=erase) == 5
    assert repository.count("org-1") == 5
    with migrated_engine.connect() as connection:
        # apply_deleted_mask = 0 shows rows that a lightweight delete only masked.
        on_disk = connection.execute(text("SELECT count() FROM llm_traces SETTINGS apply_deleted_mask = 0"))
        assert on_disk.scalar_one() == 5 + left_on_disk


def test_database_errors_are_mapped_with_the_cause(repository: TraceRepository, migrated_engine: Engine) -> None:
    repository.add(make_trace(0))  # the schema is checked once, before the first write: then the table goes
    with migrated_engine.connect() as connection:
        connection.execute(text("DROP TABLE llm_traces"))
    with pytest.raises(DatabaseError, match="ClickHouse failed while reading trace 'x'") as caught:
        repository.get("org-1", "x")
    assert caught.value.__cause__ is not None
    with pytest.raises(DatabaseError, match="ClickHouse failed while"):
        repository.add(make_trace(1))


def test_an_unmigrated_database_says_how_to_migrate(repository: TraceRepository, migrated_engine: Engine) -> None:
    with migrated_engine.connect() as connection:
        # Another missing table, in a query that names llm_traces, is an ordinary database error.
        with pytest.raises(DatabaseError) as other, database_errors("testing"):
            connection.execute(text("SELECT t.id FROM llm_traces AS t INNER JOIN no_such_table AS n ON t.id = n.id"))
        assert not isinstance(other.value, SchemaNotMigratedError)
        connection.execute(text("DROP TABLE llm_traces"))
    for action in (
        lambda: repository.get("org-1", "x"),
        lambda: repository.add_many([make_trace(1)], skip_stored=False),
        lambda: repository.usage("org-1"),
    ):
        with pytest.raises(SchemaNotMigratedError, match="`alembic upgrade head`, `llmtrace migrate`"):
            action()


def test_a_database_migrated_before_prices_says_how_to_migrate(engine: Engine) -> None:
    upgrade(engine, "0003")  # the traces table, no price list yet
    repository = TraceRepository(engine)
    repository.add_many([make_trace(1)])
    with pytest.raises(SchemaNotMigratedError, match=r"llm_model_prices table does not exist.*`llmtrace migrate`"):
        repository.usage("org-1")


def test_programming_errors_are_not_swallowed(repository: TraceRepository) -> None:
    with pytest.raises(TypeError, match="the accepted filters are agent_id"):
        repository.count("org-1", agnet_id="typo")
    with pytest.raises(TypeError, match="since must be a datetime"):
        repository.count("org-1", since="yesterday")


def test_since_must_precede_until(repository: TraceRepository) -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="must be earlier than until"):
        repository.count("org-1", since=now, until=now)


def test_assigning_to_a_stored_trace_keeps_its_stored_values(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    written = make_trace(1)
    row = list(written.to_clickhouse_row())
    columns = LLMTrace.clickhouse_columns()
    row[columns.index("request_size_bytes")] = row[columns.index("response_size_bytes")] = 0
    with migrated_engine.connect() as connection:
        driver_client(connection).insert("llm_traces", [row], column_names=columns)
    stored = repository.get("org-1", written.id)
    stored.latency_ms = 5  # validated on assignment, which must not derive anything
    assert (stored.latency_ms, stored.request_size_bytes, stored.response_size_bytes) == (5, 0, 0)


def test_byte_sums_do_not_wrap_around(repository: TraceRepository) -> None:
    largest = 2**64 - 1
    repository.add_many([make_trace(1, request_size_bytes=largest), make_trace(2, request_size_bytes=57)])
    (row,) = repository.usage("org-1", group_by=())
    assert row.request_bytes == largest + 57

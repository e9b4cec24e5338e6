"""Ad-hoc queries on LLMTraceRecord with SQLAlchemy 2.x, including ClickHouse's own clauses."""

from __future__ import annotations

from collections import Counter, defaultdict

from clickhouse_connect.cc_sqlalchemy import select as ch_select
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from llmtrace import LLMTrace, LLMTraceRecord, record_to_trace, trace_to_record
from tests.factories import make_trace

TRACES = [make_trace(i, organization_id="org-a" if i % 4 else "org-b") for i in range(40)]


def load(engine: Engine) -> None:
    with Session(engine) as session:
        session.add_all(trace_to_record(t) for t in TRACES)
        session.commit()


def test_select_with_filter_returns_records(migrated_engine: Engine) -> None:
    load(migrated_engine)
    with Session(migrated_engine) as session:
        records = session.scalars(
            select(LLMTraceRecord)
            .where(LLMTraceRecord.organization_id == "org-a", LLMTraceRecord.model == "gpt-4.1")
            .order_by(LLMTraceRecord.created_at)
        ).all()
    expected = [t for t in TRACES if t.organization_id == "org-a" and t.model == "gpt-4.1"]
    assert [record_to_trace(r) for r in records] == expected


def test_group_by_with_sums(migrated_engine: Engine) -> None:
    load(migrated_engine)
    statement = (
        select(
            LLMTraceRecord.model,
            func.count().label("requests"),
            func.sum(LLMTraceRecord.total_tokens).label("tokens"),
            func.sum(LLMTraceRecord.cached_input_tokens).label("cached"),
        )
        .where(LLMTraceRecord.organization_id == "org-a")
        .group_by(LLMTraceRecord.model)
        .order_by(LLMTraceRecord.model)
    )
    with migrated_engine.connect() as connection:
        rows = connection.execute(statement).all()

    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in TRACES:
        if t.organization_id == "org-a":
            expected[t.model][0] += 1
            expected[t.model][1] += t.total_tokens
            expected[t.model][2] += t.cached_input_tokens or 0
    assert {row.model: [row.requests, row.tokens, row.cached] for row in rows} == dict(expected)


def test_limit_by_keeps_the_latest_per_agent(migrated_engine: Engine) -> None:
    load(migrated_engine)
    statement = (
        ch_select(LLMTraceRecord.agent_id, LLMTraceRecord.id, LLMTraceRecord.created_at)
        .where(LLMTraceRecord.organization_id == "org-a")
        .order_by(LLMTraceRecord.agent_id, LLMTraceRecord.created_at.desc())
        .limit_by([LLMTraceRecord.agent_id], 2)
    )
    with migrated_engine.connect() as connection:
        rows = connection.execute(statement).all()
    assert Counter(row.agent_id for row in rows) == {"agent-0": 2, "agent-1": 2, "agent-2": 2}
    latest: dict[str, list[LLMTrace]] = defaultdict(list)
    for t in sorted(TRACES, key=lambda t: t.created_at, reverse=True):
        if t.organization_id == "org-a" and len(latest[t.agent_id or ""]) < 2:
            latest[t.agent_id or ""].append(t)
    assert {row.id for row in rows} == {t.id for ts in latest.values() for t in ts}


def test_prewhere_compiles_and_filters(migrated_engine: Engine) -> None:
    load(migrated_engine)
    statement = ch_select(func.count()).select_from(LLMTraceRecord).prewhere(LLMTraceRecord.organization_id == "org-b")
    with migrated_engine.connect() as connection:
        assert connection.execute(statement).scalar_one() == sum(t.organization_id == "org-b" for t in TRACES)

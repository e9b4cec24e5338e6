"""The reference platform's writers and readers, before and after the billing migration, on a populated table.

Older deployments of the platform insert the seed's 28 columns; its current release inserts 31 (three billing
fields before created_at). Both write with ``client.insert(table, rows, column_names=...)`` and read with
plain SQL. Upgrading a table that holds traces must keep every row and value, rewrite no part, and keep both
writers and every one of the platform's read queries working.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pytest
from sqlalchemy import Engine, text

from llmtrace import LLMTrace, TraceRepository
from llmtrace.engine import driver_client
from llmtrace.migrations import check, downgrade, upgrade
from llmtrace.synthetic import synthetic_traces
from tests.factories import make_trace

CURRENT_COLUMNS = LLMTrace.clickhouse_columns()
BILLING = ["billing_plan_type", "billing_cost_source", "billing_customer_id"]
SEED_COLUMNS = [column for column in CURRENT_COLUMNS if column not in BILLING]
END = datetime(2026, 11, 20, tzinfo=UTC)


def seed_row(trace: LLMTrace) -> list[Any]:
    """The 28-value tuple the seed's to_clickhouse_row() sends for ``trace`` (no billing fields)."""
    values = dict(zip(CURRENT_COLUMNS, trace.to_clickhouse_row(), strict=True))
    return [values[column] for column in SEED_COLUMNS]


@cache
def populated_traces() -> list[LLMTrace]:
    """Three months of a multi-tenant platform, plus rows only other writers produce (zeros, '' ids, odd text)."""
    traces = list(
        synthetic_traces(
            1_500, organizations=40, agents_per_organization=3, skew=1.1, payload_bytes=(50, 2_000), end=END,
            span=timedelta(days=80), seed=7,
        )
    )  # fmt: skip
    odd = [
        make_trace(1, organization_id="org-0", request_json="it's \\ \x00 😀", step_id="step-shared"),
        make_trace(2, organization_id="org-0", project_id=None, agent_id=None, run_id=None, step_id="step-shared"),
    ]
    return traces + odd


def insert(engine: Engine, rows: Sequence[Sequence[Any]], columns: list[str]) -> None:
    with engine.connect() as connection:
        driver_client(connection).insert("llm_traces", rows, column_names=columns)


def zeroed(row: list[Any], columns: list[str]) -> list[Any]:
    """What a writer without llmtrace's derived fields sends: total_tokens and sizes left at 0."""
    row = list(row)
    for name in ("total_tokens", "request_size_bytes", "response_size_bytes"):
        row[columns.index(name)] = 0
    return row


def platform_reads(engine: Engine, columns: list[str], organization: str, step: str) -> dict[str, Any]:
    """The reference platform's read queries, as it sends them, with the column list of one of its releases."""
    listed = ", ".join(columns)
    traces = [trace for trace in populated_traces() if trace.organization_id == organization]
    (busiest_agent, _), *_ = Counter(trace.agent_id for trace in traces).most_common(1)
    queries = {
        "by step, newest first": (
            f"SELECT {listed} FROM llm_traces WHERE step_id = %(step)s AND organization_id = %(org)s "
            "ORDER BY created_at DESC, id",
            {"step": step, "org": organization},
        ),
        "by id": (
            f"SELECT {listed} FROM llm_traces WHERE id = %(id)s AND organization_id = %(org)s LIMIT 1",
            {"id": traces[3].id, "org": organization},
        ),
        "by agent, page 3": (
            f"SELECT {listed} FROM llm_traces WHERE agent_id = %(agent)s AND organization_id = %(org)s "
            "ORDER BY created_at DESC, id LIMIT %(limit)s OFFSET %(offset)s",
            {"agent": busiest_agent, "org": organization, "limit": 10, "offset": 10},
        ),
        "usage": (
            "SELECT model, agent_id, call_type, provider, count(), sum(prompt_tokens), sum(completion_tokens), "
            "sum(total_tokens) FROM llm_traces WHERE organization_id = %(org)s "
            "GROUP BY model, agent_id, call_type, provider ORDER BY model, agent_id, call_type, provider",
            {"org": organization},
        ),
        "large requests": (
            "SELECT id, request_size_bytes FROM llm_traces WHERE organization_id = %(org)s "
            "AND request_size_bytes > %(size)s ORDER BY request_size_bytes DESC, id LIMIT 25",
            {"org": organization, "size": 1_000},
        ),
    }
    with engine.connect() as connection:
        client = driver_client(connection)
        return {
            name: client.query(sql, parameters=parameters).result_rows for name, (sql, parameters) in queries.items()
        }


def table_state(engine: Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every row (seed columns, in a stable order) and every active part (name, rows, bytes)."""
    with engine.connect() as connection:
        rows = connection.execute(text(f"SELECT {', '.join(SEED_COLUMNS)} FROM llm_traces ORDER BY ALL")).all()
        parts = connection.execute(
            text(
                "SELECT name, rows, bytes_on_disk FROM system.parts WHERE database = currentDatabase() "
                "AND table = 'llm_traces' AND active ORDER BY name"
            )
        ).all()
    return [tuple(row) for row in rows], [tuple(part) for part in parts]


@pytest.fixture
def seed_table(engine: Engine) -> Engine:
    """A table at the first revision, holding traces written by the seed's 28-column writer."""
    upgrade(engine, "0001")
    traces = populated_traces()
    rows = [seed_row(trace) for trace in traces[:1000]] + [zeroed(seed_row(t), SEED_COLUMNS) for t in traces[1000:]]
    insert(engine, rows, SEED_COLUMNS)
    with engine.connect() as connection:
        connection.execute(text("SYSTEM STOP MERGES llm_traces"))  # so that part names tell about rewrites
    return engine


def test_upgrade_keeps_every_row_rewrites_nothing_and_round_trips(seed_table: Engine) -> None:
    engine = seed_table
    before_rows, before_parts = table_state(engine)
    reads_before = platform_reads(engine, SEED_COLUMNS, "org-0", "step-shared")
    assert len(before_rows) == len(populated_traces())
    assert all(reads_before.values()), "every platform query should find something to compare"

    upgrade(engine)
    after_rows, after_parts = table_state(engine)
    assert after_rows == before_rows
    assert after_parts == before_parts  # ADD COLUMN with a default touched no part
    with engine.connect() as connection:
        billing = connection.execute(text(f"SELECT DISTINCT {', '.join(BILLING)} FROM llm_traces")).all()
    assert [tuple(row) for row in billing] == [("", "", "")]
    check(engine)
    assert platform_reads(engine, SEED_COLUMNS, "org-0", "step-shared") == reads_before

    with engine.connect() as connection:
        connection.execute(text("SYSTEM START MERGES llm_traces"))  # DROP COLUMN is a mutation: merges run it
    downgrade(engine, "0001")
    assert table_state(engine)[0] == before_rows
    assert platform_reads(engine, SEED_COLUMNS, "org-0", "step-shared") == reads_before
    upgrade(engine)
    assert table_state(engine)[0] == before_rows
    check(engine)


def test_both_platform_writers_and_the_repository_write_after_upgrade(seed_table: Engine) -> None:
    engine = seed_table
    upgrade(engine)
    repository = TraceRepository(engine)
    billed = {"billing_plan_type": "enterprise", "billing_cost_source": "platform", "billing_customer_id": "cus_9"}
    seed_written = make_trace(10, organization_id="org-new")
    current_written = make_trace(11, organization_id="org-new", **billed)
    through_repository = make_trace(12, organization_id="org-new", **billed)
    insert(engine, [seed_row(seed_written)], SEED_COLUMNS)
    insert(engine, [list(current_written.to_clickhouse_row())], CURRENT_COLUMNS)
    assert repository.add_many([through_repository]) == 1

    assert repository.get("org-new", seed_written.id) == seed_written  # billing fields absent: None
    assert repository.get("org-new", seed_written.id).billing_plan_type is None
    assert repository.get("org-new", current_written.id) == current_written
    assert repository.get("org-new", through_repository.id) == through_repository
    assert [trace.id for trace in repository.list("org-new", billing_customer_id="cus_9").items] == sorted(
        [current_written.id, through_repository.id], reverse=True
    )
    by_plan = repository.usage("org-new", group_by=("billing_plan_type",))
    assert {row.billing_plan_type: row.requests for row in by_plan} == {None: 1, "enterprise": 2}
    # The current platform's reader, with its 31 columns, reads the old rows too.
    reads = platform_reads(engine, CURRENT_COLUMNS, "org-0", "step-shared")
    assert reads["by step, newest first"] and all(len(row) == 31 for row in reads["by step, newest first"])


def test_the_current_writer_is_refused_before_the_migration_with_the_reason(engine: Engine) -> None:
    # What the platform saw against an old table; after upgrade() the same insert works (test above).
    upgrade(engine, "0001")
    with pytest.raises(Exception, match="billing_plan_type"):
        insert(engine, [list(make_trace(1).to_clickhouse_row())], CURRENT_COLUMNS)

"""Delete statements: never without a condition (that would erase the whole table), and where rows are stored."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from clickhouse_connect.cc_sqlalchemy.dialect import ClickHouseDialect

from llmtrace.alter_delete import AlterTableDelete, delete_statement
from llmtrace.filters import TraceFilter
from llmtrace.record import TRACES_TABLE
from llmtrace.topology import Topology


def test_a_delete_without_conditions_is_refused() -> None:
    with pytest.raises(ValueError, match="AlterTableDelete needs at least one condition"):
        AlterTableDelete(TRACES_TABLE)


def compiled(statement: Any) -> str:
    return str(statement.compile(dialect=ClickHouseDialect(), compile_kwargs={"literal_binds": True}))


FILTER = TraceFilter(organization_id="org-1", agent_id="agent-'7'", until=datetime(2026, 5, 1, 12, 0, 0, 123456, UTC))
CONDITION = (
    "`organization_id` = 'org-1' AND `{t}`.`agent_id` = 'agent-\\'7\\'' "
    "AND `{t}`.`created_at` < '2026-05-01 12:00:00.123456'"
)


@pytest.mark.parametrize("topology", ["single", "replicated", "cloud"])
def test_deletes_outside_a_cluster_target_the_table_itself(topology: str) -> None:
    erase = compiled(delete_statement(TRACES_TABLE, FILTER.clauses(), erase=True, topology=Topology.parse(topology)))
    mask = compiled(delete_statement(TRACES_TABLE, FILTER.clauses(), erase=False, topology=Topology.parse(topology)))
    assert erase == "ALTER TABLE `llm_traces` DELETE WHERE `llm_traces`." + CONDITION.format(t="llm_traces")
    assert mask.startswith("DELETE FROM `llm_traces` WHERE ") and "ON CLUSTER" not in mask


def test_deletes_on_a_cluster_target_the_local_table_on_the_cluster() -> None:
    cluster = Topology.parse("cluster:traces-eu")
    erase = compiled(delete_statement(TRACES_TABLE, FILTER.clauses(), erase=True, topology=cluster))
    mask = compiled(delete_statement(TRACES_TABLE, FILTER.clauses(), erase=False, topology=cluster))
    where = "`llm_traces_local`." + CONDITION.format(t="llm_traces_local")
    assert erase == f"ALTER TABLE `llm_traces_local` ON CLUSTER 'traces-eu' DELETE WHERE {where}"
    assert mask == f"DELETE FROM `llm_traces_local` ON CLUSTER 'traces-eu' WHERE {where}"

"""Add the billing fields of the reference platform's current LLMTrace, just before created_at.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

One release after the seed, the platform's writer sends ``billing_plan_type``, ``billing_cost_source`` and
``billing_customer_id`` (``''`` when absent), 31 columns in all; writers of the seed's 28 columns are still
deployed. Both must keep working, so the columns default to ``''``.

ADD COLUMN with a constant default rewrites no part: parts written before it read the default, and only parts
written (or merged) afterwards store the column. Plan type and cost source take a handful of values, so they
are ``LowCardinality``; a customer id is as distinct as the organization ids, so it is a plain ``String``.

Written out literally rather than importing llmtrace.record: a migration is a fixed point in the schema's
history (llmtrace.ddl only renders it for the deployment topology).
"""

from collections.abc import Sequence

from llmtrace.ddl import migration_ddl, run

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "llm_traces"
# In order, each placed after the one before: the platform's clickhouse_columns() lists them before created_at.
COLUMNS = (
    ("billing_plan_type", "LowCardinality(String)", "llm_config_json"),
    ("billing_cost_source", "LowCardinality(String)", "billing_plan_type"),
    ("billing_customer_id", "String", "billing_cost_source"),
)


def upgrade() -> None:
    run(
        migration_ddl().add_columns(
            TABLE,
            [f"ADD COLUMN IF NOT EXISTS {name} {type_} DEFAULT '' AFTER {after}" for name, type_, after in COLUMNS],
        )
    )


def downgrade() -> None:
    run(migration_ddl().drop_columns(TABLE, [f"DROP COLUMN IF EXISTS {name}" for name, _, _ in COLUMNS]))

"""Create the llm_traces table with its skip indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written out literally rather than importing llmtrace.record: a migration is a fixed point in the schema's
history and must not change when the model does later.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from clickhouse_connect.cc_sqlalchemy.alembic import ClickHouseIndex
from clickhouse_connect.cc_sqlalchemy.datatypes.sqltypes import (
    Array,
    Bool,
    DateTime64,
    LowCardinality,
    Nullable,
    String,
    UInt32,
    UInt64,
)
from clickhouse_connect.cc_sqlalchemy.ddl.tableengine import MergeTree

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAYLOAD_CODEC = "ZSTD(3)"
BLOOM_INDEXED = ("id", "run_id", "step_id", "trace_id")


def upgrade() -> None:
    op.create_table(
        "llm_traces",
        sa.Column("id", String),
        sa.Column("organization_id", String),
        sa.Column("project_id", String),
        sa.Column("agent_id", String),
        sa.Column("agent_tags", Array(LowCardinality(String))),
        sa.Column("run_id", String),
        sa.Column("step_id", String),
        sa.Column("trace_id", String),
        sa.Column("call_type", LowCardinality(String)),
        sa.Column("provider", LowCardinality(String)),
        sa.Column("model", LowCardinality(String)),
        sa.Column("is_byok", Bool),
        sa.Column("request_size_bytes", UInt64),
        sa.Column("response_size_bytes", UInt64),
        sa.Column("prompt_tokens", UInt32),
        sa.Column("completion_tokens", UInt32),
        sa.Column("total_tokens", UInt32),
        sa.Column("cached_input_tokens", Nullable(UInt32)),
        sa.Column("cache_write_tokens", Nullable(UInt32)),
        sa.Column("reasoning_tokens", Nullable(UInt32)),
        sa.Column("latency_ms", UInt32),
        sa.Column("is_error", Bool),
        sa.Column("error_type", LowCardinality(String)),
        sa.Column("error_message", String),
        sa.Column("request_json", String, clickhousedb_codec=PAYLOAD_CODEC),
        sa.Column("response_json", String, clickhousedb_codec=PAYLOAD_CODEC),
        sa.Column("llm_config_json", String, clickhousedb_codec=PAYLOAD_CODEC),
        sa.Column("created_at", DateTime64(6, "UTC")),
        clickhousedb_engine=MergeTree(
            order_by=("organization_id", "agent_id", "created_at"),
            partition_by="toYYYYMM(created_at)",
            settings={"non_replicated_deduplication_window": 10000},
        ),
        if_not_exists=True,
    )
    op.add_clickhouse_indexes(
        "llm_traces",
        [
            ClickHouseIndex(f"idx_{column}", column, "bloom_filter(0.01)", granularity=1, if_not_exists=True)
            for column in BLOOM_INDEXED
        ],
    )


def downgrade() -> None:
    op.drop_table("llm_traces", if_exists=True)

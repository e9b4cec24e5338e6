"""Create the llm_traces table with its skip indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written out literally rather than importing llmtrace.record: a migration is a fixed point in the schema's
history and must not change when the model does later. What it imports from llmtrace is how statements are
rendered for the deployment topology (llmtrace.ddl), not what they say.
"""

from collections.abc import Sequence

from llmtrace.ddl import Deduplication, migration_ddl, run

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "llm_traces"
COLUMNS = (
    "`id` String",
    "`organization_id` String",
    "`project_id` String",
    "`agent_id` String",
    "`agent_tags` Array(LowCardinality(String))",
    "`run_id` String",
    "`step_id` String",
    "`trace_id` String",
    "`call_type` LowCardinality(String)",
    "`provider` LowCardinality(String)",
    "`model` LowCardinality(String)",
    "`is_byok` Bool",
    "`request_size_bytes` UInt64",
    "`response_size_bytes` UInt64",
    "`prompt_tokens` UInt32",
    "`completion_tokens` UInt32",
    "`total_tokens` UInt32",
    "`cached_input_tokens` Nullable(UInt32)",
    "`cache_write_tokens` Nullable(UInt32)",
    "`reasoning_tokens` Nullable(UInt32)",
    "`latency_ms` UInt32",
    "`is_error` Bool",
    "`error_type` LowCardinality(String)",
    "`error_message` String",
    "`request_json` String CODEC(ZSTD(3))",
    "`response_json` String CODEC(ZSTD(3))",
    "`llm_config_json` String CODEC(ZSTD(3))",
    "`created_at` DateTime64(6, 'UTC')",
)
BLOOM_INDEXED = ("id", "run_id", "step_id", "trace_id")


def upgrade() -> None:
    ddl = migration_ddl()
    run(
        ddl.create_table(
            TABLE,
            COLUMNS,
            order_by="(organization_id, agent_id, created_at)",
            partition_by="toYYYYMM(created_at)",
            # 10,000 blocks: hours of retries at one batch per second. 7 days: a spooled batch replayed after a
            # long outage is still recognised (see llmtrace.ddl for why the replicated engines need the bound).
            deduplication=Deduplication(blocks=10_000, seconds=7 * 24 * 3600),
            # A function of the trace's identity: every attempt of a batch sends each trace to the same shard.
            sharding_key="cityHash64(organization_id, id)",
        )
    )
    run(
        ddl.alter_storage(
            TABLE,
            [
                f"ADD INDEX IF NOT EXISTS `idx_{column}` {column} TYPE bloom_filter(0.01) GRANULARITY 1"
                for column in BLOOM_INDEXED
            ],
        )
    )


def downgrade() -> None:
    run(migration_ddl().drop_table(TABLE))

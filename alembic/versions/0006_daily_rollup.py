"""Create the daily rollup, ``llm_usage_daily``, fed by a materialized view on the hourly rollup, and fill it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

The hourly rollup keeps agents and projects, so on a platform with many small tenants it is hardly smaller than
the traces. The daily rollup leaves those two keys out and sums whole UTC days: reports by organization, model,
provider, call type, BYOK, error or billing over days or months read it (see llmtrace.rollup for when).

Its view reads the blocks inserted into the hourly rollup, not the traces: every insert of traces reaches it
through the hourly rollup's view, and merges the hourly block's few rows rather than every trace again. A block
dropped as a repeat by the hourly rollup is dropped here too (same deduplication window). Partitioned by month
of the day, like the traces.

The view is created before the daily rollup is filled from the hourly one: a trace written while this
migration runs may be counted twice until ``TraceRepository.rebuild_rollup()`` runs; run the migration while
writers are paused to avoid it.

A row retention set on the traces before this migration is given to the daily rollup (and to the hourly one,
which migration 0005 created without it), as ``llmtrace.retention.set_retention`` gives it to every rollup.

Written out literally rather than importing llmtrace.rollup: a migration is a fixed point in the schema's
history (a test checks that the view in the database computes what llmtrace.rollup.DAILY.select says).
"""

from collections.abc import Sequence

from llmtrace.ddl import Deduplication, migration_ddl, run

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOURLY = "llm_usage_hourly"
DAILY = "llm_usage_daily"
VIEW = "llm_usage_daily_mv"
KEYS = (
    "organization_id String",
    "model LowCardinality(String)",
    "provider LowCardinality(String)",
    "call_type LowCardinality(String)",
    "is_byok Bool",
    "is_error Bool",
    "billing_plan_type LowCardinality(String)",
    "billing_cost_source LowCardinality(String)",
    "billing_customer_id String",
    "day DateTime64(6, 'UTC')",
    "band_prompt UInt8",
    "band_with_cache UInt8",
    "cache_over_prompt Bool",
    "reasoning_over_completion Bool",
)
MEASURES = (
    "requests SimpleAggregateFunction(sum, UInt64)",
    "errors SimpleAggregateFunction(sum, UInt64)",
    "prompt_tokens SimpleAggregateFunction(sum, UInt64)",
    "completion_tokens SimpleAggregateFunction(sum, UInt64)",
    "total_tokens SimpleAggregateFunction(sum, UInt64)",
    "cached_input_tokens SimpleAggregateFunction(sum, Nullable(UInt64))",
    "cache_write_tokens SimpleAggregateFunction(sum, Nullable(UInt64))",
    "reasoning_tokens SimpleAggregateFunction(sum, Nullable(UInt64))",
    "request_bytes SimpleAggregateFunction(sum, UInt128)",
    "response_bytes SimpleAggregateFunction(sum, UInt128)",
    "latency_sum SimpleAggregateFunction(sum, UInt64)",
    "latency_state AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32)",
)
DIMENSIONS = ", ".join(column.split(" ")[0] for column in KEYS)
GROUP_KEYS = (
    "organization_id, model, provider, call_type, is_byok, is_error, billing_plan_type, billing_cost_source, "
    "billing_customer_id"
)
SELECT = (
    f"SELECT {GROUP_KEYS}, "
    "fromUnixTimestamp64Micro(toUnixTimestamp64Micro(h.hour) - "
    "positiveModulo(toUnixTimestamp64Micro(h.hour), 86400000000), 'UTC') AS day, "
    "band_prompt, band_with_cache, cache_over_prompt, reasoning_over_completion, "
    "sum(h.requests) AS requests, sum(h.errors) AS errors, "
    "sum(h.prompt_tokens) AS prompt_tokens, sum(h.completion_tokens) AS completion_tokens, "
    "sum(h.total_tokens) AS total_tokens, sum(h.cached_input_tokens) AS cached_input_tokens, "
    "sum(h.cache_write_tokens) AS cache_write_tokens, sum(h.reasoning_tokens) AS reasoning_tokens, "
    "sum(h.request_bytes) AS request_bytes, sum(h.response_bytes) AS response_bytes, "
    "sum(h.latency_sum) AS latency_sum, "
    "quantilesTDigestMergeState(0.5, 0.95, 0.99)(h.latency_state) AS latency_state "
    "FROM {source} AS h "
    f"GROUP BY {DIMENSIONS}"
)


def upgrade() -> None:
    ddl = migration_ddl()
    run(
        ddl.create_table(
            DAILY,
            [*KEYS, *MEASURES],
            order_by=(
                "(organization_id, day, model, provider, call_type, is_byok, is_error, billing_plan_type, "
                "billing_cost_source, billing_customer_id, band_prompt, band_with_cache, cache_over_prompt, "
                "reasoning_over_completion)"
            ),
            partition_by="toYYYYMM(day)",
            # The traces' window (migrations 0001 and 0005): a block the hourly rollup drops is dropped here too.
            deduplication=Deduplication(blocks=10_000, seconds=7 * 24 * 3600),
            sharding_key="cityHash64(organization_id)",
            family="AggregatingMergeTree",
        )
    )
    # Before any row: a retention set earlier on the traces applies to the daily rollup from its first part.
    follow_traces_retention(DAILY, materialize=False)
    # Migration 0005 created the hourly rollup without it.
    follow_traces_retention(HOURLY, materialize=True)
    run(ddl.create_materialized_view(VIEW, target=DAILY, source=HOURLY, select=SELECT))
    # Fill from the hourly rollup as it is, through the tables readers use (on a cluster: every shard).
    run([f"INSERT INTO {ddl.name(DAILY)} {SELECT.format(source=ddl.name(HOURLY))} SETTINGS insert_deduplicate = 0"])


def follow_traces_retention(table: str, *, materialize: bool) -> None:
    """Give the rollup ``table`` the traces' row retention, as ``set_retention`` does for every rollup that exists
    when it runs (see llmtrace.retention). Online only: an offline script cannot read it; run
    ``llmtrace retention`` again after it."""
    from alembic import context, op

    from llmtrace.engine import driver_client
    from llmtrace.retention import follow_traces_statements

    if context.is_offline_mode():
        return
    client = driver_client(op.get_bind())
    for statement in follow_traces_statements(client, migration_ddl(), table, materialize=materialize):
        # Materialized (if at all) by the statement's own MATERIALIZE TTL, with the settings it sets first.
        op.execute(statement, execution_options={"settings": {"materialize_ttl_after_modify": 0}})


def downgrade() -> None:
    ddl = migration_ddl()
    run(ddl.drop_view(VIEW))
    run(ddl.drop_table(DAILY))

"""Create the hourly rollup, ``llm_usage_hourly``, its materialized view, and fill it from the stored traces.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

Reports over long ranges read hourly totals instead of every trace (see llmtrace.rollup for what keeps the two
equal). The rollup is an AggregatingMergeTree keyed by the report's group keys, the hour, and what pricing needs
of each trace; sums are SimpleAggregateFunction(sum) columns and latency percentiles t-digest states. It keeps
the traces' deduplication window, so a block ClickHouse drops as a repeat in ``llm_traces`` is dropped here
too. Partitioned by month of the hour, like the traces.

The view is created before the rollup is filled from the traces already stored: a trace written while this
migration runs may be counted twice (once by the view, once by the filling) until
``TraceRepository.rebuild_rollup()`` runs; run the migration while writers are paused to avoid it.

On a cluster each host has a local rollup table, fed by a view on its local traces table, and a Distributed
table in front, sharded by organization.

Written out literally rather than importing llmtrace.rollup: a migration is a fixed point in the schema's
history (a test checks that the view in the database computes what llmtrace.rollup.HOURLY.select says).
"""

from collections.abc import Sequence

from llmtrace.ddl import Deduplication, migration_ddl, run

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRACES = "llm_traces"
ROLLUP = "llm_usage_hourly"
VIEW = "llm_usage_hourly_mv"
KEYS = (
    "organization_id String",
    "project_id String",
    "agent_id String",
    "model LowCardinality(String)",
    "provider LowCardinality(String)",
    "call_type LowCardinality(String)",
    "is_byok Bool",
    "is_error Bool",
    "billing_plan_type LowCardinality(String)",
    "billing_cost_source LowCardinality(String)",
    "billing_customer_id String",
    "hour DateTime64(6, 'UTC')",
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
    "organization_id, project_id, agent_id, model, provider, call_type, is_byok, is_error, "
    "billing_plan_type, billing_cost_source, billing_customer_id"
)
# Tier thresholds of prices (llmtrace.prices.TIER_THRESHOLDS when this migration was written).
LADDER = "[32000, 100000, 128000, 199999, 200000, 256000, 272000, 512000, 524288, 1000000, 1048576]"
WITH_CACHE = (
    "toInt64(t.prompt_tokens) + toInt64(ifNull(t.cached_input_tokens, 0)) + toInt64(ifNull(t.cache_write_tokens, 0))"
)
BAND = "toUInt8(arrayCount((threshold, size) -> size > threshold, " + LADDER + ", arrayWithConstant(11, {size})))"
SELECT = (
    f"SELECT {GROUP_KEYS}, "
    "fromUnixTimestamp64Micro(toUnixTimestamp64Micro(t.created_at) - "
    "positiveModulo(toUnixTimestamp64Micro(t.created_at), 3600000000), 'UTC') AS hour, "
    f"{BAND.format(size='toInt64(t.prompt_tokens)')} AS band_prompt, "
    f"{BAND.format(size=WITH_CACHE)} AS band_with_cache, "
    "(ifNull(t.cached_input_tokens, 0) + ifNull(t.cache_write_tokens, 0)) > t.prompt_tokens AS cache_over_prompt, "
    "ifNull(t.reasoning_tokens, 0) > t.completion_tokens AS reasoning_over_completion, "
    "count() AS requests, countIf(is_error) AS errors, "
    "sum(t.prompt_tokens) AS prompt_tokens, sum(t.completion_tokens) AS completion_tokens, "
    "sum(t.total_tokens) AS total_tokens, sum(t.cached_input_tokens) AS cached_input_tokens, "
    "sum(t.cache_write_tokens) AS cache_write_tokens, sum(t.reasoning_tokens) AS reasoning_tokens, "
    "sum(toUInt128(t.request_size_bytes)) AS request_bytes, sum(toUInt128(t.response_size_bytes)) AS response_bytes, "
    "sum(toUInt64(t.latency_ms)) AS latency_sum, "
    "quantilesTDigestState(0.5, 0.95, 0.99)(t.latency_ms) AS latency_state "
    "FROM {source} AS t "
    f"GROUP BY {DIMENSIONS}"
)


def upgrade() -> None:
    ddl = migration_ddl()
    run(
        ddl.create_table(
            ROLLUP,
            [*KEYS, *MEASURES],
            order_by=(
                "(organization_id, hour, agent_id, model, provider, call_type, is_byok, is_error, project_id, "
                "billing_plan_type, billing_cost_source, billing_customer_id, band_prompt, band_with_cache, "
                "cache_over_prompt, reasoning_over_completion)"
            ),
            partition_by="toYYYYMM(hour)",
            # The traces' window (migration 0001), so that the view drops exactly the blocks the table drops.
            deduplication=Deduplication(blocks=10_000, seconds=7 * 24 * 3600),
            sharding_key="cityHash64(organization_id)",
            family="AggregatingMergeTree",
        )
    )
    run(ddl.create_materialized_view(VIEW, target=ROLLUP, source=TRACES, select=SELECT))
    # Fill from the traces already stored, through the tables readers use (on a cluster: every shard).
    run([f"INSERT INTO {ddl.name(ROLLUP)} {SELECT.format(source=ddl.name(TRACES))} SETTINGS insert_deduplicate = 0"])


def downgrade() -> None:
    ddl = migration_ddl()
    run(ddl.drop_view(VIEW))
    run(ddl.drop_table(ROLLUP))

"""Create the price list, ``llm_model_prices``, and fill it with the default prices from genai-prices.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

Costs are computed when a report runs, from the price in force at each trace's created_at (see llmtrace.prices
and llmtrace.cost), so the table holds every price with the hour it starts to apply. A ReplacingMergeTree keyed
by (provider, model, source, effective_from): setting a price again replaces it, ``is_deleted`` removes it.
Rates are per million tokens, one element per tier (``tier_above``: the input size above which the tier
applies, -1 for the base rates).

The default rows come from the installed genai-prices snapshot (offline), so a fresh install prices common
models at once; ``llmtrace.prices.load_default_prices`` refreshes them later. They are data, not schema:
downgrading drops the table with them, and upgrading again reloads whatever genai-prices is installed then.

On a cluster the table is replicated whole to every host (not sharded), so each shard prices its own traces
with a local join.
"""

from collections.abc import Sequence

from alembic import context, op

from llmtrace.ddl import migration_ddl, run

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "llm_model_prices"
RATES = "Array(Decimal(38, 18))"
COLUMNS = (
    "provider LowCardinality(String)",
    "model String",
    "source LowCardinality(String)",
    "effective_from DateTime64(6, 'UTC')",
    "currency LowCardinality(String)",
    "prompt_includes_cached Bool",
    "completion_includes_reasoning Bool",
    "tier_above Array(Int64)",
    f"input_per_mtok {RATES}",
    f"cached_input_per_mtok {RATES}",
    f"cache_write_per_mtok {RATES}",
    f"output_per_mtok {RATES}",
    f"reasoning_per_mtok {RATES}",
    f"per_thousand_requests {RATES}",
    "updated_at DateTime64(6, 'UTC')",
    "is_deleted UInt8",
)


def upgrade() -> None:
    from llmtrace.prices import default_prices_sql, load_default_prices

    run(
        migration_ddl().create_reference_table(
            TABLE,
            COLUMNS,
            order_by="(provider, model, source, effective_from)",
            version="updated_at",
            is_deleted="is_deleted",
        )
    )
    if context.is_offline_mode():
        # A rendered script carries the rows as one INSERT (on a cluster, replication copies them to every host).
        run(default_prices_sql(migration_ddl().name(TABLE)))
    else:
        load_default_prices(op.get_bind())


def downgrade() -> None:
    run(migration_ddl().drop_reference_table(TABLE))

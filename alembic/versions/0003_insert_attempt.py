"""Record on every row which insert attempt stored it (a hidden column), so writes can count what they stored.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

``insert_attempt`` is MATERIALIZED from the insert's ``log_comment`` setting when that starts with
``llmtrace:``: llmtrace sets it to a fresh, time-ordered id on every insert it sends, other writers leave it
empty. MATERIALIZED columns are left out of ``SELECT *`` and cannot be named in an INSERT, so readers and
writers that know nothing of it, the reference platform's included, are unaffected. The minmax index lets
the count of one attempt's rows skip every part written before it: ids grow with time, so older parts' maxima
are all smaller. Adding the column rewrites nothing: parts written before it read the expression, i.e. ``''``.

On a cluster the column is declared on the Distributed table too, with the same expression: queries through it
can name the column, and an insert through it does not send the column, so each shard computes it from the
log_comment that the insert forwards to it.

Written out literally rather than importing llmtrace.record: a migration is a fixed point in the schema's
history (llmtrace.ddl only renders it for the deployment topology).
"""

from collections.abc import Sequence

from llmtrace.ddl import migration_ddl, run

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "llm_traces"
ATTEMPT_EXPRESSION = "if(startsWith(getSetting('log_comment'), 'llmtrace:'), getSetting('log_comment'), '')"


def upgrade() -> None:
    ddl = migration_ddl()
    run(
        ddl.add_columns(
            TABLE, [f"ADD COLUMN IF NOT EXISTS insert_attempt LowCardinality(String) MATERIALIZED {ATTEMPT_EXPRESSION}"]
        )
    )
    run(
        ddl.alter_storage(
            TABLE, ["ADD INDEX IF NOT EXISTS idx_insert_attempt insert_attempt TYPE minmax GRANULARITY 64"]
        )
    )


def downgrade() -> None:
    ddl = migration_ddl()
    run(ddl.alter_storage(TABLE, ["DROP INDEX IF EXISTS idx_insert_attempt"]))
    run(ddl.drop_columns(TABLE, ["DROP COLUMN IF EXISTS insert_attempt"]))

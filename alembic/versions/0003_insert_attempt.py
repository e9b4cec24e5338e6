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

Written out literally rather than importing llmtrace.record: a migration is a fixed point in the schema's
history.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ATTEMPT_EXPRESSION = "if(startsWith(getSetting('log_comment'), 'llmtrace:'), getSetting('log_comment'), '')"


def upgrade() -> None:
    op.execute(
        "ALTER TABLE llm_traces "
        f"ADD COLUMN IF NOT EXISTS insert_attempt LowCardinality(String) MATERIALIZED {ATTEMPT_EXPRESSION}, "
        "ADD INDEX IF NOT EXISTS idx_insert_attempt insert_attempt TYPE minmax GRANULARITY 64"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE llm_traces DROP INDEX IF EXISTS idx_insert_attempt, DROP COLUMN IF EXISTS insert_attempt")

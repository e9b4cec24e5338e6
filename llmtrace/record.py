"""The ClickHouse table ``llm_traces`` as a declarative SQLAlchemy class, for migrations and ad-hoc queries.

One column per :class:`llmtrace.LLMTrace` field, same names, same order. Why each type:

- ids (``id``, ``organization_id``, ``project_id``, ``agent_id``, ``run_id``, ``step_id``, ``trace_id``,
  ``billing_customer_id``): ``String``. Absent optional ids are stored as ``''`` (what ``to_clickhouse_row()``
  sends) and read back as ``None``; ``Nullable`` would cost a null map per column for no gain. They are
  high-cardinality, so ``LowCardinality`` would not pay.
- ``call_type``, ``provider``, ``model``, ``error_type``, ``billing_plan_type``, ``billing_cost_source``:
  ``LowCardinality(String)``: a handful of distinct values, dictionary-encoded, so GROUP BY on them is cheap.
- the billing fields (migration 0002) default to ``''``, so writers of the seed's 28 columns, which do not
  send them, keep working next to the platform's current 31-column writer.
- ``agent_tags``: ``Array(LowCardinality(String))``: tags repeat across agents.
- ``is_byok``, ``is_error``: ``Bool`` (accepts the ``1``/``0`` of ``to_clickhouse_row()``, reads as bool).
- sizes: ``UInt64``; token counts and latency: ``UInt32``. The optional token counts (cached input, cache
  write, reasoning) are ``Nullable(UInt32)``: unknown is not zero, and cost reports must tell them apart.
- payloads (``request_json``, ``response_json``, ``llm_config_json``): ``String CODEC(ZSTD(3))``: JSON
  compresses several-fold and these columns are most of the bytes on disk.
- ``created_at``: ``DateTime64(6, 'UTC')``: microseconds, which is what Python's datetime holds, in an
  explicit zone so that the server's time zone never shifts stored instants.

The engine is MergeTree, ``ORDER BY (organization_id, agent_id, created_at)``: every read is scoped to one
organization and most to one agent, so the sort key prunes granules for them and for time ranges.
``PARTITION BY toYYYYMM(created_at)`` keeps parts per month, so row retention drops whole parts
(:mod:`llmtrace.retention`).

Point lookups on columns outside the sort key use bloom-filter skip indexes; they are listed, with the minmax index
of the hidden column below, in :data:`SKIP_INDEXES`. They are not part of SQLAlchemy's metadata (ClickHouse skip
indexes are not SQLAlchemy ``Index`` objects); the migrations create them, and a test checks the migrated table
has exactly these.

One more column exists in the table but not in this class: ``insert_attempt``, ``MATERIALIZED`` from the
insert's ``log_comment`` when llmtrace sends it (migration 0003). It records which insert attempt stored each
row, so that ``add_many`` can count the rows it really stored (see :mod:`llmtrace.ingest`). MATERIALIZED
columns are not part of ``SELECT *`` and cannot be inserted into, so nothing else sees it.

``non_replicated_deduplication_window`` makes the table remember the hashes of its most recent inserted
blocks; an insert that repeats one (same data, or same ``insert_deduplication_token``) is stored once. This
is what makes a retried batch idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

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
from sqlalchemy import MetaData, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TABLE_NAME = "llm_traces"
SORT_KEY = ("organization_id", "agent_id", "created_at")
PARTITION_KEY = "toYYYYMM(created_at)"
PAYLOAD_CODEC = "ZSTD(3)"
# Recent inserted blocks whose hashes the table keeps for deduplication. A retry that comes after more than
# this many other inserts is no longer recognised; 10,000 covers hours of retries at one batch per second.
DEDUPLICATION_WINDOW = 10_000
INSERT_ATTEMPT_COLUMN = "insert_attempt"
# What the insert_attempt column stores is the insert's log_comment when it starts with this prefix.
INSERT_ATTEMPT_PREFIX = "llmtrace:"
# Columns of the table that the declarative class leaves out on purpose (Alembic's autogenerate ignores them).
HIDDEN_COLUMNS = frozenset({INSERT_ATTEMPT_COLUMN})


@dataclass(frozen=True)
class SkipIndex:
    """A ClickHouse data-skipping index on ``llm_traces``."""

    name: str
    expression: str
    type: str
    granularity: int


SKIP_INDEXES: tuple[SkipIndex, ...] = (
    *(
        SkipIndex(name=f"idx_{column}", expression=column, type="bloom_filter(0.01)", granularity=1)
        for column in ("id", "run_id", "step_id", "trace_id")
    ),
    # Attempt ids grow with time, so a part's min/max excludes every attempt made after it was written.
    SkipIndex(name="idx_insert_attempt", expression="insert_attempt", type="minmax", granularity=64),
)


class Base(DeclarativeBase):
    """Declarative base of llmtrace's tables; ``Base.metadata`` is Alembic's target metadata."""

    metadata = MetaData()


class LLMTraceRecord(Base):
    """One row of ``llm_traces``: the ORM view of an :class:`llmtrace.LLMTrace`.

    Use it for ad-hoc queries with SQLAlchemy 2.x ``select()``; services should go through the repository,
    which converts records to and from ``LLMTrace``.
    """

    __tablename__ = TABLE_NAME
    __table_args__ = (
        MergeTree(
            order_by=SORT_KEY,
            partition_by=PARTITION_KEY,
            settings={"non_replicated_deduplication_window": DEDUPLICATION_WINDOW},
        ),
    )
    # ClickHouse has no primary-key constraint to declare; the ORM still needs an identity for its objects.
    __mapper_args__ = {"primary_key": ["organization_id", "id"]}  # noqa: RUF012 (SQLAlchemy reads it once)

    id: Mapped[str] = mapped_column(String)
    organization_id: Mapped[str] = mapped_column(String)
    project_id: Mapped[str] = mapped_column(String)
    agent_id: Mapped[str] = mapped_column(String)
    agent_tags: Mapped[list[str]] = mapped_column(Array(LowCardinality(String)))
    run_id: Mapped[str] = mapped_column(String)
    step_id: Mapped[str] = mapped_column(String)
    trace_id: Mapped[str] = mapped_column(String)
    call_type: Mapped[str] = mapped_column(LowCardinality(String))
    provider: Mapped[str] = mapped_column(LowCardinality(String))
    model: Mapped[str] = mapped_column(LowCardinality(String))
    is_byok: Mapped[bool] = mapped_column(Bool)
    request_size_bytes: Mapped[int] = mapped_column(UInt64)
    response_size_bytes: Mapped[int] = mapped_column(UInt64)
    prompt_tokens: Mapped[int] = mapped_column(UInt32)
    completion_tokens: Mapped[int] = mapped_column(UInt32)
    total_tokens: Mapped[int] = mapped_column(UInt32)
    cached_input_tokens: Mapped[int | None] = mapped_column(Nullable(UInt32))
    cache_write_tokens: Mapped[int | None] = mapped_column(Nullable(UInt32))
    reasoning_tokens: Mapped[int | None] = mapped_column(Nullable(UInt32))
    latency_ms: Mapped[int] = mapped_column(UInt32)
    is_error: Mapped[bool] = mapped_column(Bool)
    error_type: Mapped[str] = mapped_column(LowCardinality(String))
    error_message: Mapped[str] = mapped_column(String)
    request_json: Mapped[str] = mapped_column(String, clickhousedb_codec=PAYLOAD_CODEC)
    response_json: Mapped[str] = mapped_column(String, clickhousedb_codec=PAYLOAD_CODEC)
    llm_config_json: Mapped[str] = mapped_column(String, clickhousedb_codec=PAYLOAD_CODEC)
    billing_plan_type: Mapped[str] = mapped_column(LowCardinality(String), server_default="")
    billing_cost_source: Mapped[str] = mapped_column(LowCardinality(String), server_default="")
    billing_customer_id: Mapped[str] = mapped_column(String, server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime64(6, "UTC"))


# The table object, typed as a Table (the declarative attribute is typed as a generic FromClause).
TRACES_TABLE = cast(Table, LLMTraceRecord.__table__)

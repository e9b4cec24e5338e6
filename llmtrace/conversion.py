"""The one place where :class:`LLMTrace` meets the stored row and :class:`LLMTraceRecord`.

The stored form is ``LLMTrace.to_clickhouse_row()``: absent optional strings as ``''``, booleans as 1/0,
``created_at`` in UTC. Reading back undoes exactly that (``''`` -> ``None``, UTC-aware ``created_at``) and
nothing more: a stored row is not validated again, because validation also fills in derived fields (a
``total_tokens`` or a payload size left at 0), and a row that another writer stored with zeros must read back
with zeros, as the usage reports sum them. Write -> read is exact, whoever wrote the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmtrace.model import CLICKHOUSE_COLUMNS, FLAGS, OPTIONAL_STRINGS, LLMTrace, as_utc
from llmtrace.record import LLMTraceRecord


def trace_to_values(trace: LLMTrace) -> dict[str, Any]:
    """The stored column values of ``trace``, keyed by column name."""
    return dict(zip(CLICKHOUSE_COLUMNS, trace.to_clickhouse_row(), strict=True))


def trace_from_values(values: Mapping[str, Any]) -> LLMTrace:
    """Build the :class:`LLMTrace` that stored column values (keyed by column name) hold, deriving nothing."""
    fields = {column: values[column] for column in CLICKHOUSE_COLUMNS}
    for name in OPTIONAL_STRINGS:
        fields[name] = fields[name] or None
    for name in FLAGS:
        fields[name] = bool(fields[name])
    fields["agent_tags"] = list(fields["agent_tags"])
    fields["created_at"] = as_utc(fields["created_at"])
    # model_construct: the values come from typed columns, so they already satisfy the model's types and bounds.
    return LLMTrace.model_construct(**fields)


def trace_from_row(row: Sequence[Any]) -> LLMTrace:
    """Build the :class:`LLMTrace` a stored row holds, its values in ``LLMTrace.clickhouse_columns()`` order."""
    return trace_from_values(dict(zip(CLICKHOUSE_COLUMNS, row, strict=True)))


def trace_to_record(trace: LLMTrace) -> LLMTraceRecord:
    """Build the ORM record that stores ``trace``."""
    values = trace_to_values(trace)
    values["is_byok"] = trace.is_byok
    values["is_error"] = trace.is_error
    return LLMTraceRecord(**values)


def record_to_trace(record: LLMTraceRecord) -> LLMTrace:
    """Build the :class:`LLMTrace` a stored ORM record holds."""
    return trace_from_values({column: getattr(record, column) for column in CLICKHOUSE_COLUMNS})

"""The one place where :class:`LLMTrace` meets the stored row and :class:`LLMTraceRecord`.

The stored form is ``LLMTrace.to_clickhouse_row()``: absent optional strings as ``''``, booleans as 1/0,
``created_at`` in UTC. Reading back relies on the model's own normalisation (``''`` -> ``None``, naive
datetimes are UTC), so the conversion each way is a single step and write -> read is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmtrace.model import CLICKHOUSE_COLUMNS, LLMTrace
from llmtrace.record import LLMTraceRecord


def trace_to_values(trace: LLMTrace) -> dict[str, Any]:
    """The stored column values of ``trace``, keyed by column name."""
    return dict(zip(CLICKHOUSE_COLUMNS, trace.to_clickhouse_row(), strict=True))


def trace_from_values(values: Mapping[str, Any]) -> LLMTrace:
    """Build an :class:`LLMTrace` from stored column values keyed by column name."""
    return LLMTrace.model_validate({column: values[column] for column in CLICKHOUSE_COLUMNS})


def trace_from_row(row: Sequence[Any]) -> LLMTrace:
    """Build an :class:`LLMTrace` from a row whose values are in ``LLMTrace.clickhouse_columns()`` order."""
    return LLMTrace.model_validate(dict(zip(CLICKHOUSE_COLUMNS, row, strict=True)))


def trace_to_record(trace: LLMTrace) -> LLMTraceRecord:
    """Build the ORM record that stores ``trace``."""
    values = trace_to_values(trace)
    values["is_byok"] = trace.is_byok
    values["is_error"] = trace.is_error
    return LLMTraceRecord(**values)


def record_to_trace(record: LLMTraceRecord) -> LLMTrace:
    """Build the :class:`LLMTrace` a stored ORM record holds."""
    return trace_from_values({column: getattr(record, column) for column in CLICKHOUSE_COLUMNS})

"""llmtrace: store LLM request/response traces in ClickHouse and make them useful.

The public API is what ``__all__`` lists; everything else may change between releases.
"""

from llmtrace.async_writer import AsyncTraceWriter
from llmtrace.conversion import record_to_trace, trace_from_row, trace_to_record
from llmtrace.engine import DEFAULT_URL, ENV_VAR, get_engine, resolve_url
from llmtrace.errors import (
    ConfigurationError,
    DatabaseError,
    EmbeddedEngineError,
    InvalidCursor,
    LLMTraceError,
    MigrationError,
    SchemaNotMigratedError,
    TraceNotFound,
    TraceValidationError,
    WriteUnconfirmed,
)
from llmtrace.filters import ALL_ORGANIZATIONS
from llmtrace.model import LLMTrace
from llmtrace.pagination import TracePage
from llmtrace.record import SKIP_INDEXES, LLMTraceRecord
from llmtrace.repository import TraceRepository
from llmtrace.retention import Retention, get_retention, set_retention
from llmtrace.usage import UsageRow
from llmtrace.writer import TraceWriter, WriterClosed, WriterEvent, WriterQueueFull, WriterStats, WriterStopped

__all__ = [
    "ALL_ORGANIZATIONS",
    "DEFAULT_URL",
    "ENV_VAR",
    "SKIP_INDEXES",
    "AsyncTraceWriter",
    "ConfigurationError",
    "DatabaseError",
    "EmbeddedEngineError",
    "InvalidCursor",
    "LLMTrace",
    "LLMTraceError",
    "LLMTraceRecord",
    "MigrationError",
    "Retention",
    "SchemaNotMigratedError",
    "TraceNotFound",
    "TracePage",
    "TraceRepository",
    "TraceValidationError",
    "TraceWriter",
    "UsageRow",
    "WriteUnconfirmed",
    "WriterClosed",
    "WriterEvent",
    "WriterQueueFull",
    "WriterStats",
    "WriterStopped",
    "get_engine",
    "get_retention",
    "record_to_trace",
    "resolve_url",
    "set_retention",
    "trace_from_row",
    "trace_to_record",
]

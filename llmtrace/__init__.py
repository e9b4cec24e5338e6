"""llmtrace: store LLM request/response traces in ClickHouse and make them useful.

The public API is what ``__all__`` lists; everything else may change between releases.
"""

from llmtrace.conversion import record_to_trace, trace_from_row, trace_to_record
from llmtrace.engine import DEFAULT_URL, ENV_VAR, get_engine, resolve_url
from llmtrace.errors import ConfigurationError, EmbeddedEngineError, LLMTraceError, MigrationError
from llmtrace.model import LLMTrace
from llmtrace.record import SKIP_INDEXES, LLMTraceRecord

__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "SKIP_INDEXES",
    "ConfigurationError",
    "EmbeddedEngineError",
    "LLMTrace",
    "LLMTraceError",
    "LLMTraceRecord",
    "MigrationError",
    "get_engine",
    "record_to_trace",
    "resolve_url",
    "trace_from_row",
    "trace_to_record",
]

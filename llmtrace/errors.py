"""The errors llmtrace raises. Every one derives from :class:`LLMTraceError`."""

from __future__ import annotations


class LLMTraceError(Exception):
    """Base class of every error llmtrace raises on purpose."""


class ConfigurationError(LLMTraceError):
    """The database URL or another setting cannot be used as given."""


class EmbeddedEngineError(ConfigurationError):
    """The embedded ClickHouse engine (chDB) cannot be opened.

    Raised when chDB is not installed, when its data directory cannot be written, or when another process
    already holds the directory (chDB allows one process per data directory).
    """


class MigrationError(LLMTraceError):
    """The Alembic migrations could not be found or applied."""

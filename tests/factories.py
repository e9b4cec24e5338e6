"""Builders of valid test traces."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from llmtrace import LLMTrace

BASE_TIME = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def make_trace(index: int = 0, **overrides: Any) -> LLMTrace:
    """A realistic trace; ``index`` varies ids, tokens and time so that traces differ."""
    values: dict[str, Any] = {
        "id": str(uuid.UUID(int=index + 1)),
        "organization_id": "org-1",
        "project_id": "proj-1",
        "agent_id": f"agent-{index % 3}",
        "agent_tags": ["prod", f"tier-{index % 2}"],
        "run_id": f"run-{index // 10}",
        "step_id": f"step-{index}",
        "trace_id": uuid.UUID(int=10_000 + index).hex,
        "call_type": "agent_step",
        "provider": "openai" if index % 2 else "anthropic",
        "model": "gpt-4.1" if index % 2 else "claude-sonnet-4",
        "prompt_tokens": 100 + index,
        "completion_tokens": 20 + index % 7,
        "cached_input_tokens": None if index % 3 else 50,
        "latency_ms": 300 + index,
        "request_json": f'{{"messages": [{{"role": "user", "content": "question {index}"}}]}}',
        "response_json": f'{{"content": "answer {index}"}}',
        "created_at": BASE_TIME + timedelta(seconds=index),
    }
    values.update(overrides)
    return LLMTrace(**values)

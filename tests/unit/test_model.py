"""The LLMTrace model: the reference contract and the validation added on top of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from llmtrace import LLMTrace
from llmtrace.model import TRANSPOSE_CHUNK, UINT32_MAX
from tests.strategies import llm_traces

# The reference model's clickhouse_columns(), spelled out: existing writers insert tuples in exactly this order.
# The seed's 28 columns are still written by older deployments of the platform; its current release adds three
# billing fields just before created_at (31 columns), and llmtrace's model follows the current one.
SEED_COLUMNS = [
    "id", "organization_id", "project_id", "agent_id", "agent_tags", "run_id", "step_id", "trace_id",
    "call_type", "provider", "model", "is_byok", "request_size_bytes", "response_size_bytes",
    "prompt_tokens", "completion_tokens", "total_tokens", "cached_input_tokens", "cache_write_tokens",
    "reasoning_tokens", "latency_ms", "is_error", "error_type", "error_message", "request_json",
    "response_json", "llm_config_json", "created_at",
]  # fmt: skip
REFERENCE_COLUMNS = [
    *SEED_COLUMNS[:-1],
    "billing_plan_type",
    "billing_cost_source",
    "billing_customer_id",
    "created_at",
]

REQUIRED = {"id": "t1", "organization_id": "o", "call_type": "agent_step", "provider": "openai", "model": "m",
            "request_json": "{}", "response_json": "{}"}  # fmt: skip


def test_columns_and_fields_follow_the_reference_order() -> None:
    assert LLMTrace.clickhouse_columns() == REFERENCE_COLUMNS
    assert list(LLMTrace.model_fields) == REFERENCE_COLUMNS


def test_reference_defaults() -> None:
    trace = LLMTrace(**REQUIRED)
    assert trace.project_id is None and trace.agent_id is None and trace.agent_tags == []
    assert trace.is_byok is False and trace.is_error is False
    assert (trace.prompt_tokens, trace.completion_tokens, trace.total_tokens) == (0, 0, 0)
    assert trace.cached_input_tokens is None and trace.reasoning_tokens is None
    assert trace.llm_config_json == ""
    assert trace.created_at.tzinfo is UTC
    assert LLMTrace.__id_prefix__ == "llm_trace"
    assert LLMTrace.model_fields["model"].description == "Model name/identifier"


def test_to_clickhouse_row_uses_the_reference_encoding() -> None:
    trace = LLMTrace(**REQUIRED, is_byok=True, cached_input_tokens=0)
    row = dict(zip(REFERENCE_COLUMNS, trace.to_clickhouse_row(), strict=True))
    assert row["project_id"] == "" and row["error_type"] == "" and row["error_message"] == ""
    assert row["billing_plan_type"] == row["billing_cost_source"] == row["billing_customer_id"] == ""
    assert row["is_byok"] == 1 and row["is_error"] == 0
    assert row["cached_input_tokens"] == 0 and row["reasoning_tokens"] is None


@pytest.mark.parametrize(
    "field", ["prompt_tokens", "completion_tokens", "total_tokens", "cached_input_tokens", "cache_write_tokens",
              "reasoning_tokens", "latency_ms", "request_size_bytes", "response_size_bytes"],
)  # fmt: skip
def test_negative_counts_are_rejected_naming_the_field(field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        LLMTrace(**REQUIRED, **{field: -1})
    assert caught.value.errors()[0]["loc"] == (field,)
    assert "greater than or equal to 0" in str(caught.value)


def test_counts_beyond_the_column_type_are_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        LLMTrace(**REQUIRED, prompt_tokens=UINT32_MAX + 1)
    assert caught.value.errors()[0]["loc"] == ("prompt_tokens",)


def test_a_total_that_overflows_is_reported_on_total_tokens() -> None:
    with pytest.raises(ValidationError) as caught:
        LLMTrace(**REQUIRED, prompt_tokens=UINT32_MAX, completion_tokens=1)
    assert caught.value.errors()[0]["loc"] == ("total_tokens",)
    assert f"prompt_tokens + completion_tokens = {UINT32_MAX + 1}" in str(caught.value)


def test_missing_required_fields_are_all_named() -> None:
    with pytest.raises(ValidationError) as caught:
        LLMTrace(id="x")  # type: ignore[call-arg]
    missing = {error["loc"][0] for error in caught.value.errors()}
    assert missing == set(REQUIRED) - {"id"}


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        LLMTrace(**REQUIRED, prompt_token=5)
    assert caught.value.errors()[0]["loc"] == ("prompt_token",)


def test_assignment_is_validated() -> None:
    trace = LLMTrace(**REQUIRED)
    with pytest.raises(ValidationError):
        trace.latency_ms = -5


def test_total_tokens_defaults_to_prompt_plus_completion() -> None:
    assert LLMTrace(**REQUIRED, prompt_tokens=7, completion_tokens=5).total_tokens == 12
    assert LLMTrace(**REQUIRED, prompt_tokens=7, completion_tokens=5, total_tokens=40).total_tokens == 40


def test_sizes_default_to_utf8_length_of_payloads() -> None:
    trace = LLMTrace(**{**REQUIRED, "request_json": '{"q": "é😀"}', "response_json": "ok"})
    assert trace.request_size_bytes == len('{"q": "é😀"}'.encode())
    assert trace.request_size_bytes != len('{"q": "é😀"}')
    assert trace.response_size_bytes == 2
    assert LLMTrace(**REQUIRED, request_size_bytes=99).request_size_bytes == 99


def test_naive_datetimes_are_utc_and_aware_ones_are_converted() -> None:
    naive = LLMTrace(**REQUIRED, created_at=datetime(2026, 1, 1, 10, 0, 0, 5))
    assert naive.created_at == datetime(2026, 1, 1, 10, 0, 0, 5, tzinfo=UTC)
    tokyo = timezone(timedelta(hours=9))
    aware = LLMTrace(**REQUIRED, created_at=datetime(2026, 1, 1, 10, 0, tzinfo=tokyo))
    assert aware.created_at.tzinfo is UTC
    assert aware.created_at.hour == 1


def test_empty_optional_strings_mean_absent() -> None:
    trace = LLMTrace(**REQUIRED, project_id="", error_message="", run_id="r", billing_plan_type="")
    assert trace.project_id is None and trace.error_message is None and trace.run_id == "r"
    assert trace.billing_plan_type is None


def test_provider_trace_prefix_is_stripped() -> None:
    assert LLMTrace.id_from_provider_trace("provider_trace-7f9c") == "7f9c"
    assert LLMTrace.id_from_provider_trace("7f9c") == "7f9c"
    assert LLMTrace.id_from_provider_trace("xprovider_trace-7f9c") == "xprovider_trace-7f9c"


@given(
    prompt=st.integers(0, 10**6),
    completion=st.integers(0, 10**6),
    request=st.text(max_size=50),
)
def test_validation_is_idempotent(prompt: int, completion: int, request: str) -> None:
    trace = LLMTrace(**{**REQUIRED, "request_json": request}, prompt_tokens=prompt, completion_tokens=completion)
    dumped: dict[str, Any] = trace.model_dump()
    assert LLMTrace.model_validate(dumped) == trace
    assert trace.total_tokens == prompt + completion


@pytest.mark.parametrize("when", [datetime(1899, 12, 31, 23, 59, 59), datetime(2300, 1, 1)])
def test_created_at_outside_the_storable_range_is_rejected(when: datetime) -> None:
    with pytest.raises(ValidationError, match="the range ClickHouse's DateTime64 can store") as caught:
        LLMTrace(**REQUIRED, created_at=when)
    assert caught.value.errors()[0]["loc"] == ("created_at",)


@settings(max_examples=50, deadline=None)
@given(distinct=st.lists(llm_traces(), min_size=1, max_size=6), length=st.integers(0, 2 * TRANSPOSE_CHUNK + 3))
def test_column_data_is_the_transposed_rows(distinct: list[LLMTrace], length: int) -> None:
    # Batches longer than one transposition chunk, so that values must land in the right row across chunks.
    traces = [distinct[index % len(distinct)] for index in range(length)]
    # Types are compared too: True == 1 in Python, but the reference sends the flags as ints.
    rows = [[(type(value), value) for value in trace.to_clickhouse_row()] for trace in traces]
    expected = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in REFERENCE_COLUMNS]
    columns = LLMTrace.to_clickhouse_column_data(traces)
    assert [[(type(value), value) for value in column] for column in columns] == expected

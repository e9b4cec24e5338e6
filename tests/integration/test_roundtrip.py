"""Rows written the way existing platforms write them read back as equal LLMTrace objects."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from sqlalchemy import Engine, select

from llmtrace import LLMTrace, LLMTraceRecord, trace_from_row
from llmtrace.engine import driver_client
from tests.factories import make_trace
from tests.strategies import llm_traces

TABLE = LLMTraceRecord.__table__


def insert_like_a_platform(engine: Engine, traces: list[LLMTrace]) -> None:
    """Exactly what an existing writer does: reference tuples through clickhouse-connect's client.insert."""
    with engine.connect() as connection:
        driver_client(connection).insert(
            "llm_traces", [t.to_clickhouse_row() for t in traces], column_names=LLMTrace.clickhouse_columns()
        )


def read_back(engine: Engine, ids: list[str]) -> list[LLMTrace]:
    with engine.connect() as connection:
        rows = connection.execute(select(TABLE).where(TABLE.c.id.in_(ids))).all()
    by_id = {trace.id: trace for trace in map(trace_from_row, rows)}
    return [by_id[i] for i in ids]


def test_reference_rows_read_back_equal(migrated_engine: Engine) -> None:
    traces = [make_trace(i) for i in range(50)]
    insert_like_a_platform(migrated_engine, traces)
    assert read_back(migrated_engine, [t.id for t in traces]) == traces


def test_hostile_and_unusual_values_round_trip(migrated_engine: Engine) -> None:
    nasty = "héllo 😀 שלום مرحبا 'single' \"double\" back\\slash nul\x00byte new\nline tab\t -- ; DROP TABLE x; \u202e"
    tokyo = timezone(timedelta(hours=9))
    traces = [
        make_trace(1, request_json=nasty, response_json=nasty[::-1], error_message=nasty, agent_tags=[nasty, ""]),
        make_trace(2, cached_input_tokens=0, cache_write_tokens=None, reasoning_tokens=0),
        make_trace(3, cached_input_tokens=None, cache_write_tokens=0, reasoning_tokens=None),
        make_trace(4, created_at=datetime(2026, 3, 1, 8, 30, 0, 999999, tzinfo=tokyo)),
        make_trace(5, created_at=datetime(2026, 3, 29, 1, 59, 59, 1, tzinfo=ZoneInfo("Europe/Berlin"))),
        make_trace(6, created_at=datetime(2026, 1, 1, 0, 0, 0, 1)),
        make_trace(7, project_id=None, agent_id=None, run_id=None, step_id=None, trace_id=None, agent_tags=[]),
        make_trace(8, is_error=True, error_type="RateLimitError", is_byok=True),
    ]
    insert_like_a_platform(migrated_engine, traces)
    got = read_back(migrated_engine, [t.id for t in traces])
    assert got == traces
    assert got[1].cached_input_tokens == 0 and got[2].cached_input_tokens is None
    assert got[3].created_at == datetime(2026, 2, 28, 23, 30, 0, 999999, tzinfo=UTC)
    assert "\x00" in got[0].request_json and got[0].agent_tags == [nasty, ""]


def test_five_megabyte_payload_round_trips(migrated_engine: Engine) -> None:
    payload = '{"content": "' + ("0123456789abcdef😀" * 300_000) + '"}'
    assert len(payload.encode()) > 5_000_000
    trace = make_trace(1, request_json=payload, response_json=payload[:1000])
    insert_like_a_platform(migrated_engine, [trace])
    (got,) = read_back(migrated_engine, [trace.id])
    assert got.request_json == payload
    assert got.request_size_bytes == len(payload.encode())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=llm_traces())
def test_any_valid_trace_round_trips(migrated_engine: Engine, trace: LLMTrace) -> None:
    trace.id = uuid.uuid4().hex + trace.id
    insert_like_a_platform(migrated_engine, [trace])
    assert read_back(migrated_engine, [trace.id]) == [trace]

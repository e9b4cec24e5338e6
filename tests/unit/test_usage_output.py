"""The usage report's formats and chart, without an engine: generic over UsageRow's fields, exact for Decimals.

Every measure of UsageRow reaches every format; the chart adds a cost panel when rows carry cost.
"""

from __future__ import annotations

import csv
import io
import json
import struct
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import typer
from rich.console import Console

from llmtrace import usage_chart, usage_report
from llmtrace.cli import chart_bucket, parse_moment
from llmtrace.errors import ConfigurationError
from llmtrace.usage import UsageRow

START = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass(frozen=True)
class TokensOnlyRow:
    """A report row without cost measures: what the chart draws when rows carry none."""

    group: dict[str, str | None]
    bucket: datetime | None
    total_tokens: int


def row(day: int, model: str | None, tokens: int, cost: Decimal) -> UsageRow:
    zero = Decimal(0)
    return UsageRow(
        group={"model": model},
        bucket=START + timedelta(days=day),
        requests=3,
        errors=0,
        prompt_tokens=tokens - 10,
        completion_tokens=10,
        total_tokens=tokens,
        cached_input_tokens=None,
        cache_write_tokens=0,
        reasoning_tokens=None,
        request_bytes=2**70,
        response_bytes=5,
        latency_avg_ms=0.1 + 0.2,
        latency_p50_ms=1.5,
        latency_p95_ms=2.0,
        latency_p99_ms=3.0,
        cost=cost,
        input_cost=cost,
        cached_input_cost=zero,
        cache_write_cost=zero,
        output_cost=zero,
        reasoning_cost=zero,
        request_cost=zero,
        byok_cost=zero,
        unpriced_requests=1,
        source="raw",
    )


ROWS = [
    row(0, "gpt-4.1", 1_200_000, Decimal("12.345678901234567890")),
    row(0, None, 800_000, Decimal(0)),
    row(1, "gpt-4.1", 1_500_000, Decimal("0.000000001")),
]


def test_json_carries_every_field_exactly() -> None:
    out = io.StringIO()
    usage_report.write_json(ROWS, ["model"], out)
    records = json.loads(out.getvalue())
    assert list(records[0]) == [
        "bucket", "model", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
        "cached_input_tokens", "cache_write_tokens", "reasoning_tokens", "request_bytes", "response_bytes",
        "latency_avg_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cost", "input_cost",
        "cached_input_cost", "cache_write_cost", "output_cost", "reasoning_cost", "request_cost", "byok_cost",
        "unpriced_requests", "source",
    ]  # fmt: skip
    assert records[0]["cost"] == "12.345678901234567890"  # a string: every digit kept
    assert records[1]["cost"] == "0" and records[1]["model"] is None
    assert records[2]["cost"] == "1E-9" and Decimal(records[2]["cost"]) == Decimal("0.000000001")
    assert records[0]["bucket"] == "2026-11-01T00:00:00+00:00"
    assert records[0]["request_bytes"] == 2**70
    assert records[0]["latency_avg_ms"] == 0.1 + 0.2
    assert (records[0]["cached_input_tokens"], records[0]["cache_write_tokens"]) == (None, 0)


def test_csv_keeps_none_apart_from_zero_and_decimals_as_str() -> None:
    out = io.StringIO()
    usage_report.write_csv(ROWS, ["model"], out)
    records = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert records[0]["cost"] == "12.345678901234567890"
    assert records[1]["cost"] == "0" and records[1]["model"] == ""
    assert (records[0]["cached_input_tokens"], records[0]["cache_write_tokens"]) == ("", "0")
    assert float(records[0]["latency_avg_ms"]) == 0.1 + 0.2
    assert records[0]["unpriced_requests"] == "1"


def test_an_empty_report_still_has_its_header() -> None:
    out = io.StringIO()
    usage_report.write_csv([], ["model", "agent_id"], out)
    assert out.getvalue().startswith("bucket,model,agent_id,requests,errors,")
    out = io.StringIO()
    usage_report.write_json([], ["model"], out)
    assert json.loads(out.getvalue()) == []


def test_table_shows_new_measures() -> None:
    console = Console(width=400, record=True)
    console.print(usage_report.table(ROWS, ["model"], granularity="day"))
    text = console.export_text()
    header = " ".join(" ".join(text.splitlines()[:2]).split())  # headers span two lines
    assert "cost" in header and "byok" in header and "unpriced" in header and "requests" in header
    assert "12.3457" in text and "(none)" in text and "2026-11-02" in text
    assert "reasoning tokens" not in header and "cached input tokens" not in header  # no row reported them
    assert usage_report.unreported(ROWS) == ["cached_input_tokens", "reasoning_tokens"]
    assert "1,180,591,620.7 TB" in text  # 2**70 bytes: sizes in a column that reaches a million bytes are compact
    assert "1.2M" in text and "800.0k" in text  # so are counts in such a column


def test_percentiles_not_asked_for_are_left_out_and_not_called_unreported() -> None:
    rows = [replace(r, latency_p50_ms=None, latency_p95_ms=None, latency_p99_ms=None) for r in ROWS]
    assert usage_report.unreported(rows) == ["cached_input_tokens", "reasoning_tokens"]
    console = Console(width=400, record=True)
    console.print(usage_report.table(rows, ["model"], granularity="day"))
    header = " ".join(" ".join(console.export_text().splitlines()[:2]).split())
    assert "p50" not in header and "p99" not in header and "avg" in header


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_chart_has_a_cost_panel_when_rows_carry_cost(tmp_path: Path) -> None:
    with_cost, tokens_only = tmp_path / "cost.png", tmp_path / "tokens.png"
    usage_chart.write_chart(ROWS, with_cost, key="model", granularity="day", title="Usage by model per day")
    plain = [TokensOnlyRow(dict(r.group), r.bucket, r.total_tokens) for r in ROWS]
    usage_chart.write_chart(plain, tokens_only, key="model", granularity="day", title="Usage by model per day")
    assert usage_chart.has_cost(ROWS) and not usage_chart.has_cost(plain)
    (width, height), (width_plain, height_plain) = png_size(with_cost), png_size(tokens_only)
    assert width == width_plain and height > height_plain  # one more panel
    svg = tmp_path / "cost.svg"
    usage_chart.write_chart(ROWS, svg, key="model", granularity="day", title="Usage by model per day")
    text = svg.read_text()
    assert "cost (USD)" in text and "total tokens" in text and "(none)" in text and "day (UTC)" in text


def test_chart_folds_small_series_into_other(tmp_path: Path) -> None:
    many = [row(0, f"model-{i:02d}", 1000 * (i + 1), Decimal(i)) for i in range(12)]
    svg = tmp_path / "many.svg"
    usage_chart.write_chart(many, svg, key="model", granularity="hour", title="Many models")
    text = svg.read_text()
    assert "model-11" in text and "model-05" in text and "other" in text
    assert "model-04" not in text and "model-00" not in text


def test_a_chart_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigurationError, match=r"Cannot write the chart to .*missing/x.png: No such file or directory"
    ):
        usage_chart.write_chart(ROWS, tmp_path / "missing" / "x.png", key="model", granularity="day", title="t")


def test_chart_of_no_rows_says_so(tmp_path: Path) -> None:
    svg = tmp_path / "empty.svg"
    usage_chart.write_chart([], svg, key="model", granularity="day", title="Nothing")
    assert "No traces in this range" in svg.read_text()


NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("12h", NOW - timedelta(hours=12)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2w", NOW - timedelta(weeks=2)),
        ("1.5d", NOW - timedelta(hours=36)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T12:30", datetime(2026, 11, 1, 12, 30, tzinfo=UTC)),
        ("2026-11-01T12:30:00.000001Z", datetime(2026, 11, 1, 12, 30, 0, 1, tzinfo=UTC)),
        ("2026-11-01T14:30+02:00", datetime(2026, 11, 1, 12, 30, tzinfo=UTC)),
    ],
)
def test_moments(text: str, expected: datetime) -> None:
    assert parse_moment(text, option="--since", now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "7 days", "-3d", "2026-13-01", ""])
def test_moments_that_are_not(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="neither a duration"):
        parse_moment(text, option="--since", now=NOW)


def test_chart_bucket_gives_a_readable_number_of_bars() -> None:
    assert chart_bucket(None, None) == "day"
    assert chart_bucket(NOW - timedelta(days=1), NOW) == "hour"
    assert chart_bucket(NOW - timedelta(days=30), NOW) == "day"
    assert chart_bucket(NOW - timedelta(days=400), NOW) == "month"

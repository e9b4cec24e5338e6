"""``llmtrace usage``: its JSON and CSV carry exactly what TraceRepository.usage() returns; the table and the chart.

The command runs in a child process on a database of its own; the repository's answer, in another one after it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import struct
import typing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from llmtrace import UsageRow
from llmtrace.synthetic import synthetic_traces
from tests.cli_support import llmtrace, repository_call

END = datetime(2026, 10, 20, 12, 0, tzinfo=UTC)
HINTS = typing.get_type_hints(UsageRow)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with 900 traces of three organizations over five days (read-only for the tests)."""
    directory = tmp_path_factory.mktemp("usage")
    url = f"chdb:///{directory / 'db'}"
    traces = list(
        synthetic_traces(900, organizations=3, payload_bytes=(10, 300), end=END, span=timedelta(days=5), seed=7)
    )
    # Traces without an agent: their group key is None, and must stay None (not "") through JSON and CSV.
    traces += [t.model_copy(update={"agent_id": None, "id": f"no-agent-{i}"}) for i, t in enumerate(traces[:20])]
    assert repository_call(url, directory, "add", traces=traces) == len(traces)
    return url


def parse(value: Any, hint: Any) -> Any:
    """A value read from JSON or CSV as the type UsageRow declares for it."""
    if value is None or value == "":
        return None if type(None) in typing.get_args(hint) else value
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if base is datetime:
        return datetime.fromisoformat(value)
    if base is Decimal:
        return Decimal(value)
    if base in (int, float) and isinstance(value, str):
        return base(value)
    return value


def as_rows(records: list[dict[str, Any]], keys: list[str]) -> list[UsageRow]:
    rows = []
    for record in records:
        values = {
            field.name: parse(record[field.name], HINTS[field.name])
            for field in dataclasses.fields(UsageRow)
            if field.name != "group"
        }
        group = {key: record[key] if record[key] != "" else None for key in keys}
        rows.append(UsageRow(group=group, **values))
    return rows


CASES = [
    pytest.param(["--org", "org-1", "--by", "model", "--granularity", "day"], {"organization": "org-1",
                 "group_by": ["model"], "granularity": "day"}, id="one-organization-by-model-per-day"),
    pytest.param(
        ["--all-organizations", "--by", "organization_id,agent_id", "--since", "2026-10-17", "--until",
         "2026-10-19T06:30:00Z"],
        {"organization": "*", "group_by": ["organization_id", "agent_id"], "since": "2026-10-17T00:00:00+00:00",
         "until": "2026-10-19T06:30:00+00:00"},
        id="all-organizations-by-agent-in-a-range",
    ),
    pytest.param(["--all-organizations", "--by", "", "--where", "is_error=false", "--granularity", "hour"],
                 {"organization": "*", "group_by": [], "granularity": "hour", "is_error": False}, id="total-per-hour"),
    pytest.param(["--all-organizations", "--by", "model", "--granularity", "day", "--percentiles", "none"],
                 {"organization": "*", "group_by": ["model"], "granularity": "day", "percentiles": None},
                 id="without-percentiles"),
]  # fmt: skip


@pytest.mark.parametrize(("arguments", "expected"), CASES)
def test_json_is_exactly_what_usage_returns(seeded: str, tmp_path: Path, arguments: list[str], expected: Any) -> None:
    result = llmtrace("usage", *arguments, "--format", "json", url=seeded)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    oracle = repository_call(seeded, tmp_path, "usage", **expected)
    assert oracle, "the case must cover some traces"
    assert as_rows(records, expected["group_by"]) == oracle
    assert [list(record) for record in records] == [
        [
            "bucket",
            *expected["group_by"],
            *(f.name for f in dataclasses.fields(UsageRow) if f.name not in ("group", "bucket")),
        ]
    ] * len(records)


@pytest.mark.parametrize(("arguments", "expected"), CASES[:2])
def test_csv_is_exactly_what_usage_returns(seeded: str, tmp_path: Path, arguments: list[str], expected: Any) -> None:
    result = llmtrace("usage", *arguments, "--format", "csv", url=seeded)
    assert result.returncode == 0, result.stderr
    records = list(csv.DictReader(io.StringIO(result.stdout)))
    assert as_rows(records, expected["group_by"]) == repository_call(seeded, tmp_path, "usage", **expected)


def test_unknown_counts_stay_unknown_in_csv(seeded: str) -> None:
    result = llmtrace("usage", "--all-organizations", "--by", "model", "--format", "csv", url=seeded)
    rows = {row["model"]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    # Only Anthropic models report cached input tokens in the generated traces; the others' sums are unknown.
    assert rows["gpt-4.1"]["cached_input_tokens"] == ""
    assert int(rows["claude-sonnet-4"]["cached_input_tokens"]) > 0
    assert rows["gpt-4.1"]["cache_write_tokens"] == ""


def test_table_is_titled_and_shows_every_measure(seeded: str) -> None:
    result = llmtrace("usage", "--org", "org-2", "--by", "agent_id", "--granularity", "day", url=seeded)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Usage of org-2 by agent_id per day"
    header = lines[1] + " " + lines[2]  # names on two lines: "prompt" over "tokens"
    # The generated traces never report cache writes: that column is left out, and said so.
    assert lines[-1] == "Not reported by any trace: cache_write_tokens."
    for field in dataclasses.fields(UsageRow):
        if field.name not in ("group", "cache_write_tokens"):
            assert all(word in header for word in field.name.split("_")), field.name
    assert "cache write" not in header
    assert "2026-10-20" in result.stdout and "agent-2-0" in result.stdout
    assert "(none)" in result.stdout  # the traces without an agent


def test_a_table_without_percentiles_leaves_their_columns_out_without_calling_them_unreported(seeded: str) -> None:
    result = llmtrace("usage", "--org", "org-2", "--by", "model", "--percentiles", "none", url=seeded)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[1] + " " + lines[2]
    assert "p50" not in header and "p99" not in header and "avg" in header
    assert lines[-1] == "Not reported by any trace: cache_write_tokens."


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_chart_png_is_a_readable_image(seeded: str, tmp_path: Path) -> None:
    chart = tmp_path / "usage.png"
    result = llmtrace("usage", "--all-organizations", "--by", "model", "--since", "2026-10-15", "--chart", str(chart),
                      url=seeded)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Chart written to {chart}" in result.stdout
    data = chart.read_bytes()
    width, height = png_size(data)
    assert 800 <= width <= 2400 and 500 <= height <= 1600, (width, height)
    assert 10_000 < len(data) < 2_000_000
    from matplotlib.image import imread

    pixels = imread(chart)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05, "the image is (nearly) blank"


def test_chart_svg_with_machine_output_keeps_stdout_clean(seeded: str, tmp_path: Path) -> None:
    chart = tmp_path / "usage.svg"
    result = llmtrace("usage", "--org", "org-0", "--granularity", "hour", "--format", "json", "--chart", str(chart),
                      url=seeded)  # fmt: skip
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)
    assert f"Chart written to {chart}" in result.stderr
    text = chart.read_text()
    assert text.startswith("<?xml") and "<svg" in text and "total tokens" in text and "model" in text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "--all-organizations"),
        (["--org", "org-1", "--all-organizations"], "not both"),
        (["--org", "org-1", "--by", "colour"], "unknown key(s) colour"),
        (["--org", "org-1", "--since", "last tuesday"], "neither a duration"),
        (["--org", "org-1", "--since", "1d", "--until", "2d"], "must be before"),
        (["--org", "org-1", "--where", "size=3"], "KEY=VALUE"),
        (["--org", "org-1", "--chart", "usage.pdf"], ".png or .svg"),
        (["--org", "org-1", "--chart", "/nonexistent/usage.png"], "no directory /nonexistent to write it in"),
        (["--org", "org-1", "--format", "xml"], "xml"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, arguments: list[str], message: str) -> None:
    result = llmtrace("usage", *arguments, url=f"chdb:///{tmp_path / 'db'}")
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr

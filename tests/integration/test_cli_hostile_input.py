"""``llmtrace import`` and ``export`` fed what real files and hostile users hand them.

The command runs in this process (``llmtrace.cli.main``) on one migrated database shared by the module, in this
process's embedded data directory; each test keeps to an organization of its own. Flows that need a process of
their own (signals, standard input as the operating system gives it) are in test_cli_files.py.
"""

from __future__ import annotations

import gzip
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from llmtrace import ALL_ORGANIZATIONS, LLMTrace, TraceRepository, get_engine, trace_files
from llmtrace.cli import main
from llmtrace.engine import driver_client
from llmtrace.migrations import upgrade
from tests.conftest import embedded_url
from tests.factories import make_trace


@pytest.fixture(scope="module")
def url(chdb_dir: Path) -> Iterator[str]:
    url = embedded_url(chdb_dir, f"cli_{uuid.uuid4().hex[:12]}")
    engine = get_engine(url)
    upgrade(engine)
    yield url
    with engine.connect() as connection:
        database = connection.execute(text("SELECT currentDatabase()")).scalar_one()
        connection.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
    engine.dispose()


@dataclass
class Run:
    code: int
    out: str
    err: str


def run(capsys: pytest.CaptureFixture[str], *arguments: str) -> Run:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def count(url: str, organization: str) -> int:
    return TraceRepository(get_engine(url)).count(organization)


def trace_line(index: int, organization: str, **overrides: Any) -> str:
    return json.dumps(json.loads(make_trace(index, organization_id=organization).model_dump_json()) | overrides)


def test_json_lines_that_are_ambiguous_or_too_deep_are_reported_by_line_and_field(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    organization = "org-json-lines"
    good = trace_line(1, organization)
    # The same key twice: json.loads would keep the last one and store the trace in another organization.
    repeated = trace_line(2, organization)[:-1] + ', "organization_id": "org-elsewhere"}'
    deep = "[" * 100_000 + "]" * 100_000
    file = tmp_path / "hostile.jsonl"
    file.write_text("\n".join([good, repeated, deep]) + "\n")
    result = run(capsys, "--url", url, "import", str(file))
    assert result.code == 1, result
    assert "Traceback" not in result.err
    assert result.err.splitlines()[1:] == [
        "  line 2, organization_id: the field is given more than once in the line",
        "  line 3, (line): not valid JSON: arrays or objects nested too deeply",
    ]
    assert count(url, organization) == 0 and count(url, "org-elsewhere") == 0


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "traces.jsonl",
            gzip.compress(b'{"id": "1"}\n'),
            "The input is gzip-compressed, not JSON Lines text: decompress it first "
            "(gunzip -c FILE | llmtrace import --format jsonl -).",
        ),
        (
            "traces.csv",
            gzip.compress(b"id,organization_id\n1,org\n"),
            "The input is gzip-compressed, not CSV text: decompress it first "
            "(gunzip -c FILE | llmtrace import --format csv -).",
        ),
        ("traces.jsonl", b"PAR1\x15\x04", "The input is a Parquet file, not JSON Lines text: name it *.parquet or "
         "pass --format parquet."),
        ("traces.json", b'\n [\n  {"id": "1"},\n  {"id": "2"}\n]\n', "The input is a JSON array, not JSON Lines "
         "(one trace object per line): convert it first (jq -c '.[]' FILE | llmtrace import -)."),
    ],
    ids=["gzip-as-jsonl", "gzip-as-csv", "parquet-as-jsonl", "json-array"],
)  # fmt: skip
def test_a_compressed_or_parquet_file_given_as_text_is_named(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    file = tmp_path / name
    file.write_bytes(content)
    result = run(capsys, "--url", url, "import", str(file))
    assert (result.code, result.err) == (1, f"llmtrace: {message}\n")


def test_csv_saved_by_a_spreadsheet_imports_exactly(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte order mark, CRLF line ends and a payload longer than the csv module's default 128 KiB cell limit."""
    organization = "org-spreadsheet"
    traces = [
        make_trace(1, organization_id=organization, request_json=json.dumps({"text": "x" * 300_000})),
        make_trace(2, organization_id=organization, cached_input_tokens=None, agent_id=None),
    ]
    out = io.BytesIO()
    writer = trace_files.open_writer(out, "csv")
    writer.write(traces)
    writer.close()
    assert b"\r" not in out.getvalue()
    file = tmp_path / "from-a-spreadsheet.csv"
    file.write_bytes(b"\xef\xbb\xbf" + out.getvalue().replace(b"\n", b"\r\n"))
    result = run(capsys, "--url", url, "import", str(file))
    assert (result.code, result.err) == (0, ""), result
    repository = TraceRepository(get_engine(url))
    assert [repository.get(organization, trace.id) for trace in traces] == traces


def test_csv_with_a_column_named_twice_is_refused(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "twice.csv"
    # csv.DictReader keeps the last of two columns of one name: these traces would go to org-elsewhere.
    file.write_text(
        "id,organization_id,call_type,provider,model,request_json,response_json,organization_id\n"
        "1,org-csv-twice,agent_step,openai,gpt-4.1,{},{},org-elsewhere\n"
    )
    result = run(capsys, "--url", url, "import", str(file))
    assert result.code == 1
    assert result.err.splitlines()[1:] == ["  line 1, organization_id: the header names this column twice"]
    assert count(url, "org-csv-twice") == 0 and count(url, "org-elsewhere") == 0


def test_csv_bytes_that_are_not_utf8_are_reported_at_their_line_and_field(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [b"id,organization_id,call_type,provider,model,request_json,response_json"]
    lines += [b"csv-%d,org-csv-bytes,agent_step,openai,gpt-4.1,{},{}" % i for i in range(1000)]
    lines[901] = lines[901].replace(b"gpt-4.1", b"gpt\xff4.1")  # line 902 of the file
    file = tmp_path / "latin.csv"
    file.write_bytes(b"\n".join(lines) + b"\n")
    result = run(capsys, "--url", url, "import", str(file), "--batch-size", "2000")
    assert result.code == 1
    assert result.err.splitlines()[1:] == ["  line 902, model: not UTF-8 text (byte 0xff at character 4)"]
    assert count(url, "org-csv-bytes") == 0


def parquet_of(tmp_path: Path, organization: str, count: int = 3) -> Any:
    """A table of ``count`` traces in the export's Parquet schema."""
    import pyarrow as pa

    rows = [make_trace(i, organization_id=organization).model_dump() for i in range(count)]
    return pa.Table.from_pylist(rows, schema=trace_files.parquet_schema())


def test_parquet_with_a_column_named_twice_is_refused(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = parquet_of(tmp_path, "org-parquet-twice")
    table = pa.Table.from_arrays([*table.columns, pa.array(["org-elsewhere"] * 3)], [*table.column_names,
                                 "organization_id"])  # fmt: skip
    file = tmp_path / "twice.parquet"
    pq.write_table(table, file)
    result = run(capsys, "--url", url, "import", str(file))
    assert result.code == 1
    assert result.err == (
        "llmtrace: Cannot read the Parquet file: it has two columns named organization_id, and which one is meant "
        "cannot be told.\n"
    )
    assert count(url, "org-parquet-twice") == 0 and count(url, "org-elsewhere") == 0


def test_parquet_values_python_cannot_hold_are_reported_by_row_and_field(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = parquet_of(tmp_path, "org-parquet-far", count=5)
    index = table.schema.get_field_index("created_at")
    # Year 146,000-odd: a valid Parquet timestamp, beyond what a Python datetime holds.
    moments = pa.array([10**6, 10**6, 2**62, 10**6, 10**6], pa.timestamp("us", tz="UTC"))
    file = tmp_path / "far.parquet"
    pq.write_table(table.set_column(index, "created_at", moments), file)
    result = run(capsys, "--url", url, "import", str(file))
    assert result.code == 1
    assert "Traceback" not in result.err
    assert result.err.splitlines()[1:] == ["  row 3, created_at: cannot be read: date value out of range"]
    assert count(url, "org-parquet-far") == 0


def test_traces_past_the_retention_are_reported_by_line(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upgrade(get_engine(database_url))
    assert run(capsys, "--url", database_url, "retention", "--rows-days", "365", "--payload-days", "365").code == 0
    lines = [trace_line(i, "org-1") for i in range(8)]
    lines[6] = trace_line(6, "org-1", created_at="2001-01-01T00:00:00Z")
    file = tmp_path / "old.jsonl"
    file.write_text("\n".join(lines) + "\n")
    result = run(capsys, "--url", database_url, "import", str(file), "--batch-size", "4")
    assert result.code == 1
    assert result.err.splitlines() == [
        f"llmtrace: {file}: 1 problem(s) in lines 5 to 8; nothing of that batch was written (4 trace(s) of earlier "
        "batches were stored; importing the file again skips them):",
        "  line 7, created_at: is older than the table's row retention of 365 day(s), so ClickHouse would drop it at "
        "once. Leave such traces out, or lengthen the retention with llmtrace.set_retention",
    ]
    assert count(database_url, "org-1") == 4


def test_a_parquet_file_damaged_part_way_says_what_was_stored(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    file = tmp_path / "damaged.parquet"
    # The reader takes 1,000 rows at a time: the first 1,000 are read (and stored) before the damage is met.
    pq.write_table(parquet_of(tmp_path, "org-parquet-damaged", count=1010), file, row_group_size=1000)
    column = pq.ParquetFile(file).metadata.row_group(1).column(0)
    data = bytearray(file.read_bytes())
    for offset in range(column.data_page_offset, column.data_page_offset + 16):
        data[offset] ^= 0xFF  # the second row group's first page header
    file.write_bytes(bytes(data))
    result = run(capsys, "--url", url, "import", str(file), "--batch-size", "1000")
    assert result.code == 1
    message, note = result.err.splitlines()  # pyarrow's message of several lines on one
    assert message.startswith("llmtrace: Cannot read the Parquet file: Couldn't deserialize thrift: ")
    assert note == f"1,000 trace(s) of earlier batches of {file} were stored; importing it again skips them."
    assert count(url, "org-parquet-damaged") == 1000


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--since", "999999d"], 3),  # further back than a datetime reaches: every trace
        (["--since", "0001-01-01"], 3),  # before created_at can be: every trace
        (["--until", "0500-01-01T00:00:00Z"], 0),
        (["--until", "99999999w"], 0),
        (["--since", "1d", "--until", "999999d"], "--since"),  # still refused: the range is empty
    ],
)
def test_times_beyond_what_created_at_can_hold_are_not_an_error(
    url: str, capsys: pytest.CaptureFixture[str], arguments: list[str], expected: int | str
) -> None:
    organization = "org-far-times"
    repository = TraceRepository(get_engine(url))
    repository.add_many([make_trace(i, organization_id=organization) for i in range(3)])
    result = run(capsys, "--url", url, "traces", "--org", organization, "--format", "json", *arguments)
    if isinstance(expected, str):
        assert result.code == 2 and "must be before" in result.err, result
        return
    assert (result.code, result.err) == (0, ""), result
    assert len(json.loads(result.out)["traces"]) == expected
    usage = run(capsys, "--url", url, "usage", "--org", organization, "--by", "", "--format", "json", *arguments)
    assert (usage.code, usage.err) == (0, ""), usage
    assert sum(row["requests"] for row in json.loads(usage.out)) == expected


def test_show_prints_a_payload_too_deep_to_pretty_print_as_it_is(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    deep = "[" * 10_000 + "]" * 10_000
    trace = make_trace(1, organization_id="org-deep-payload", request_json=deep, response_json="NaN")
    TraceRepository(get_engine(url)).add_many([trace])
    result = run(capsys, "--url", url, "traces", "--org", "org-deep-payload", "--show", trace.id)
    assert (result.code, result.err) == (0, ""), result
    assert f"request_json ({len(deep):,} bytes)\n" in result.out
    assert deep in result.out.replace("\n", "")  # folded at the console's width


def test_pages_of_a_relative_time_range_follow_one_another(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--since 7d`` means another instant at each run: the next page's cursor still belongs to the first page's."""
    organization = "org-relative-pages"
    recent = datetime.now(UTC) - timedelta(hours=1)
    traces = [make_trace(i, organization_id=organization, created_at=recent - timedelta(seconds=i)) for i in range(5)]
    TraceRepository(get_engine(url)).add_many(traces)
    seen: list[str] = []
    cursor: list[str] = []
    for _ in range(3):
        result = run(capsys, "--url", url, "traces", "--org", organization, "--since", "7d", "--until", "1s",
                     "--limit", "2", "--format", "json", *cursor)  # fmt: skip
        assert (result.code, result.err) == (0, ""), result
        page = json.loads(result.out)
        seen += [item["id"] for item in page["traces"]]
        cursor = ["--cursor", page["next_cursor"]] if page["next_cursor"] else []
    assert seen == [trace.id for trace in traces] and cursor == []
    table = run(capsys, "--url", url, "traces", "--org", organization, "--since", "7d", "--limit", "4")
    next_page = table.out.splitlines()[-1].removeprefix("Next page: --cursor ")
    last = run(capsys, "--url", url, "traces", "--org", organization, "--since", "7d", "--cursor", next_page)
    assert last.code == 0 and traces[4].id in last.out, last
    other = run(capsys, "--url", url, "traces", "--org", organization, "--since", "8d", "--cursor", next_page)
    assert other.code == 1 and "issued for other filters" in other.err


def test_export_of_every_organization_counts_them_plainly_and_names_traces_without_one(
    database_url: str, migrated_engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = TraceRepository(migrated_engine)
    repository.add_many([make_trace(i, organization_id=f"org-{i % 3}") for i in range(9)])
    # Another writer's row without an organization id, as the reference to_clickhouse_row() may send it.
    columns = LLMTrace.clickhouse_columns()
    row = list(make_trace(100, organization_id="org-x").to_clickhouse_row())
    row[columns.index("organization_id")] = ""
    with migrated_engine.connect() as connection:
        driver_client(connection).insert("llm_traces", [row], column_names=columns)
    assert repository.organizations() == [("", 1), ("org-0", 3), ("org-1", 3), ("org-2", 3)]
    only = make_trace(0).model
    assert sum(count for _, count in repository.organizations(model=only)) == repository.count(
        ALL_ORGANIZATIONS, model=only
    )

    target = tmp_path / "all.jsonl"
    result = run(capsys, "export", "--all-organizations", "-o", str(target), "--url", database_url)
    assert result.code == 0, result.err
    exported = [LLMTrace.model_validate_json(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert sorted(trace.organization_id for trace in exported) == sorted(f"org-{i % 3}" for i in range(9))
    assert "Not exported: 1 trace(s) without an organization id (stored as '')." in result.err

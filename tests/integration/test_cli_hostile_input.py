"""``llmtrace import`` and ``export`` fed what real files and hostile users hand them.

The command runs in this process (``llmtrace.cli.main``) on one migrated database shared by the module, in this
process's embedded data directory; each test keeps to an organization of its own. Flows that need a process of
their own (signals, standard input as the operating system gives it) are in test_cli_files.py.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from llmtrace import TraceRepository, get_engine
from llmtrace.cli import main
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
    ],
    ids=["gzip-as-jsonl", "gzip-as-csv", "parquet-as-jsonl"],
)  # fmt: skip
def test_a_compressed_or_parquet_file_given_as_text_is_named(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    file = tmp_path / name
    file.write_bytes(content)
    result = run(capsys, "--url", url, "import", str(file))
    assert (result.code, result.err) == (1, f"llmtrace: {message}\n")

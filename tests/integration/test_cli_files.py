"""``llmtrace import`` and ``llmtrace export``: exact round trips in every format, exactly-once imports, bad lines.

Each command runs in a child process on a database of its own; what the database holds is read back with the
repository in another child process (tests.cli_oracle).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llmtrace import LLMTrace
from tests.cli_support import LLMTRACE, llmtrace, repository_call
from tests.factories import make_trace
from tests.fault_servers import Fault, fault_server

AWKWARD = "quotes \" ' backslash \\ tab \t newline \n CR \r NUL \x00 comma , semicolon ; -- unicode é 漢字 🚀"


def awkward_traces() -> list[LLMTrace]:
    """Traces whose every field takes a value that a careless export or import would change."""
    base = datetime(2026, 9, 30, 23, 59, 59, 999999, tzinfo=UTC)
    traces = [make_trace(i, created_at=base - timedelta(minutes=i, microseconds=i)) for i in range(40)]
    traces += [
        make_trace(
            100,
            agent_tags=[AWKWARD, "", "[\"nested\"]"],
            request_json=json.dumps({"text": AWKWARD}),
            response_json=AWKWARD,  # not JSON at all
            llm_config_json="",
            cached_input_tokens=0,  # zero, not unknown
            cache_write_tokens=None,
            reasoning_tokens=0,
            is_byok=True,
            is_error=True,
            error_type="RateLimitError",
            error_message=AWKWARD,
            billing_plan_type="pro",
            billing_cost_source="platform",
            billing_customer_id="cus_é",
            total_tokens=4_000_000_000,  # stated, not the sum
            request_size_bytes=2**64 - 1,
            response_size_bytes=1,
            latency_ms=0,
        ),
        make_trace(101, agent_id=None, project_id=None, run_id=None, step_id=None, trace_id=None, agent_tags=[],
                   prompt_tokens=0, completion_tokens=0, created_at=datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
        make_trace(102, created_at=datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), model="モデル"),
        make_trace(103, organization_id="org-2"),
    ]  # fmt: skip
    return traces


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[LLMTrace]]:
    directory = tmp_path_factory.mktemp("source")
    url = f"chdb:///{directory / 'db'}"
    traces = awkward_traces()
    assert repository_call(url, directory, "add", traces=traces) == len(traces)
    return url, sorted(repository_call(url, directory, "traces", organization="org-1"), key=lambda t: t.id)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_export_then_import_round_trips_exactly(
    source: tuple[str, list[LLMTrace]], tmp_path: Path, suffix: str
) -> None:
    source_url, stored = source
    assert len(stored) == 43
    exported = tmp_path / f"traces{suffix}"
    result = llmtrace("export", "--org", "org-1", "-o", str(exported), "--batch-size", "10", url=source_url)
    assert result.returncode == 0, result.stderr
    assert "Exported 43 trace(s)" in result.stderr
    assert exported.stat().st_mode & 0o777 == 0o600  # it holds payloads: readable by its owner only

    target = f"chdb:///{tmp_path / 'target'}"
    assert llmtrace("migrate", url=target).returncode == 0
    result = llmtrace("import", str(exported), "--batch-size", "16", url=target)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Imported 43 trace(s) from {exported}.\n"
    assert sorted(repository_call(target, tmp_path, "traces", organization="org-1"), key=lambda t: t.id) == stored
    assert repository_call(target, tmp_path, "count", organization="org-2") == 0

    again = llmtrace("import", str(exported), url=target)
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout == f"Imported 0 trace(s) from {exported}; 43 skipped (already stored, or repeated in the file).\n"
    )
    assert repository_call(target, tmp_path, "count", organization="org-1") == 43


def test_export_streams_pages_newest_first_to_stdout_and_parquet_row_groups(
    source: tuple[str, list[LLMTrace]], tmp_path: Path
) -> None:
    source_url, stored = source
    result = llmtrace("export", "--org", "org-1", "--batch-size", "7", url=source_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    exported = [LLMTrace.model_validate_json(line) for line in lines]
    assert [t.created_at for t in exported] == sorted((t.created_at for t in stored), reverse=True)

    parquet = tmp_path / "all.parquet"
    result = llmtrace("export", "--all-organizations", "-o", str(parquet), "--batch-size", "7", url=source_url)
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(parquet).metadata
    # One row group per page: org-1's 43 traces in 7 pages, org-2's one.
    assert (metadata.num_rows, metadata.num_row_groups) == (44, 8)


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_import_reports_bad_lines_and_writes_nothing_of_their_batch(tmp_path: Path) -> None:
    url = f"chdb:///{tmp_path / 'db'}"
    assert llmtrace("migrate", url=url).returncode == 0
    good = [make_trace(i).model_dump_json() for i in range(10)]
    negative = json.loads(good[6]) | {"prompt_tokens": -5}
    unknown = json.loads(good[7]) | {"colour": "blue"}
    lines = [*good[:4], "", good[4], '{"id": "x", oops', json.dumps(negative), json.dumps(unknown), *good[8:]]
    file = tmp_path / "traces.jsonl"
    write_lines(file, lines)
    # Batches of 4 items (the blank line 5 is no item): lines 1-4, 6-9 (three bad), 10-11.
    result = llmtrace("import", str(file), "--batch-size", "4", url=url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.splitlines()
    assert message[0] == (
        f"llmtrace: {file}: 3 problem(s) in lines 6 to 9; nothing of that batch was written (4 trace(s) of earlier "
        "batches were stored; importing the file again skips them):"
    )
    assert message[1].startswith("  line 7, (line): not valid JSON")
    assert message[2].startswith("  line 8, prompt_tokens: Input should be greater than or equal to 0")
    assert message[3].startswith("  line 9, colour: Extra inputs are not permitted")
    stored = repository_call(url, tmp_path, "traces", organization="org-1")
    assert sorted(t.id for t in stored) == sorted(make_trace(i).id for i in range(4))

    lines[6:9] = good[5:8]  # fixed
    write_lines(file, lines)
    result = llmtrace("import", str(file), "--batch-size", "4", url=url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Imported 6 trace(s) from {file}; 4 skipped (already stored, or repeated in the file).\n"
    assert sorted(t.id for t in repository_call(url, tmp_path, "traces", organization="org-1")) == sorted(
        make_trace(i).id for i in range(10)
    )


def test_import_of_csv_numbers_lines_as_a_text_editor_does(tmp_path: Path) -> None:
    url = f"chdb:///{tmp_path / 'db'}"
    exported = tmp_path / "three.csv"
    assert llmtrace("migrate", url=url).returncode == 0
    source_traces = [make_trace(0), make_trace(1), make_trace(2, request_json='{"a":\n"two lines"}')]
    assert repository_call(url, tmp_path, "add", traces=source_traces) == 3
    assert llmtrace("export", "--org", "org-1", "-o", str(exported), url=url).returncode == 0
    header, *lines = exported.read_text().split("\n")[:-1]
    # Newest first: trace 2 on lines 2-3 (its payload holds a line break), trace 1 on line 4, trace 0 on line 5.
    assert len(lines) == 4 and lines[2].startswith(make_trace(1).id) and lines[3].startswith(make_trace(0).id)
    lines[2] = lines[2].replace(",org-1,", ",,", 1)
    lines[3] = lines[3].replace(",anthropic,", ",anthropic,,,", 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([header, *lines, ""]))
    result = llmtrace("import", str(bad), url=f"chdb:///{tmp_path / 'other'}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"llmtrace: {bad}: 2 problem(s) in lines 2 to 5; nothing of that batch was written")
    assert "\n  line 4, organization_id: Value error, must name the organization" in result.stderr
    assert "\n  line 5, (line): 2 more cell(s) than the header has columns\n" in result.stderr


def test_import_from_stdin(tmp_path: Path) -> None:
    url = f"chdb:///{tmp_path / 'db'}"
    assert llmtrace("migrate", url=url).returncode == 0
    data = "".join(make_trace(i).model_dump_json() + "\n" for i in range(25)).encode()
    result = llmtrace("import", "-", url=url, stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Imported 25 trace(s) from -.\n"
    # Exactly once from standard input too, in other batches this time.
    again = llmtrace("import", "-", "--batch-size", "7", url=url, stdin=data)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "Imported 0 trace(s) from -; 25 skipped (already stored, or repeated in the file).\n"


def test_import_into_an_unmigrated_database_says_what_to_do(tmp_path: Path) -> None:
    file = tmp_path / "one.jsonl"
    write_lines(file, [make_trace(1).model_dump_json()])
    result = llmtrace("import", str(file), url=f"chdb:///{tmp_path / 'db'}")
    assert result.returncode == 1
    assert result.stderr.startswith("llmtrace: ") and "llmtrace migrate" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("arguments", "package"),
    [
        (["export", "--org", "org-1", "-o", "x.parquet"], "pyarrow"),
        (["usage", "--org", "o", "--chart", "x.png"], "matplotlib"),
    ],
)
def test_a_missing_extra_is_named(tmp_path: Path, arguments: list[str], package: str) -> None:
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / f"{package}.py").write_text(f"raise ImportError('{package} is blocked for this test')\n")
    url = f"chdb:///{tmp_path / 'db'}"
    assert llmtrace("migrate", url=url).returncode == 0
    arguments = [str(tmp_path / a) if a.startswith("x.") else a for a in arguments]
    result = llmtrace(*arguments, url=url, env={"PYTHONPATH": str(blocker)})
    assert result.returncode == 1, result
    assert result.stderr == (
        f"llmtrace: {'Writing Parquet files' if package == 'pyarrow' else 'A usage chart (--chart)'} needs {package}, "
        f"which is not installed. It comes with llmtrace's 'reports' extra: pip install 'llmtrace[reports]'.\n"
    )
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("command", [["export", "--org", "org-1"], ["usage", "--org", "org-1"]])
def test_a_server_that_refuses_connections_is_one_line_on_stderr(command: list[str]) -> None:
    with fault_server(Fault.REFUSE) as port:
        result = llmtrace(*command, url=f"clickhousedb://default:secret@127.0.0.1:{port}/traces")
    assert result.returncode == 1
    # Only llmtrace's own line: nothing the driver logs on the way.
    assert result.stderr.startswith(f"llmtrace: ClickHouse at 127.0.0.1:{port} refused the connection")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def _default_signals() -> None:
    for signal_number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signal_number, signal.SIG_DFL)


def test_an_export_stopped_by_a_signal_leaves_no_file(tmp_path: Path) -> None:
    """SIGTERM (kill, timeout, systemd), SIGHUP (a closed terminal) and SIGINT (Ctrl-C) leave no file behind.

    The export ends as if the signal had killed it; SIGKILL cannot be caught, and leaves its temporary file
    (.NAME.*.tmp) next to the target, never a partial file at the target's name.
    """
    url = f"chdb:///{tmp_path / 'db'}"
    assert repository_call(url, tmp_path, "add", traces=[make_trace(i) for i in range(300)]) == 300
    out = tmp_path / "out"
    out.mkdir()
    for signal_number, code in (
        (signal.SIGTERM, -signal.SIGTERM),
        (signal.SIGHUP, -signal.SIGHUP),
        (signal.SIGINT, 130),
    ):
        command = [LLMTRACE, "export", "--org", "org-1", "--batch-size", "1", "-o", str(out / "traces.jsonl")]
        process = subprocess.Popen(
            command,
            env={**os.environ, "LLMTRACE_DATABASE_URL": url},
            stderr=subprocess.PIPE,
            # The export keeps a signal its parent ignores ignored (as under nohup); the test runner itself may run
            # under nohup, so the export starts with every signal at its default.
            preexec_fn=_default_signals,
        )
        deadline = time.monotonic() + 60
        while not list(out.iterdir()) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        process.send_signal(signal_number)  # one page of 300 written at most
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == code, stderr.decode()  # Ctrl-C: 128 + SIGINT, as Click ends
        assert b"Traceback" not in stderr
        assert list(out.iterdir()) == []

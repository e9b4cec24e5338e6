"""The command lines a user runs: alembic, llmtrace migrate/retention/demo, and behaviour under a non-UTC process zone.

Each runs in a child process with its own embedded directory (this test process holds its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrace.cli import main
from llmtrace.migrations import PROJECT_ROOT

BIN = Path(sys.executable).parent


def run(command: list[str], url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "LLMTRACE_DATABASE_URL": url, **env},
    )


def test_alembic_command_line_round_trip(tmp_path: Path) -> None:
    alembic = str(BIN / "alembic")
    script = f"{alembic} upgrade head && {alembic} downgrade base && {alembic} upgrade head && {alembic} check"
    result = run(["bash", "-c", script], f"chdb:///{tmp_path / 'db'}")
    assert result.returncode == 0, result.stderr
    assert "Running upgrade  -> 0001" in result.stderr
    assert "Running downgrade 0001 -> " in result.stderr
    assert "No new upgrade operations detected." in result.stdout


def test_llmtrace_demo_runs_the_main_job(tmp_path: Path) -> None:
    result = run(
        [str(BIN / "llmtrace"), "demo", "--traces", "500", "--seed", "1"],
        f"chdb:///{tmp_path / 'db'}",
        TTY_INTERACTIVE="1",  # show the progress bar although stderr is a pipe
    )
    assert result.returncode == 0, result.stderr
    assert "Wrote 500 traces" in result.stdout
    assert "write 500 traces (add_many)" in result.stdout
    assert "writing traces" in result.stderr  # the progress bar
    assert "500/500" in result.stderr


def test_llmtrace_migrate_takes_the_url_before_or_after_the_command(tmp_path: Path) -> None:
    wrong = "postgresql://user:secret@db/app"
    for arguments in (
        ["--url", f"chdb:///{tmp_path / 'a'}", "migrate"],
        ["migrate", "--url", f"chdb:///{tmp_path / 'b'}"],
    ):
        result = run([str(BIN / "llmtrace"), *arguments], wrong)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Schema is at the newest revision.\n"


def test_llmtrace_migrate_refuses_a_wrong_topology(tmp_path: Path) -> None:
    result = run([str(BIN / "llmtrace"), "migrate", "--topology", "cluster:"], f"chdb:///{tmp_path / 'db'}")
    assert result.returncode == 1
    assert result.stderr.startswith("llmtrace: ") and "--topology" in result.stderr
    assert "Traceback" not in result.stderr


def test_llmtrace_retention_sets_and_shows_it_and_alembic_check_stays_clean(tmp_path: Path) -> None:
    llmtrace, alembic = BIN / "llmtrace", BIN / "alembic"
    script = (
        f"{llmtrace} migrate && {llmtrace} retention && {llmtrace} retention --rows-days 90 --payload-days 30 && "
        f"{llmtrace} retention && {alembic} check && {llmtrace} retention --rows-days none --payload-days 7"
    )
    result = run(["bash", "-c", script], f"chdb:///{tmp_path / 'db'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "Traces: kept; payloads: kept.",
        "Traces: dropped after 90 days; payloads: emptied after 30 days.",
        "Traces: dropped after 90 days; payloads: emptied after 30 days.",
        "No new upgrade operations detected.",
        "Traces: kept; payloads: emptied after 7 days.",
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--rows-days", "90"], "give both --rows-days and --payload-days"),
        (["--rows-days", "ninety", "--payload-days", "none"], "--rows-days takes a whole number of days or none"),
        (["--rows-days", "30", "--payload-days", "60"], "payload_days=60 is longer than rows_days=30"),
        (["--rows-days", "0", "--payload-days", "none"], "rows_days must be between 1 and"),
    ],
)
def test_llmtrace_retention_refuses_bad_days_before_opening_anything(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", "chdb:////nonexistent/never-opened", "retention", *arguments]) == 1
    assert capsys.readouterr().err.startswith(f"llmtrace: {message}")
    assert not Path("/nonexistent/never-opened").exists()


def test_llmtrace_reports_configuration_errors_without_a_traceback() -> None:
    result = run([str(BIN / "llmtrace"), "migrate"], "postgresql://user:secret@db/app")
    assert result.returncode == 1
    assert result.stderr.startswith("llmtrace: Unsupported database URL scheme 'postgresql'")
    assert len(result.stderr.splitlines()) == 1
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_help() -> None:
    for command in ([], ["usage"], ["traces"], ["import"], ["export"], ["doctor"], ["migrate"], ["demo"]):
        result = run([str(BIN / "llmtrace"), *command, "--help"], "")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Usage: llmtrace")
        assert "--url" in result.stdout


NON_UTC_ROUND_TRIP = """
import sys
from datetime import datetime, timezone, timedelta
from llmtrace import TraceRepository, get_engine
from llmtrace.migrations import upgrade
from tests.factories import make_trace
engine = get_engine(sys.argv[1])
upgrade(engine)
repository = TraceRepository(engine)
traces = [
    make_trace(1, created_at=datetime(2026, 3, 29, 1, 30, 0, 123456)),
    make_trace(2, created_at=datetime(2026, 7, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7)))),
]
repository.add_many(traces)
assert [repository.get("org-1", t.id) for t in traces] == traces, "round trip changed the instant"
page = repository.list("org-1", since=datetime(2026, 7, 2, 6, 59, 59, 999999), limit=5)
assert [t.id for t in page.items] == [traces[1].id], page.items
print("ok")
"""


def test_round_trip_is_exact_when_the_process_zone_is_not_utc(tmp_path: Path) -> None:
    result = run([sys.executable, "-c", NON_UTC_ROUND_TRIP, f"chdb:///{tmp_path / 'db'}"], "", TZ="America/New_York")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

"""``llmtrace doctor``: one OK/WARN/FAIL line per check with what to do, and exit code 1 on a FAIL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from llmtrace import ALL_ORGANIZATIONS, ConfigurationError, TraceRepository, get_engine
from llmtrace.cli import main
from llmtrace.doctor import Status, diagnose
from llmtrace.migrations import PROJECT_ROOT, alembic_config, upgrade
from llmtrace.retention import Retention, set_retention
from llmtrace.rollup import ROLLUPS
from llmtrace.spool import Quarantine, Spool
from tests.cli_support import BIN, llmtrace, repository_call
from tests.conftest import embedded_url
from tests.factories import make_trace

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def lines_of(output: str) -> dict[str, str]:
    """The report's lines by check name (advice lines, which start with spaces, joined to their check's)."""
    checks: dict[str, str] = {}
    last = ""
    for line in output.splitlines():
        if line.startswith(" "):
            checks[last] += "\n" + line.strip()
        else:
            status, last, found = line.split(maxsplit=2)
            checks[last] = f"{status} {found}"
    return checks


def test_an_unmigrated_database_fails_and_says_to_migrate(tmp_path: Path) -> None:
    result = llmtrace("doctor", url=f"chdb:///{tmp_path / 'db'}")
    assert result.returncode == 1, result
    checks = lines_of(result.stdout)
    assert checks["connection"].startswith("OK embedded engine (chDB, ClickHouse 26.")
    assert f"data directory {tmp_path / 'db'}, database default" in checks["connection"]
    assert checks["schema"] == (
        "FAIL not migrated: the database has no llmtrace schema\n"
        "-> run `llmtrace migrate` (or `alembic upgrade head`) to create the traces table"
    )
    assert list(checks) == ["connection", "schema"]


@pytest.fixture
def populated(tmp_path: Path) -> str:
    url = f"chdb:///{tmp_path / 'db'}?database=traces"
    assert repository_call(url, tmp_path, "add", traces=[make_trace(i) for i in range(300)]) == 300
    return url


def test_a_healthy_database_passes_with_its_numbers(populated: str) -> None:
    result = llmtrace("doctor", url=populated)
    assert result.returncode == 0, result
    checks = lines_of(result.stdout)
    assert list(checks) == ["connection", "schema", "drift", "table", "parts", "mutations", "retention", "rollup"]
    assert all(line.startswith("OK ") for line in checks.values()), checks
    assert checks["schema"] == f"OK at the newest revision ({HEAD})"
    assert checks["table"].startswith("OK llm_traces: 300 rows, ")
    assert "on disk (" in checks["table"] and "compression " in checks["table"]
    assert checks["parts"].startswith("OK 1 active parts in 1 partitions")
    assert checks["mutations"] == "OK none pending"
    assert checks["retention"] == "OK traces kept for ever; payloads kept for ever"
    assert checks["rollup"] == "OK daily and hourly in step with the traces (300)"


def test_a_rollup_out_of_step_and_a_retention_show(populated: str, tmp_path: Path) -> None:
    repository_call(
        populated,
        tmp_path,
        "execute",
        statements=["INSERT INTO llm_usage_hourly SELECT * FROM llm_usage_hourly LIMIT 1"],
        settings={"insert_deduplicate": 0},
    )
    assert llmtrace("retention", "--rows-days", "400", "--payload-days", "30", url=populated).returncode == 0
    result = llmtrace("doctor", url=populated)
    checks = lines_of(result.stdout)
    assert result.returncode == 0, result  # warnings do not fail the check
    assert checks["retention"] == "OK traces dropped after 400 days; payloads emptied after 30 days"
    assert checks["rollup"].startswith("WARN counts ") and "the table holds 300" in checks["rollup"]
    assert "rebuild_rollup()" in checks["rollup"]


def test_drift_and_a_failing_mutation_fail(populated: str, tmp_path: Path) -> None:
    repository_call(
        populated,
        tmp_path,
        "execute",
        statements=[
            "ALTER TABLE llm_traces ADD COLUMN colour String",
            # A mutation that can never finish: throwIf fails on every row.
            "ALTER TABLE llm_traces DELETE WHERE throwIf(latency_ms >= 0, 'stuck on purpose')",
        ],
        settings={"mutations_sync": 0},
    )
    result = llmtrace("doctor", url=populated)
    assert result.returncode == 1, result
    checks = lines_of(result.stdout)
    assert checks["drift"].startswith("FAIL the table differs from the model: ")
    assert "colour" in checks["drift"] and "alembic revision --autogenerate" in checks["drift"]
    assert checks["mutations"].startswith("FAIL 1 pending since ")
    assert "stuck on purpose" in checks["mutations"] and "KILL MUTATION" in checks["mutations"]


def test_a_database_behind_the_newest_revision_fails(tmp_path: Path) -> None:
    url = f"chdb:///{tmp_path / 'db'}"
    downgrade = subprocess.run(
        ["bash", "-c", f"{BIN / 'alembic'} upgrade 0002"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LLMTRACE_DATABASE_URL": url},
    )
    assert downgrade.returncode == 0, downgrade.stderr
    result = llmtrace("doctor", url=url)
    assert result.returncode == 1
    assert lines_of(result.stdout)["schema"] == (
        f"FAIL at revision 0002, behind the newest ({HEAD})\n-> run `llmtrace migrate`"
    )


def test_spool_backlog_and_quarantine(populated: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    mine = Spool(spool_dir, destination="traces.llm_traces")
    mine.append([make_trace(i) for i in range(5)])
    mine.rotate()
    other = Spool(spool_dir, destination="elsewhere.llm_traces")
    other.append([make_trace(9)])
    other.rotate()
    result = llmtrace("doctor", "--spool-dir", str(spool_dir), url=populated)
    assert result.returncode == 0, result
    spool = lines_of(result.stdout)["spool"]
    assert spool.startswith(f"OK {spool_dir}: 1 file(s) waiting for traces.llm_traces, 1 for other databases, ")

    old = time.time() - 3600
    for path in spool_dir.glob("*.spool"):
        os.utime(path, (old, old))
    spool = lines_of(llmtrace("doctor", "--spool-dir", str(spool_dir), url=populated).stdout)["spool"]
    assert spool.startswith("WARN ") and "no writer has replayed them lately" in spool

    Quarantine(spool_dir).add({"reason": "rejected by ClickHouse"})
    result = llmtrace("doctor", "--spool-dir", str(spool_dir), url=populated)
    assert result.returncode == 0  # a warning is not a failure
    spool = lines_of(result.stdout)["spool"]
    assert spool.startswith("WARN ") and "1 quarantine entry" in spool and "quarantine.jsonl" in spool


@pytest.mark.parametrize(
    ("url", "found"),
    [
        ("postgresql://user:secret@db/app", "Unsupported database URL scheme 'postgresql'"),
        ("clickhousedb://default:secret@127.0.0.1:9/traces", "127.0.0.1:9"),
    ],
)
def test_no_connection_fails(url: str, found: str) -> None:
    result = llmtrace("doctor", url=url)
    assert result.returncode == 1
    checks = lines_of(result.stdout)
    assert list(checks) == ["connection"]
    assert checks["connection"].startswith("FAIL ") and found in checks["connection"]
    assert "secret" not in result.stdout


def test_a_data_directory_held_by_another_process_fails_with_its_pid(tmp_path: Path) -> None:
    url = f"chdb:///{tmp_path / 'db'}"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from llmtrace import get_engine; get_engine({url!r}); print('ready', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        result = llmtrace("doctor", url=url)
    finally:
        holder.communicate("\n", timeout=60)
    assert result.returncode == 1
    connection = lines_of(result.stdout)["connection"]
    assert connection.startswith(f"FAIL The embedded ClickHouse data directory {tmp_path / 'db'} is in use by another")
    assert f"(pid {holder.pid})" in connection


def spool_line(url: str, spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The spool check of ``llmtrace doctor --spool-dir``, run in this process."""
    main(["doctor", "--url", url, "--spool-dir", str(spool_dir)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err == "", captured.err
    return lines_of(captured.out)["spool"]


def test_a_quarantine_that_cannot_be_read_is_a_warning(
    chdb_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = embedded_url(chdb_dir, "doctor_spool")  # not migrated: the spool is checked all the same
    in_the_way = tmp_path / "file-in-the-way"
    (in_the_way / "quarantine").parent.mkdir()
    (in_the_way / "quarantine").write_text("not a directory")
    spool = spool_line(url, in_the_way, capsys)
    quarantine = in_the_way / "quarantine" / "quarantine.jsonl"
    assert spool.startswith(
        f"WARN {in_the_way}: 0 file(s) waiting for doctor_spool.llm_traces; the quarantine cannot be read "
        f"({quarantine}: Not a directory)"
    ), spool
    assert "-> make it a directory" in spool

    directory_in_the_way = tmp_path / "directory-in-the-way"
    (directory_in_the_way / "quarantine" / "quarantine.jsonl").mkdir(parents=True)
    spool = spool_line(url, directory_in_the_way, capsys)
    assert spool.startswith("WARN ") and "the quarantine cannot be read" in spool and "Is a directory" in spool


def test_spool_files_that_cannot_be_replayed_are_counted(
    chdb_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = embedded_url(chdb_dir, "doctor_spool")
    spool_dir = tmp_path / "spool"
    mine = Spool(spool_dir, destination="doctor_spool.llm_traces")
    mine.append([make_trace(i) for i in range(3)])
    mine.rotate()
    [damaged] = spool_dir.glob("*.spool")
    data = bytearray(damaged.read_bytes())
    data[20] ^= 0xFF  # in the header's body: its checksum no longer matches
    damaged.write_bytes(bytes(data))
    (spool_dir / "notes.spool").write_text("not a spool file at all")
    spool = spool_line(url, spool_dir, capsys)
    assert spool == (
        f"WARN {spool_dir}: 0 file(s) waiting for doctor_spool.llm_traces; 1 with a damaged header, "
        "1 not a spool file\n"
        "-> the traces of a file with a damaged header cannot be replayed: a writer's replay moves it to the "
        "quarantine, for a person to look at"
    )


@pytest.mark.parametrize(
    "url", ["clickhousedb://default:secret@127.0.0.1:eighty/traces", "clickhousedb://default:secret@[::1/traces"]
)
def test_a_url_with_a_malformed_host_or_port_is_a_failed_check_and_an_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--url", url]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    connection = lines_of(out)["connection"]
    assert connection.startswith("FAIL Cannot parse the database URL 'clickhousedb://default:***@")
    assert "secret" not in out
    assert main(["usage", "--org", "org-1", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmtrace: Cannot parse the database URL") and len(err.splitlines()) == 1


def test_a_hand_made_ttl_and_a_missing_rollup_are_warnings(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = get_engine(database_url)
    upgrade(engine)

    def doctor(*statements: str) -> dict[str, str]:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
        code = main(["doctor", "--url", database_url])
        checks = lines_of(capsys.readouterr().out)
        assert code == 0, checks  # warnings only
        return checks

    checks = doctor(
        "ALTER TABLE llm_traces MODIFY TTL toDateTime(created_at) + INTERVAL 30 DAY DELETE WHERE is_error",
        "DROP TABLE llm_usage_daily_mv",
        "DROP TABLE llm_usage_daily",
    )
    assert checks["retention"].startswith("WARN ") and "remove that TTL" in checks["retention"]
    assert checks["rollup"] == (
        "WARN no daily rollup: reports it would answer read slower sources\n-> run `llmtrace migrate`"
    )
    checks = doctor("DROP TABLE llm_usage_hourly_mv", "DROP TABLE llm_usage_hourly")
    assert checks["rollup"] == (
        "WARN no daily or hourly rollup: every report scans the traces\n-> run `llmtrace migrate`"
    )


@pytest.mark.parametrize("days", [0, 20_000])
def test_a_hand_made_ttl_of_days_llmtrace_refuses_is_a_warning_not_a_traceback(
    database_url: str, migrated_engine: Engine, days: int
) -> None:
    # The form llmtrace writes, with a number of days set_retention would refuse.
    with migrated_engine.connect() as connection:
        connection.execute(text(f"ALTER TABLE llm_traces MODIFY TTL created_at + INTERVAL {days} DAY"))
    checks = {check.name: check for check in diagnose(database_url)}
    assert checks["retention"].status is Status.WARN and "remove that TTL" in (checks["retention"].advice or "")
    assert checks["rollup"].status is Status.OK, checks["rollup"]  # compared whole, as without a retention of ours
    with pytest.raises(ConfigurationError, match="toIntervalDay"):
        TraceRepository(migrated_engine).usage(ALL_ORGANIZATIONS)


def test_the_rollup_check_compares_only_the_days_the_retention_keeps_whole(
    database_url: str, migrated_engine: Engine
) -> None:
    repository = TraceRepository(migrated_engine)
    now = datetime.now(UTC)
    repository.add_many([make_trace(i, created_at=now - timedelta(days=2, minutes=i)) for i in range(20)])
    repository.add_many([make_trace(100 + i, created_at=now - timedelta(days=60, minutes=i)) for i in range(10)])
    with migrated_engine.connect() as connection:
        # Expired traces leave the table before the rollups' rows for their days (here all at once, as a TTL
        # merge of the traces' part would): the rollups' TTL merges are held back so that the rows stay.
        for rollup in ROLLUPS:
            connection.execute(text(f"SYSTEM STOP TTL MERGES {rollup.table}"))
        set_retention(migrated_engine, rows_days=30, payload_days=None)
        connection.execute(
            text("ALTER TABLE llm_traces DELETE WHERE created_at < now() - INTERVAL 40 DAY"),
            execution_options={"settings": {"mutations_sync": 2}},
        )
    (rollup_check,) = [check for check in diagnose(database_url) if check.name == "rollup"]
    assert rollup_check.status is Status.OK, rollup_check
    # The first whole day after the cutoff, as the check's own clock saw it (this test may straddle midnight).
    first_days = {Retention(rows_days=30).first_whole_day(moment) for moment in (now, datetime.now(UTC))}
    assert rollup_check.found in {
        f"daily and hourly in step with the traces since {day:%Y-%m-%d} (the first day the retention keeps whole) (20)"
        for day in first_days
    }

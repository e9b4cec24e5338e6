"""Health checks of a trace database and a writer's spool: each an OK, WARN or FAIL line with what to do.

The checks, in order, each run only when the ones it needs passed: the connection and engine; the schema's
revision and drift from the model (``alembic check``); the traces table's rows, size on disk, compression and
parts; its pending mutations; a spool directory's backlog and quarantine. Every FAIL is something that stops
traces from being written or read; every WARN something that will, or that needs a person, if left alone.
"""

from __future__ import annotations

import contextlib
import enum
import io
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url

from llmtrace.engine import EMBEDDED_SCHEME, driver_client, get_engine, is_embedded, parse_embedded_url, resolve_url
from llmtrace.errors import ConfigurationError, LLMTraceError, database_errors
from llmtrace.migrations import alembic_config
from llmtrace.record import TABLE_NAME
from llmtrace.retention import RETAINED_TABLES, read_retention, read_row_retention
from llmtrace.rollup import ROLLUPS, existing
from llmtrace.spool import QUARANTINE_DIRECTORY, QUARANTINE_FILE, SUFFIX
from llmtrace.spool_format import NotASpoolFile, read_file_header
from llmtrace.topology import SINGLE, Topology, deployed

VERSION_TABLE = "alembic_version"
# A partition with more active parts than this share of parts_to_delay_insert is close to slowed-down inserts.
PARTS_WARNING_SHARE = 0.5
# A spool file older than this has waited through several replay intervals (30 s by default).
STALE_SPOOL_SECONDS = 600.0


class Status(enum.StrEnum):
    """How a check came out."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, and what to do about it (if anything)."""

    status: Status
    name: str
    found: str
    advice: str = ""


def diagnose(url: str | None, *, spool_dir: Path | None = None) -> Iterator[Check]:
    """Run every check against the database at ``url`` (and ``spool_dir``, if given), yielding each as it ends."""
    database_checks = _database_checks(url)
    destination = yield from database_checks
    if spool_dir is not None:
        yield spool_check(spool_dir, destination=destination)


def _database_checks(url: str | None) -> Generator[Check, None, str | None]:
    """The database's checks; returns its spool destination (``database.table``)."""
    raw = resolve_url(url)
    try:
        engine = get_engine(url)
    except LLMTraceError as exc:
        yield Check(Status.FAIL, "connection", str(exc), "fix the URL (--url or LLMTRACE_DATABASE_URL)")
        return _destination_of(raw)
    connected = False
    try:
        with database_errors("checking the database"), engine.connect() as connection:
            client = driver_client(connection)
            yield _engine_check(engine, client, raw)
            connected = True
            revision = yield from _schema_checks(connection, client)
            if revision:
                topology = (SINGLE if is_embedded(engine) else deployed(client)) or SINGLE
                yield from _table_checks(client, topology)
                yield _retention_check(client, topology)
                yield _rollup_check(connection, client, topology)
    except LLMTraceError as exc:
        if connected:
            yield Check(Status.FAIL, "database", str(exc), "see the error; run `llmtrace doctor` again once fixed")
        else:
            yield Check(
                Status.FAIL,
                "connection",
                str(exc),
                "check that the server is up and reachable, and the URL's host, port and credentials",
            )
    return f"{engine.url.database or 'default'}.{TABLE_NAME}"


def _destination_of(raw: str) -> str | None:
    with contextlib.suppress(Exception):
        parsed = make_url(raw)
        if parsed.drivername == EMBEDDED_SCHEME:
            return f"{parse_embedded_url(parsed).database}.{TABLE_NAME}"
        return f"{parsed.database or 'default'}.{TABLE_NAME}"
    return None


def _engine_check(engine: Engine, client: Any, raw: str) -> Check:
    version = client.query("SELECT version()").result_rows[0][0]
    database = client.query("SELECT currentDatabase()").result_rows[0][0]
    if is_embedded(engine):
        target = parse_embedded_url(make_url(raw))
        where = f"embedded engine (chDB, ClickHouse {version}), data directory {target.directory}, database {database}"
    else:
        url = engine.url
        where = f"ClickHouse server {version} at {url.host}:{url.port or 8123}, database {database}"
    return Check(Status.OK, "connection", where)


def _schema_checks(connection: Connection, client: Any) -> Generator[Check, None, str | None]:
    """Revision and drift; returns the database's revision, or ``None`` when it has none."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    exists = client.query(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = %(table)s",
        parameters={"table": VERSION_TABLE},
    ).result_rows[0][0]
    revisions = (
        [row[0] for row in client.query(f"SELECT version_num FROM {VERSION_TABLE}").result_rows] if exists else []
    )
    if not revisions:
        yield Check(
            Status.FAIL,
            "schema",
            "not migrated: the database has no llmtrace schema",
            "run `llmtrace migrate` (or `alembic upgrade head`) to create the traces table",
        )
        return None
    revision = str(revisions[0])
    known = ScriptDirectory.from_config(alembic_config())
    if len(revisions) > 1:
        yield Check(
            Status.FAIL, "schema", f"several revisions recorded: {', '.join(revisions)}", "inspect alembic_version"
        )
        return revision
    if revision != head:
        try:
            known.get_revision(revision)
        except CommandError:
            yield Check(
                Status.FAIL,
                "schema",
                f"at revision {revision}, which this llmtrace does not know (its newest is {head})",
                "upgrade llmtrace to the release that wrote this schema",
            )
            return revision
        yield Check(
            Status.FAIL, "schema", f"at revision {revision}, behind the newest ({head})", "run `llmtrace migrate`"
        )
        return revision
    yield Check(Status.OK, "schema", f"at the newest revision ({head})")
    yield _drift_check(connection)
    return revision


def _drift_check(connection: Connection) -> Check:
    config = alembic_config(connection)
    # alembic check prints "No new upgrade operations detected." on success; the report says it in its own words.
    config.stdout = io.StringIO()
    try:
        command.check(config)
    except CommandError as exc:
        return Check(
            Status.FAIL,
            "drift",
            f"the table differs from the model: {exc}",
            "someone altered it by hand: undo that, or write a migration for it (`alembic revision --autogenerate`)",
        )
    return Check(Status.OK, "drift", "the table matches the model (alembic check)")


_PARTS = """
SELECT count(), uniqExact(partition), sum(rows), sum(bytes_on_disk), sum(data_compressed_bytes),
       sum(data_uncompressed_bytes)
FROM system.parts WHERE database = currentDatabase() AND table = %(table)s AND active
"""
_MOST_PARTS = """
SELECT partition, count() AS parts FROM system.parts
WHERE database = currentDatabase() AND table = %(table)s AND active
GROUP BY partition ORDER BY parts DESC LIMIT 1
"""
_DELAY_SETTING = "SELECT value FROM system.merge_tree_settings WHERE name = 'parts_to_delay_insert'"
_MUTATIONS = """
SELECT count(), min(create_time), anyIf(latest_fail_reason, latest_fail_reason != '')
FROM system.mutations WHERE database = currentDatabase() AND table = %(table)s AND NOT is_done
"""


def _table_checks(client: Any, topology: Topology) -> Iterator[Check]:
    table = topology.storage_table(TABLE_NAME)
    scope = " (on this host)" if topology.distributed else ""
    parameters = {"table": table}
    parts, partitions, rows, on_disk, compressed, uncompressed = client.query(
        _PARTS, parameters=parameters
    ).result_rows[0]
    ratio = f", compression {uncompressed / compressed:.1f}x" if compressed else ""
    yield Check(
        Status.OK,
        "table",
        f"{table}{scope}: {rows:,} rows, {_size(on_disk)} on disk ({_size(uncompressed)} uncompressed{ratio})",
    )
    most = client.query(_MOST_PARTS, parameters=parameters).result_rows
    delay = int(client.query(_DELAY_SETTING).result_rows[0][0])
    busiest = f"; most in one partition: {most[0][1]} ({most[0][0]})" if most else ""
    found = f"{parts} active parts in {partitions} partitions{busiest}"
    if most and most[0][1] > delay * PARTS_WARNING_SHARE:
        yield Check(
            Status.WARN,
            "parts",
            f"{found}; ClickHouse slows inserts down at {delay} parts in a partition",
            "write bigger, fewer batches (TraceWriter batch_size, add_many batch_size) and let merges catch up",
        )
    else:
        yield Check(Status.OK, "parts", found)
    pending, since, failure = client.query(_MUTATIONS, parameters=parameters).result_rows[0]
    if not pending:
        yield Check(Status.OK, "mutations", "none pending")
    elif failure:
        yield Check(
            Status.FAIL,
            "mutations",
            f"{pending} pending since {since}, failing: {failure}",
            "see system.mutations (latest_fail_reason); fix the cause or KILL MUTATION, then delete again",
        )
    else:
        yield Check(
            Status.WARN,
            "mutations",
            f"{pending} pending since {since} (deletes still rewriting parts)",
            "wait for them to finish; watch system.mutations",
        )


def _retention_check(client: Any, topology: Topology) -> Check:
    try:
        retention = read_retention(client, topology.storage_table(TABLE_NAME), RETAINED_TABLES[TABLE_NAME])
    except ConfigurationError as exc:
        return Check(
            Status.WARN, "retention", str(exc), "remove that TTL, then set retention with `llmtrace retention`"
        )
    rows = "kept for ever" if retention.rows_days is None else f"dropped after {retention.rows_days} days"
    payloads = "kept for ever" if retention.payload_days is None else f"emptied after {retention.payload_days} days"
    return Check(Status.OK, "retention", f"traces {rows}; payloads {payloads}")


def _rollup_check(connection: Connection, client: Any, topology: Topology) -> Check:
    """Whether the rollups count the traces the table holds (their views add every insert as it happens).

    With a row retention, only from the first day it keeps whole, as reports do: before that day, expired traces
    and the rollups' rows for them leave with their parts at times merges choose, not together.
    """
    found = existing(connection)
    present = [rollup for rollup in ROLLUPS if rollup.name in found]
    missing = " or ".join(rollup.name for rollup in ROLLUPS if rollup.name not in found)
    if not present:
        return Check(
            Status.WARN, "rollup", f"no {missing} rollup: every report scans the traces", "run `llmtrace migrate`"
        )
    if missing:
        return Check(Status.WARN, "rollup", f"no {missing} rollup: reports it would answer read slower sources",
                     "run `llmtrace migrate`")  # fmt: skip
    try:
        retention, now = read_row_retention(client, topology.storage_table(TABLE_NAME))
        first_day = retention.first_whole_day(now)
    except ConfigurationError:  # a TTL llmtrace did not write: the retention check reports it
        first_day = None
    parameters = {} if first_day is None else {"first_day": first_day}

    def counted(statement: str, time_column: str) -> int:
        if first_day is not None:
            statement += f" WHERE {time_column} >= {{first_day:DateTime64(6, 'UTC')}}"
        return int(client.query(statement, parameters=parameters).result_rows[0][0] or 0)

    traces = counted(f"SELECT count() FROM {TABLE_NAME}", "created_at")
    counts = {
        rollup.name: counted(f"SELECT sum(requests) FROM {rollup.table}", rollup.time_column) for rollup in present
    }
    names = " and ".join(counts)
    since = "" if first_day is None else f" since {first_day:%Y-%m-%d} (the first day the retention keeps whole)"
    if all(count == traces for count in counts.values()):
        return Check(Status.OK, "rollup", f"{names} in step with the traces{since} ({traces:,})")
    differ = ", ".join(f"{name} {count:,}" for name, count in counts.items())
    return Check(
        Status.WARN,
        "rollup",
        f"counts {differ} traces{since}, the table holds {traces:,} "
        "(a delete, an insert or an expiry may be under way)",
        "if it stays so, rebuild them: TraceRepository(engine).rebuild_rollup()",
    )


def spool_check(directory: Path, *, destination: str | None) -> Check:
    """The backlog of a spool directory: files waiting for replay (this database's and others'), and the quarantine."""
    name = "spool"
    if not directory.is_dir():
        return Check(
            Status.WARN,
            name,
            f"{directory} does not exist (nothing was ever spooled there, or this is not the writer's spool_dir)",
            "pass the spool_dir of the TraceWriter",
        )
    try:
        paths = list(directory.iterdir())
    except OSError as exc:
        return Check(
            Status.FAIL,
            name,
            f"{directory} cannot be read ({exc.strerror or exc})",
            "give the writers, and the user running doctor, access to it",
        )
    mine = others = damaged = foreign = 0
    size = 0
    oldest: float | None = None
    for path in paths:
        if not path.name.endswith(SUFFIX) or path.name.startswith(".") or not path.is_file():
            continue
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                header, _ = read_file_header(handle.fileno())
        except NotASpoolFile as exc:
            # Replay moves a file whose header is damaged to the quarantine (its traces' destination is unknown),
            # removes an empty one and leaves a foreign one alone.
            if exc.ours:
                damaged += 1
            elif stat.st_size:
                foreign += 1
            continue
        except OSError:
            continue
        size += stat.st_size
        oldest = stat.st_mtime if oldest is None else min(oldest, stat.st_mtime)
        if header.destination in (None, destination):
            mine += 1
        else:
            others += 1
    found = f"{directory}: {mine} file(s) waiting for {destination or 'this database'}"
    if others:
        found += f", {others} for other databases"
    if mine or others:
        age = time.time() - (oldest or time.time())
        found += f", {_size(size)}, oldest {age:,.0f} s old"
    unreplayable = [f"{damaged} with a damaged header"] if damaged else []
    unreplayable += [f"{foreign} not a spool file"] if foreign else []
    if unreplayable:
        found += "; " + ", ".join(unreplayable)
    quarantine = directory / QUARANTINE_DIRECTORY / QUARANTINE_FILE
    try:
        quarantined = _lines(quarantine)
    except OSError as exc:
        return Check(
            Status.WARN,
            name,
            f"{found}; the quarantine cannot be read ({quarantine}: {exc.strerror or exc})",
            "make it a directory the writers can write to: replay sets aside there what it must not retry forever",
        )
    if quarantined:
        found += f"; {quarantined} quarantine entr{'y' if quarantined == 1 else 'ies'}"
        return Check(Status.WARN, name, found, f"traces set aside need a person: read {quarantine}")
    if damaged:
        return Check(
            Status.WARN,
            name,
            found,
            "the traces of a file with a damaged header cannot be replayed: a writer's replay moves it to the "
            "quarantine, for a person to look at",
        )
    if mine and time.time() - (oldest or time.time()) > STALE_SPOOL_SECONDS:
        return Check(
            Status.WARN,
            name,
            found,
            "no writer has replayed them lately: start a TraceWriter with this spool_dir against this database",
        )
    return Check(Status.OK, name, found)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except FileNotFoundError:
        return 0


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def report_status(checks: list[Check]) -> Status:
    """The worst status of the checks."""
    order = [Status.OK, Status.WARN, Status.FAIL]
    return max((check.status for check in checks), key=order.index, default=Status.OK)

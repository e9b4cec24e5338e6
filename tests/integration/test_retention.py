"""Retention on the embedded engine: TTLs set, read back and removed; which rows and payloads go, and when.

Traces are written with ``created_at`` in the past, before the retention is set (``add_many`` refuses traces
already past it), then the TTL is materialized explicitly and the parts are read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from llmtrace import (
    ConfigurationError,
    Retention,
    SchemaNotMigratedError,
    TraceRepository,
    get_retention,
    set_retention,
)
from llmtrace.ddl import SchemaDDL
from llmtrace.migrations import check
from llmtrace.retention import TTL_SETTINGS, retention_statements
from llmtrace.topology import Topology
from tests.factories import make_trace
from tests.integration.test_topologies import CLUSTER, formatted

PAYLOADS = ("request_json", "response_json", "llm_config_json")
SETTLE_SECONDS = 60


def month_start(now: datetime, months_back: int) -> datetime:
    """Midnight UTC of the first day of the month ``months_back`` before ``now``'s."""
    year, month = divmod(now.year * 12 + now.month - 1 - months_back, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


def scalar(engine: Engine, sql: str) -> object:
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar_one()


def materialize_ttl(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("ALTER TABLE llm_traces MATERIALIZE TTL SETTINGS mutations_sync = 2"))


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"after {SETTLE_SECONDS} s, still not: {what}"
        time.sleep(0.1)


def stored_ids(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(text("SELECT id FROM llm_traces")).scalars())


def table_definition(engine: Engine) -> str:
    return str(
        scalar(
            engine,
            "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'llm_traces'",
        )
    )


class Ages:
    """Traces at chosen ages: a month entirely past the row retention, a month it cuts in two, recent traces.

    The row retention is chosen so that its cutoff falls on the 15th of the month before last, whatever today is.
    """

    def __init__(self, now: datetime) -> None:
        cut_month, old_month = month_start(now, 2), month_start(now, 4)
        self.rows_days = (now - (cut_month + timedelta(days=14))).days
        self.payload_days = 2
        at = {
            "old-a": old_month + timedelta(days=2),
            "old-b": old_month + timedelta(days=20),
            "cut-expired": cut_month + timedelta(days=4),
            "cut-kept": cut_month + timedelta(days=24),
            "three-days": now - timedelta(days=3),
            "one-hour": now - timedelta(hours=1),
        }
        self.traces = {
            name: make_trace(index, id=name, created_at=moment, llm_config_json='{"temperature": 0.2}')
            for index, (name, moment) in enumerate(at.items())
        }


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    return TraceRepository(migrated_engine)


def test_a_new_table_has_no_retention(migrated_engine: Engine) -> None:
    assert get_retention(migrated_engine) == Retention(rows_days=None, payload_days=None)


def test_row_retention_drops_whole_expired_parts_and_leaves_a_part_it_cuts(
    migrated_engine: Engine, repository: TraceRepository
) -> None:
    ages = Ages(datetime.now(UTC))
    repository.add_many(list(ages.traces.values()))  # one part per month
    set_retention(migrated_engine, rows_days=ages.rows_days, payload_days=None)
    materialize_ttl(migrated_engine)

    # The month wholly past the cutoff goes as a part; the month the cutoff cuts is one part with a live row,
    # so it stays whole (ttl_only_drop_parts): its expired row outlives the retention until the part is rewritten.
    wait_until(lambda: "old-a" not in stored_ids(migrated_engine), "the expired month dropped")
    assert stored_ids(migrated_engine) == {"cut-expired", "cut-kept", "three-days", "one-hour"}
    payloads = scalar(migrated_engine, "SELECT countIf(request_json = '') FROM llm_traces")
    assert payloads == 0

    # Any rewrite of that part (here a merge forced by hand) removes the expired row with it.
    with migrated_engine.connect() as connection:
        connection.execute(text("OPTIMIZE TABLE llm_traces FINAL"))
    assert stored_ids(migrated_engine) == {"cut-kept", "three-days", "one-hour"}


def test_payload_retention_empties_payloads_and_keeps_everything_else(
    migrated_engine: Engine, repository: TraceRepository
) -> None:
    ages = Ages(datetime.now(UTC))
    repository.add_many(list(ages.traces.values()))
    set_retention(migrated_engine, rows_days=ages.rows_days, payload_days=ages.payload_days)
    materialize_ttl(migrated_engine)

    # Background TTL merges rewrite the parts holding expired payloads; the rewrite also removes expired rows.
    def settled() -> bool:
        return scalar(migrated_engine, "SELECT countIf(request_json = '') FROM llm_traces") == 2 and stored_ids(
            migrated_engine
        ) == {"cut-kept", "three-days", "one-hour"}

    wait_until(settled, "payloads older than 2 days emptied and expired rows gone")
    emptied = {name: trace.model_copy(update=dict.fromkeys(PAYLOADS, "")) for name, trace in ages.traces.items()}
    # Read back exactly as stored: payloads '', sizes, tokens, latency and every other field as written.
    assert repository.get("org-1", "cut-kept") == emptied["cut-kept"]
    assert repository.get("org-1", "three-days") == emptied["three-days"]
    assert repository.get("org-1", "one-hour") == ages.traces["one-hour"]
    kept = repository.get("org-1", "three-days")
    assert kept.request_size_bytes == ages.traces["three-days"].request_size_bytes > 0
    usage = repository.usage("org-1", group_by=("model",))
    assert sum(row.requests for row in usage) == 3
    assert sum(row.request_bytes for row in usage) == sum(
        ages.traces[name].request_size_bytes for name in ("cut-kept", "three-days", "one-hour")
    )


def test_retention_reads_back_and_a_repeated_call_alters_nothing(migrated_engine: Engine) -> None:
    for rows_days, payload_days in [(90, 30), (90, 90), (90, None), (None, 14), (365, 14)]:
        applied = set_retention(migrated_engine, rows_days=rows_days, payload_days=payload_days)
        assert applied == get_retention(migrated_engine) == Retention(rows_days, payload_days)
    before = table_definition(migrated_engine)
    mutations = scalar(
        migrated_engine,
        "SELECT count() FROM system.mutations WHERE database = currentDatabase() AND table = 'llm_traces'",
    )
    set_retention(migrated_engine, rows_days=365, payload_days=14)
    assert table_definition(migrated_engine) == before
    assert scalar(
        migrated_engine,
        "SELECT count() FROM system.mutations WHERE database = currentDatabase() AND table = 'llm_traces'",
    ) == (mutations)


def test_removing_retention_restores_the_migrated_table(migrated_engine: Engine) -> None:
    migrated = table_definition(migrated_engine)
    set_retention(migrated_engine, rows_days=30, payload_days=7)
    definition = table_definition(migrated_engine)
    assert "TTL created_at + toIntervalDay(30) SETTINGS" in definition
    assert definition.count("CODEC(ZSTD(3)) TTL created_at + toIntervalDay(7)") == 3
    assert all(f"{name} = {value}" in definition for name, value in TTL_SETTINGS.items())
    set_retention(migrated_engine, rows_days=None, payload_days=None)
    assert table_definition(migrated_engine) == migrated
    assert get_retention(migrated_engine) == Retention()


@pytest.mark.parametrize("retention", [Retention(30, 7), Retention(30), Retention(None, 7)])
def test_alembic_check_stays_clean_with_retention_set(migrated_engine: Engine, retention: Retention) -> None:
    set_retention(migrated_engine, rows_days=retention.rows_days, payload_days=retention.payload_days)
    check(migrated_engine)
    set_retention(migrated_engine, rows_days=None, payload_days=None)
    check(migrated_engine)


def test_without_materializing_existing_parts_keep_their_rows(
    migrated_engine: Engine, repository: TraceRepository
) -> None:
    ages = Ages(datetime.now(UTC))
    repository.add_many(list(ages.traces.values()))
    set_retention(migrated_engine, rows_days=ages.rows_days, payload_days=ages.payload_days, materialize=False)
    assert (
        scalar(
            migrated_engine,
            "SELECT count() FROM system.mutations WHERE database = currentDatabase() AND table = 'llm_traces'",
        )
        == 0
    )
    time.sleep(1)  # long enough for the merges that follow a materialization here (see the tests above)
    assert stored_ids(migrated_engine) == set(ages.traces)
    assert scalar(migrated_engine, "SELECT countIf(request_json = '') FROM llm_traces") == 0


def test_a_ttl_llmtrace_did_not_write_is_reported_and_left_alone(migrated_engine: Engine) -> None:
    with migrated_engine.connect() as connection:
        connection.execute(text("ALTER TABLE llm_traces MODIFY TTL created_at + INTERVAL 1 YEAR"))
    with pytest.raises(ConfigurationError, match=r"TTL created_at \+ toIntervalYear\(1\), which llmtrace"):
        get_retention(migrated_engine)
    with pytest.raises(ConfigurationError, match="REMOVE TTL"):
        set_retention(migrated_engine, rows_days=30, payload_days=None)
    assert "toIntervalYear(1)" in table_definition(migrated_engine)
    with migrated_engine.connect() as connection:
        connection.execute(text("ALTER TABLE llm_traces REMOVE TTL"))
        connection.execute(text("ALTER TABLE llm_traces MODIFY COLUMN request_json TTL created_at + INTERVAL 3 DAY"))
    with pytest.raises(
        ConfigurationError, match=r"request_json: created_at \+ toIntervalDay\(3\); response_json: none"
    ):
        get_retention(migrated_engine)


def test_invalid_arguments_are_refused_before_anything_is_altered(migrated_engine: Engine) -> None:
    migrated = table_definition(migrated_engine)
    with pytest.raises(ValueError, match="rows_days must be between 1"):
        set_retention(migrated_engine, rows_days=0, payload_days=None)
    with pytest.raises(ValueError, match="payload_days=40 is longer than rows_days=30"):
        set_retention(migrated_engine, rows_days=30, payload_days=40)
    with pytest.raises(ValueError, match="table='llm_rollups' has no retention; the tables that do are llm_traces"):
        set_retention(migrated_engine, rows_days=30, payload_days=None, table="llm_rollups")
    with pytest.raises(TypeError, match="payload_days must be a whole number"):
        set_retention(migrated_engine, rows_days=30, payload_days="7")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="needs a ClickHouse server"):
        set_retention(migrated_engine, rows_days=30, payload_days=None, topology=f"cluster:{CLUSTER}")
    assert table_definition(migrated_engine) == migrated


def test_on_an_unmigrated_database_the_error_says_how_to_create_the_table(engine: Engine) -> None:
    with pytest.raises(SchemaNotMigratedError, match=r"llm_traces table does not exist.*alembic upgrade head"):
        get_retention(engine)


def test_cluster_statements_parse_with_on_cluster_on_the_local_table(engine: Engine) -> None:
    ddl = SchemaDDL(Topology.parse(f"cluster:{CLUSTER}"), database="traces")
    transitions = [(Retention(), Retention(30, 7)), (Retention(30, 7), Retention(60)), (Retention(60), Retention())]
    rendered = [
        statement
        for current, wanted in transitions
        for statement in retention_statements(current, wanted, table="llm_traces", ddl=ddl, materialize=True)
    ]
    parsed = formatted(engine, rendered)
    assert all(
        statement.startswith(f"ALTER TABLE traces.llm_traces_local ON CLUSTER `{CLUSTER}`") for statement in parsed
    )
    kinds = [
        "MODIFY SETTING",
        "MODIFY COLUMN `request_json` TTL",
        "MODIFY TTL",
        "MATERIALIZE TTL",
        "REMOVE TTL",
        "RESET SETTING",
    ]
    assert all(any(kind in statement for statement in parsed) for kind in kinds)


ACTIVE_PARTS = "FROM system.parts WHERE database = currentDatabase() AND table = 'llm_traces' AND active"


def test_materializing_recalculates_ttl_bounds_without_rewriting_column_files(
    migrated_engine: Engine, repository: TraceRepository
) -> None:
    # Parts of more than min_bytes_for_wide_part (10 MB) keep a file per column, which a mutation can hard-link;
    # smaller (compact) parts hold every column in one file, which this engine rewrites. Here every part is wide.
    with migrated_engine.connect() as connection:
        connection.execute(text("ALTER TABLE llm_traces MODIFY SETTING min_bytes_for_wide_part = 0"))
    now = datetime.now(UTC)
    # Less than 7 days old: no TTL merge has anything to do. All in this month's partition, so in one part.
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    times = [max(now - timedelta(minutes=index), month_start) for index in range(100)]
    repository.add_many([make_trace(index, created_at=time) for index, time in enumerate(times)])
    data = (".bin", ".mrk2", ".cmrk2", ".mrk3", ".cmrk3")

    def data_files() -> dict[str, int]:
        path = str(scalar(migrated_engine, f"SELECT path {ACTIVE_PARTS}"))
        return {name: os.stat(os.path.join(path, name)).st_ino for name in os.listdir(path) if name.endswith(data)}

    before = data_files()
    set_retention(migrated_engine, rows_days=30, payload_days=7)
    materialize_ttl(migrated_engine)
    assert scalar(migrated_engine, f"SELECT countIf(delete_ttl_info_max > 0) {ACTIVE_PARTS}") == 1
    assert len(before) > 30
    assert data_files() == before  # the same files, hard-linked into the part that carries the TTL bounds

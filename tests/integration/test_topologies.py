"""One migration history, four deployment topologies.

What can be checked here, on the embedded engine and local stand-in servers:

- ``alembic upgrade head --sql`` (and the downgrade) for every topology: every statement is parsed by ClickHouse's
  own parser (``formatQuery``), and the structural facts are read from the parser's output: ``ON CLUSTER`` with
  the configured name on every DDL statement of a cluster and nowhere else, the engines, the Distributed table's
  sharding key, the deduplication settings, the version table.
- The Cloud rendering runs on the embedded engine (MergeTree with the replicated deduplication settings); the
  single topology runs end to end everywhere else in the suite.
- The version table's topology hook, online, with a real connection.
- The stored-trace lookup's external data: its encoding and query on the real engine (through ``format()``, the
  same input formats external data uses: chDB has no external data), and the request clickhouse-connect sends a
  server (to a stand-in that records it).
- Clear errors for a wrong ``LLMTRACE_TOPOLOGY`` from ``alembic``, ``llmtrace migrate`` and the Python API.

What needs a real cluster or Cloud is listed in the README ("Deployments").
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from functools import cache
from typing import Any

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from clickhouse_connect.cc_sqlalchemy.dialect import ClickHouseDialect
from sqlalchemy import Engine, text

from llmtrace import ConfigurationError, TraceRepository
from llmtrace.alter_delete import delete_statement
from llmtrace.cli import main
from llmtrace.ddl import DATABASE_OPTION, TOPOLOGY_OPTION
from llmtrace.engine import ENV_VAR, driver_client, get_engine
from llmtrace.filters import TraceFilter
from llmtrace.migrations import PROJECT_ROOT, alembic_config, check, upgrade
from llmtrace.model import LLMTrace, insert_column_data
from llmtrace.record import TRACES_TABLE
from llmtrace.stored_lookup import (
    EXTERNAL_FORMAT,
    EXTERNAL_STRUCTURE,
    STAGING_TABLE,
    BatchKeys,
    StoredTraces,
    external_keys_data,
    semi_join,
)
from llmtrace.topology import SINGLE, TOPOLOGY_ENV_VAR, Kind, ServerFacts, Topology, deployed, server_facts
from tests.factories import make_trace
from tests.fault_servers import Fault, fault_server

CLUSTER = "traces-eu"
DATABASE = "traces"
TOPOLOGIES = ["single", f"cluster:{CLUSTER}", "replicated", "cloud"]
REPLICATED_WINDOW = "replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800"
# For each topology: the engine of every table the upgrade creates, and its settings, as ClickHouse formats them.
EXPECTED_TABLES: dict[str, dict[str, tuple[str, str | None]]] = {
    "single": {
        "llm_usage_daily": ("AggregatingMergeTree", "non_replicated_deduplication_window = 10000"),
        "llm_usage_hourly": ("AggregatingMergeTree", "non_replicated_deduplication_window = 10000"),
        "llm_model_prices": ("ReplacingMergeTree(updated_at, is_deleted)", None),
        "alembic_version": ("MergeTree", None),
        "llm_traces": ("MergeTree", "non_replicated_deduplication_window = 10000"),
    },
    f"cluster:{CLUSTER}": {
        "llm_usage_daily_local": (
            "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/llm_usage_daily_local', "
            "'{replica}')",
            REPLICATED_WINDOW,
        ),
        "llm_usage_daily": (
            f"Distributed('{CLUSTER}', '{DATABASE}', 'llm_usage_daily_local', cityHash64(organization_id))",
            None,
        ),
        "llm_usage_hourly_local": (
            "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/llm_usage_hourly_local', "
            "'{replica}')",
            REPLICATED_WINDOW,
        ),
        "llm_usage_hourly": (
            f"Distributed('{CLUSTER}', '{DATABASE}', 'llm_usage_hourly_local', cityHash64(organization_id))",
            None,
        ),
        # Every host holds the whole price list: one replica group for the cluster, like the version table.
        "llm_model_prices": (
            "ReplicatedReplacingMergeTree('/clickhouse/tables/all/{database}/llm_model_prices', '{shard}-{replica}', "
            "updated_at, is_deleted)",
            None,
        ),
        "alembic_version": (
            "ReplicatedMergeTree('/clickhouse/tables/all/{database}/alembic_version', '{shard}-{replica}')",
            "replicated_deduplication_window = 0",
        ),
        "llm_traces_local": (
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/llm_traces_local', '{replica}')",
            REPLICATED_WINDOW,
        ),
        "llm_traces": (
            f"Distributed('{CLUSTER}', '{DATABASE}', 'llm_traces_local', cityHash64(organization_id, id))",
            None,
        ),
    },
    "replicated": {
        "llm_usage_daily": ("ReplicatedAggregatingMergeTree", REPLICATED_WINDOW),
        "llm_usage_hourly": ("ReplicatedAggregatingMergeTree", REPLICATED_WINDOW),
        "llm_model_prices": ("ReplicatedReplacingMergeTree(updated_at, is_deleted)", None),
        "alembic_version": ("ReplicatedMergeTree", "replicated_deduplication_window = 0"),
        "llm_traces": ("ReplicatedMergeTree", REPLICATED_WINDOW),
    },
    "cloud": {
        "llm_usage_daily": ("AggregatingMergeTree", REPLICATED_WINDOW),
        "llm_usage_hourly": ("AggregatingMergeTree", REPLICATED_WINDOW),
        "llm_model_prices": ("ReplacingMergeTree(updated_at, is_deleted)", None),
        "alembic_version": ("MergeTree", "replicated_deduplication_window = 0"),
        "llm_traces": ("MergeTree", REPLICATED_WINDOW),
    },
}
# Tables a migration fills with rows (beside the version table).
FILLED = {"llm_model_prices", "llm_usage_hourly", "llm_usage_daily"}
_STATEMENT_KINDS = (
    r"CREATE TABLE(?: IF NOT EXISTS)?|CREATE MATERIALIZED VIEW(?: IF NOT EXISTS)?|ALTER TABLE|DROP TABLE IF EXISTS|"
    r"DROP VIEW IF EXISTS|INSERT INTO|DELETE FROM"
)
_TARGET = re.compile(rf"^(?:{_STATEMENT_KINDS}) (\S+)")
_ON_CLUSTER = re.compile(r" ON CLUSTER (`[^`]+`|\S+)")
LITERAL: dict[str, Any] = {"dialect": ClickHouseDialect(), "compile_kwargs": {"literal_binds": True}}


@pytest.fixture(autouse=True)
def no_deployment_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOPOLOGY_ENV_VAR, raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)


def statements_of(script: str) -> list[str]:
    """The statements of an offline migration script, without its comments."""
    lines = [line for line in script.splitlines() if not line.startswith("--")]
    return [statement.strip() for statement in re.split(r";\s*$", "\n".join(lines), flags=re.M) if statement.strip()]


def render(revisions: str, *, topology: str | None = None, downgrade: bool = False) -> str:
    """``alembic upgrade|downgrade <revisions> --sql`` in this process, for ``topology`` (else LLMTRACE_TOPOLOGY)."""
    config = alembic_config(topology=topology)
    config.output_buffer = io.StringIO()
    # Offline, a cluster's tables are qualified with the URL's database; nothing is opened.
    config.set_main_option("sqlalchemy.url", f"clickhousedb://nobody@unreachable.invalid:8123/{DATABASE}")
    (command.downgrade if downgrade else command.upgrade)(config, revisions, sql=True)
    return config.output_buffer.getvalue()


@cache
def rendered(topology: str) -> tuple[list[str], list[str]]:
    """The upgrade from nothing and the downgrade to nothing, for ``topology`` (read from LLMTRACE_TOPOLOGY)."""
    previous = os.environ.get(TOPOLOGY_ENV_VAR)
    os.environ[TOPOLOGY_ENV_VAR] = topology
    try:
        return statements_of(render("head")), statements_of(render("head:base", downgrade=True))
    finally:
        if previous is None:
            del os.environ[TOPOLOGY_ENV_VAR]
        else:
            os.environ[TOPOLOGY_ENV_VAR] = previous


def formatted(engine: Engine, statements: list[str]) -> list[str]:
    """Each statement as ClickHouse's parser formats it (formatQuery raises on anything it cannot parse)."""
    with engine.connect() as connection:
        client = driver_client(connection)
        return [client.query("SELECT formatQuery(%(q)s)", parameters={"q": s}).result_rows[0][0] for s in statements]


def target(statement: str) -> str:
    """The table a formatted statement is about, without its database."""
    match = _TARGET.match(statement)
    assert match, statement
    return match.group(1).split(".")[-1].strip("`")


def is_version_bookkeeping(statement: str) -> bool:
    """Alembic's own rows in the version table (run where Alembic is connected, replicated by the table itself)."""
    return target(statement) == "alembic_version" and (statement.startswith("INSERT") or "DELETE WHERE" in statement)


def is_data(statement: str) -> bool:
    """Rows a migration inserts: the version table's, the default price list (replicated by its table) and the
    rollups' first filling (through the Distributed tables on a cluster)."""
    return is_version_bookkeeping(statement) or (statement.startswith("INSERT") and target(statement) in FILLED)


def line_value(statement: str, keyword: str) -> str | None:
    match = re.search(rf"^{keyword} (.+)$", statement, flags=re.M)
    return match.group(1) if match else None


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_statement_parses_and_has_the_topologys_structure(engine: Engine, topology: str) -> None:
    upgrade_sql, downgrade_sql = rendered(topology)
    parsed_upgrade, parsed_downgrade = formatted(engine, upgrade_sql), formatted(engine, downgrade_sql)
    every = parsed_upgrade + parsed_downgrade
    ddl = [statement for statement in every if not is_data(statement)]
    clustered = Topology.parse(topology).distributed

    # ON CLUSTER with the configured name on every DDL statement of a cluster, and nowhere else.
    on_cluster = [_ON_CLUSTER.findall(statement) for statement in every]
    if clustered:
        assert all(_ON_CLUSTER.findall(statement) == [f"`{CLUSTER}`"] for statement in ddl), ddl
        assert all(target(statement) in {"alembic_version", *FILLED} for statement in every if statement not in ddl)
        assert all(f" {DATABASE}." in statement.split("\n")[0] for statement in ddl)
    for statement, found in zip(every, on_cluster, strict=True):
        if not (clustered and statement in ddl):
            assert not found, statement

    # Engines, settings and the Distributed table's sharding key, as the parser reads them.
    creates = {target(s): s for s in parsed_upgrade if s.startswith("CREATE TABLE")}
    assert set(creates) == set(EXPECTED_TABLES[topology])
    for table, (engine_clause, settings) in EXPECTED_TABLES[topology].items():
        assert line_value(creates[table], "ENGINE =") == engine_clause, creates[table]
        assert line_value(creates[table], "SETTINGS") == settings, creates[table]
    distributed = sorted(table for table, s in creates.items() if "Distributed(" in s)
    assert distributed == (["llm_traces", "llm_usage_daily", "llm_usage_hourly"] if clustered else [])
    # Each rollup's view reads the table that stores what it sums (the traces; the hourly totals) and writes the
    # table that stores its totals.
    hourly, daily = [s for s in parsed_upgrade if s.startswith("CREATE MATERIALIZED VIEW")]
    suffix = "_local" if clustered else ""
    prefix = DATABASE + "." if clustered else ""
    assert f"TO {prefix}llm_usage_hourly{suffix}\n" in hourly, hourly
    assert f"FROM {prefix}llm_traces{suffix} AS t" in hourly, hourly
    assert f"TO {prefix}llm_usage_daily{suffix}\n" in daily, daily
    assert f"FROM {prefix}llm_usage_hourly{suffix} AS h" in daily, daily
    if clustered:
        assert f"AS {DATABASE}.llm_traces_local" in creates["llm_traces"]
        assert "rand" not in creates["llm_traces"]  # a deterministic key: retries reach the same shard

    # Columns reach readers through the Distributed table too, which never names a column its local table lacks;
    # indexes exist where rows are stored.
    storage = "llm_traces_local" if clustered else "llm_traces"
    for column in ("billing_plan_type", "insert_attempt"):
        adding = [target(s) for s in parsed_upgrade if f"ADD COLUMN IF NOT EXISTS `{column}`" in s]
        dropping = [target(s) for s in parsed_downgrade if f"DROP COLUMN IF EXISTS {column}" in s]
        assert adding == ([storage, "llm_traces"] if clustered else ["llm_traces"])
        assert dropping == adding[::-1]
    assert {target(s) for s in parsed_upgrade + parsed_downgrade if " INDEX " in s} == {storage}
    assert "MATERIALIZED if(startsWith(getSetting('log_comment'), 'llmtrace:')" in "".join(parsed_upgrade)

    # The downgrade removes the Distributed table before the table it reads.
    drops = [target(s) for s in parsed_downgrade if s.startswith("DROP TABLE")]
    assert drops == [
        *(["llm_usage_daily", "llm_usage_daily_local"] if clustered else ["llm_usage_daily"]),
        *(["llm_usage_hourly", "llm_usage_hourly_local"] if clustered else ["llm_usage_hourly"]),
        "llm_model_prices",
        *(["llm_traces", "llm_traces_local"] if clustered else ["llm_traces"]),
    ]
    assert all(s.endswith(" SYNC") == clustered for s in parsed_downgrade if s.startswith("DROP TABLE"))


def test_cluster_deletes_parse_and_go_to_the_local_table(engine: Engine) -> None:
    conditions = TraceFilter(organization_id="org-1", run_id="run-'9'").clauses()
    cluster = Topology.parse(f"cluster:{CLUSTER}")
    statements = [
        str(delete_statement(TRACES_TABLE, conditions, erase=erase, topology=cluster).compile(**LITERAL))
        for erase in (True, False)
    ]
    for statement in formatted(engine, statements):
        assert target(statement) == "llm_traces_local" and _ON_CLUSTER.findall(statement) == [f"`{CLUSTER}`"]


def test_the_topology_argument_renders_what_the_environment_variable_does() -> None:
    assert statements_of(render("head", topology=f"cluster:{CLUSTER}")) == rendered(f"cluster:{CLUSTER}")[0]


def test_offline_rendering_says_which_topology_it_is_for() -> None:
    assert "-- llmtrace: rendered for the single topology" in render("head")
    cluster = render("head", topology=f"cluster:{CLUSTER}")
    assert f"-- llmtrace: rendered for the cluster:{CLUSTER} topology, tables in database {DATABASE}" in cluster


def test_the_alembic_command_line_reads_the_setting_and_reports_a_wrong_one() -> None:
    def alembic(topology: str) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, ENV_VAR: "clickhousedb://nobody@unreachable.invalid:8123/db"}
        return subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=False,
            env={**environment, TOPOLOGY_ENV_VAR: topology},
        )

    clustered = alembic("cluster:main")
    assert clustered.returncode == 0, clustered.stderr
    assert "CREATE TABLE IF NOT EXISTS `db`.`llm_traces_local` ON CLUSTER 'main'" in clustered.stdout
    wrong = alembic("clusters")
    assert wrong.returncode != 0
    assert "FAILED: Invalid LLMTRACE_TOPOLOGY value 'clusters'. Accepted: single" in wrong.stdout
    assert "Traceback" not in wrong.stdout + wrong.stderr


# -- what runs on the embedded engine ------------------------------------------------------------------------------


def test_the_cloud_rendering_runs_on_clickhouse(engine: Engine) -> None:
    upgrade_sql, _ = rendered("cloud")
    with engine.connect() as connection:
        for statement in upgrade_sql:
            connection.execute(text(statement))
        tables = dict(
            connection.execute(
                text(
                    "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase() "
                    "AND name IN ('llm_traces', 'alembic_version')"
                )
            ).all()
        )
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert tables["llm_traces"].startswith("MergeTree PARTITION BY toYYYYMM(created_at)")
    assert tables["llm_traces"].endswith(f"SETTINGS {REPLICATED_WINDOW}, index_granularity = 8192")
    assert tables["alembic_version"].endswith("SETTINGS replicated_deduplication_window = 0, index_granularity = 8192")
    assert version == ["0006"]
    check(engine)  # the same columns as the model


def test_the_version_table_is_created_for_the_topology_online(engine: Engine) -> None:
    with engine.connect() as connection:
        database = connection.execute(text("SELECT currentDatabase()")).scalar_one()
        options = {TOPOLOGY_OPTION: Topology(Kind.CLOUD), DATABASE_OPTION: database, "fn": lambda heads, context: []}
        MigrationContext.configure(connection, opts=options).run_migrations()
        created = connection.execute(
            text(
                "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = 'alembic_version'"
            )
        ).scalar_one()
    assert created.startswith("MergeTree ORDER BY version_num SETTINGS replicated_deduplication_window = 0")


def test_the_single_topology_runs_end_to_end_when_named(engine: Engine) -> None:
    upgrade(engine, topology="single")
    repository = TraceRepository(engine, topology=SINGLE)
    trace = make_trace(1)
    assert repository.add_many([trace, trace]) == 1
    assert repository.get(trace.organization_id, trace.id) == trace
    assert repository.delete(trace.organization_id) == 1
    check(engine, topology="single")


def test_the_embedded_engine_refuses_other_topologies(engine: Engine) -> None:
    with pytest.raises(ConfigurationError, match="cloud needs a ClickHouse server"):
        upgrade(engine, topology="cloud")
    with pytest.raises(ConfigurationError, match=f"cluster:{CLUSTER} needs a ClickHouse server"):
        TraceRepository(engine, topology=f"cluster:{CLUSTER}")
    with engine.connect() as connection:
        tables = connection.execute(text("SELECT name FROM system.tables WHERE database = currentDatabase()")).all()
    assert tables == []  # refused before anything was created


def test_llmtrace_migrate_reports_wrong_topologies(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--url", database_url, "migrate", "--topology", "clustr:main"]) == 1
    assert capsys.readouterr().err.startswith("llmtrace: Invalid --topology value 'clustr:main'. Accepted: single")
    assert main(["--url", database_url, "migrate", "--topology", "cluster:main"]) == 1
    assert "llmtrace: The topology cluster:main needs a ClickHouse server" in capsys.readouterr().err
    monkeypatch.setenv(TOPOLOGY_ENV_VAR, "cluster")
    assert main(["--url", database_url, "migrate"]) == 1
    assert capsys.readouterr().err.startswith("llmtrace: LLMTRACE_TOPOLOGY='cluster' names no cluster")
    monkeypatch.delenv(TOPOLOGY_ENV_VAR)
    assert main(["--url", database_url, "migrate", "--topology", "single"]) == 0
    assert capsys.readouterr().out == "Schema is at the newest revision (single topology).\n"


def test_a_clusters_local_table_is_not_drift(migrated_engine: Engine) -> None:
    # On a cluster, the model's table is the Distributed one; its local table is compared through it.
    with migrated_engine.connect() as connection:
        connection.execute(text("CREATE TABLE llm_traces_local AS llm_traces"))
    check(migrated_engine)


def test_detection_reads_the_servers_own_tables(engine: Engine) -> None:
    with engine.connect() as connection:
        client = driver_client(connection)
        assert deployed(client) is None
        before = server_facts(client)
        upgrade(engine)
        after = server_facts(client)
        assert deployed(client) == SINGLE
    assert before == ServerFacts(None, "", "Atomic", False, 0, ())
    assert after.table_engine == "MergeTree" and after.table_engine_full.startswith("MergeTree PARTITION BY")


# -- the stored-trace lookup's keys as external data -------------------------------------------------------------

ODD = ["it's", 'a "quote"', "back\\slash", "tab\there", "new\nline", "nul\x00byte", "😀 ünï", "\u2028", "[1,2]", ""]


def odd_traces() -> list[LLMTrace]:
    return [
        make_trace(i, organization_id=f"org-{text_}", agent_id=text_ or None, id=f"id-{i}-{text_}")
        for i, text_ in enumerate(ODD)
    ]


def keys_of(traces: list[LLMTrace]) -> BatchKeys:
    return BatchKeys.from_columns(insert_column_data(traces))


def test_external_keys_select_exactly_the_stored_traces(migrated_engine: Engine) -> None:
    stored, missing = odd_traces()[::2], odd_traces()[1::2]
    TraceRepository(migrated_engine).add_many(stored)
    batch = keys_of(stored + missing)
    # chDB has no external data; format() reads the same bytes with the same input format and structure.
    source = f"format({EXTERNAL_FORMAT}, '{EXTERNAL_STRUCTURE}', %(keys)s)"
    query = semi_join(source, micros=True)
    with migrated_engine.connect() as connection:
        client = driver_client(connection)
        rows = client.query(query, parameters={"keys": external_keys_data(batch).decode()}).result_rows
        through_session = StoredTraces(client).stored_keys(batch)
    found = {(organization, agent, int(micros), id_) for organization, agent, micros, id_ in rows}
    assert found == keys_of(stored).keys() == through_session


def test_the_distributed_semi_join_ships_the_keys_to_the_shards(engine: Engine) -> None:
    local, distributed = formatted(engine, [semi_join(STAGING_TABLE), semi_join(STAGING_TABLE, distributed=True)])
    assert ") IN (" in local and "GLOBAL IN" not in local
    assert ") GLOBAL IN (" in distributed


@pytest.mark.parametrize(
    ("topology", "settings"),
    [(f"cluster:{CLUSTER}", {"load_balancing": "in_order"}), ("cloud", {"select_sequential_consistency": "1"})],
)
def test_a_server_gets_the_keys_with_the_query_and_no_session_table(
    topology: str, settings: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    requests: list[dict[str, Any]] = []
    batch = keys_of(odd_traces())
    with fault_server(Fault.CLICKHOUSE_ERROR, after_handshake=True, requests=requests) as port:
        engine = get_engine(f"clickhousedb://default:secret@127.0.0.1:{port}/{DATABASE}")
        try:
            with engine.connect() as connection, caplog.at_level(logging.WARNING, logger="llmtrace.stored_lookup"):
                lookup = StoredTraces.for_topology(driver_client(connection), Topology.parse(topology), embedded=False)
                with pytest.raises(Exception, match="TOO_MANY_PARTS"):
                    lookup.stored_keys(batch)  # the stand-in fails the query, and then its fallback
        finally:
            engine.dispose()
    staged, fallback = [request for request in requests if "llm_traces" in request["sql"]]
    assert f"{'GLOBAL IN' if 'cluster' in topology else 'IN'} (SELECT organization_id, agent_id, " in staged["sql"]
    assert f"fromUnixTimestamp64Micro(created_at, 'UTC') FROM {STAGING_TABLE})" in staged["sql"]
    assert staged[f"{STAGING_TABLE}_format"] == EXTERNAL_FORMAT
    assert staged[f"{STAGING_TABLE}_structure"] == EXTERNAL_STRUCTURE
    assert external_keys_data(batch).decode() in staged["body"]
    assert not any("TEMPORARY TABLE" in request["sql"] for request in requests)
    assert "WHERE (organization_id, id) IN" in fallback["sql"]
    for request in (staged, fallback):
        assert {name: request.get(name) for name in settings} == settings
    assert "external data is unavailable" in caplog.text

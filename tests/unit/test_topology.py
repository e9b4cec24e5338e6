"""The LLMTRACE_TOPOLOGY setting: its forms, its errors, what wins, and what a server's facts imply."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtrace import ConfigurationError, TraceRepository, get_engine
from llmtrace.topology import (
    SINGLE,
    TOPOLOGY_ENV_VAR,
    Kind,
    ServerFacts,
    Topology,
    configured,
    decide,
)

SERVER_URL = "clickhousedb://default:secret@clickhouse.invalid:8123/traces"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("single", SINGLE),
        ("SINGLE ", SINGLE),
        ("replicated", Topology(Kind.REPLICATED)),
        ("Cloud", Topology(Kind.CLOUD)),
        ("cluster:main", Topology(Kind.CLUSTER, "main")),
        ("cluster:traces-eu.1", Topology(Kind.CLUSTER, "traces-eu.1")),
        ("cluster:{cluster}", Topology(Kind.CLUSTER, "{cluster}")),
        (" cluster: main ", Topology(Kind.CLUSTER, "main")),
    ],
)
def test_accepted_forms(text: str, expected: Topology) -> None:
    topology = Topology.parse(text)
    assert topology == expected
    assert Topology.parse(str(topology)) == topology


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("bogus", "Invalid LLMTRACE_TOPOLOGY value 'bogus'"),
        ("clustered", "Invalid LLMTRACE_TOPOLOGY value 'clustered'"),
        ("single:main", "Invalid LLMTRACE_TOPOLOGY value 'single:main'"),
        ("cluster", "LLMTRACE_TOPOLOGY='cluster' names no cluster"),
        ("cluster:", "LLMTRACE_TOPOLOGY='cluster:' names no cluster"),
        ("cluster:main cluster", "has an invalid cluster name 'main cluster'"),
        ("cluster:it's", 'has an invalid cluster name "it\'s"'),
        ("cluster:{a}{b}", "has an invalid cluster name '{a}{b}'"),
    ],
)
def test_bad_values_name_the_setting_and_what_is_accepted(text: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Topology.parse(text)
    message = str(raised.value)
    assert says in message
    assert "cluster:<name>" in message


def test_the_source_is_named_in_the_error() -> None:
    with pytest.raises(ConfigurationError, match=r"Invalid --topology value 'x'.*single.*cluster:<name>.*replicated.*"):
        configured("x", source="--topology")


def test_an_explicit_value_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOPOLOGY_ENV_VAR, "cluster:main")
    assert configured() == Topology(Kind.CLUSTER, "main")
    assert configured("cloud") == Topology(Kind.CLOUD)
    monkeypatch.setenv(TOPOLOGY_ENV_VAR, "  ")
    assert configured() is None
    monkeypatch.delenv(TOPOLOGY_ENV_VAR)
    assert configured() is None


def test_get_engine_reports_a_malformed_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOPOLOGY_ENV_VAR, "clusters:main")
    with pytest.raises(ConfigurationError, match="Invalid LLMTRACE_TOPOLOGY value 'clusters:main'"):
        get_engine(SERVER_URL)


def test_get_engine_refuses_a_cluster_for_the_embedded_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(TOPOLOGY_ENV_VAR, "cluster:main")
    with pytest.raises(ConfigurationError, match=r"cluster:main needs a ClickHouse server.*embedded engine"):
        get_engine(f"chdb:///{tmp_path / 'never-opened'}")
    assert not (tmp_path / "never-opened").exists()


def test_the_repository_reports_a_malformed_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = get_engine(SERVER_URL)  # no connection is made
    with pytest.raises(ConfigurationError, match="Invalid topology value 'shard'"):
        TraceRepository(engine, topology="shard")
    monkeypatch.setenv(TOPOLOGY_ENV_VAR, "cloudy")
    with pytest.raises(ConfigurationError, match="Invalid LLMTRACE_TOPOLOGY value 'cloudy'"):
        TraceRepository(engine)


def test_each_topology_renders_on_cluster_and_storage_table() -> None:
    cluster = Topology.parse("cluster:main")
    assert cluster.on_cluster() == " ON CLUSTER 'main'" and cluster.storage_table("t") == "t_local"
    for other in ("single", "replicated", "cloud"):
        assert Topology.parse(other).on_cluster() == "" and Topology.parse(other).storage_table("t") == "t"


def test_reads_after_an_insert_pin_replicas_on_a_cluster_and_are_sequential_on_cloud() -> None:
    assert Topology.parse("cluster:main").read_settings() == {"load_balancing": "in_order"}
    assert Topology.parse("cloud").read_settings() == {"select_sequential_consistency": 1}
    assert SINGLE.read_settings() == Topology.parse("replicated").read_settings() == {}


# -- detection ------------------------------------------------------------------------------------------------


def facts(**overrides: object) -> ServerFacts:
    """A fresh database on an ordinary server that belongs to no cluster, changed by ``overrides``."""
    values: dict[str, object] = {
        "table_engine": None,
        "table_engine_full": "",
        "database_engine": "Atomic",
        "shared_merge_tree": False,
        "database_shards": 0,
        "remote_clusters": (),
    }
    return ServerFacts(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (facts(), SINGLE),
        (facts(remote_clusters=()), SINGLE),
        (facts(database_engine="Shared", shared_merge_tree=True), Topology(Kind.CLOUD)),
        (facts(database_engine="Replicated", shared_merge_tree=True, database_shards=1), Topology(Kind.CLOUD)),
        (facts(database_engine="Replicated", database_shards=1), Topology(Kind.REPLICATED)),
        # A migrated database says what it was deployed with, whatever else the server lists.
        (
            facts(
                table_engine="Distributed",
                table_engine_full="Distributed('traces-eu', 'db', 'llm_traces_local', cityHash64(organization_id, id))",
                remote_clusters=("traces-eu", "other"),
            ),
            Topology(Kind.CLUSTER, "traces-eu"),
        ),
        (
            facts(table_engine="Distributed", table_engine_full="Distributed({cluster}, db, llm_traces_local, x)"),
            Topology(Kind.CLUSTER, "{cluster}"),
        ),
        (facts(table_engine="SharedMergeTree", database_engine="Replicated"), Topology(Kind.CLOUD)),
        (facts(table_engine="ReplicatedMergeTree", database_engine="Replicated"), Topology(Kind.REPLICATED)),
        (facts(table_engine="MergeTree", remote_clusters=("main",)), SINGLE),
    ],
)
def test_what_a_server_states_decides_the_topology(server: ServerFacts, expected: Topology) -> None:
    assert decide(server) == expected


def test_a_cluster_is_never_inferred_from_system_clusters() -> None:
    with pytest.raises(ConfigurationError) as raised:
        decide(facts(remote_clusters=("main", "logs")))
    message = str(raised.value)
    assert "Cannot tell whether to deploy to this server alone or to a cluster" in message
    assert "main, logs" in message and "LLMTRACE_TOPOLOGY" in message and "cluster:<name>" in message


def test_a_sharded_replicated_database_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="Replicated database has 2 shards"):
        decide(facts(database_engine="Replicated", database_shards=2))

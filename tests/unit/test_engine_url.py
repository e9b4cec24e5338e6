"""URL resolution and the errors a user gets for URLs and embedded directories that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from llmtrace import DEFAULT_URL, ENV_VAR, ConfigurationError, EmbeddedEngineError, get_engine, resolve_url
from llmtrace import engine as engine_module
from llmtrace.engine import parse_embedded_url


def test_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "clickhousedb://env-host/db")
    assert resolve_url("chdb:///x") == "chdb:///x"


def test_environment_wins_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "clickhousedb://env-host/db")
    assert resolve_url() == "clickhousedb://env-host/db"


def test_default_is_embedded_under_dot_llmtrace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_url() == DEFAULT_URL
    target = parse_embedded_url(make_url(DEFAULT_URL))
    assert target.directory == Path.cwd() / ".llmtrace" / "chdb"
    assert target.database == "default"


def test_embedded_url_forms() -> None:
    absolute = parse_embedded_url(make_url("chdb:////var/lib/traces?database=analytics"))
    assert absolute.directory == Path("/var/lib/traces") and absolute.database == "analytics"
    relative = parse_embedded_url(make_url("chdb:///data/traces"))
    assert relative.directory == Path.cwd() / "data" / "traces"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("chdb://", "names no data directory"),
        ("chdb:///dir?databse=x", "Unknown option(s) databse"),
        ("chdb:///dir?database=bad-name", "Invalid database name 'bad-name'"),
        ("chdb:///dir?database=1x", "Invalid database name '1x'"),
    ],
)
def test_bad_embedded_urls_say_what_to_write(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_engine(url)


def test_foreign_schemes_are_rejected_with_the_accepted_forms() -> None:
    with pytest.raises(ConfigurationError, match="Unsupported database URL scheme 'postgresql'") as caught:
        get_engine("postgresql://u:p@h/db")
    assert "chdb:///dir" in str(caught.value) and "clickhousedb://" in str(caught.value)


def test_clickhouse_sqlalchemy_scheme_gets_a_pointed_hint() -> None:
    with pytest.raises(ConfigurationError, match="clickhouse-sqlalchemy's schemes"):
        get_engine("clickhouse+native://localhost/db")


def test_unparseable_url_hides_the_password() -> None:
    with pytest.raises(ConfigurationError, match="Cannot parse") as caught:
        get_engine("not a url://user:secret@")
    assert "secret" not in str(caught.value)


def test_server_url_builds_an_engine_without_connecting() -> None:
    engine = get_engine("clickhousedb://user:pw@clickhouse.example:8123/traces")
    assert engine.dialect.name == "clickhousedb"
    assert engine.url.host == "clickhouse.example" and engine.url.database == "traces"


def test_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(EmbeddedEngineError, match="Cannot create the embedded ClickHouse data directory") as caught:
        get_engine(f"chdb:///{blocker}/chdb")
    assert str(blocker / "chdb") in str(caught.value)
    assert ENV_VAR in str(caught.value)


def test_missing_chdb_install_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = engine_module.importlib.util.find_spec
    monkeypatch.setattr(
        engine_module.importlib.util, "find_spec", lambda name: None if name == "chdb" else real_find_spec(name)
    )
    with pytest.raises(EmbeddedEngineError, match=r"pip install 'llmtrace\[embedded\]'"):
        get_engine("chdb:///anywhere")


def test_driver_client_refuses_a_foreign_engine() -> None:
    from sqlalchemy import create_engine

    from llmtrace.engine import driver_client

    expected = "not clickhouse-connect's; llmtrace needs an engine built by"
    with create_engine("sqlite://").connect() as connection, pytest.raises(ConfigurationError, match=expected):
        driver_client(connection)


def test_missing_migration_scripts_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llmtrace import MigrationError, migrations

    monkeypatch.setattr(migrations, "SCRIPT_LOCATIONS", (tmp_path / "a", tmp_path / "b"))
    with pytest.raises(MigrationError, match="migration scripts were not found") as caught:
        migrations.alembic_config()
    assert str(tmp_path / "a") in str(caught.value) and str(tmp_path / "b") in str(caught.value)

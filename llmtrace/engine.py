"""Where the traces live: resolve the database URL and build a SQLAlchemy engine for it.

Two kinds of URL are accepted:

- ``chdb:///relative/dir`` or ``chdb:////absolute/dir`` (optionally ``?database=name``): the embedded
  ClickHouse engine (chDB) with its data in that directory. The slashes follow SQLite's convention.
- ``clickhousedb://user:password@host:8123/database`` (and clickhouse-connect's other spellings): a ClickHouse
  server or ClickHouse Cloud over HTTP(S), through clickhouse-connect's SQLAlchemy dialect.

The URL comes from the ``url`` argument, else ``LLMTRACE_DATABASE_URL``, else :data:`DEFAULT_URL`.

Server engines get the timeouts of :data:`SERVER_TIMEOUTS` unless the URL's query or ``connect_args`` set them.
Embedded engines refuse to work in a process forked from the one that opened them (chDB would hang there).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import Pool

from llmtrace.errors import ConfigurationError, EmbeddedEngineError
from llmtrace.errors import redacted as redacted  # re-exported: URLs are shown redacted (the CLI prints one)
from llmtrace.topology import configured, require_embeddable

ENV_VAR = "LLMTRACE_DATABASE_URL"
DEFAULT_URL = "chdb:///.llmtrace/chdb"
EMBEDDED_SCHEME = "chdb"
SERVER_SCHEMES = frozenset({"clickhousedb", "clickhousedb+connect", "clickhouse+connect"})
LOCK_FILE_NAME = "llmtrace.lock"
DEFAULT_DATABASE = "default"
_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Seconds. clickhouse-connect's own defaults are 10 s to connect and 300 s to wait for each read, so a server that
# accepts connections and never answers holds every attempt (and a writer's whole buffer) for five minutes.
# - connect_timeout 10 s (clickhouse-connect's own): TCP and TLS handshakes take milliseconds; 10 s without one
#   means an unreachable or overloaded host, better retried later than waited for. urllib3 also applies it to
#   each blocked send of a request body.
# - send_receive_timeout 30 s: the longest silence tolerated while waiting for an answer, not a limit on a
#   statement's duration. clickhouse-connect asks the server for progress headers (send_progress_in_http_headers)
#   every send_receive_timeout - 5 s (clamped to 10-120 s; http_headers_progress_interval_ms, set in its
#   apply_http_server_settings), so a server working on a long query keeps the connection alive with a header
#   every 25 s. Every statement llmtrace sends (a 10,000-trace insert batch included) answers well within 30 s
#   on a healthy server. A statement that may report no progress for longer, such as an erasing delete waiting
#   for its mutation on a very large table, may need a larger value (README, "Configuration").
SERVER_TIMEOUTS: dict[str, int] = {"connect_timeout": 10, "send_receive_timeout": 30}


@dataclass(frozen=True)
class EmbeddedTarget:
    """An embedded-engine location parsed from a ``chdb://`` URL."""

    directory: Path
    database: str


def resolve_url(url: str | URL | None = None) -> str:
    """Return the database URL to use: the argument, else ``LLMTRACE_DATABASE_URL``, else the embedded default.

    Args:
        url: An explicit URL, or ``None`` to fall back to the environment and then the default.

    Returns:
        The URL as a string (passwords included: do not log it).
    """
    if url is not None:
        return url.render_as_string(hide_password=False) if isinstance(url, URL) else url
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def parse_embedded_url(url: URL) -> EmbeddedTarget:
    """Read the data directory and database out of a ``chdb://`` URL.

    Raises:
        ConfigurationError: The URL has no directory, an unknown option, or an invalid database name.
    """
    if not url.database:
        raise ConfigurationError(
            "The chdb:// URL names no data directory. Write chdb:///relative/dir or chdb:////absolute/dir."
        )
    unknown = sorted(set(url.query) - {"database"})
    if unknown:
        raise ConfigurationError(
            f"Unknown option(s) {', '.join(unknown)} in the chdb:// URL; the only option is ?database=<name>."
        )
    database = url.query.get("database", DEFAULT_DATABASE)
    if not isinstance(database, str) or not _DATABASE_NAME.match(database):
        raise ConfigurationError(
            f"Invalid database name {database!r} in the chdb:// URL: use letters, digits and underscores, "
            "not starting with a digit."
        )
    return EmbeddedTarget(directory=Path(url.database).expanduser().resolve(), database=database)


def get_engine(url: str | URL | None = None, **engine_kwargs: Any) -> Engine:
    """Build a SQLAlchemy engine for the trace database.

    For the embedded engine, the data directory and the database are created on first use, and the directory
    is locked for this process (chDB allows one process per data directory). Such an engine raises
    :class:`EmbeddedEngineError` on every connection attempt in a process forked from this one.

    For a server, ``connect_timeout`` and ``send_receive_timeout`` (whole seconds) default to
    :data:`SERVER_TIMEOUTS`; set them in the URL's query (``?send_receive_timeout=120``) or in
    ``connect_args``, which wins over the URL.

    Args:
        url: The database URL; see :func:`resolve_url` for the fallbacks and the module docs for the forms.
        **engine_kwargs: Passed to :func:`sqlalchemy.create_engine` (e.g. ``pool_size``, ``echo``,
            ``connect_args``).

    Returns:
        A SQLAlchemy engine on clickhouse-connect's ``clickhousedb`` dialect.

    Raises:
        ConfigurationError: The URL is malformed or not a ClickHouse URL, a timeout is not a positive number
            of seconds, ``LLMTRACE_TOPOLOGY`` is not one of its accepted forms, or it names a topology other
            than ``single`` for the embedded engine.
        EmbeddedEngineError: chDB is not installed, the directory cannot be written, another process holds it,
            or this process was forked from one that had opened the embedded engine.
    """
    raw = resolve_url(url)
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number ("host:eighty", "[::1")
        raise ConfigurationError(
            f"Cannot parse the database URL {redacted(raw)!r}: {exc}. "
            "Expected chdb:///dir for the embedded engine or clickhousedb://user:pass@host:8123/db for a server."
        ) from exc
    # A malformed LLMTRACE_TOPOLOGY, or one the embedded engine cannot be, is reported when the engine is made,
    # before anything is written with it.
    topology = configured()
    if parsed.drivername == EMBEDDED_SCHEME:
        if topology is not None:
            require_embeddable(topology)
        return _embedded_engine(parse_embedded_url(parsed), engine_kwargs)
    if parsed.drivername in SERVER_SCHEMES:
        return _server_engine(parsed, engine_kwargs)
    raise ConfigurationError(
        f"Unsupported database URL scheme {parsed.drivername!r}. Use chdb:///dir for the embedded engine or "
        "clickhousedb://user:pass@host:8123/db for a ClickHouse server "
        "(clickhouse:// and clickhouse+native:// are clickhouse-sqlalchemy's schemes, which llmtrace does not use)."
    )


def _server_engine(url: URL, engine_kwargs: dict[str, Any]) -> Engine:
    # SQLAlchemy hands the URL's query to the driver and lets connect_args override it, so a default applies only
    # where neither names the option.
    connect_args = {name: value for name, value in SERVER_TIMEOUTS.items() if name not in url.query}
    connect_args.update(engine_kwargs.pop("connect_args", {}))
    for name in SERVER_TIMEOUTS:
        _check_timeout(name, connect_args.get(name, url.query.get(name)))
    return create_engine(url, connect_args=connect_args, **engine_kwargs)


def _check_timeout(name: str, value: object) -> None:
    # clickhouse-connect reads these as whole seconds (int()); anything else would fail only at the first connection.
    # None, given in connect_args, is the driver's way to wait without limit.
    if value is None:
        return
    try:
        seconds = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        seconds = 0
    if seconds <= 0 or (isinstance(value, float) and not value.is_integer()):
        raise ConfigurationError(
            f"{name} must be a whole number of seconds greater than 0, got {value!r} "
            f"(in the URL's query, ?{name}=30, or in get_engine(..., connect_args={{{name!r}: 30}}))."
        )


# chDB hosts one data directory per process; remember which one this process opened, the lock it holds, and which
# process opened it. A process forked from that one inherits all three, but not a working chDB: the engine's
# threads do not survive a fork, and every call into it there (a query, even closing a connection) waits for ever.
_held_locks: dict[Path, int] = {}
_held_locks_guard = threading.Lock()
_opened_by_pid: int | None = None
_embedded_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
# In a forked child: the parent's connection pools, kept referenced and unused. Letting them be collected would
# close their connections, a chDB call that hangs there.
_parent_pools: list[Pool] = []


def _after_fork_in_child() -> None:
    global _held_locks_guard
    # A thread of the parent may have held the guard at the instant of the fork; that thread does not exist here.
    _held_locks_guard = threading.Lock()
    for engine in list(_embedded_engines):
        # The engine gets an empty pool, so that every checkout (engine.connect(), raw_connection()) needs a new
        # connection, which the do_connect hook refuses.
        _parent_pools.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _embedded_engine(target: EmbeddedTarget, engine_kwargs: dict[str, Any]) -> Engine:
    _require_chdb()
    _refuse_if_forked()
    _prepare_directory(target.directory)
    _lock_directory(target.directory)
    _create_database(target)
    connect_args = {"interface": "chdb", "path": str(target.directory), **engine_kwargs.pop("connect_args", {})}
    engine = create_engine(f"clickhousedb:///{target.database}", connect_args=connect_args, **engine_kwargs)
    _refuse_connections_after_fork(engine)
    return engine


def _refuse_if_forked() -> None:
    opener = _opened_by_pid
    if opener is not None and opener != os.getpid():
        raise _forked_error(opener)


def _refuse_connections_after_fork(engine: Engine) -> None:
    """Make the engine raise :class:`EmbeddedEngineError` instead of hanging when used in a forked child."""
    owner = os.getpid()

    def before_connecting(*_: Any) -> None:
        # Runs before the driver opens a new connection, i.e. before chDB is called at all. In a forked child every
        # checkout needs a new connection: _after_fork_in_child emptied the pool.
        if os.getpid() != owner:
            raise _forked_error(owner)

    event.listen(engine, "do_connect", before_connecting)
    _embedded_engines.add(engine)


def _forked_error(opener: int) -> EmbeddedEngineError:
    where = " on " + ", ".join(str(directory) for directory in _held_locks) if _held_locks else ""
    return EmbeddedEngineError(
        f"This process (pid {os.getpid()}) was forked from pid {opener} after that process had opened the embedded "
        f"ClickHouse engine (chDB){where}. chDB cannot run in a forked process: it would hang. Open the engine "
        "in the process that uses it, after the fork (gunicorn: without --preload, or in a post_fork hook; "
        "multiprocessing: the 'spawn' start method), in one process only (chDB allows one process per data "
        f"directory); or set {ENV_VAR} to a ClickHouse server URL (clickhousedb://user:pass@host:8123/db) so that "
        "several processes can share the data."
    )


def _require_chdb() -> None:
    if importlib.util.find_spec("chdb") is None:
        raise EmbeddedEngineError(
            "The embedded ClickHouse engine (chDB) is not installed. Install it with "
            "`pip install 'llmtrace[embedded]'`, or set LLMTRACE_DATABASE_URL to a ClickHouse server URL "
            "such as clickhousedb://user:pass@host:8123/db."
        )


def _prepare_directory(directory: Path) -> None:
    fix = (
        f"Make it writable, or choose another directory with {ENV_VAR}=chdb:////path/to/writable/dir "
        "(or pass url= to get_engine)."
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedEngineError(
            f"Cannot create the embedded ClickHouse data directory {directory}: {exc.strerror}. {fix}"
        ) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise EmbeddedEngineError(f"The embedded ClickHouse data directory {directory} is not writable. {fix}")


def _lock_directory(directory: Path) -> None:
    with _held_locks_guard:
        _lock_directory_once(directory)


def _lock_directory_once(directory: Path) -> None:
    if directory in _held_locks:
        return
    if _held_locks:
        (other,) = _held_locks
        raise EmbeddedEngineError(
            f"This process already uses the embedded ClickHouse data directory {other}; chDB can host only one "
            f"data directory per process, so {directory} cannot be opened here. Use one directory per process "
            "(separate databases within it isolate data: chdb:///dir?database=name)."
        )
    lock_path = directory / LOCK_FILE_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise EmbeddedEngineError(f"Cannot lock the embedded ClickHouse data directory {directory}: {exc}") from exc
        raise EmbeddedEngineError(
            f"The embedded ClickHouse data directory {directory} is in use by another process"
            f"{f' (pid {holder})' if holder else ''}. chDB allows one process per data directory. "
            "Stop that process, or give this one its own directory with "
            f"{ENV_VAR}=chdb:////path/to/another/dir, or run a ClickHouse server and use a clickhousedb:// URL "
            "so that several processes can share the data."
        ) from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    # Kept open for the life of the process: the kernel releases the lock when the process exits.
    _held_locks[directory] = fd
    global _opened_by_pid
    _opened_by_pid = os.getpid()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _create_database(target: EmbeddedTarget) -> None:
    # Imported here: clickhouse-connect loads chDB's native library on first use, which is only wanted for
    # embedded URLs.
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        client = clickhouse_connect.get_client(interface="chdb", path=str(target.directory))
    except ClickHouseError as exc:
        raise EmbeddedEngineError(
            f"chDB could not open the data directory {target.directory}: {exc}. This usually means another "
            "program (not llmtrace) has it open, or that it holds data from an incompatible ClickHouse version. "
            f"Use another directory with {ENV_VAR}=chdb:////path/to/another/dir."
        ) from exc
    try:
        client.command(f"CREATE DATABASE IF NOT EXISTS `{target.database}`")
    finally:
        client.close()


def is_embedded(engine: Engine) -> bool:
    """Whether ``engine`` is an embedded-engine (chDB) engine made by :func:`get_engine` in this process."""
    return engine in _embedded_engines


def driver_client(connection: Connection) -> Any:
    """The clickhouse-connect client behind a SQLAlchemy connection of a ``clickhousedb`` engine.

    Column-oriented inserts (``client.insert``) go through it: they are several times faster than SQLAlchemy's
    ``executemany`` and take per-insert settings such as ``insert_deduplication_token``.
    """
    dbapi_connection = connection.connection.dbapi_connection
    client = getattr(dbapi_connection, "client", None)
    if client is None:
        raise ConfigurationError(
            f"The engine's driver connection {type(dbapi_connection).__name__} is not clickhouse-connect's; "
            "llmtrace needs an engine built by llmtrace.get_engine (the clickhousedb dialect)."
        )
    return client

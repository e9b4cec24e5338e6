"""The errors llmtrace raises, and the one place where database failures become :class:`DatabaseError`.

Every error derives from :class:`LLMTraceError`. :func:`database_errors` maps whatever the driver
(clickhouse-connect), SQLAlchemy or the HTTP transport (urllib3, sockets) raises to :class:`DatabaseError`, keeps
the original as ``__cause__``, words the message after what was being done and what went wrong, and decides
whether the failure is transient.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType, TracebackType
from typing import NamedTuple


class LLMTraceError(Exception):
    """Base class of every error llmtrace raises on purpose."""


class ConfigurationError(LLMTraceError):
    """The database URL or another setting cannot be used as given."""


class ExtraNotInstalled(ConfigurationError):  # noqa: N818 (a state, like TraceNotFound)
    """A feature needs a package of one of llmtrace's optional extras, and that package is not installed."""

    def __init__(self, package: str, *, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs {package}, which is not installed. It comes with llmtrace's {extra!r} extra: "
            f"pip install 'llmtrace[{extra}]'."
        )


class EmbeddedEngineError(ConfigurationError):
    """The embedded ClickHouse engine (chDB) cannot be opened or used here.

    Raised when chDB is not installed, when its data directory cannot be written, when another process already
    holds the directory (chDB allows one process per data directory), and in a process forked from one that had
    opened the engine (chDB cannot run in such a child).
    """


class MigrationError(LLMTraceError):
    """The Alembic migrations could not be found or applied."""


class DatabaseError(LLMTraceError):
    """ClickHouse rejected or failed a statement, or could not be reached; the driver's exception is the ``__cause__``.

    Attributes:
        transient: Whether the same statement may succeed if tried again later (the server was unreachable,
            timed out, overloaded, or its answer was lost or garbled on the way), as opposed to a failure that
            repeats (bad SQL, a missing table, a value the column rejects, wrong credentials).
        code: The ClickHouse error code (e.g. 252 for TOO_MANY_PARTS) when ClickHouse reported one, else ``None``.
    """

    def __init__(self, message: str, *, transient: bool = False, code: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.code = code


class SchemaNotMigratedError(DatabaseError):
    """The traces table does not exist in the database: the migrations have not been run against it."""


class WriteUnconfirmed(DatabaseError):  # noqa: N818 (a state, like TraceNotFound)
    """An insert was sent and may have been stored, but reading back what it stored failed.

    Always transient: sending the same batch again is safe (its deduplication token makes ClickHouse store it at
    most once) and settles the question. Until then the traces may or may not be stored.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message, transient=True, code=code)


class TraceNotFound(LLMTraceError, LookupError):  # noqa: N818 (the public name the API promises)
    """No trace with the given id exists in the given organization."""


class TraceValidationError(LLMTraceError, ValueError):
    """One or more traces of a batch are invalid; nothing of that batch was written.

    Attributes:
        problems: ``(index, field, message)`` for every invalid field of every invalid item, where ``index``
            is the item's position in the iterable given to ``add_many``.
    """

    def __init__(self, problems: list[tuple[int, str, str]]) -> None:
        self.problems = problems
        lines = [f"  item {index}, {field}: {message}" for index, field, message in problems]
        items = len({index for index, _, _ in problems})
        super().__init__(f"{items} invalid trace(s); nothing from this batch was written:\n" + "\n".join(lines))


class InvalidCursor(LLMTraceError, ValueError):  # noqa: N818 (named like TraceNotFound)
    """A pagination cursor is malformed, or was issued for another organization or other filters."""


# ClickHouse error codes that mean "not now" rather than "never": the server is overloaded, short of memory or
# disk, waiting for merges, or lost its network, Keeper or replicas. Names as ClickHouse 26.9 spells them (a
# test checks them against the embedded engine's errorCodeToName). Every other code is permanent: SYNTAX_ERROR,
# UNKNOWN_TABLE, UNKNOWN_IDENTIFIER, TYPE_MISMATCH, CANNOT_PARSE_*, AUTHENTICATION_FAILED, ACCESS_DENIED,
# READONLY, TABLE_IS_PERMANENTLY_READ_ONLY, ...
TRANSIENT_ERROR_CODES: Mapping[int, str] = MappingProxyType(
    {
        95: "CANNOT_READ_FROM_SOCKET",
        96: "CANNOT_WRITE_TO_SOCKET",
        159: "TIMEOUT_EXCEEDED",
        173: "CANNOT_ALLOCATE_MEMORY",
        198: "DNS_ERROR",
        201: "QUOTA_EXCEEDED",
        202: "TOO_MANY_SIMULTANEOUS_QUERIES",
        203: "NO_FREE_CONNECTION",
        209: "SOCKET_TIMEOUT",
        210: "NETWORK_ERROR",
        225: "NO_ZOOKEEPER",
        241: "MEMORY_LIMIT_EXCEEDED",
        242: "TABLE_IS_READ_ONLY",
        243: "NOT_ENOUGH_SPACE",
        244: "UNEXPECTED_ZOOKEEPER_ERROR",
        252: "TOO_MANY_PARTS",
        254: "NO_ACTIVE_REPLICAS",
        265: "NO_AVAILABLE_REPLICA",
        279: "ALL_CONNECTION_TRIES_FAILED",
        285: "TOO_FEW_LIVE_REPLICAS",
        289: "REPLICA_IS_NOT_IN_QUORUM",
        297: "SHARD_HAS_NO_CONNECTIONS",
        319: "UNKNOWN_STATUS_OF_INSERT",
        364: "RECEIVED_ERROR_TOO_MANY_REQUESTS",
        369: "ALL_REPLICAS_ARE_STALE",
        373: "SESSION_IS_LOCKED",
        384: "PART_IS_TEMPORARILY_LOCKED",
        394: "QUERY_WAS_CANCELLED",
        415: "ALL_REPLICAS_LOST",
        439: "CANNOT_SCHEDULE_TASK",
        473: "DEADLOCK_AVOIDED",
        519: "NO_REMOTE_SHARD_AVAILABLE",
        574: "DISTRIBUTED_TOO_MANY_PENDING_BYTES",
        692: "TOO_MANY_MUTATIONS",
        700: "USER_SESSION_LIMIT_EXCEEDED",
        738: "PART_IS_LOCKED",
        745: "SERVER_OVERLOADED",
        749: "TCP_CONNECTION_LIMIT_REACHED",
        762: "HTTP_CONNECTION_LIMIT_REACHED",
        777: "MEMORY_RESERVATION_KILLED",
        778: "MEMORY_RESERVATION_FAILED",
        904: "TOO_MANY_UNAVAILABLE_SHARDS",
        999: "KEEPER_EXCEPTION",
        1017: "ASYNC_INSERT_FLUSH_TIMEOUT",
        1019: "QUERY_SLOT_ACQUISITION_TIMEOUT",
        1020: "MEMORY_RESERVATION_ACQUISITION_TIMEOUT",
    }
)
_TRANSIENT_ERROR_NAMES = frozenset(TRANSIENT_ERROR_CODES.values())

# HTTP statuses that say "try again" when no ClickHouse error code came with them: every 5xx (a proxy or load
# balancer in front of ClickHouse, or ClickHouse failing before it could report a code), request timeout and
# too many requests. Other 4xx without a code (401, 403, 404, 413, ...) repeat until something is changed.
_TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})


def transient_error_code(code: int | None, name: str | None = None) -> bool:
    """Whether a ClickHouse error code (or, without a code, its symbolic name) means "try again later"."""
    if code is not None:
        return code in TRANSIENT_ERROR_CODES
    return name in _TRANSIENT_ERROR_NAMES


def transient_http_status(status: int) -> bool:
    """Whether an HTTP status that came without a ClickHouse error code means "try again later"."""
    return status >= 500 or status in _TRANSIENT_CLIENT_STATUSES


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Map database failures raised in the block to :class:`DatabaseError`, keeping the original as ``__cause__``.

    Mapped: the driver's exceptions, SQLAlchemy's DBAPI and pool-timeout errors, urllib3's errors (and the socket
    errors they wrap), and anything else the driver's own code raises while reading a response it cannot decode
    (see :func:`_raised_by_driver_decoding`). Passed through untouched: llmtrace's own errors, and programming
    errors (``TypeError``, ``AttributeError``, ... and anything else raised outside the driver).

    Args:
        action: What was being done, for the message (e.g. ``"inserting 1000 traces"``).

    Raises:
        SchemaNotMigratedError: The traces table or the price list does not exist.
        DatabaseError: Any other database failure, with ``transient`` and ``code`` set.
    """
    try:
        yield
    except LLMTraceError:
        raise
    except Exception as exc:
        failure = describe_failure(exc)
        if failure is None:
            raise
        message = redacted(f"{failure.subject} {failure.what} while {action}: {failure.detail}")
        missing = _missing_schema_table(failure.server_text) if failure.code == _UNKNOWN_TABLE else None
        if missing is not None:
            raise SchemaNotMigratedError(
                f"The {missing} table does not exist in this database. Create it with `alembic upgrade head`, "
                "`llmtrace migrate` or llmtrace.migrations.upgrade(engine).\n" + message,
                code=failure.code,
            ) from exc
        raise DatabaseError(message, transient=failure.transient, code=failure.code) from exc


def redacted(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it replaced by ``***``."""
    # Up to the last "@" before the host's "/": a password with an unescaped "@" is hidden whole.
    return re.sub(r"//([^:/@\s]*):[^\s/]*@", r"//\1:***@", text)


# -- what went wrong --------------------------------------------------------------------------------------------


class Failure(NamedTuple):
    """A database failure, described for a message: ``"<subject> <what> while <action>: <detail>"``."""

    subject: str
    what: str
    detail: str
    transient: bool
    code: int | None = None
    server_text: str = ""


_UNKNOWN_TABLE = 60
# Exception types that mean a bug, wherever they are raised: a wrong argument handed to the driver surfaces as one
# of these inside the driver's own frames, so they are never taken for a database failure.
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError)
_CONNECTION_LOST = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.HTTPException)
_HTTP_STATUS = re.compile(r"\bHTTP status (\d{3})\b")
_SERVER_CODE = re.compile(r"\bCode: (\d+)\. DB::Exception\b")
_SERVER_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
_URL_HOST = re.compile(r"\b(?:https?)://([^/\s)?]+)")
_TIMEOUT_SECONDS = re.compile(r"\b(?:read|connect) timeout=([\d.]+)")
_DRIVER_DECORATIONS = (
    re.compile(r"^Received ClickHouse exception, code: \d+, server response: "),
    re.compile(r"^HTTP driver received HTTP status \d{3}, server response: "),
    re.compile(r"\s*\(for url [^)]*\)\s*$"),
    re.compile(r"\s*\(version\s+(?:[^()]|\([^()]*\))*\)\s*$"),
)


def describe_failure(exc: BaseException) -> Failure | None:
    """Describe ``exc`` as a database failure, or return ``None`` when it is not one (a programming error).

    The order matters: a ClickHouse error code is the server's own verdict and wins; then what the socket layer
    saw (refused, timed out, reset); then the HTTP status of an answer that carried no ClickHouse error; then the
    driver's exception class.
    """
    from clickhouse_connect.driver.exceptions import Error as DriverError
    from clickhouse_connect.driver.exceptions import OperationalError as DriverOperationalError
    from clickhouse_connect.driver.exceptions import StreamFailureError
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout
    from urllib3.exceptions import HTTPError as TransportError

    if isinstance(exc, _PROGRAMMING_ERRORS):
        return None
    if isinstance(exc, PoolTimeout):
        return Failure("ClickHouse", "had no free pooled connection", _first_line(exc), transient=True)
    if not isinstance(exc, (DBAPIError, DriverError, TransportError)) and not _raised_by_driver_decoding(exc):
        return None
    chain = list(_causes(exc))
    driver_error = next((error for error in chain if isinstance(error, DriverError)), None)
    subject = _subject(chain)
    detail = _driver_detail(driver_error) if driver_error is not None else _first_line(chain[-1])

    code, name = _server_code(driver_error)
    if code is not None or name is not None:
        return Failure(subject, "failed", detail, transient_error_code(code, name), code, str(driver_error))
    network = _network_failure(chain, subject)
    if network is not None:
        return network
    status = _http_status(driver_error)
    if status is not None:
        what = f"answered HTTP {status} without a ClickHouse error (from a proxy or load balancer in front of it?)"
        return Failure(subject, what, detail, transient_http_status(status))
    if isinstance(driver_error, StreamFailureError):
        return Failure(subject, "sent a response that could not be read", detail, transient=True)
    if driver_error is None:
        # Not the driver's own exception class: what its decoders raised on a response they could not read.
        return Failure(subject, "sent a response that could not be read", _first_line(exc), transient=True)
    # DB-API's OperationalError is "not necessarily under the control of the programmer" (a lost connection, a
    # response cut short or garbled); its other classes (ProgrammingError, DataError, ...) repeat.
    return Failure(subject, "failed", detail, transient=isinstance(driver_error, DriverOperationalError))


def _network_failure(chain: list[BaseException], subject: str) -> Failure | None:
    from urllib3.exceptions import (
        ConnectTimeoutError,
        NameResolutionError,
        NewConnectionError,
        ProtocolError,
        ReadTimeoutError,
        SSLError,
    )

    def first(kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
        return next((error for error in chain if isinstance(error, kind)), None)

    def innermost(kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
        return next((error for error in reversed(chain) if isinstance(error, kind)), None)

    if (refused := first(ConnectionRefusedError)) is not None:
        return Failure(subject, "refused the connection (is it running, on this host and port?)", str(refused), True)
    if (unresolved := first((NameResolutionError, socket.gaierror))) is not None:
        return Failure(subject, "could not be found (its host name did not resolve)", str(unresolved), True)
    if (slow := first(ConnectTimeoutError)) is not None and not isinstance(slow, NewConnectionError):
        what = f"did not accept the connection within {_timeout(slow)} (connect_timeout)"
        return Failure(subject, what, _first_line(slow), True)
    if (silent := first((ReadTimeoutError, TimeoutError))) is not None:
        what = f"did not answer within {_timeout(silent)} (send_receive_timeout)"
        return Failure(subject, what, _first_line(silent), True)
    if (lost := innermost((*_CONNECTION_LOST, ProtocolError))) is not None:
        return Failure(subject, "closed or reset the connection before answering", _first_line(lost), True)
    if (tls := first(SSLError)) is not None:
        # A certificate that does not verify stays so; other TLS failures are connections torn down mid-handshake.
        verify = first(ssl.SSLCertVerificationError)
        return Failure(subject, "failed the TLS handshake", _first_line(verify or tls), verify is None)
    if (unreachable := first((NewConnectionError, OSError))) is not None:
        return Failure(subject, "could not be connected to", _first_line(unreachable), True)
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it: SQLAlchemy's ``orig``, urllib3's ``reason``, ``__cause__`` and ``__context__``."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 32:
        error = pending.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        linked = (getattr(error, "orig", None), getattr(error, "reason", None), error.__cause__, error.__context__)
        pending.extend(cause for cause in linked if isinstance(cause, BaseException))


def _subject(chain: list[BaseException]) -> str:
    """``"ClickHouse at host:port"`` when the failure says where, else ``"ClickHouse"`` (e.g. the embedded engine)."""
    for error in chain:
        # urllib3's errors hold the connection or the pool they failed on (NewConnectionError's pool is deprecated).
        holder = error.conn if hasattr(error, "conn") else getattr(error, "pool", None)
        host, port = getattr(holder, "host", None), getattr(holder, "port", None)
        if isinstance(host, str) and host:
            return f"ClickHouse at {host}:{port}" if port else f"ClickHouse at {host}"
    from clickhouse_connect.driver.exceptions import Error as DriverError

    # The driver names the server's URL in its messages (SQLAlchemy's wrappers name a documentation URL instead).
    for error in chain:
        match = _URL_HOST.search(str(error)) if isinstance(error, DriverError) else None
        if match:
            return f"ClickHouse at {match.group(1)}"
    return "ClickHouse"


def _server_code(error: BaseException | None) -> tuple[int | None, str | None]:
    """The ClickHouse error code and name: from the driver (the response header) or, failing that, the message."""
    if error is None:
        return None, None
    text = str(error)
    code = getattr(error, "code", None)
    if not isinstance(code, int):
        found = _SERVER_CODE.search(text)
        code = int(found.group(1)) if found else None
    name = getattr(error, "name", None)
    if not isinstance(name, str) and code is not None:
        names = _SERVER_NAME.findall(text)
        name = names[-1] if names else None
    return code, name if isinstance(name, str) else None


def _http_status(error: BaseException | None) -> int | None:
    found = _HTTP_STATUS.search(str(error)) if error is not None else None
    return int(found.group(1)) if found else None


def _driver_detail(error: BaseException) -> str:
    """The driver's message without its decorations (prefixes, the URL, the server version)."""
    text = _first_line(error)
    for decoration in _DRIVER_DECORATIONS:
        text = decoration.sub("", text)
    return text


def _timeout(error: BaseException) -> str:
    found = _TIMEOUT_SECONDS.search(str(error))
    return f"{found.group(1)} s" if found else "the configured timeout"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- failures raised by the driver's code, not as its exception classes ----------------------------------------

# clickhouse-connect decodes responses in Python and Cython and does not wrap everything that can go wrong there: a
# body that is not what was asked for (truncated, garbled, a proxy's page sent with status 200) can surface as
# ValueError, IndexError, OverflowError, struct.error, SystemError, ... raised in its own frames. Such an exception is
# taken for a database failure only when both hold:
# - the innermost frame outside the standard library is the driver's (or its HTTP transport's): anything raised in
#   llmtrace's frames, SQLAlchemy's or a caller's is left alone, so that llmtrace's bugs never pass for an
#   unreachable database;
# - one of the driver's response decoders is on the stack: the same exception types raised while the driver builds
#   a client from bad settings or encodes a value llmtrace should not have handed it are configuration or
#   programming errors, and are left alone too.
# _PROGRAMMING_ERRORS are left alone even then. Checking the traceback, rather than wrapping each driver call, keeps
# this working for the calls SQLAlchemy makes into the driver on llmtrace's behalf (cursor.execute, fetching rows).
_DRIVER_PACKAGES = frozenset({"clickhouse_connect", "urllib3"})
# The driver's Native-format decoding: the transform's entry point and block reader, and every column type's reader.
_DECODER_FUNCTIONS = frozenset({"parse_response", "get_block", "read_column", "read_column_data", "read_column_prefix"})


def _raised_by_driver_decoding(exc: BaseException) -> bool:
    frames = list(_frames(exc.__traceback__))
    packages = (module.partition(".")[0] for module, _ in reversed(frames))
    innermost_package = next((package for package in packages if package not in sys.stdlib_module_names), "")
    decoding = any(
        module.startswith("clickhouse_connect.") and function in _DECODER_FUNCTIONS for module, function in frames
    )
    return innermost_package in _DRIVER_PACKAGES and decoding


def _frames(tb: TracebackType | None) -> Iterator[tuple[str, str]]:
    """``(module, function)`` of each frame of a traceback, outermost first."""
    while tb is not None:
        frame = tb.tb_frame
        yield str(frame.f_globals.get("__name__", "")), frame.f_code.co_name
        tb = tb.tb_next


def _missing_schema_table(text: str) -> str | None:
    """The table of the migrations' schema (the traces or the price list) a ClickHouse message says is missing."""
    # ClickHouse says "Unknown table expression identifier 'llm_traces'" in a query and "Table db.llm_traces
    # does not exist" in an insert. Matching the tables' own names keeps a missing temporary table, whose
    # message also quotes the query around it, from being taken for an unmigrated database.
    from llmtrace.prices import PRICES_TABLE_NAME
    from llmtrace.record import TABLE_NAME

    for table in (TABLE_NAME, PRICES_TABLE_NAME):
        if re.search(rf"identifier '{table}'|Table \S*\b{table} does not exist", text) is not None:
            return table
    return None

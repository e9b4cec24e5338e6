"""database_errors: which failures become DatabaseError, which of them are transient, and what passes through.

The exceptions are the driver's, SQLAlchemy's and urllib3's own classes, built the way those libraries build them
(HTTP errors by clickhouse-connect's own builder). Failures of real connections are in
tests/integration/test_server_faults.py.
"""

from __future__ import annotations

import pytest
import sqlalchemy.exc
from clickhouse_connect.driver import exceptions as driver
from clickhouse_connect.driver._backend.httpcommon import build_http_error
from clickhouse_connect.driver.common import coerce_int
from clickhouse_connect.driver.transform import NativeTransform
from urllib3.connection import HTTPConnection
from urllib3.exceptions import NewConnectionError, ReadTimeoutError

from llmtrace.errors import (
    TRANSIENT_ERROR_CODES,
    DatabaseError,
    EmbeddedEngineError,
    SchemaNotMigratedError,
    TraceNotFound,
    database_errors,
    redacted,
)

URL = "http://clickhouse.internal:8123"
PERMANENT_CODES = {
    6: "CANNOT_PARSE_TEXT",
    16: "NO_SUCH_COLUMN_IN_TABLE",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    47: "UNKNOWN_IDENTIFIER",
    53: "TYPE_MISMATCH",
    60: "UNKNOWN_TABLE",
    62: "SYNTAX_ERROR",
    164: "READONLY",
    194: "REQUIRED_PASSWORD",
    497: "ACCESS_DENIED",
    516: "AUTHENTICATION_FAILED",
    774: "TABLE_IS_PERMANENTLY_READ_ONLY",
}


def server_error(code: int, name: str, *, status: int = 500) -> Exception:
    body = f"Code: {code}. DB::Exception: something about it. ({name}) (version 26.9.1.1 (official build))"
    return build_http_error(status, str(code), body, True, URL, status in (429, 503, 504))


def mapped(exc: BaseException, action: str = "doing it") -> DatabaseError:
    with pytest.raises(DatabaseError) as caught, database_errors(action):
        raise exc
    assert caught.value.__cause__ is exc
    return caught.value


@pytest.mark.parametrize(("code", "name"), sorted(TRANSIENT_ERROR_CODES.items()))
def test_codes_that_mean_try_again_later_are_transient(code: int, name: str) -> None:
    error = mapped(server_error(code, name))
    assert error.transient and error.code == code
    assert f"({name})" in str(error)


@pytest.mark.parametrize(("code", "name"), sorted(PERMANENT_CODES.items()))
def test_codes_that_repeat_are_permanent(code: int, name: str) -> None:
    error = mapped(server_error(code, name))
    assert not error.transient and error.code == code


@pytest.mark.parametrize(
    ("status", "code", "name", "transient"),
    [
        (500, 62, "SYNTAX_ERROR", False),  # the code is the server's verdict, whatever the status
        (503, 209, "SOCKET_TIMEOUT", True),
        (408, 159, "TIMEOUT_EXCEEDED", True),
        (403, 516, "AUTHENTICATION_FAILED", False),
        (400, 252, "TOO_MANY_PARTS", True),
    ],
)
def test_the_clickhouse_code_wins_over_the_http_status(status: int, code: int, name: str, transient: bool) -> None:
    assert mapped(server_error(code, name, status=status)).transient is transient


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        *[(status, True) for status in (500, 502, 503, 504, 507, 408, 429)],
        *[(status, False) for status in (400, 401, 403, 404, 413)],
    ],
)
def test_http_statuses_without_a_clickhouse_code(status: int, transient: bool) -> None:
    error = mapped(build_http_error(status, None, "<html>proxy page</html>", True, URL, status in (429, 503, 504)))
    assert error.transient is transient and error.code is None
    assert f"ClickHouse at clickhouse.internal:8123 answered HTTP {status} without a ClickHouse error" in str(error)


def test_a_code_found_only_in_the_message_counts() -> None:
    # An error ClickHouse writes into a response already streaming has no header; the message carries the code.
    message = "Code: 241. DB::Exception: Memory limit (total) exceeded: would use 9.31 GiB. (MEMORY_LIMIT_EXCEEDED)"
    error = mapped(driver.StreamFailureError(message, code=None))
    assert error.transient and error.code == 241


def test_a_symbolic_name_without_a_code_counts() -> None:
    assert mapped(driver.DatabaseError("rejected", name="TOO_MANY_PARTS")).transient


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (driver.OperationalError("Error executing HTTP request"), True),
        (driver.StreamFailureError("Stream ended unexpectedly (connection closed by server)"), True),
        (driver.ProgrammingError("Setting max_threads is readonly"), False),
        (driver.DataError("Unable to create native array for column `a`"), False),
        (driver.InternalError("Unrecognized ClickHouse type base: Nonsense"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_driver_errors_without_code_or_status_follow_the_db_api_class(exc: Exception, transient: bool) -> None:
    assert mapped(exc).transient is transient


def test_sqlalchemy_wrappers_are_classified_by_the_driver_error_inside() -> None:
    wrapped = sqlalchemy.exc.DatabaseError("SELECT 1", {}, server_error(252, "TOO_MANY_PARTS"))
    error = mapped(wrapped, "counting traces")
    assert error.transient and error.code == 252
    assert str(error).startswith("ClickHouse at clickhouse.internal:8123 failed while counting traces: Code: 252.")
    assert "[SQL:" not in str(error) and "sqlalche.me" not in str(error)


def test_a_refused_connection_names_the_server() -> None:
    refused = NewConnectionError(HTTPConnection("db.internal", 8123), "Failed to establish a new connection")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    error = mapped(refused, "inserting 1000 traces")
    assert error.transient
    assert str(error).startswith("ClickHouse at db.internal:8123 refused the connection")
    assert "while inserting 1000 traces: [Errno 111] Connection refused" in str(error)


def test_a_read_timeout_names_the_timeout() -> None:
    error = mapped(ReadTimeoutError(None, "/", "Read timed out. (read timeout=30)"))  # type: ignore[arg-type]
    assert error.transient
    assert "did not answer within 30 s (send_receive_timeout)" in str(error)


def test_an_exhausted_connection_pool_is_transient() -> None:
    error = mapped(sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"))
    assert error.transient and "had no free pooled connection" in str(error)


def test_a_missing_traces_table_says_how_to_migrate() -> None:
    missing = server_error(60, "UNKNOWN_TABLE", status=404)
    missing.args = (str(missing).replace("something about it", "Table traces.llm_traces does not exist"),)
    with pytest.raises(SchemaNotMigratedError, match="alembic upgrade head"), database_errors("inserting"):
        raise missing


@pytest.mark.parametrize(
    "exc",
    [TypeError("bad argument"), AttributeError("no such attribute"), ValueError("bad value"), OSError("spool full")],
    ids=lambda exc: type(exc).__name__,
)
def test_errors_raised_outside_the_driver_pass_through(exc: Exception) -> None:
    with pytest.raises(type(exc)) as caught, database_errors("doing it"):
        raise exc
    assert caught.value is exc


@pytest.mark.parametrize("exc", [EmbeddedEngineError("forked"), TraceNotFound("no such trace"), DatabaseError("x")])
def test_llmtrace_errors_pass_through(exc: Exception) -> None:
    with pytest.raises(type(exc)) as caught, database_errors("doing it"):
        raise exc
    assert caught.value is exc


def test_programming_errors_inside_the_driver_decoder_pass_through() -> None:
    # A wrong object handed to the driver's decoder fails in the driver's frames: still a bug, not a database failure.
    with pytest.raises(AttributeError), database_errors("reading"):
        NativeTransform.parse_response(object())  # type: ignore[arg-type]


def test_a_driver_value_error_outside_its_decoders_passes_through() -> None:
    # Raised in the driver's own frames, but while reading a setting, not a response: a configuration error.
    with pytest.raises(ValueError, match="invalid literal"), database_errors("connecting"):
        coerce_int("thirty")


def test_passwords_never_reach_the_message() -> None:
    error = mapped(driver.OperationalError("cannot reach clickhousedb://default:hunter2@db:8123/traces"))
    assert "hunter2" not in str(error) and "clickhousedb://default:***@db:8123/traces" in str(error)


def test_redacted_hides_only_the_password() -> None:
    assert redacted("a clickhousedb://user:p@ss:w0rd@host:8123/db b") == "a clickhousedb://user:***@host:8123/db b"
    assert redacted("u://user:pw@host/db?tag=a@b") == "u://user:***@host/db?tag=a@b"
    assert redacted("chdb:///relative/dir") == "chdb:///relative/dir"

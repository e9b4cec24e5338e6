"""The repository against ClickHouse servers that fail: every failure is a DatabaseError that says what happened.

The real clickhouse-connect HTTP client talks to the local servers of tests/fault_servers.py through
``get_engine("clickhousedb://...")``: nothing of the client, SQLAlchemy or the repository is replaced.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine

from llmtrace import DatabaseError, TraceRepository, get_engine
from llmtrace.engine import driver_client
from tests.factories import make_trace
from tests.fault_servers import AUTHENTICATION_FAILED, SYNTAX_ERROR, Fault, ServerError, fault_server

PASSWORD = "s3cret-pw"
# The hanging server's tests set this receive timeout: short, to keep them fast (whole seconds are what
# clickhouse-connect accepts). The others keep the default, so that a slow answer on a loaded machine cannot pass
# for a timeout.
TIMEOUT_SECONDS = 1

Operation = Callable[[TraceRepository], object]
OPERATIONS: dict[str, tuple[Operation, str]] = {
    "add_many": (lambda repository: repository.add_many([make_trace(1), make_trace(2)]), "while "),
    "get": (lambda repository: repository.get("org-1", "trace-x"), "while reading trace 'trace-x'"),
    "list": (lambda repository: repository.list("org-1", limit=10), "while listing traces"),
    "count": (lambda repository: repository.count("org-1", model="gpt-4.1"), "while counting traces"),
    "usage": (lambda repository: repository.usage(organization_id="org-1", granularity="day"), "while computing usage"),
    "delete": (lambda repository: repository.delete("org-1", before=datetime.now(UTC)), "while deleting traces"),
}

# What each fault's message must say; (at set-up, after the handshake) where the two differ.
CAUSES: dict[Fault, tuple[str, str]] = {
    Fault.REFUSE: ("refused the connection", "refused the connection"),
    Fault.RESET: ("closed or reset the connection", "closed or reset the connection"),
    Fault.HANG: (f"did not answer within {TIMEOUT_SECONDS} s", f"did not answer within {TIMEOUT_SECONDS} s"),
    Fault.CLICKHOUSE_ERROR: ("(TOO_MANY_PARTS)", "(TOO_MANY_PARTS)"),
    Fault.BAD_GATEWAY: ("answered HTTP 502 without a ClickHouse error", "answered HTTP 502 without a ClickHouse error"),
    Fault.SERVICE_UNAVAILABLE: ("answered HTTP 503", "answered HTTP 503"),
    Fault.GATEWAY_TIMEOUT: ("answered HTTP 504", "answered HTTP 504"),
    # At set-up the driver itself reports the unreadable answer to its version query.
    Fault.GARBAGE: ("Unexpected response to server version query", "sent a response that could not be read"),
}
# Faults whose message can name the server's address (the others' driver messages do not carry it).
NAMES_THE_ADDRESS = set(Fault) - {Fault.GARBAGE}


def non_daemon_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if not thread.daemon}


@pytest.fixture(autouse=True)
def no_thread_outlives_its_server() -> Iterator[None]:
    # The servers' threads are not daemons, so this sees any of them left running.
    before = non_daemon_threads()
    yield
    assert non_daemon_threads() <= before


def server_url(port: int, **query: object) -> str:
    options = "&".join(f"{name}={value}" for name, value in query.items())
    return f"clickhousedb://default:{PASSWORD}@127.0.0.1:{port}/traces" + (f"?{options}" if options else "")


@contextmanager
def repository_on(port: int, **query: object) -> Iterator[TraceRepository]:
    engine = get_engine(server_url(port, **query))
    try:
        yield TraceRepository(engine)
    finally:
        engine.dispose()


def failure_of(operation: Operation, repository: TraceRepository) -> tuple[DatabaseError, float]:
    started = time.monotonic()
    with pytest.raises(DatabaseError) as caught:
        operation(repository)
    return caught.value, time.monotonic() - started


def assert_well_formed(error: DatabaseError, *, port: int, action: str, cause: str, address: bool) -> None:
    message = str(error)
    assert cause in message, message
    assert action in message, message
    if address:
        assert f"ClickHouse at 127.0.0.1:{port}" in message, message
    assert PASSWORD not in message
    # The driver's (or SQLAlchemy's wrapping of the driver's) exception is kept, not re-raised raw.
    assert error.__cause__ is not None
    assert type(error).__module__ == "llmtrace.errors"


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("after_handshake", [False, True], ids=["at-setup", "after-handshake"])
@pytest.mark.parametrize("fault", list(Fault), ids=[fault.value for fault in Fault])
def test_every_fault_is_a_transient_database_error(fault: Fault, after_handshake: bool, operation: str) -> None:
    call, action = OPERATIONS[operation]
    query = {"send_receive_timeout": TIMEOUT_SECONDS} if fault is Fault.HANG else {}
    with fault_server(fault, after_handshake=after_handshake) as port, repository_on(port, **query) as repository:
        error, elapsed = failure_of(call, repository)
    assert_well_formed(
        error, port=port, action=action, cause=CAUSES[fault][after_handshake], address=fault in NAMES_THE_ADDRESS
    )
    assert error.transient, str(error)
    assert error.code == (252 if fault is Fault.CLICKHOUSE_ERROR else None)
    if fault is Fault.HANG:
        # One attempt waits out the receive timeout; nothing else may add more than a fraction of it.
        assert elapsed < 5 * TIMEOUT_SECONDS


@pytest.mark.parametrize("after_handshake", [False, True], ids=["at-setup", "after-handshake"])
@pytest.mark.parametrize("error", [SYNTAX_ERROR, AUTHENTICATION_FAILED], ids=lambda error: error.name)
def test_errors_that_repeat_are_permanent(error: ServerError, after_handshake: bool) -> None:
    with (
        fault_server(Fault.CLICKHOUSE_ERROR, after_handshake=after_handshake, error=error) as port,
        repository_on(port) as repository,
    ):
        failure, _ = failure_of(OPERATIONS["count"][0], repository)
    assert_well_formed(failure, port=port, action="while counting traces", cause=f"({error.name})", address=True)
    assert not failure.transient
    assert failure.code == error.code


def test_a_response_the_driver_cannot_decode_is_a_database_error() -> None:
    # A well-formed Native header announcing a Date32 column, then a day number no date has: the driver's decoder
    # raises a plain ValueError of its own, which is not one of its exception classes.
    garbage = b"\x01\x01\x01x\x06Date32\xff\xff\xff\x7f"
    with (
        fault_server(Fault.GARBAGE, after_handshake=True, garbage=garbage) as port,
        repository_on(port) as repository,
    ):
        error, _ = failure_of(OPERATIONS["count"][0], repository)
    assert "sent a response that could not be read" in str(error)
    assert isinstance(error.__cause__, ValueError)
    assert error.transient


# -- timeouts ---------------------------------------------------------------------------------------------------


def driver_timeouts(engine: Engine) -> tuple[float, float]:
    with engine.connect() as connection:
        timeout = driver_client(connection).timeout
    return timeout.connect_timeout, timeout.read_timeout


@contextmanager
def answering_server(requests: list[dict[str, str]] | None = None) -> Iterator[int]:
    """A server that completes the handshake (and hangs on anything else, which these tests never send)."""
    with fault_server(Fault.HANG, after_handshake=True, requests=requests) as port:
        yield port


def test_server_engines_get_bounded_timeouts_by_default() -> None:
    requests: list[dict[str, str]] = []
    with answering_server(requests) as port:
        engine = get_engine(f"clickhousedb://default:{PASSWORD}@127.0.0.1:{port}/traces")
        try:
            assert driver_timeouts(engine) == (10, 30)
        finally:
            engine.dispose()
    # The reason 30 s is enough for long queries: the client asks the server for a progress header every 25 s.
    asked = [request for request in requests if "http_headers_progress_interval_ms" in request]
    assert asked and {request["http_headers_progress_interval_ms"] for request in asked} == {"25000"}
    assert {request["send_progress_in_http_headers"] for request in asked} == {"1"}


@pytest.mark.parametrize(
    ("query", "connect_args", "expected"),
    [
        ("?send_receive_timeout=120&connect_timeout=5", {}, (5, 120)),
        ("?send_receive_timeout=120", {"send_receive_timeout": 7}, (10, 7)),
        ("", {"connect_timeout": 3}, (3, 30)),
    ],
    ids=["url", "connect_args-over-url", "connect_args"],
)
def test_timeouts_are_set_by_url_or_connect_args(query: str, connect_args: dict[str, Any], expected: tuple) -> None:
    with answering_server() as port:
        engine = get_engine(
            f"clickhousedb://default:{PASSWORD}@127.0.0.1:{port}/traces{query}", connect_args=connect_args
        )
        try:
            assert driver_timeouts(engine) == expected
        finally:
            engine.dispose()


# -- the fault servers themselves ---------------------------------------------------------------------------------


def test_a_hanging_server_stops_at_once_under_a_waiting_client() -> None:
    with socket.socket() as client:
        started = time.monotonic()
        with fault_server(Fault.HANG) as port:
            client.connect(("127.0.0.1", port))
            client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nSELECT 1")
            client.settimeout(0.2)
            with pytest.raises(TimeoutError):
                client.recv(1)  # the server has the request, and does not answer
        client.settimeout(5)
        assert client.recv(1) == b""  # closed by the server's teardown, not left hanging
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("after_handshake", [False, True], ids=["at-setup", "after-handshake"])
def test_a_refusing_server_keeps_its_port(after_handshake: bool) -> None:
    with fault_server(Fault.REFUSE, after_handshake=after_handshake) as port, repository_on(port) as repository:
        failure_of(OPERATIONS["count"][0], repository)
        with socket.socket() as intruder, pytest.raises(OSError, match="Address already in use"):
            intruder.bind(("127.0.0.1", port))

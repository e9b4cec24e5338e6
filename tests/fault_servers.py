"""Local stand-ins for a ClickHouse server that fail the way real deployments fail, for the test suite.

Each server listens on 127.0.0.1 and speaks just enough of ClickHouse's HTTP interface for clickhouse-connect's
real HTTP client. :func:`fault_server` is a context manager that yields the port::

    with fault_server(Fault.RESET, after_handshake=True) as port:
        engine = get_engine(f"clickhousedb://default:secret@127.0.0.1:{port}/db")

Two modes:

- ``after_handshake=False``: the fault hits the very first request, i.e. while clickhouse-connect creates its
  client (which is what SQLAlchemy's ``engine.connect()`` does for a new pooled connection).
- ``after_handshake=True``: the server answers the handshake correctly (the requests clickhouse-connect sends
  when it creates a client: server version and time zone, ``system.settings`` and the protocol probe; and the
  ``SELECT currentDatabase()`` SQLAlchemy sends on an engine's first connection), then fails every other request.
  Handshake requests are recognised by their SQL, so the handshake of every new connection succeeds.

Teardown never waits on a client: hanging handlers are released, open connections are shut down and every thread
is joined before the context manager returns.
"""

from __future__ import annotations

import enum
import http.server
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

SERVER_VERSION = "26.9.1.1"
# How long a hanging handler waits before giving up on its own; teardown releases it long before.
HANG_LIMIT_SECONDS = 120.0
# How often the accept loop checks for shutdown: short, so that teardown takes milliseconds.
POLL_INTERVAL_SECONDS = 0.02


class Fault(enum.Enum):
    """What the server does to a request it does not answer correctly."""

    REFUSE = "refuse"
    """Nothing listens on the port: the connection is refused.

    After the handshake: the server answers each handshake request with ``Connection: close`` and stops listening
    once it has answered all of them, so the client's next request finds nothing listening.
    """
    RESET = "reset"
    """The server reads the request, then resets the connection (close with SO_LINGER 0)."""
    HANG = "hang"
    """The server reads the request and never answers."""
    CLICKHOUSE_ERROR = "clickhouse_error"
    """A ClickHouse exception: its HTTP status, ``X-ClickHouse-Exception-Code`` and ``Code: N. DB::Exception``."""
    BAD_GATEWAY = "bad_gateway"
    """HTTP 502 from a proxy in front of ClickHouse (an HTML page, no ClickHouse error)."""
    SERVICE_UNAVAILABLE = "service_unavailable"
    """HTTP 503 from a proxy, with an empty body."""
    GATEWAY_TIMEOUT = "gateway_timeout"
    """HTTP 504 from a proxy (an HTML page, no ClickHouse error)."""
    GARBAGE = "garbage"
    """HTTP 200 whose body is not what was asked for (neither a result in the requested format nor an error)."""


_PROXY_PAGES = {Fault.BAD_GATEWAY: 502, Fault.GATEWAY_TIMEOUT: 504}
# Bytes no ClickHouse format starts with: read as Native, a block of some two million columns, none of them there.
GARBAGE_BODY = b"\x8f\xff\xfe\x00 not a ClickHouse result \xc3\x28\xa0\xa1"


@dataclass(frozen=True)
class ServerError:
    """A ClickHouse exception as the server reports it over HTTP."""

    code: int
    name: str
    status: int
    message: str

    def body(self) -> bytes:
        """The response body, worded like ClickHouse's own (``Code: N. DB::Exception: ... (NAME) (version ...)``)."""
        trailer = f"(version {SERVER_VERSION} (official build))"
        return f"Code: {self.code}. DB::Exception: {self.message}. ({self.name}) {trailer}\n".encode()


# HTTP statuses as ClickHouse's exceptionCodeToHTTPStatus maps these codes.
TOO_MANY_PARTS = ServerError(
    252,
    "TOO_MANY_PARTS",
    500,
    "Too many parts (3001 with average size of 18.42 KiB) in table 'db.llm_traces'. "
    "Merges are processing significantly slower than inserts",
)
SYNTAX_ERROR = ServerError(62, "SYNTAX_ERROR", 400, "Syntax error: failed at position 1 ('SELEC')")
AUTHENTICATION_FAILED = ServerError(
    516,
    "AUTHENTICATION_FAILED",
    403,
    "default: Authentication failed: password is incorrect, or there is no user with such name",
)


@contextmanager
def fault_server(
    fault: Fault,
    *,
    after_handshake: bool = False,
    error: ServerError = TOO_MANY_PARTS,
    garbage: bytes = GARBAGE_BODY,
    requests: list[dict[str, str]] | None = None,
) -> Iterator[int]:
    """Run a server on 127.0.0.1 that fails with ``fault``; yield its port.

    Args:
        fault: How the server fails.
        after_handshake: Answer the client's set-up requests correctly and fail only the later ones (see the
            module docs); otherwise fail from the first request.
        error: The ClickHouse exception sent for :attr:`Fault.CLICKHOUSE_ERROR`.
        garbage: The body sent for :attr:`Fault.GARBAGE`.
        requests: If given, every request the server reads is appended to it: its URL parameters, its SQL
            under ``"sql"`` and its body under ``"body"``.
    """
    # Held for the whole context: while it is bound, no other socket can take the port, so a refusing port stays
    # refusing. SO_REUSEPORT lets the listener share the port with it (Linux: the same user only).
    reservation = _reuse_port_socket()
    reservation.bind(("127.0.0.1", 0))
    port: int = reservation.getsockname()[1]
    try:
        if fault is Fault.REFUSE and not after_handshake:
            yield port
            return
        server = _FaultServer(
            port, fault=fault, after_handshake=after_handshake, error=error, garbage=garbage, requests=requests
        )
        try:
            server.start()
            yield port
        finally:
            server.stop()
    finally:
        reservation.close()


def _reuse_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


# -- the server --------------------------------------------------------------------------------------------------


class _FaultServer(socketserver.ThreadingTCPServer):
    # Handler threads are joined at server_close, and are not daemons: a leaked one would show (and block exit).
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        port: int,
        *,
        fault: Fault,
        after_handshake: bool,
        error: ServerError,
        garbage: bytes,
        requests: list[dict[str, str]] | None,
    ) -> None:
        self.fault = fault
        self.after_handshake = after_handshake
        self.error = error
        self.garbage = garbage
        self.requests = requests
        self.stopping = threading.Event()
        self._answered: set[str] = set()
        self._connections: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._listening = True
        self._thread = threading.Thread(
            target=self.serve_forever, args=(POLL_INTERVAL_SECONDS,), name=f"fault-server-{port}"
        )
        super().__init__(("127.0.0.1", port), _Handler, bind_and_activate=False)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Release hanging handlers, stop accepting, close every connection, join every thread."""
        with self._guard:
            self.stopping.set()
        self.stop_listening()
        with self._guard:
            connections = list(self._connections)
        for connection in connections:
            # Unblocks a handler waiting to read the next request of a kept-alive connection.
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.server_close()  # joins the handler threads (block_on_close)

    def stop_listening(self) -> None:
        """Refuse new connections from now on (the reservation socket keeps the port taken)."""
        with self._guard:
            if not self._listening:
                return
            self._listening = False
        if self._thread.is_alive():
            self.shutdown()  # waits for serve_forever to return
            self._thread.join()
        with suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()

    def track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._guard:
            if not open_:
                self._connections.discard(connection)
                return
            self._connections.add(connection)
            stopped = self.stopping.is_set()
        if stopped:
            # Accepted after stop() took its list of connections: shut down here instead.
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handshake_completed_by(self, query: str) -> bool:
        """Record that the handshake request ``query`` is answered; whether every handshake request now is."""
        with self._guard:
            self._answered.add(_handshake_step(query))
            return self._answered >= set(_HANDSHAKE)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-request (it timed out, or the test ended) is expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FaultServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's algorithm holds the body back until
        # the client's delayed ACK (40 ms) for each answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, open_=True)

    def finish(self) -> None:
        with suppress(OSError, ValueError):
            super().finish()
        self.server.track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        body = self._read_body()
        params = {name: values[-1] for name, values in parse_qs(urlsplit(self.path).query).items()}
        query = params.get("query") or body.decode(errors="replace")
        if self.server.requests is not None:
            self.server.requests.append({**params, "sql": query, "body": body.decode(errors="replace")})
        if self.server.after_handshake:
            answer = _handshake_answer(query, params)
            if answer is not None:
                self._answer_handshake(query, answer)
                return
        self._fail()

    def _answer_handshake(self, query: str, answer: tuple[str, bytes]) -> None:
        server = self.server
        if server.fault is Fault.REFUSE and server.handshake_completed_by(query):
            # Before answering: the client sends its next request only after this answer, so that request
            # is certain to find nothing listening.
            server.stop_listening()
        content_type, payload = answer
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("X-ClickHouse-Server-Display-Name", "fault-server")
        self.send_header("X-ClickHouse-Timezone", "UTC")
        self.send_header("Content-Length", str(len(payload)))
        if server.fault is Fault.REFUSE:
            # No kept-alive connection may survive the handshake: the next request must open a new one.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)

    def _fail(self) -> None:
        fault = self.server.fault
        if fault in (Fault.RESET, Fault.REFUSE):
            # REFUSE reaches here only for a request that is not part of the handshake before the handshake is
            # complete: the closest a listening server can come to refusing it is to stop listening and reset it.
            if fault is Fault.REFUSE:
                self.server.stop_listening()
            self._reset()
        elif fault is Fault.HANG:
            self.server.stopping.wait(HANG_LIMIT_SECONDS)
            self.close_connection = True
        elif fault is Fault.CLICKHOUSE_ERROR:
            error = self.server.error
            self._reply(
                error.status,
                error.body(),
                "text/plain; charset=UTF-8",
                {"X-ClickHouse-Exception-Code": str(error.code), "X-ClickHouse-Server-Display-Name": "fault-server"},
            )
        elif fault is Fault.GARBAGE:
            self._reply(200, self.server.garbage, "application/octet-stream", {"X-ClickHouse-Format": "Native"})
        elif fault is Fault.SERVICE_UNAVAILABLE:
            self._reply(503, b"", "text/plain", {})
        else:
            status = _PROXY_PAGES[fault]
            page = f"<html><head><title>{status}</title></head><body><center><h1>{status}</h1></center></body></html>\n"
            self._reply(status, page.encode(), "text/html", {"Server": "nginx"})

    def _reply(self, status: int, payload: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _reset(self) -> None:
        """Close the connection with a TCP reset instead of an orderly FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket closes for real only once its file objects are closed too.
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunks()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunks(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # Trailer lines, up to the empty line that ends the body.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()


# -- the handshake ----------------------------------------------------------------------------------------------

# The set-up requests, recognised by a fragment of their SQL, and how each is answered.
_HANDSHAKE: dict[str, Callable[[dict[str, str]], tuple[str, bytes]]] = {
    # clickhouse-connect's client: a command (TabSeparated answer).
    "SELECT version(), timezone()": lambda _: ("text/tab-separated-values", f"{SERVER_VERSION}\tUTC\n".encode()),
    # clickhouse-connect's client: which settings exist and may be changed.
    "FROM system.settings": lambda _: ("application/octet-stream", _settings_block()),
    # clickhouse-connect's client: the protocol-version probe. Answered as a server (or proxy) that ignores the
    # client_protocol_version parameter does, which clickhouse-connect accepts by using protocol version 0.
    "SELECT 1 AS check": lambda _: ("application/octet-stream", _native_block([("check", "UInt8", [1])])),
    # SQLAlchemy's dialect, on an engine's first connection.
    "SELECT currentDatabase()": lambda params: (
        "application/octet-stream",
        _native_block([("currentDatabase()", "String", [params.get("database", "default")])]),
    ),
}


def _handshake_step(query: str) -> str:
    return next(fragment for fragment in _HANDSHAKE if fragment in query)


def _handshake_answer(query: str, params: dict[str, str]) -> tuple[str, bytes] | None:
    for fragment, answer in _HANDSHAKE.items():
        if fragment in query:
            return answer(params)
    return None


# Settings that clickhouse-connect looks up to decide what it may send; all changeable, as for a default user.
_SETTINGS = [
    ("send_progress_in_http_headers", "0"),
    ("http_headers_progress_interval_ms", "100"),
    ("enable_http_compression", "0"),
    ("cancel_http_readonly_queries_on_client_close", "0"),
    ("date_time_input_format", "basic"),
    ("max_execution_time", "0"),
]


def _settings_block() -> bytes:
    names, values = zip(*_SETTINGS, strict=True)
    return _native_block(
        [("name", "String", list(names)), ("value", "String", list(values)), ("readonly", "UInt8", [0] * len(names))]
    )


def _native_block(columns: list[tuple[str, str, list[Any]]]) -> bytes:
    """One block of ClickHouse's Native format (protocol version 0) holding String and UInt8 columns."""
    rows = len(columns[0][2])
    out = bytearray(_varuint(len(columns)) + _varuint(rows))
    for name, type_name, values in columns:
        out += _native_string(name.encode()) + _native_string(type_name.encode())
        for value in values:
            out += _native_string(value.encode()) if type_name == "String" else bytes([value])
    return bytes(out)


def _native_string(data: bytes) -> bytes:
    return _varuint(len(data)) + data


def _varuint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)

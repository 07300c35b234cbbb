"""Socket plumbing for fake model servers: real HTTP/1.1 over loopback sockets.

:class:`LoopbackHTTPServer` accepts connections in a daemon thread, serves
each in its own thread with a :class:`ConnectionHandler`, records every
request and connection, and can refuse or accept again (a server that died
and came back). Every wait is bounded and wakes up on :meth:`stop`, so a test
run never hangs on it. What the server answers is a subclass's business (see
:mod:`tests.fakes.lmstudio`): it sets ``handler_class`` to a handler whose
``_handle_request`` reads ``self.path`` and writes with the helpers here.

Standard library only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

__all__ = [
    "IO_TIMEOUT_SECONDS",
    "POLL_SECONDS",
    "Abort",
    "ConnectionHandler",
    "ConnectionRecord",
    "LoopbackHTTPServer",
    "RequestRecord",
    "dumps",
]

log = logging.getLogger("tests.fakes")

#: Granularity of every interruptible wait: bounds how late stop() or a
#: vanished client is noticed by a stalled or streaming request.
POLL_SECONDS = 0.05
# Bound on any single read or write once a request has started, so a client
# that stops reading cannot pin a thread for ever.
IO_TIMEOUT_SECONDS = 30.0
_MAX_REQUEST_LINE = 65536
_MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class RequestRecord:
    """One request as the fake received it, and what became of it."""

    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any  # parsed body, or None when absent or not JSON
    received_at: float  # time.monotonic()
    connection_id: int
    fault: str | None = None  # kind of the fault applied, if any
    status: int | None = None  # status sent, None when none was sent
    chunks_sent: int = 0  # SSE `data:` payloads written, [DONE] included
    client_disconnected: bool = False  # the client left before the response ended
    finished_at: float | None = None


@dataclass
class ConnectionRecord:
    """One accepted TCP connection.

    ``closed_by`` says who ended it: ``"peer"`` (the client closed or reset
    it), ``"idle_timeout"``, ``"server"`` (``Connection: close`` or a
    protocol error), ``"fault"``, ``"stop"``, ``"overload"`` or ``"error"``.
    """

    id: int
    peer: tuple[str, int]
    opened_at: float  # time.monotonic()
    closed_at: float | None = None
    closed_by: str | None = None
    requests: int = 0

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def peer_closed(self) -> bool:
        """Whether the server saw the client close (or reset) the connection."""
        return self.closed_by == "peer"


class Abort(Exception):
    """Unwind the current request and close its connection."""


def dumps(obj: Any) -> bytes:
    """JSON, compact like Express's ``res.json()``."""
    return json.dumps(obj, separators=(",", ":")).encode()


class LoopbackHTTPServer:
    """A threaded HTTP/1.1 server on loopback, with records and bounded waits.

    ``idle_timeout``: seconds a keep-alive connection may idle (None: for
    ever); ``max_connections``: connections served at once, others closed.
    """

    #: The handler serving each connection (a :class:`ConnectionHandler`).
    handler_class: type[ConnectionHandler]
    #: Prefix of the server's thread names.
    thread_name = "fake-server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout: float | None = 5.0,
        max_connections: int = 256,
    ) -> None:
        self.host = host
        self._port = port
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RequestRecord] = []
        self._connections: list[ConnectionRecord] = []
        self._open_sockets: dict[int, socket.socket] = {}
        self._threads: set[threading.Thread] = set()
        self._ids = itertools.count(1)

        self._listen_lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self._wake_acceptor: socket.socket | None = None
        self._started = False
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the requested one before :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self.host}:{self._port}"

    @property
    def listening(self) -> bool:
        return self._accept_thread is not None

    def start(self) -> Self:
        """Bind, serve in a daemon thread and return self."""
        if self._started:
            raise RuntimeError(f"{type(self).__name__} can only be started once")
        self._started = True
        self.accept()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop listening, close every client connection and wait for threads.

        Returns within about ``timeout`` seconds even with stalled or
        streaming requests in flight: those waits watch the stop flag, and
        shutting the sockets down wakes any thread blocked in a read or write.
        """
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        self.refuse()
        with self._lock:
            sockets = list(self._open_sockets.values())
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def refuse(self, *, drop_connections: bool = False) -> None:
        """Close the listening socket, so new connections are refused.

        Connections already accepted carry on unless ``drop_connections`` is
        true, which is what a server process that died looks like to its
        clients. :meth:`accept` listens again on the same port.
        """
        with self._listen_lock:
            thread, self._accept_thread = self._accept_thread, None
            if thread is not None:
                assert self._wake_acceptor is not None
                # The accept thread closes its own sockets: closing the
                # listener from here could race with its accept() on a reused
                # descriptor.
                self._wake_acceptor.send(b"x")
        if thread is not None:
            thread.join(5.0)
        if drop_connections:
            # Only now: every connection accepted until the listener closed
            # is in the list (the accept thread registers each), so none
            # accepted meanwhile carries on as if the process still lived.
            with self._lock:
                sockets = list(self._open_sockets.values())
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def accept(self) -> None:
        """Listen (again) on the port, undoing :meth:`refuse`."""
        if self._stopping.is_set():
            raise RuntimeError(f"{type(self).__name__} is stopped")
        with self._listen_lock:
            if self._accept_thread is not None:
                return
            # create_server sets SO_REUSEADDR, so the port can be bound again
            # while connections from the previous listener linger.
            listener = socket.create_server((self.host, self._port), backlog=128)
            self._port = listener.getsockname()[1]
            listener.setblocking(False)
            waker, self._wake_acceptor = socket.socketpair()
            self._accept_thread = threading.Thread(
                target=self._accept_loop,
                args=(listener, waker, self._wake_acceptor),
                name=f"{self.thread_name}-accept-{self._port}",
                daemon=True,
            )
            self._accept_thread.start()

    def _accept_loop(
        self, listener: socket.socket, waker: socket.socket, wake: socket.socket
    ) -> None:
        """Accept connections until a byte arrives on ``waker``."""
        try:
            while True:
                readable, _, _ = select.select([listener, waker], [], [])
                if waker in readable:
                    return
                try:
                    sock, peer = listener.accept()
                except BlockingIOError:  # the client gave up meanwhile
                    continue
                except OSError as exc:  # e.g. EMFILE: back off, keep going
                    log.warning("%s accept failed: %s", self.thread_name, exc)
                    time.sleep(POLL_SECONDS)
                    continue
                self._start_connection(sock, peer)
        finally:
            for sock in (listener, waker, wake):
                sock.close()

    def _start_connection(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.settimeout(None)
        record = ConnectionRecord(next(self._ids), peer, time.monotonic())
        with self._changed:
            self._connections.append(record)
            overloaded = len(self._open_sockets) >= self.max_connections
            if not overloaded:
                self._open_sockets[record.id] = sock
            self._changed.notify_all()
        if overloaded:
            sock.close()
            self._connection_closed(record, "overload")
            return
        thread = threading.Thread(
            target=self._serve_connection,
            args=(sock, record),
            name=f"{self.thread_name}-conn-{record.id}",
            daemon=True,
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _serve_connection(self, sock: socket.socket, record: ConnectionRecord) -> None:
        try:
            self.handler_class(sock, record.peer, self, record)
        except OSError:  # e.g. writing an error page to a vanished client
            self._connection_closed(record, "peer")
        except Exception:
            log.exception("%s connection %s failed", self.thread_name, record.id)
            self._connection_closed(record, "error")
        finally:
            sock.close()
            self._connection_closed(record, "server")
            with self._lock:
                self._open_sockets.pop(record.id, None)
                self._threads.discard(threading.current_thread())

    def _connection_closed(self, record: ConnectionRecord, reason: str) -> None:
        """Record the first reason given; later calls only confirm the close."""
        with self._changed:
            if record.closed_by is None:
                record.closed_by = "stop" if self._stopping.is_set() else reason
            if record.closed_at is None:
                record.closed_at = time.monotonic()
            self._changed.notify_all()

    # -- records -----------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> list[ConnectionRecord]:
        """A snapshot of the connections accepted so far, oldest first."""
        with self._lock:
            return list(self._connections)

    def clear_records(self) -> None:
        """Forget recorded requests and closed connections.

        Records of connections still open are kept: a client's pooled socket
        carries on into the next test, which may want to see it close.
        """
        with self._lock:
            self._requests.clear()
            self._connections[:] = [c for c in self._connections if c.open]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until ``predicate()`` is truthy; return its last value.

        Re-checks whenever a request or connection is recorded or changes,
        and at least every 50 ms. Never raises on timeout: assert the result.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            remaining = deadline - time.monotonic()
            if value or remaining <= 0:
                return value
            with self._changed:
                self._changed.wait(min(remaining, POLL_SECONDS))

    def _record_request(self, record: RequestRecord) -> None:
        with self._changed:
            self._requests.append(record)
            self._changed.notify_all()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


class ConnectionHandler(BaseHTTPRequestHandler):
    """Serve one connection's requests for a :class:`LoopbackHTTPServer`.

    Subclasses implement ``_handle_request`` (set ``self.record`` to the
    request's :class:`RequestRecord` first) and answer with the writing
    helpers; raising :class:`Abort` ends the connection.
    """

    protocol_version = "HTTP/1.1"
    #: Headers sent first in every answer.
    server_headers: dict[str, str] = {}

    def __init__(self, sock, peer, fake: LoopbackHTTPServer, record: ConnectionRecord):
        self.fake = fake
        self.conn_record = record
        self.record: RequestRecord | None = None
        self.headers_sent = False
        super().__init__(sock, peer, fake)

    # -- connection loop -----------------------------------------------------

    def handle_one_request(self) -> None:
        # Replaces the base class version: any method is routed (LM Studio
        # answers unknown methods with 200), and the idle wait is timed.
        fake = self.fake
        try:
            # Why: Express closes keep-alive sockets idle for its timeout; a
            # timed-out wait for the next request line is exactly that.
            self.connection.settimeout(fake.idle_timeout)
            self.raw_requestline = self.rfile.readline(_MAX_REQUEST_LINE + 1)
        except TimeoutError:
            self._close("idle_timeout")
            return
        except OSError:
            self._close("peer")
            return
        if not self.raw_requestline:
            self._close("peer")
            return
        self.connection.settimeout(IO_TIMEOUT_SECONDS)
        self.headers_sent = False
        self.record = None
        if len(self.raw_requestline) > _MAX_REQUEST_LINE:
            self.send_error(414)
            self._close("server")
            return
        if not self.parse_request():  # it has answered with an error
            self._close("server")
            return
        self.conn_record.requests += 1
        try:
            self._handle_request()
        except Abort:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self._client_gone()
        except TimeoutError:
            self._close("error")
        except OSError:
            self._close("peer")  # recorded as "stop" when stop() caused it
        except Exception:
            log.exception("fake server failed on %s %s", self.command, self.path)
            self._close("error")
            if not self.headers_sent:
                error = {"error": {"message": "fake server failed"}}
                with contextlib.suppress(OSError):
                    self._send_json(500, error)
        finally:
            if self.record is not None:
                self.record.finished_at = time.monotonic()
                self.fake._notify()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()
        self.fake._connection_closed(self.conn_record, "server")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake server: " + format, *args)

    def _close(self, reason: str) -> None:
        """Close the connection after this request and record why."""
        self.close_connection = True
        with self.fake._changed:
            if self.conn_record.closed_by is None:
                stopping = self.fake._stopping.is_set()
                self.conn_record.closed_by = "stop" if stopping else reason

    def _client_gone(self) -> None:
        if self.record is not None:
            self.record.client_disconnected = True
        self._close("peer")

    def _handle_request(self) -> None:
        raise NotImplementedError

    # -- reading -------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY_BYTES:
            raise Abort
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked_body(self) -> bytes:
        parts: list[bytes] = []
        size_read = 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise Abort
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # skip trailers
                return b"".join(parts)
            size_read += size
            if size_read > _MAX_BODY_BYTES:
                raise Abort
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF closing the chunk

    # -- waiting and closing -------------------------------------------------

    def _reset(self, rst: bool) -> None:
        """Close the socket without a word: FIN, or RST when ``rst``."""
        if rst:
            # A zero linger turns close() into a RST.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        else:
            self.connection.shutdown(socket.SHUT_RDWR)
        # The makefile() wrappers hold references that would defer the close.
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        self._close("fault")
        raise Abort

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False when stopping or the client left."""
        deadline = time.monotonic() + seconds
        while True:
            if self.fake._stopping.is_set():
                self._close("stop")
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            step = min(remaining, POLL_SECONDS)
            # Readable means: EOF (client gone, or stop() shut the socket)
            # or pipelined bytes, which are left in place.
            readable, _, _ = select.select([self.connection], [], [], step)
            if readable:
                try:
                    gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    if not self.fake._stopping.is_set():
                        self._client_gone()
                    return False
                self.fake._stopping.wait(step)

    # -- writing -------------------------------------------------------------

    def _start_response(self, status: int, headers: dict[str, str]) -> None:
        # Not send_response(): it adds a Server header the imitated servers
        # (Express...) never send.
        self.send_response_only(status)
        for name, value in self.server_headers.items():
            self.send_header(name, value)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Date", self.date_time_string())
        # send_header("Connection") also sets close_connection: derived from
        # it, the header leaves it unchanged.
        if self.close_connection:
            self.send_header("Connection", "close")
        else:
            self.send_header("Connection", "keep-alive")
            idle = self.fake.idle_timeout
            if idle is not None:
                seconds = max(1, math.ceil(idle))
                self.send_header("Keep-Alive", f"timeout={seconds}")
        self.end_headers()  # writes the buffered header block in one go
        self.headers_sent = True
        if self.record is not None:
            self.record.status = status

    def _send_json(
        self, status: int, obj: Any, headers: dict[str, str] | None = None
    ) -> None:
        payload = obj if isinstance(obj, bytes) else dumps(obj)
        self._send_bytes(status, payload, "application/json; charset=utf-8", headers)

    def _send_bytes(
        self,
        status: int,
        payload: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        all_headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(payload)),
            **(headers or {}),
        }
        self._start_response(status, all_headers)
        if self.command != "HEAD":
            self._write(payload)

    def _write_chunk(self, data: bytes) -> None:
        self._write(b"%X\r\n%s\r\n" % (len(data), data))

    def _write(self, data: bytes) -> None:
        # wfile is unbuffered (wbufsize 0): each write reaches the socket now.
        self.wfile.write(data)

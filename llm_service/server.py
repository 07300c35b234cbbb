"""The gunicorn worker: gthread, with request heads gathered on its event loop.

``gunicorn.conf.py`` sets ``worker_class = "llm_service.server.Worker"``.

Why this worker. Stock gthread hands a connection to a pool thread as soon as
it is readable; once one byte has arrived the thread blocks in gunicorn's
parser until the whole head is there, with no deadline. A client that sends
one byte every few seconds (slowloris) so pins a thread for as long as it
likes, and ~1,000 of them stop the service. Here a connection stays on the
worker's one ``selectors`` loop, non-blocking, until its head is complete
(``\\r\\n\\r\\n``): the loop gathers its bytes, bounded by gunicorn's own
request-line and header limits, and closes it when
``LLM_SERVICE_CLIENT_HEADER_TIMEOUT`` passes (counted from the accept, or from
the first byte of the next request on a kept-alive connection). Only a
complete head reaches a pool thread, with the gathered bytes given back to
gunicorn's parser, so a thread is only ever busy with a request that can be
served. The body then has as long again: every read of it goes through
:class:`DeadlineReader`, which closes the connection when that time is up.

A waiting connection costs a socket and a small object, not a thread, so
``worker_connections`` is large; when it is full all the same, the oldest idle
or still-sending connections are closed to let new clients in, so no number of
slow sockets can lock clients out for longer than the loop takes to notice.

Why not another worker class: gevent or eventlet would make waiting cheap too,
but monkey-patching replaces ``select.epoll``, which the disconnect watcher of
:mod:`llm_service.streaming` relies on, and any blocking call they cannot patch
(SQLite, C database drivers) would stall every request of the process. This
keeps gthread's threads for requests, and its loop, its keep-alive handling
and its shutdown. It serves plain HTTP/1.x, which is what the gateway speaks
behind the TLS-terminating proxy in front of it; TLS or HTTP/2 settings make
the worker refuse to start rather than run without the deadline.

A connection that ends after its answer (``Connection: close``) is closed as
RFC 9112 9.6 asks (FIN, then the client's unread bytes drained so the answer
is not cut by a reset), but on the loop, non-blocking and bounded: gthread
waits for it on the loop's thread, up to 2 s per connection, so clients that
keep such sockets open stalled every other connection of the worker.

Several workers share the listening socket; :mod:`llm_service.balance` keeps
a burst of connections from landing on one of them (a worker ahead of a
live sibling lets it accept, 10 ms at a time at most).

Shutdown (SIGTERM). The worker stops listening at once (its copy of the
listening socket is closed; the arbiter has closed its own, so new connections
are refused instead of waiting in the backlog), and tells
:data:`llm_service.lifecycle.drain` how long it has: new requests on open
connections are answered 503 ``server_shutting_down`` and streams still open
shortly before ``graceful_timeout`` end with that error event.

Contract with :mod:`llm_service.streaming`: the client socket a request sees
(``environ["gunicorn.socket"]``) is left blocking without a timeout. The body
deadline is applied to each read only and the socket's previous timeout is
put back after it, so a timeout the stream relay sets on the socket for its
writes is never replaced, and no short read deadline can cut a long stream.
"""

from __future__ import annotations

import contextlib
import errno
import math
import re
import selectors
import socket
import time
from collections import OrderedDict
from functools import partial
from typing import Any

from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.http.message import (
    DEFAULT_MAX_HEADERFIELD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
)
from gunicorn.workers import gthread

from . import balance, lifecycle
from .config import server_settings
from .lifecycle import drain

#: Largest single read while gathering a head.
READ_SIZE = 65536
#: Bytes of unfinished heads held by one worker at most, whatever the number of
#: connections; past it, the connection that would exceed it is closed.
MAX_GATHERED_BYTES = 64 * 1024 * 1024
#: How many connections to close at once when ``worker_connections`` is full.
ROOM_TO_MAKE = 32
#: gunicorn answers a request line over 1 MiB when the limit is 0 ("none").
UNLIMITED_LINE = 1024 * 1024
#: Accepts per wake-up of the listening socket (gthread's own accepts one).
ACCEPTS_PER_EVENT = 64
#: A connection closed after its answer (``Connection: close``) is half-closed
#: and its unread bytes drained (RFC 9112 9.6: so the kernel does not reset
#: the connection before the client has read the answer) for this long at
#: most, or until this many bytes, on the loop, without blocking it.
LINGER_SECONDS = 2.0
LINGER_MAX_DRAIN = 65536
#: Connections lingering at once at most; past it the oldest is closed at once.
MAX_LINGERING = 1024

_HEAD_END = b"\r\n\r\n"
#: A line feed without its carriage return: gunicorn refuses it, so such a head
#: goes to the parser at once (to be answered 400) instead of waiting.
_BARE_LF = re.compile(rb"(?<!\r)\n")


class ClientTimeoutError(TimeoutError):
    """The client did not send the request body within its deadline."""


class DeadlineReader:
    """The client socket as gunicorn's parser reads it: every read ends by a deadline.

    Past the deadline the connection is shut down, so whatever the app was
    doing with the body, the client is disconnected, and the read fails with a
    ``TimeoutError`` (which Werkzeug reports to the app as a client that went
    away, and gunicorn as a connection to close).
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.deadline = math.inf

    def recv(self, size: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining > 0:
            prior = self.sock.gettimeout()
            timeout = remaining if prior is None else min(prior, remaining)
            self.sock.settimeout(timeout)
            try:
                return self.sock.recv(size)
            except TimeoutError:
                pass
            finally:
                self.sock.settimeout(prior)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        raise ClientTimeoutError("the client did not send the request in time")


class ModeSocket(socket.socket):
    """A client socket whose mode switches cost nothing when nothing changes.

    A kept-alive request switches its socket between the loop (non-blocking)
    and a thread (blocking), and gthread asks twice on each side. Each
    ``setblocking`` is an ``ioctl`` that hands the GIL over; the mode is
    known without one (``gettimeout``), so only real changes make the call.
    """

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        timeout = self.gettimeout()
        if (timeout is None) if flag else (timeout == 0.0):
            return
        super().setblocking(flag)


class Connection(gthread.TConn):
    """gthread's connection, with the head gathered so far."""

    def __init__(self, cfg: Any, sock: Any, *args: Any) -> None:
        if type(sock) is socket.socket:
            sock.__class__ = ModeSocket  # same layout: only the method differs
        super().__init__(cfg, sock, *args)
        self.head = bytearray()
        self.scanned = 0  # bytes of ``head`` already searched for its end
        self.head_deadline = 0.0
        #: The worker's non-blocking linger; ``None``: close as gthread does.
        self.linger: Any = None
        self.linger_deadline = 0.0
        self.drained = 0

    def close(self, graceful: bool = False) -> None:
        """As gthread, but a graceful close lingers on the worker's loop.

        gthread's graceful close (``util.close_graceful``) runs on the loop's
        thread and waits there up to 2 s for the client to close: each client
        that asks ``Connection: close`` and keeps its socket open stalled every
        other connection of the worker (accepts, heads, keep-alive) that long.
        """
        if graceful and self.linger is not None:
            self.linger(self)
        else:
            super().close(graceful)


class Worker(gthread.ThreadWorker):
    """gthread that hands a connection to a thread only once its head is complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = 10.0
        #: Connections whose head is being gathered, oldest deadline first.
        self.gathering: OrderedDict[Connection, None] = OrderedDict()
        #: Half-closed connections being drained, oldest deadline first.
        self.lingering: OrderedDict[Connection, None] = OrderedDict()
        self.gathered_bytes = 0
        line = self.cfg.limit_request_line
        if line < 0 or line >= MAX_REQUEST_LINE:
            line = MAX_REQUEST_LINE
        self.line_limit = line or UNLIMITED_LINE
        fields = self.cfg.limit_request_fields
        if fields <= 0 or fields > MAX_HEADERS:
            fields = MAX_HEADERS
        field_size = self.cfg.limit_request_field_size
        if field_size <= 0:
            field_size = DEFAULT_MAX_HEADERFIELD_SIZE
        # gunicorn's own bound on a head: the request line, then its header
        # buffer (Message.max_buffer_headers).
        self.head_limit = self.line_limit + 4 + fields * (field_size + 2) + 4
        # In the arbiter, before the fork: this worker's slot among its siblings.
        self.balancer = balance.for_worker(self)

    def init_process(self) -> None:
        if self.cfg.is_ssl or self.cfg.http2_cleartext in ("prior-knowledge", "both"):
            raise RuntimeError(
                "llm_service.server.Worker serves plain HTTP/1.x: terminate TLS "
                "in front of the gateway, or use gunicorn's gthread worker."
            )
        self.header_timeout = server_settings()["CLIENT_HEADER_TIMEOUT"]
        # Before the app loads: without a shared slot store, each worker takes
        # its share of a model host's slots.
        lifecycle.workers = max(1, self.cfg.workers)
        super().init_process()

    # Accepting and gathering heads (main thread) -----------------------------

    def accept(self, listener: Any) -> None:
        if not self._accepting:
            return  # an event of this same wait, from before listening stopped
        balancer = self.balancer
        forced = 0 if balancer is None else balancer.take_forced()
        for _ in range(ACCEPTS_PER_EVENT):
            if self.nr_conns >= self.worker_connections:
                return
            if balancer is not None:
                if forced:
                    forced -= 1
                elif balancer.defer(self.nr_conns):
                    self.set_accept_enabled(False)
                    return
            try:
                sock, addr = listener.accept()
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    return
                raise
            self.nr_conns += 1
            if balancer is not None:
                balancer.publish(self.nr_conns)
            conn = Connection(self.cfg, sock, addr, listener.getsockname())
            conn.linger = self._linger
            self._gather(conn)

    def set_accept_enabled(self, enabled: bool) -> None:
        """As gthread, but a deferring worker listens again only when it may.

        gthread's loop asks to listen on each turn while it is not listening.
        """
        balancer = self.balancer
        if (
            enabled
            and balancer is not None
            and balancer.deferring
            and not balancer.may_listen(self.nr_conns)
        ):
            return
        super().set_accept_enabled(enabled)

    def on_client_socket_readable(self, conn: Connection, client: Any) -> None:
        """A kept-alive connection sends its next request: gather its head."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._gather(conn)
        self._read_head(conn, client)

    def _gather(self, conn: Connection) -> None:
        conn.sock.setblocking(False)
        conn.head_deadline = time.monotonic() + self.header_timeout
        if not self.alive:
            conn.head_deadline = min(
                conn.head_deadline, time.monotonic() + gthread.STOP_KEEPALIVE_LINGER
            )
        self.gathering[conn] = None
        self.poller.register(
            conn.sock, selectors.EVENT_READ, partial(self._read_head, conn)
        )

    def _read_head(self, conn: Connection, _client: Any) -> None:
        want = min(READ_SIZE, self.head_limit + 1 - len(conn.head))
        try:
            data = conn.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data or self.gathered_bytes + len(data) > MAX_GATHERED_BYTES:
            self._drop(conn)
            return
        conn.head += data
        self.gathered_bytes += len(data)
        self._check_head(conn)

    def _check_head(self, conn: Connection) -> None:
        head = conn.head
        start = max(0, conn.scanned - 3)
        if head.find(_HEAD_END, start) >= 0 or _BARE_LF.search(head, start):
            self._hand_over(conn)
            return
        conn.scanned = len(head)
        # One empty line may come before the request line (RFC 9112 2.2).
        line_start = 2 if head.startswith(b"\r\n") else 0
        line_end = head.find(b"\r\n", line_start)
        line_length = (line_end if line_end >= 0 else len(head) - 2) - line_start
        if line_length > self.line_limit:
            self._refuse(conn, LimitRequestLine(line_length, self.line_limit))
        elif len(head) > self.head_limit:
            self._refuse(conn, LimitRequestHeaders("max buffer headers"))

    def _stop_gathering(self, conn: Connection) -> None:
        self.poller.unregister(conn.sock)
        del self.gathering[conn]
        self.gathered_bytes -= len(conn.head)

    def _hand_over(self, conn: Connection) -> None:
        self._stop_gathering(conn)
        self.enqueue_req(conn)

    def _refuse(self, conn: Connection, error: Exception) -> None:
        """Answer a head over gunicorn's limits as gunicorn would (414 or 431)."""
        self._stop_gathering(conn)
        # The socket is non-blocking: the short answer is written now or not at all.
        self.handle_error(None, conn.sock, conn.client, error)
        self.nr_conns -= 1
        conn.close()

    def _drop(self, conn: Connection) -> None:
        self._stop_gathering(conn)
        self.nr_conns -= 1
        conn.close()

    # Closing after an answer (main thread) ------------------------------------

    def _linger(self, conn: Connection) -> None:
        """Send FIN now; drain what the client still sends until it closes.

        Called by gthread (on the loop) for a connection that ends after its
        answer. Never blocks: the draining is the loop's, bounded by
        ``LINGER_SECONDS``, ``LINGER_MAX_DRAIN`` and ``MAX_LINGERING``.
        """
        sock = conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self.lingering) >= MAX_LINGERING:
            self._end_linger(next(iter(self.lingering)))
        sock.setblocking(False)
        conn.linger_deadline = time.monotonic() + LINGER_SECONDS
        conn.drained = 0
        self.lingering[conn] = None
        self.poller.register(sock, selectors.EVENT_READ, partial(self._drain, conn))

    def _drain(self, conn: Connection, _client: Any) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_MAX_DRAIN:
            self._end_linger(conn)

    def _end_linger(self, conn: Connection) -> None:
        self.poller.unregister(conn.sock)
        del self.lingering[conn]
        conn.sock.close()

    def murder_pending(self) -> None:
        """Close connections past their head or linger deadline; make room."""
        super().murder_pending()
        now = time.monotonic()
        while self.gathering:
            conn = next(iter(self.gathering))
            if conn.head_deadline > now:
                break
            self._drop(conn)
        while self.lingering:
            conn = next(iter(self.lingering))
            if conn.linger_deadline > now:
                break
            self._end_linger(conn)
        if self.alive and self.nr_conns >= self.worker_connections:
            self._make_room()

    def _make_room(self) -> None:
        """Close the oldest idle, then the oldest still-sending connections."""
        target = self.worker_connections - ROOM_TO_MAKE
        while self.nr_conns > target and self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            self.poller.unregister(conn.sock)
            self.nr_conns -= 1
            conn.close()
        while self.nr_conns > target and self.gathering:
            self._drop(next(iter(self.gathering)))

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.gathering:
            first = next(iter(self.gathering)).head_deadline
            timeout = min(timeout, max(0.0, first - time.monotonic()) + 0.005)
        if self.lingering:
            first = next(iter(self.lingering)).linger_deadline
            timeout = min(timeout, max(0.0, first - time.monotonic()) + 0.005)
        if self.balancer is not None:
            # Before waiting, so siblings see this worker's count and that it
            # is alive; a stopping worker listens no more: none waits for it.
            if self.alive:
                self.balancer.publish(self.nr_conns)
                timeout = self.balancer.timeout(timeout)
            else:
                self.balancer.leave()
        super().wait_for_and_dispatch_events(timeout)

    def finish_request(self, conn: Connection, fs: Any) -> None:
        """As gthread, but bytes read ahead (a pipelined request) are gathered too."""
        if not fs.cancelled() and fs.exception() is None and fs.result() is True:
            ahead = conn.parser.unreader.take_buffered()
            if ahead:
                self._gather(conn)
                conn.head += ahead
                self.gathered_bytes += len(ahead)
                self._check_head(conn)
                return
        super().finish_request(conn, fs)

    # Serving a request (pool thread) -----------------------------------------

    def handle(self, conn: Connection) -> Any:
        head = bytes(conn.head)
        conn.head = bytearray()
        conn.scanned = 0
        conn.data_ready = True  # gthread must not wait for data: it is here
        conn.sock.setblocking(True)
        conn.init()  # plain HTTP/1.x: makes the parser, reads nothing
        unreader = conn.parser.unreader
        unreader.unread(head)
        if not isinstance(unreader.sock, DeadlineReader):
            unreader.sock = DeadlineReader(unreader.sock)
        unreader.sock.deadline = time.monotonic() + self.header_timeout
        return super().handle(conn)

    # Shutdown -----------------------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.alive:
            drain.begin(self.cfg.graceful_timeout)
            self.method_queue.defer(self._stop_listening)
        super().handle_exit(sig, frame)

    def _stop_listening(self) -> None:
        """Refuse new connections now rather than leave them in the backlog."""
        self.set_accept_enabled(False)
        for listener in self.sockets:
            listener.close()
        cap = time.monotonic() + gthread.STOP_KEEPALIVE_LINGER
        for conn in self.gathering:
            conn.head_deadline = min(conn.head_deadline, cap)

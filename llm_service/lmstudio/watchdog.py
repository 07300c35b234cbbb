"""Wall-clock deadlines and cancellation for upstream calls.

A socket read only wakes for data, for its own per-read timeout, or when the
socket is shut down. An upstream that drips one byte per read never trips a
per-read timeout, and a caller that has gone away cannot stop a blocked read.
So each call runs in a :class:`CallScope`: the connections it uses register
their sockets with it, and one watchdog thread per process shuts those sockets
down when the call's deadline passes; :meth:`CallScope.cancel` does the same at
once from any thread. Either way the blocked read wakes within milliseconds,
the upstream sees its connection close (and stops generating), and the client
raises the matching error.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading

# Bound at import: a test that fakes the client's clock must not stop this one.
from time import monotonic

import urllib3.poolmanager
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: Why a scope ended its call early.
DEADLINE = "deadline"
CANCELLED = "cancelled"

_current = threading.local()


def _shutdown(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on this socket; close() does not.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class CallScope:
    """The deadline and cancellation of one upstream call, across its attempts.

    Thread-safe: :meth:`cancel` may come from any thread (e.g. the one that
    notices the gateway's own client hang up).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        #: Wall-clock (``monotonic()``) end of the call; None: no deadline.
        self.deadline: float | None = None
        #: After the request is sent, the deadline becomes send time + this.
        self.after_send: float | None = None
        #: When the last attempt finished sending its request.
        self.sent_at: float | None = None
        #: :data:`DEADLINE` or :data:`CANCELLED` once the call was ended early.
        self.reason: str | None = None
        self.finished = False

    @property
    def ended(self) -> bool:
        """True once the deadline passed or the call was cancelled."""
        return self.reason is not None

    def cancel(self) -> None:
        """End the call now: its caller no longer wants the answer."""
        self._end(CANCELLED)

    def expire(self) -> None:
        """End the call because its deadline passed (called by the watchdog)."""
        if self.deadline is not None and monotonic() >= self.deadline:
            self._end(DEADLINE)

    def set_deadline(self, deadline: float) -> None:
        """Set (or move) the wall-clock deadline and have the watchdog watch it."""
        with self._lock:
            if self.finished:
                return
            self.deadline = deadline
        watchdog.schedule(self, deadline)

    def finish(self) -> None:
        """The call is over: forget its sockets, which go back to the pool."""
        with self._lock:
            self.finished = True
            self._sockets.clear()

    def active(self) -> _Active:
        """Make this the scope of connections used by the current thread."""
        return _Active(self)

    # -- called by the connections -------------------------------------------

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            ended = self.reason is not None
            if not ended and not self.finished:
                self._sockets.add(sock)
        if ended:
            _shutdown(sock)

    def detach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def mark_sent(self) -> None:
        self.sent_at = monotonic()
        if self.after_send is not None:
            self.set_deadline(self.sent_at + self.after_send)

    def _end(self, reason: str) -> None:
        with self._lock:
            if self.finished or self.reason is not None:
                return
            self.reason = reason
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


class _Active:
    """``with scope.active()``: a class, not a generator (once per attempt)."""

    __slots__ = ("previous", "scope")

    def __init__(self, scope: CallScope) -> None:
        self.scope = scope
        self.previous: CallScope | None = None

    def __enter__(self) -> CallScope:
        self.previous = getattr(_current, "scope", None)
        _current.scope = self.scope
        return self.scope

    def __exit__(self, *_exc: object) -> None:
        _current.scope = self.previous


def current_scope() -> CallScope | None:
    """The scope of the call the current thread is making, if any."""
    return getattr(_current, "scope", None)


class Watchdog:
    """One thread per process that ends calls whose deadline passed."""

    #: Every this many schedules, entries of finished calls are dropped.
    COMPACT_EVERY = 1024

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, CallScope]] = []
        self._order = itertools.count()
        self._pid: int | None = None
        self._since_compacted = 0

    def schedule(self, scope: CallScope, deadline: float) -> None:
        with self._cond:
            if self._pid != os.getpid():
                # Started in the process that uses it: a thread does not
                # survive gunicorn's fork, so a worker starts its own.
                self._pid = os.getpid()
                self._heap = []
                threading.Thread(
                    target=self._run, name="call-watchdog", daemon=True
                ).start()
            self._since_compacted += 1
            if self._since_compacted >= self.COMPACT_EVERY:
                self._compact()
            heapq.heappush(self._heap, (deadline, next(self._order), scope))
            if self._heap[0][2] is scope:
                # The thread sleeps until the earliest deadline: only a new
                # earliest one needs it awake. Waking it for every call (most
                # end later than one already queued) cost each request a
                # thread switch and a turn of the GIL.
                self._cond.notify()

    def _compact(self) -> None:
        """Drop the entries of finished calls and moved deadlines (lock held).

        A call's entry would otherwise stay until its deadline (the retry
        budget, a minute by default) although the call ended in milliseconds:
        at a few hundred calls a second, tens of thousands of entries and some
        20 MB. Kept: the calls still running, so the heap stays within them
        plus ``COMPACT_EVERY``. Only later deadlines go, so the thread never
        sleeps past one it must keep.
        """
        self._since_compacted = 0
        self._heap = [
            entry
            for entry in self._heap
            if not entry[2].finished and entry[2].deadline == entry[0]
        ]
        heapq.heapify(self._heap)

    def pending(self) -> int:
        """Entries waiting (finished calls are dropped when the clock passes them
        or when the heap is compacted, see :meth:`_compact`)."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._next_due()
            for scope in due:
                scope.expire()

    def _next_due(self) -> list[CallScope]:
        """Wait until some entries are due; return their scopes."""
        while True:
            now = monotonic()
            due = []
            while self._heap and self._heap[0][0] <= now:
                deadline, _, scope = heapq.heappop(self._heap)
                # A moved deadline left this entry behind; its new one is queued.
                if not scope.finished and scope.deadline == deadline:
                    due.append(scope)
            if due:
                return due
            timeout = None
            if self._heap:
                # A deadline past what a wait takes (a budget of "inf") would
                # raise OverflowError here and end the thread: no later call
                # would ever be cut at its deadline.
                timeout = min(self._heap[0][0] - now, threading.TIMEOUT_MAX)
            self._cond.wait(timeout)


#: The process's watchdog.
watchdog = Watchdog()


# -- connections that register with the current scope --------------------------


class _ScopedConnectionMixin:
    """Registers its socket with the calling thread's scope for each request."""

    sock: socket.socket | None
    _scope: CallScope | None = None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._join_scope()

    def request(self, *args, **kwargs) -> None:
        if self.sock is not None:  # a reused connection: connect() is not called
            self._join_scope()
        super().request(*args, **kwargs)  # type: ignore[misc]
        if self._scope is not None:
            self._scope.mark_sent()

    def _join_scope(self) -> None:
        scope = current_scope()
        if scope is not None and self.sock is not None:
            self._scope = scope
            scope.attach(self.sock)

    def leave_scope(self) -> None:
        scope, self._scope = self._scope, None
        if scope is not None and self.sock is not None:
            scope.detach(self.sock)


class ScopedHTTPConnection(_ScopedConnectionMixin, HTTPConnection):
    pass


class ScopedHTTPSConnection(_ScopedConnectionMixin, HTTPSConnection):
    pass


class _PoolMixin:
    def _put_conn(self, conn) -> None:
        # Back in the pool, another thread's call may take it: detach it
        # first, so ending this call can never shut down that one's socket.
        if isinstance(conn, _ScopedConnectionMixin):
            conn.leave_scope()
        super()._put_conn(conn)  # type: ignore[misc]


class _HTTPPool(_PoolMixin, HTTPConnectionPool):
    ConnectionCls = ScopedHTTPConnection


class _HTTPSPool(_PoolMixin, HTTPSConnectionPool):
    ConnectionCls = ScopedHTTPSConnection


_SCOPED_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class ScopedAdapter(HTTPAdapter):
    """A requests adapter whose connections join the calling thread's scope."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _SCOPED_POOLS

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        # SOCKS proxies bring their own pool classes: leave them alone.
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _SCOPED_POOLS
        return manager

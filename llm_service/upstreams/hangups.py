"""Call scopes cancelled when the gateway's own client hangs up.

A request's thread is busy waiting for the upstream and cannot notice its client
leave; one watcher thread per process does (:class:`DisconnectWatcher`), and
cancels the call's :class:`~llm_service.lmstudio.watchdog.CallScope` (or the
stream) at once, so the upstream sees its connection close and stops
generating instead of finishing an answer nobody will read.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import has_request_context, request

from ..lmstudio.watchdog import CallScope

log = logging.getLogger("llm_service.streaming")


def hangup_scope() -> _HangupScope:
    """Give an upstream call a scope that is cancelled if this client hangs up.

    ``with hangup_scope() as scope:``. Outside a request (the CLI) the scope is
    never cancelled.
    """
    return _HangupScope()


class _HangupScope:
    """The context of :func:`hangup_scope`: a class, not a generator (every call)."""

    __slots__ = ("_stop_watching",)

    def __enter__(self) -> CallScope:
        scope = CallScope()
        sock = request.environ.get("gunicorn.socket") if has_request_context() else None
        self._stop_watching = disconnects.watch(sock, scope.cancel)
        return scope

    def __exit__(self, *_exc: object) -> None:
        self._stop_watching()


class DisconnectWatcher:
    """Notices, for the whole process, clients that hang up during a call.

    One thread waits in ``epoll`` for hang-ups (``EPOLLRDHUP``) on the sockets
    of every open call and calls that call's callback at once, so the upstream
    stops generating within milliseconds, not at the next chunk. A call's own
    thread is busy waiting for the upstream and cannot watch.

    A socket is handed to ``epoll`` only once its call has lasted
    :attr:`WATCH_AFTER`: most calls end sooner, and for them watching would
    cost two system calls, each handing the GIL over, on the hot path of every
    request. Until then the call is only noted in a dict (no system call). A
    client that hangs up in a call's first moments is noticed at most
    ``WATCH_AFTER`` (plus one poll) later; a call shorter than that ends of
    itself before anything could be saved.
    """

    EVENTS = (
        getattr(select, "EPOLLRDHUP", 0)
        | getattr(select, "EPOLLHUP", 0)
        | getattr(select, "EPOLLERR", 0)
    )
    #: How long a call runs unwatched, in seconds.
    WATCH_AFTER = 0.01

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Calls not yet in epoll, oldest first: fd -> (when to watch, callback).
        self._pending: collections.OrderedDict[
            int, tuple[float, Callable[[], None]]
        ] = collections.OrderedDict()
        #: Calls in epoll: fd -> callback.
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._epoll: Any = None
        self._wakeup = -1
        #: The thread waits with no timeout (nothing pending): a new call must
        #: wake it.
        self._sleeping = False

    def watch(
        self, sock: socket.socket | None, on_disconnect: Callable[[], None]
    ) -> Callable[[], None]:
        """Call ``on_disconnect`` when ``sock``'s peer hangs up; return an undo.

        Without a socket (not under gunicorn) or without epoll (not Linux),
        nothing is watched: the hang-up then shows when a write fails.
        """
        if sock is None or not hasattr(select, "epoll"):
            return lambda: None
        fd = sock.fileno()
        wake = False
        with self._lock:
            if self._epoll is None:
                self._start()
            self._pending[fd] = (time.monotonic() + self.WATCH_AFTER, on_disconnect)
            if self._sleeping:
                self._sleeping = False
                wake = True
        if wake:
            os.eventfd_write(self._wakeup, 1)

        def stop() -> None:
            with self._lock:
                if self._pending.pop(fd, None) is not None:
                    return  # never handed to epoll: nothing to undo
                if self._callbacks.pop(fd, None) is not None:
                    with contextlib.suppress(OSError):
                        self._epoll.unregister(fd)

        return stop

    def _start(self) -> None:
        # Created in the worker on first use: an epoll made before gunicorn
        # forks would be shared by every worker.
        self._epoll = select.epoll()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        threading.Thread(
            target=self._run, name="disconnect-watcher", daemon=True
        ).start()

    def _run(self) -> None:
        while True:
            for fd, _events in self._epoll.poll(self._promote()):
                if fd == self._wakeup:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wakeup)
                    continue
                self._hung_up(fd)

    def _hung_up(self, fd: int) -> None:
        with self._lock:
            callback = self._callbacks.pop(fd, None)
            if callback is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
        if callback is not None:
            try:
                callback()
            except Exception:  # a watcher must outlive any one stream
                log.exception("cancelling a stream failed")

    def _promote(self) -> float | None:
        """Hand the calls that have lasted long enough to epoll.

        Returns how long to wait for the next one to be due (None: nothing
        pending; a new call wakes the thread).
        """
        now = time.monotonic()
        with self._lock:
            while self._pending:
                fd, (due, callback) = next(iter(self._pending.items()))
                if due > now:
                    return due - now
                del self._pending[fd]
                try:
                    self._epoll.register(fd, self.EVENTS)
                except OSError:  # closed or reused meanwhile: not ours to watch
                    continue
                self._callbacks[fd] = callback
            self._sleeping = True
            return None


#: The process's watcher (gunicorn workers are processes: one each).
disconnects = DisconnectWatcher()

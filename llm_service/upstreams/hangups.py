"""Call scopes cancelled when the gateway's own client hangs up.

A request's thread is busy waiting for the upstream and cannot notice its client
leave; one watcher thread per process does (:class:`DisconnectWatcher`), and
cancels the call's :class:`~llm_service.lmstudio.watchdog.CallScope` (or the
stream) at once, so the upstream sees its connection close and stops
generating instead of finishing an answer nobody will read.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import has_request_context, request

from ..lmstudio.watchdog import CallScope

log = logging.getLogger("llm_service.streaming")


@contextlib.contextmanager
def hangup_scope() -> Iterator[CallScope]:
    """Give an upstream call a scope that is cancelled if this client hangs up.

    Outside a request (the CLI) the scope is never cancelled.
    """
    scope = CallScope()
    sock = request.environ.get("gunicorn.socket") if has_request_context() else None
    stop_watching = disconnects.watch(sock, scope.cancel)
    try:
        yield scope
    finally:
        stop_watching()


class DisconnectWatcher:
    """Notices, for the whole process, clients that hang up during a call.

    One thread waits in ``epoll`` for hang-ups (``EPOLLRDHUP``) on the sockets
    of every open stream and calls that stream's callback at once, so the
    upstream stops generating within milliseconds, not at the next chunk. A
    stream's own thread is busy waiting for the upstream and cannot watch.
    """

    EVENTS = (
        getattr(select, "EPOLLRDHUP", 0)
        | getattr(select, "EPOLLHUP", 0)
        | getattr(select, "EPOLLERR", 0)
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._epoll: Any = None

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
        with self._lock:
            if self._epoll is None:
                # Created in the worker on first use: an epoll made before
                # gunicorn forks would be shared by every worker.
                self._epoll = select.epoll()
                threading.Thread(
                    target=self._run, name="disconnect-watcher", daemon=True
                ).start()
            self._callbacks[fd] = on_disconnect
            self._epoll.register(fd, self.EVENTS)

        def stop() -> None:
            with self._lock:
                if self._callbacks.pop(fd, None) is not None:
                    with contextlib.suppress(OSError):
                        self._epoll.unregister(fd)

        return stop

    def _run(self) -> None:
        while True:
            for fd, _events in self._epoll.poll():
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


#: The process's watcher (gunicorn workers are processes: one each).
disconnects = DisconnectWatcher()

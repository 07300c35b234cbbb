"""Relaying an upstream event stream to the client: flush, keep-alive, cancel.

Each event leaves as soon as it arrives (gunicorn writes every yielded chunk).
When the client goes away the upstream stream is closed at once (a watcher
thread sees the hang-up), which makes LM Studio and llama.cpp stop generating;
the same watcher cancels non-streamed upstream calls (:func:`hangup_cancels`).
A failure after the first byte cannot become an HTTP status any more, so it
ends the stream with an error event in the route's error shape, and never with
the success marker.

A client that reads slowly is not buffered for: the upstream stream holds a
bounded buffer and TCP slows the upstream down. Each write to the client
(gunicorn's blocking ``sendall``) gets the stream's remaining time as the
socket's timeout, so a client that stops reading cannot hold the stream past
``STREAM_TOTAL_TIMEOUT``. Once a stream starts relaying, this module owns the
client socket's timeout; gunicorn sets the socket back to blocking (or
non-blocking, between keep-alive requests) when the response is done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, current_app, request, stream_with_context

from .errors import describe_failure, error_body, log_failure
from .lifecycle import ShuttingDownError, drain
from .lmstudio import CallScope, LMStudioError, SSEEvent, UpstreamStream
from .pipeline import correlation_id
from .upstream import get_upstream

log = logging.getLogger("llm_service.streaming")

KEEPALIVE = b": keep-alive\n\n"
#: Longest a silent stream sleeps before checking its keep-alive. Deadlines are
#: exact whatever it is, and hang-ups are seen by the watcher, so it can be long.
MAX_TICK_SECONDS = 1.0

#: Time a write may take when the stream's deadline has passed: the error event
#: that says so still reaches a client that reads.
FINAL_WRITE_SECONDS = 0.5

#: Turns one upstream event into the bytes to send (b"" to send nothing).
Renderer = Callable[[SSEEvent], bytes]


def sse(data: Any, event: str | None = None) -> bytes:
    """Encode one server-sent event; ``data`` is JSON-encoded unless a string."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


@contextlib.contextmanager
def hangup_cancels() -> Iterator[CallScope]:
    """Give an upstream call a scope that is cancelled if this client hangs up.

    The upstream then sees its connection close and stops generating, instead
    of finishing an answer nobody will read while the next request waits.
    """
    scope = CallScope()
    stop_watching = disconnects.watch(
        request.environ.get("gunicorn.socket"), scope.cancel
    )
    try:
        yield scope
    finally:
        stop_watching()


def open_upstream_stream(path: str, payload: dict[str, Any]) -> UpstreamStream:
    """Start the upstream stream with the app's stream limits (retried until open)."""
    config = current_app.config
    with hangup_cancels() as scope:
        return get_upstream().client.open_stream(
            path,
            payload,
            correlation_id=correlation_id(),
            first_token_timeout=config["STREAM_FIRST_TOKEN_TIMEOUT"],
            idle_timeout=config["STREAM_IDLE_TIMEOUT"],
            total_timeout=config["STREAM_TOTAL_TIMEOUT"],
            scope=scope,
        )


def event_stream_response(body: Iterable[bytes]) -> Response:
    """A ``text/event-stream`` response that no proxy or client should buffer."""
    response = Response(stream_with_context(body), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def relay(
    upstream: UpstreamStream,
    render: Renderer,
    finish: Callable[[], bytes],
    error_event: Callable[[dict[str, Any]], bytes],
) -> Iterator[bytes]:
    """Yield the client's bytes for ``upstream``'s events, then ``finish()``.

    On an upstream failure, yields ``error_event(body)`` instead of ``finish()``.
    When the client disconnects, the upstream is cancelled at once.
    """
    client = request.environ.get("gunicorn.socket")
    stop_watching = disconnects.watch(client, upstream.cancel)
    keepalive = current_app.config["STREAM_KEEPALIVE_SECONDS"]
    last_sent = time.monotonic()

    def bounded(data: bytes) -> bytes:
        """Let the write of ``data`` last no longer than the stream may."""
        if client is not None:
            remaining = upstream.total_deadline - time.monotonic()
            with contextlib.suppress(OSError):
                client.settimeout(max(remaining, FINAL_WRITE_SECONDS))
        return data

    try:
        tick = min(MAX_TICK_SECONDS, keepalive / 2)
        for event in upstream.events(tick=tick):
            if drain.streams_must_end():
                # The worker stops soon: say so rather than cut the stream.
                raise ShuttingDownError()
            if event is None:
                if time.monotonic() - last_sent >= keepalive:
                    yield bounded(KEEPALIVE)
                    last_sent = time.monotonic()
                continue
            data = render(event)
            if data:
                yield bounded(data)
                last_sent = time.monotonic()
        if upstream.cancelled:
            log.info("client disconnected; upstream stream cancelled")
            return
        yield bounded(finish())
    except GeneratorExit:
        # gunicorn stopped iterating: the client hung up, or a write outlasted
        # the stream's time (the socket timed out; gunicorn logs that itself).
        if time.monotonic() >= upstream.total_deadline and not upstream.cancelled:
            log.warning(
                "client read too slowly; stream cut at its total time limit",
                extra={"error_code": "stream_timeout"},
            )
        raise
    except Exception as err:  # upstream failures, and bugs: the stream still ends
        if isinstance(err, LMStudioError) and upstream.error is None:
            upstream.error = err  # e.g. a malformed chunk: the call's record says so
        failure = describe_failure(err)
        log_failure(err, failure)
        yield bounded(error_event(error_body(failure)))
    finally:
        stop_watching()
        upstream.close()


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

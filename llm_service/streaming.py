"""Relaying an upstream event stream to the client: flush, keep-alive, cancel.

Each event leaves as soon as it arrives (gunicorn writes every yielded chunk).
When the client goes away the upstream stream is closed at once, which makes LM
Studio and llama.cpp stop generating. A failure after the first byte cannot
become an HTTP status any more, so it ends the stream with an error event in
the route's error shape, and never with the success marker.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, current_app, request, stream_with_context

from .errors import describe_failure, error_body, log_failure
from .lmstudio import LMStudioError, SSEEvent, UpstreamStream
from .pipeline import correlation_id
from .upstream import get_upstream

log = logging.getLogger("llm_service.streaming")

KEEPALIVE = b": keep-alive\n\n"
#: How often a silent stream checks whether its client is still there.
TICK_SECONDS = 0.25

#: Turns one upstream event into the bytes to send (b"" to send nothing).
Renderer = Callable[[SSEEvent], bytes]


def sse(data: Any, event: str | None = None) -> bytes:
    """Encode one server-sent event; ``data`` is JSON-encoded unless a string."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


def open_upstream_stream(path: str, payload: dict[str, Any]) -> UpstreamStream:
    """Start the upstream stream with the app's stream limits (retried until open)."""
    config = current_app.config
    return get_upstream().client.open_stream(
        path,
        payload,
        correlation_id=correlation_id(),
        first_token_timeout=config["STREAM_FIRST_TOKEN_TIMEOUT"],
        idle_timeout=config["STREAM_IDLE_TIMEOUT"],
        total_timeout=config["STREAM_TOTAL_TIMEOUT"],
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
    Stops (and closes the upstream) as soon as the client disconnects.
    """
    client = request.environ.get("gunicorn.socket")
    keepalive = current_app.config["STREAM_KEEPALIVE_SECONDS"]
    last_sent = time.monotonic()
    try:
        for event in upstream.events(tick=TICK_SECONDS):
            if client_disconnected(client):
                log.info("client disconnected; upstream stream closed")
                return
            if event is None:
                if time.monotonic() - last_sent >= keepalive:
                    yield KEEPALIVE
                    last_sent = time.monotonic()
                continue
            data = render(event)
            if data:
                yield data
                last_sent = time.monotonic()
        yield finish()
    except LMStudioError as err:
        failure = describe_failure(err)
        log_failure(err, failure)
        yield error_event(error_body(failure))
    finally:
        upstream.close()


def client_disconnected(sock: socket.socket | None) -> bool:
    """Tell, without blocking, whether the client closed its connection.

    A readable socket with nothing to read is a closed one; a streaming client
    sends nothing else, so any readable byte means it is still there.
    """
    if sock is None:
        return False
    try:
        # poll, not select: select fails on descriptors above 1024, which a
        # gateway holding many streams reaches.
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True

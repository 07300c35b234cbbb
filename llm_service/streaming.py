"""Relaying an upstream event stream to the client: flush, keep-alive, cancel.

Each event leaves as soon as it arrives (gunicorn writes every yielded chunk).
When the client goes away the upstream stream is closed at once (a watcher
thread sees the hang-up), which makes LM Studio and llama.cpp stop generating;
the same watcher cancels non-streamed upstream calls
(:func:`~llm_service.upstreams.hangup_scope`). Streams are opened by the door
(:meth:`~llm_service.upstreams.Upstream.open_stream`); this module only relays.
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
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, current_app, request, stream_with_context

from .errors import describe_failure, error_body, log_failure
from .lifecycle import ShuttingDownError, drain
from .lmstudio.errors import LMStudioError
from .lmstudio.sse import SSEEvent
from .lmstudio.stream import UpstreamStream
from .upstreams import disconnects
from .upstreams.queueing import QueueNotice, SlotStream
from .usage import end_stream

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


def event_stream_response(body: Iterable[bytes]) -> Response:
    """A ``text/event-stream`` response that no proxy or client should buffer."""
    response = Response(stream_with_context(body), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def relay(
    upstream: UpstreamStream | SlotStream,
    render: Renderer,
    finish: Callable[[], bytes],
    error_event: Callable[[dict[str, Any]], bytes],
) -> Iterator[bytes]:
    """Yield the client's bytes for ``upstream``'s events, then ``finish()``.

    On an upstream failure, yields ``error_event(body)`` instead of ``finish()``.
    When the client disconnects, the upstream is cancelled at once. Before the
    final event (either) is yielded, the upstream is closed and the request's
    stream ended (its slot given back, its quota settled, its usage recorded):
    a client that reads the final event may send its next request at once.
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

    def final(data: bytes) -> bytes:
        """``data``, the stream's last event, once the stream has ended."""
        upstream.close()
        end_stream(data)
        return bounded(data)

    try:
        tick = min(MAX_TICK_SECONDS, keepalive / 2)
        for event in upstream.events(tick=tick):
            if drain.streams_must_end():
                # The worker stops soon: say so rather than cut the stream.
                raise ShuttingDownError()
            if isinstance(event, QueueNotice):
                # Waiting for a slot: the position, which keeps proxies too.
                yield bounded(event.data)
                last_sent = time.monotonic()
                continue
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
        yield final(finish())
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
        body = error_body(failure)
        retry_after = failure.headers.get("Retry-After")
        if retry_after and retry_after.isdigit():
            # No header can say it any more: the event does.
            body["error"]["retry_after"] = int(retry_after)
        yield final(error_event(body))
    finally:
        stop_watching()
        upstream.close()

"""App-wide request hooks: correlation ID, timing, security headers, access record."""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, request

from .ids import new_uuid
from .lifecycle import ShuttingDownError, drain

access_log = logging.getLogger("llm_service.access")

CORRELATION_HEADER = "X-Correlation-ID"
UPSTREAM_HOST_HEADER = "X-Upstream-Host"
_INCOMING_HEADERS = (CORRELATION_HEADER, "X-Request-ID")
#: A caller's correlation ID is kept when it matches this (also the API
#: document's pattern for the header, see openapi.py).
CORRELATION_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
_VALID_CORRELATION_ID = re.compile(CORRELATION_ID_PATTERN)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
HSTS = "max-age=31536000; includeSubDomains"
#: Identifies the gateway to whoever calls it, another llm-service included
#: (``flask lmstudio check`` reports an upstream that answers with it).
VIA = "1.1 llm-service"


def correlation_id() -> str:
    """Return this request's correlation ID, choosing it on first use.

    A caller's ``X-Correlation-ID`` (or ``X-Request-ID``) is kept when it is 1-128
    characters of ``[A-Za-z0-9._:-]``; anything else could forge log lines or
    headers, so it is replaced by a new UUID.
    """
    if "correlation_id" not in g:
        chosen = None
        for header in _INCOMING_HEADERS:
            value = request.headers.get(header)
            if value and _VALID_CORRELATION_ID.fullmatch(value):
                chosen = value
                break
        g.correlation_id = chosen or str(new_uuid())
    return g.correlation_id


def _start_request() -> None:
    g.started = time.perf_counter()
    correlation_id()
    if drain.draining:
        # Nothing started after SIGTERM: the worker is about to go.
        raise ShuttingDownError()


def _finish_response(response: Response) -> Response:
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    response.headers[CORRELATION_HEADER] = correlation_id()
    response.headers["X-Process-Time"] = f"{elapsed:.6f}"
    response.headers["Via"] = VIA
    if "queue_time" in g:
        # Seconds waited for a slot of the model server (see upstreams.queueing).
        response.headers["X-Queue-Time"] = f"{g.queue_time:.3f}"
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    if g.get("upstream_host"):
        # The model host that served the request (its name, never its URL).
        response.headers[UPSTREAM_HOST_HEADER] = g.upstream_host
    g.response_status = response.status_code
    if response.is_streamed and "started" in g:
        # Flask runs teardown when the view returns and again when a stream
        # ends (or not at all if it is closed unstarted): a stream's record is
        # written once, when the server closes its body, with its whole time.
        g.access_deferred = True
        state, where = g._get_current_object(), _Where.of_request()
        response.call_on_close(lambda: _write_access(state, where))
    return response


class _Where:
    """The request's facts an access record needs after its context is gone."""

    __slots__ = ("client", "correlation_id", "method", "path", "trace")

    @classmethod
    def of_request(cls) -> _Where:
        where = cls()
        where.method, where.path = request.method, request.path
        where.client = request.remote_addr
        where.correlation_id = correlation_id()
        where.trace = g.get("trace")
        return where


def _log_access(_error: BaseException | None) -> None:
    """Write one access record per request, after the response is complete."""
    if "started" in g and not g.get("access_deferred"):
        _write_access(g._get_current_object(), None)


def _write_access(state: object, where: _Where | None) -> None:
    """Write the record from ``state`` (the request's ``g``), once.

    ``where``: the request's facts, for a stream's record written after its
    context is gone (the correlation ID and trace then ride on the record).
    """
    if getattr(state, "access_written", False):
        return
    state.access_written = True
    queue_time = getattr(state, "queue_time", None)
    status = getattr(state, "response_status", 500)
    extra = {
        "status": status,
        "duration_ms": round((time.perf_counter() - state.started) * 1000, 2),
        "upstream_status": getattr(state, "upstream_status", None),
        "upstream_retries": max(0, getattr(state, "upstream_attempts", 0) - 1),
        "upstream_host": getattr(state, "upstream_host", None),
        "queue_ms": round(queue_time * 1000, 2) if queue_time is not None else None,
    }
    if where is None:
        method, path, client = request.method, request.path, request.remote_addr
    else:
        method, path, client = where.method, where.path, where.client
        extra["correlation_id"] = where.correlation_id
        if where.trace is not None:
            extra["trace_id"] = where.trace.trace_id
            extra["span_id"] = where.trace.span_id
    extra.update(method=method, path=path, client=client)
    access_log.info("%s %s %s", method, path, status, extra=extra)


def init_app(app: Flask) -> None:
    """Register the hooks; ``before_request`` first so every later hook has an ID."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start_request)
    app.after_request(_finish_response)
    app.teardown_request(_log_access)

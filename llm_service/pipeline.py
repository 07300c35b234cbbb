"""App-wide request hooks: correlation ID, timing, security headers, access record."""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Request, Response, g, request
from flask.ctx import _AppCtxGlobals
from werkzeug.datastructures import Headers

from .ids import new_uuid_text
from .lifecycle import ShuttingDownError, drain
from .logs import log_fields

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
#: As ``update_headers`` takes them: added only where missing.
_SECURITY_DEFAULTS = [(name, value, False) for name, value in SECURITY_HEADERS.items()]
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
    return _correlation_id_of(g._get_current_object())


def _correlation_id_of(state: _AppCtxGlobals) -> str:
    """The correlation ID of the request whose ``g`` is ``state`` (each use of
    the proxy costs a lookup)."""
    found = state.get("correlation_id")
    return found if found is not None else _choose_correlation_id(state)


def _choose_correlation_id(state: _AppCtxGlobals) -> str:
    headers = request.headers
    chosen = None
    for header in _INCOMING_HEADERS:
        value = headers.get(header)
        if value and _VALID_CORRELATION_ID.fullmatch(value):
            chosen = value
            break
    state.correlation_id = chosen or new_uuid_text()
    return state.correlation_id


def _start_request() -> None:
    state = g._get_current_object()
    state.started = time.perf_counter()
    _correlation_id_of(state)
    if drain.draining:
        # Nothing started after SIGTERM: the worker is about to go.
        raise ShuttingDownError()


def _finish_response(response: Response) -> Response:
    state = g._get_current_object()  # once: each use of the proxy costs
    elapsed = time.perf_counter() - state.get("started", time.perf_counter())
    # (name, value, replace): set, or only added when missing.
    updates = [
        (CORRELATION_HEADER, _correlation_id_of(state), True),
        ("X-Process-Time", f"{elapsed:.6f}", True),
        ("Via", VIA, True),
    ]
    if "queue_time" in state:
        # Seconds waited for a slot of the model server (see upstreams.queueing).
        updates.append(("X-Queue-Time", f"{state.queue_time:.3f}", True))
    updates += _SECURITY_DEFAULTS
    current = request._get_current_object()
    if current.is_secure:
        updates.append(("Strict-Transport-Security", HSTS, False))
    if state.get("upstream_host"):
        # The model host that served the request (its name, never its URL).
        updates.append((UPSTREAM_HOST_HEADER, state.upstream_host, True))
    update_headers(response.headers, updates)
    state.response_status = response.status_code
    if response.is_streamed and "started" in state:
        # Flask runs teardown when the view returns and again when a stream
        # ends (or not at all if it is closed unstarted): a stream's record is
        # written once, when the server closes its body, with its whole time.
        state.access_deferred = True
        where = _Where.of_request(state, current)
        response.call_on_close(lambda: _write_access(state, where))
    return response


def update_headers(headers: Headers, updates: list[tuple[str, str, bool]]) -> None:
    """Set each header, or where ``replace`` is false add it only if missing.

    The same headers, in the same order, as ``headers.set`` and
    ``headers.setdefault`` one at a time, in one scan of the list instead of
    one (or two) per header.
    """
    present = {name.lower() for name, _ in headers}
    for name, value, replace in updates:
        if name.lower() not in present:
            headers.add(name, value)
        elif replace:
            headers.set(name, value)


class _Where:
    """The request's facts an access record needs after its context is gone."""

    __slots__ = ("client", "correlation_id", "method", "path", "trace")

    @classmethod
    def of_request(cls, state: _AppCtxGlobals, current: Request) -> _Where:
        """The facts of ``current``, the request whose ``g`` is ``state``."""
        where = cls()
        where.method, where.path = current.method, current.path
        where.client = current.remote_addr
        where.correlation_id = state.correlation_id
        where.trace = state.get("trace")
        return where


def _log_access(_error: BaseException | None) -> None:
    """Write one access record per request, after the response is complete."""
    state = g._get_current_object()  # once: each use of the proxy costs
    if "started" in state and not state.get("access_deferred"):
        _write_access(state, None)


def _write_access(state: _AppCtxGlobals, where: _Where | None) -> None:
    """Write the record from ``state`` (the request's ``g``), once.

    ``where``: the request's facts, for a stream's record written after its
    context is gone (the correlation ID and trace then ride on the record).
    """
    if state.get("access_written"):
        return
    state.access_written = True
    if not access_log.isEnabledFor(logging.INFO):
        return
    queue_time = state.get("queue_time")
    status = state.get("response_status", 500)
    extra = {
        "status": status,
        "duration_ms": round((time.perf_counter() - state.started) * 1000, 2),
        "upstream_status": state.get("upstream_status"),
        "upstream_retries": max(0, state.get("upstream_attempts", 0) - 1),
        "upstream_host": state.get("upstream_host"),
        "queue_ms": round(queue_time * 1000, 2) if queue_time is not None else None,
    }
    if where is None:
        current = request._get_current_object()
        method, path, client = current.method, current.path, current.remote_addr
    else:
        method, path, client = where.method, where.path, where.client
        extra["correlation_id"] = where.correlation_id
        if where.trace is not None:
            extra["trace_id"] = where.trace.trace_id
            extra["span_id"] = where.trace.span_id
    extra.update(method=method, path=path, client=client)
    log_fields(access_log, logging.INFO, "%s %s %s", (method, path, status), extra)


def init_app(app: Flask) -> None:
    """Register the hooks; ``before_request`` first so every later hook has an ID."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start_request)
    app.after_request(_finish_response)
    app.teardown_request(_log_access)

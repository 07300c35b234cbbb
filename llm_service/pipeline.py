"""App-wide request hooks: correlation ID, timing, security headers, access record."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

from .lifecycle import ShuttingDownError, drain

access_log = logging.getLogger("llm_service.access")

CORRELATION_HEADER = "X-Correlation-ID"
UPSTREAM_HOST_HEADER = "X-Upstream-Host"
_INCOMING_HEADERS = (CORRELATION_HEADER, "X-Request-ID")
_VALID_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

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
        g.correlation_id = chosen or str(uuid.uuid4())
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
    return response


def _log_access(_error: BaseException | None) -> None:
    """Write one access record per request, after the response is complete."""
    started = g.get("started")
    if started is None:
        return
    access_log.info(
        "%s %s %s",
        request.method,
        request.path,
        g.get("response_status", 500),
        extra={
            "method": request.method,
            "path": request.path,
            "status": g.get("response_status", 500),
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "client": request.remote_addr,
            "upstream_status": g.get("upstream_status"),
            "upstream_retries": max(0, g.get("upstream_attempts", 0) - 1),
            "upstream_host": g.get("upstream_host"),
            "queue_ms": (round(g.queue_time * 1000, 2) if "queue_time" in g else None),
        },
    )


def init_app(app: Flask) -> None:
    """Register the hooks; ``before_request`` first so every later hook has an ID."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start_request)
    app.after_request(_finish_response)
    app.teardown_request(_log_access)

"""The service itself: ``/``, ``/health``, ``/health/live`` and ``/health/ready``."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify, url_for

from . import __version__, quotas
from .auth import health_details_allowed
from .config import redact_url
from .errors import UNAVAILABLE_RETRY_AFTER, Failure, error_response
from .limits import storage_state
from .openapi import documented
from .pipeline import correlation_id
from .schemas import HealthSchema, IndexSchema, LiveSchema, ReadySchema
from .upstreams import HealthReport, get_upstream

bp = Blueprint("health", __name__)

SERVICE_NAME = "llm-service"
_STARTED_AT = "llm_service.started_at"


@bp.record_once
def _remember_start(state) -> None:
    state.app.extensions[_STARTED_AT] = time.monotonic()


def _uptime() -> float:
    return round(time.monotonic() - current_app.extensions[_STARTED_AT], 3)


#: The error code /health answers for a cause, as the API would answer it.
_CAUSE_CODES = {
    "auth": "upstream_auth_failed",
    "not_openai": "upstream_invalid_response",
    "not_http": "upstream_invalid_response",
    "loop": "upstream_loop",
}


def _upstream_view(report: HealthReport) -> dict:
    return {
        "url": redact_url(report.url),
        "reachable": report.reachable,
        "busy": report.busy,
        "latency_ms": report.latency_ms,
        "server": report.server,
        "models": report.models,
        "loaded_models": report.loaded,
        "error": report.error,
        "cause": report.cause,
    }


#: What callers without an admin key are told once keys exist.
UNREACHABLE_PUBLIC = "The upstream model server is not reachable."

#: Causes that mean nothing answered at all.
_UNREACHABLE = frozenset({"dns", "refused", "unreachable", "timeout"})


def _unreachable(report: HealthReport) -> str:
    url = redact_url(report.url)
    if report.cause in _UNREACHABLE:
        return f"The upstream at {url} is not reachable: {report.error}"
    return f"The upstream at {url} answers but cannot serve: {report.error}"


def _answer(
    body: dict, healthy: bool, code: str, reason: str | None, cause: str | None
) -> Response:
    """200 with ``body``, or the error contract's 503 with ``body`` beside it."""
    if healthy:
        return jsonify({**body, "correlation_id": correlation_id()})
    failure = Failure(
        503,
        code,
        reason or "",
        details={"cause": cause} if cause else None,
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
    )
    return error_response(failure, body)


@bp.get("/")
@documented(answers={200: IndexSchema})
def index():
    """Name the service and link to its routes."""
    return {
        "service": SERVICE_NAME,
        "version": __version__,
        "links": {
            "health": url_for("health.health"),
            "live": url_for("health.live"),
            "ready": url_for("health.ready"),
            "message": url_for("message.send_message"),
            "docs": url_for("docs.docs"),
            "openapi": url_for("docs.openapi_json"),
        },
        "correlation_id": correlation_id(),
    }


@bp.get("/health")
@documented(answers={200: HealthSchema, 503: HealthSchema})
def health():
    """Report the service and its upstream; 503 when the upstream does not answer.

    A model server busy generating for this gateway is up (``busy``), not down.
    Once API keys exist, the upstreams' details go to admin keys only.
    With several hosts, ``status`` is ``ok`` while any host answers; ``hosts``
    reports each one and ``lm_studio`` the first that answers.
    """
    upstream = get_upstream()
    report = upstream.health()
    status = "busy" if report.busy else "ok"
    body = {
        "status": status if report.reachable else "unavailable",
        "service": SERVICE_NAME,
        "version": __version__,
        "uptime_seconds": _uptime(),
        "lm_studio": _upstream_view(report),
        "hosts": upstream.hosts_view(),
        "rate_limit_storage": storage_state(),
    }
    code = _CAUSE_CODES.get(report.cause or "", "upstream_unavailable")
    reason, cause = _unreachable(report), report.cause
    if not health_details_allowed():
        # Once keys exist, only admin keys see the upstreams and their errors.
        del body["lm_studio"], body["hosts"]
        code, reason, cause = "upstream_unavailable", UNREACHABLE_PUBLIC, None
    else:
        body.update(quotas.health_details())
    return _answer(body, report.reachable, code, reason, cause)


@bp.get("/health/live")
@documented(answers={200: LiveSchema})
def live():
    """Say the process serves requests; never calls the upstream."""
    return {
        "status": "alive",
        "version": __version__,
        "uptime_seconds": _uptime(),
        "correlation_id": correlation_id(),
    }


@bp.get("/health/ready")
@documented(answers={200: ReadySchema, 503: ReadySchema})
def ready():
    """Say whether a model can answer now; 503 with the reason when not."""
    upstream = get_upstream()
    report = upstream.health()
    body = {
        "status": "ready" if report.ready else "not_ready",
        "models": report.servable_models,
        "hosts": upstream.hosts_view(),
    }
    if not report.reachable:
        reason = _unreachable(report)
        code = _CAUSE_CODES.get(report.cause or "", "upstream_unavailable")
        cause = report.cause
    else:
        reason = "The upstream has no model loaded."
        code = "no_model_loaded"
        cause = "no_model"
    return _answer(body, report.ready, code, reason, cause)

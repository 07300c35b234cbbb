"""Blueprint: ``/``, ``/health``, ``/health/live`` and ``/health/ready``."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify, url_for

from . import __version__, quotas
from .auth import health_details_allowed
from .errors import UNAVAILABLE_RETRY_AFTER
from .lmstudio import HealthReport
from .openapi import documented
from .pipeline import correlation_id
from .schemas import HealthSchema, IndexSchema, LiveSchema, ReadySchema
from .upstream import get_upstream

bp = Blueprint("health", __name__)

SERVICE_NAME = "llm-service"
_STARTED_AT = "llm_service.started_at"


@bp.record_once
def _remember_start(state) -> None:
    state.app.extensions[_STARTED_AT] = time.monotonic()


def _uptime() -> float:
    return round(time.monotonic() - current_app.extensions[_STARTED_AT], 3)


def _upstream_view(report: HealthReport) -> dict:
    return {
        "url": report.url,
        "reachable": report.reachable,
        "latency_ms": report.latency_ms,
        "server": report.server,
        "models": report.models,
        "loaded_models": report.loaded,
        "error": report.error,
    }


def _unreachable(report: HealthReport) -> str:
    return f"LM Studio is not reachable at {report.url}: {report.error}"


def _answer(body: dict, healthy: bool, code: str, reason: str | None) -> Response:
    body["correlation_id"] = correlation_id()
    if healthy:
        return jsonify(body)
    body["error"] = {"code": code, "message": reason}
    response = jsonify(body)
    response.status_code = 503
    response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER)
    return response


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

    Once API keys exist, the upstream's details are shown to admin keys only.
    """
    report = get_upstream().health()
    body = {
        "status": "ok" if report.reachable else "unavailable",
        "service": SERVICE_NAME,
        "version": __version__,
        "uptime_seconds": _uptime(),
        "lm_studio": _upstream_view(report),
    }
    reason = _unreachable(report)
    if not health_details_allowed():
        # Once keys exist, only admin keys see the upstream and its errors.
        del body["lm_studio"]
        reason = "The upstream model server is not reachable."
    else:
        body.update(quotas.health_details())
    return _answer(body, report.reachable, "upstream_unavailable", reason)


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
    report = get_upstream().health()
    body = {
        "status": "ready" if report.ready else "not_ready",
        "models": report.servable_models,
    }
    if not report.reachable:
        reason = _unreachable(report)
        code = "upstream_unavailable"
    else:
        reason = "The upstream has no model loaded."
        code = "no_model_loaded"
    return _answer(body, report.ready, code, reason)

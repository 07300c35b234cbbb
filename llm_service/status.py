"""Monitoring: ``GET /metrics`` and ``GET /status``.

``/metrics`` is Prometheus's text exposition of every worker's figures
(:mod:`.metrics` collects them). ``/status`` is what an operator looks at rather
than the logs.

A server-rendered page (Jinja2, no script, no outside resource; it refreshes
itself every few seconds) showing each upstream host (up or down, loaded
models, calls in flight) and the last minutes' request rate, latency and error
rate, summed over every gunicorn worker.

Later parts add to it without touching this module: ``hooks.hosts`` returns the
hosts to show (several hosts: theirs, with circuit and slots), and
``hooks.sections`` holds extra tables (the queue, usage per key today), each a
function returning a :class:`Section`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    render_template,
    request,
    send_from_directory,
)

from . import __version__, auth, metrics
from .config import redact_url
from .openapi import documented

bp = Blueprint("monitoring", __name__)

#: Seconds between the page's own refreshes.
REFRESH_SECONDS = 5
#: The app's strict policy, relaxed only for the page's own stylesheet.
STATUS_CSP = (
    "default-src 'none'; style-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
STATIC = Path(__file__).with_name("static")
#: Spans of the traffic table, in seconds.
SPANS = ((60, "last minute"), (300, "last 5 minutes"))


@dataclass
class HostView:
    """One upstream host as the page shows it."""

    name: str
    url: str
    up: bool
    detail: str = ""
    server: str | None = None
    models: list[str] = field(default_factory=list)
    loaded: list[str] | None = None
    in_flight: int = 0
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Section:
    """An extra table: a title, column names and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


def _one_upstream() -> list[HostView]:
    """Today's single host, from its cached probe."""
    from .upstreams import get_upstream

    report = get_upstream().health()
    state = current_app.extensions.get(metrics.EXTENSION)
    name = state.host if state else "upstream"
    flights = _in_flight_by_host()
    detail = "busy generating" if report.busy else ""
    if not report.reachable:
        detail = report.error or "not reachable"
    if state is not None:
        gauge = metrics.metric("upstream_up")
        gauge.labels(host=name).set(1 if report.reachable else 0)
        if report.reachable:
            metrics.model_labels.learn(report.models)
    return [
        HostView(
            name=name,
            url=redact_url(report.url),
            up=report.reachable,
            detail=detail,
            server=report.server,
            models=list(report.models),
            loaded=report.loaded,
            in_flight=flights.get(name, 0),
        )
    ]


def _in_flight_by_host() -> dict[str, int]:
    """Upstream calls in flight per host, summed over every worker."""
    found: dict[str, int] = {}
    wanted = metrics.PREFIX + "upstream_in_flight"
    for family in metrics.collecting_registry().collect():
        if family.name != wanted:
            continue
        for sample in family.samples:
            host = sample.labels.get("host", "")
            found[host] = found.get(host, 0) + int(sample.value)
    return found


@dataclass
class Hooks:
    """What later parts plug in: the hosts to show, and extra sections."""

    hosts: Callable[[], list[HostView]] = _one_upstream
    sections: list[Callable[[], Section]] = field(default_factory=list)


hooks = Hooks()


def _traffic() -> list[dict]:
    state = current_app.extensions.get(metrics.EXTENSION)
    if state is None:
        return []
    now = time.time()
    return [
        {"label": label, "summary": state.window.summary(seconds, now)}
        for seconds, label in SPANS
    ]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _guard(challenge: str) -> None:
    """Only on the metrics listener when there is one; admin keys once keys exist.

    The separate ``LLM_SERVICE_METRICS_BIND`` address (loopback only) needs no
    key: reaching it is the permission.
    """
    metrics.monitoring_allowed()
    if not metrics.on_metrics_listener():
        auth.require_admin(challenge)


@bp.get("/metrics")
@documented(
    answers={200: {"text/plain": None, "application/openmetrics-text": None}},
    errors=("not_found", "invalid_api_key", "admin_key_required"),
)
def metrics_view():
    """Prometheus metrics of every worker (text exposition format).

    Served here while no API key exists; with ``LLM_SERVICE_METRICS_BIND`` set
    it is served on that (loopback) address instead, and 404 here.
    """
    if current_app.extensions.get(metrics.EXTENSION) is None:
        abort(404)  # LLM_SERVICE_METRICS=false
    _guard("Bearer")
    metrics.refresh_upstream_state()
    body, content_type = metrics.scrape(request.headers.get("Accept", ""))
    response = Response(body)
    response.headers["Content-Type"] = content_type
    return response


@bp.get("/status")
@documented(
    answers={200: {"text/html": None}},
    errors=("not_found", "invalid_api_key", "admin_key_required"),
)
def status():
    """The status page: hosts, recent traffic, latency and errors (HTML)."""
    _guard("Basic")
    page = render_template(
        "status.html",
        version=__version__,
        refresh=REFRESH_SECONDS,
        now=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        hosts=hooks.hosts(),
        traffic=_traffic(),
        metrics_on=current_app.config["METRICS"],
        sections=[section() for section in hooks.sections],
        ms=_ms,
    )
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = STATUS_CSP
    return response


@bp.get("/status/style.css")
@documented(
    answers={200: {"text/css": None}, 304: {}},
    errors=("not_found", "invalid_api_key", "admin_key_required"),
)
def stylesheet():
    """The status page's stylesheet."""
    _guard("Basic")
    return send_from_directory(STATIC, "status.css", mimetype="text/css")


def init_app(app: Flask) -> None:
    """Serve the status page."""
    app.register_blueprint(bp)

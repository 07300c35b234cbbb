"""The app's LM Studio client and its cached health probe.

Builds one :class:`LMStudioClient` per app from config, records each attempt's
upstream status on ``g`` for the access record, and caches probes so health
traffic cannot hammer the upstream.
"""

from __future__ import annotations

import secrets
import threading
import time

from flask import Flask, current_app, g, has_request_context, request

from .lmstudio import HealthReport, LMStudioClient, LMStudioLoopError

EXTENSION = "llm_service.upstream"


class Upstream:
    """The client plus a time-limited cache of its last probe."""

    def __init__(
        self, client: LMStudioClient, cache_seconds: float, via: str = ""
    ) -> None:
        self.client = client
        #: This process's pseudonym in the ``Via`` header it sends upstream.
        self.via = via
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._report: HealthReport | None = None
        self._probed_at = 0.0
        self._last_models: list[str] = []
        self._last_server: str | None = None

    def health(self) -> HealthReport:
        """Return a probe no older than ``cache_seconds``; one probe at a time."""
        with self._lock:
            fresh = time.monotonic() - self._probed_at < self.cache_seconds
            if self._report is None or not fresh:
                report = self.client.probe()
                if report.busy:
                    # Generating for a request of ours: it serves what it served.
                    report.models = list(self._last_models)
                elif report.reachable:
                    self._last_models = report.servable_models
                    self._last_server = report.server
                self._report = report
                self._probed_at = time.monotonic()
            return self._report

    def servable_models(self) -> list[str]:
        """Models that can answer, from a fresh probe or else the last good one.

        A probe can fail while the upstream is fine: llama.cpp's server answers
        ``/v1/models`` only between generations. The request itself then tells
        whether the upstream is really down.
        """
        report = self.health()
        if report.reachable:
            return report.servable_models
        with self._lock:
            return list(self._last_models)

    def sole_model(self) -> str | None:
        """The one model a non-LM Studio server serves, whatever a request names.

        llama.cpp's server answers every request with its one model but echoes
        the requested name in ``model``; this is what really answered. None when
        unknown (no probe yet), several models, or LM Studio (which reports the
        answering model itself). Never probes.
        """
        with self._lock:
            if self._last_server == "lmstudio" or len(self._last_models) != 1:
                return None
            return self._last_models[0]

    def forget_health(self) -> None:
        """Drop the cached probe (after the upstream said no model is loaded)."""
        with self._lock:
            self._report = None


def _refuse_loops() -> None:
    """Refuse a request that this process itself sent upstream: a self-loop.

    Without this, a gateway whose upstream URL is its own address calls itself
    until its threads, its rate limit or its time budget run out.
    """
    via = request.headers.get("Via")
    upstream = current_app.extensions[EXTENSION]
    if via and upstream.via and upstream.via in via:
        raise LMStudioLoopError(
            "The gateway's upstream URL leads back to the gateway itself: "
            "LLM_SERVICE_LM_STUDIO_URL must point at a model server.",
            status=508,
        )


def _record_attempt(status: int | None) -> None:
    # Called for the attempts of the request's own upstream call only: health
    # probes made on the way (e.g. to pick a model) are not retries.
    if has_request_context():
        g.upstream_status = status
        g.upstream_attempts = g.get("upstream_attempts", 0) + 1


def init_app(app: Flask) -> None:
    """Create the app's client from its settings; refuse requests that loop."""
    config = app.config
    # Random per process: chains of distinct gateways stay possible.
    via = f"llm-service-{secrets.token_hex(4)}"
    client = LMStudioClient(
        config["LM_STUDIO_BASE_URL"],
        api_token=config["LM_STUDIO_API_TOKEN"],
        connect_timeout=config["LM_STUDIO_CONNECT_TIMEOUT"],
        read_timeout=config["LM_STUDIO_TIMEOUT"],
        retries=config["LM_STUDIO_RETRIES"],
        retry_budget=config["LM_STUDIO_RETRY_BUDGET"],
        retry_after_max=config["LM_STUDIO_RETRY_AFTER_MAX"],
        health_timeout=min(2.0, config["LM_STUDIO_TIMEOUT"]),
        max_response_bytes=config["MAX_UPSTREAM_RESPONSE_BYTES"],
        max_sse_line_bytes=config["MAX_SSE_LINE_BYTES"],
        on_attempt=_record_attempt,
        via=via,
    )
    app.extensions[EXTENSION] = Upstream(client, config["HEALTH_CACHE_SECONDS"], via)
    app.before_request(_refuse_loops)


def get_upstream() -> Upstream:
    """Return the current app's :class:`Upstream`."""
    return current_app.extensions[EXTENSION]

"""The app's LM Studio client and its cached health probe.

Builds one :class:`LMStudioClient` per app from config, records each attempt's
upstream status on ``g`` for the access record, and caches probes so health
traffic cannot hammer the upstream.
"""

from __future__ import annotations

import threading
import time

from flask import Flask, current_app, g, has_request_context

from .lmstudio import HealthReport, LMStudioClient

EXTENSION = "llm_service.upstream"


class Upstream:
    """The client plus a time-limited cache of its last probe."""

    def __init__(self, client: LMStudioClient, cache_seconds: float) -> None:
        self.client = client
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._report: HealthReport | None = None
        self._probed_at = 0.0
        self._last_models: list[str] = []

    def health(self) -> HealthReport:
        """Return a probe no older than ``cache_seconds``; one probe at a time."""
        with self._lock:
            fresh = time.monotonic() - self._probed_at < self.cache_seconds
            if self._report is None or not fresh:
                self._report = self.client.probe()
                self._probed_at = time.monotonic()
                if self._report.reachable:
                    self._last_models = self._report.servable_models
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

    def forget_health(self) -> None:
        """Drop the cached probe (after the upstream said no model is loaded)."""
        with self._lock:
            self._report = None


def _record_attempt(status: int | None) -> None:
    # Called for the attempts of the request's own upstream call only: health
    # probes made on the way (e.g. to pick a model) are not retries.
    if has_request_context():
        g.upstream_status = status
        g.upstream_attempts = g.get("upstream_attempts", 0) + 1


def init_app(app: Flask) -> None:
    """Create the app's client from its settings."""
    config = app.config
    client = LMStudioClient(
        config["LM_STUDIO_BASE_URL"],
        api_token=config["LM_STUDIO_API_TOKEN"],
        connect_timeout=config["LM_STUDIO_CONNECT_TIMEOUT"],
        read_timeout=config["LM_STUDIO_TIMEOUT"],
        retries=config["LM_STUDIO_RETRIES"],
        retry_budget=config["LM_STUDIO_RETRY_BUDGET"],
        retry_after_max=config["LM_STUDIO_RETRY_AFTER_MAX"],
        health_timeout=min(2.0, config["LM_STUDIO_TIMEOUT"]),
        on_attempt=_record_attempt,
    )
    app.extensions[EXTENSION] = Upstream(client, config["HEALTH_CACHE_SECONDS"])


def get_upstream() -> Upstream:
    """Return the current app's :class:`Upstream`."""
    return current_app.extensions[EXTENSION]

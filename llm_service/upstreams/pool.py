"""The app's door to its model server: calls, streams, model choice, health.

:class:`Upstream` is the only object the views, streaming and the CLI use to
reach the model server. It owns the app's :class:`LMStudioClient` (built from
config, with two hooks: each attempt's upstream status goes to ``g`` for the
access record, and each call carries the request's correlation ID), resolves
the model a request asks for, fills in the request defaults both APIs share,
runs every call in a scope that a client hang-up cancels, and caches health
probes so health traffic cannot hammer the upstream. When the upstream says no
model is loaded, the cache is dropped here, where the answer is heard.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app, g, has_request_context, request

from ..lmstudio.chunks import ChatResult
from ..lmstudio.client import HealthReport, LMStudioClient
from ..lmstudio.errors import LMStudioLoopError, NoModelLoadedError
from ..lmstudio.stream import UpstreamStream
from ..lmstudio.watchdog import CallScope
from ..pipeline import correlation_id
from . import queueing
from .admission import Admission
from .hangups import hangup_scope

EXTENSION = "llm_service.upstream"

__all__ = ["EXTENSION", "HealthReport", "Upstream", "get_upstream", "init_app"]


class Upstream:
    """The model server as the app sees it: one client, its health cache."""

    def __init__(
        self,
        client: LMStudioClient,
        cache_seconds: float,
        via: str = "",
        admission: Admission | None = None,
        host: str = "default",
    ) -> None:
        self._client = client
        #: Slots and the fair queue in front of them (:mod:`.admission`).
        self.admission = admission if admission is not None else Admission()
        #: The host's name in the admission (its address, never credentials).
        self.host = host
        #: This process's pseudonym in the ``Via`` header it sends upstream.
        self.via = via
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._report: HealthReport | None = None
        self._probed_at = 0.0
        self._last_models: list[str] = []
        self._last_server: str | None = None

    # -- what the CLI and make run show --------------------------------------

    @property
    def base_url(self) -> str:
        """The upstream's URL (may hold credentials: redact before showing)."""
        return self._client.base_url

    @property
    def sends_token(self) -> bool:
        """True when the gateway sends the upstream an API token."""
        return self._client.sends_token

    # -- requests ------------------------------------------------------------

    def request_defaults(self, data: dict[str, Any]) -> dict[str, Any]:
        """The upstream body for a validated generation request, both APIs alike.

        ``null`` fields (SDKs send them for options left unset) are dropped;
        the model is resolved (:meth:`resolve_model`); ``max_tokens`` gets the
        configured default unless the request bounds its answer itself
        (``max_tokens`` or ``max_completion_tokens``).
        """
        payload = {key: value for key, value in data.items() if value is not None}
        payload["model"] = self.resolve_model(payload.get("model"))
        if "max_tokens" not in payload and "max_completion_tokens" not in payload:
            payload["max_tokens"] = current_app.config["DEFAULT_MAX_TOKENS"]
        return payload

    def resolve_model(self, requested: str | None) -> str:
        """The model to ask for: the request's, the configured, or a loaded one."""
        if requested:
            return requested
        if current_app.config["DEFAULT_MODEL"]:
            return current_app.config["DEFAULT_MODEL"]
        models = self.servable_models()
        if models:
            return models[0]
        with self._heard():
            if not self.health().reachable:
                # Ask the way a request naming a model would (with its
                # retries), so a bad token, a wrong path or a web server fail
                # with their own codes.
                with hangup_scope() as scope:
                    models = self._client.list_models(scope=scope)
                if models:
                    return models[0]
            raise NoModelLoadedError("The upstream lists no model that can answer.")

    def answering_model(self, reported: str) -> str:
        """The model that answered, rather than an echo of the requested name."""
        sole = self.sole_model()
        return sole if sole is not None and reported != sole else reported

    def chat_completion(self, payload: dict[str, Any]) -> ChatResult:
        """Ask for a (not streamed) chat completion; cancelled if the client leaves."""
        with self._heard(), self._slot(), hangup_scope() as scope:
            return self._client.chat_completion(payload, scope=scope)

    def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to ``path``; return the upstream's JSON object as it is."""
        with self._heard(), self._slot(), hangup_scope() as scope:
            return self._client.post_json(path, payload, scope=scope)

    def get_json(self, path: str) -> dict[str, Any]:
        """GET ``path``; return the upstream's JSON object as it is."""
        with self._heard(), hangup_scope() as scope:
            return self._client.get_json(path, scope=scope)

    def open_stream(self, path: str, payload: dict[str, Any]) -> queueing.SlotStream:
        """Start a stream with the app's stream limits (retried until open).

        It holds a slot of the host until it closes. When none is free, the
        stream returned waits in the queue first (sending its position as
        comments) and opens once admitted.
        """
        config = current_app.config
        limits = {
            "first_token_timeout": config["STREAM_FIRST_TOKEN_TIMEOUT"],
            "idle_timeout": config["STREAM_IDLE_TIMEOUT"],
            "total_timeout": config["STREAM_TOTAL_TIMEOUT"],
        }

        def opener(scope: CallScope) -> UpstreamStream:
            with self._heard():
                return self._client.open_stream(path, payload, scope=scope, **limits)

        ticket = queueing.enter(self.admission, self.host)
        if not ticket.admitted:
            return queueing.SlotStream(ticket, opener=opener)
        queueing.record_wait(ticket)
        try:
            with hangup_scope() as scope:
                return queueing.SlotStream(ticket, opener(scope))
        except BaseException:
            ticket.release()
            raise

    def _slot(self) -> contextlib.AbstractContextManager[Any]:
        """Hold a slot of the host for one call (waiting in the queue for it)."""
        return queueing.slot(self.admission, self.host)

    @contextlib.contextmanager
    def _heard(self) -> Iterator[None]:
        """Drop the cached probe when the upstream says no model is loaded."""
        try:
            yield
        except NoModelLoadedError:
            self.forget_health()
            raise

    # -- health --------------------------------------------------------------

    def probe(self) -> HealthReport:
        """Probe the upstream now, bypassing the cache (the CLI, ``make run``)."""
        return self._client.probe()

    def health(self) -> HealthReport:
        """Return a probe no older than ``cache_seconds``; one probe at a time."""
        with self._lock:
            fresh = time.monotonic() - self._probed_at < self.cache_seconds
            if self._report is None or not fresh:
                report = self._client.probe()
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


def _request_correlation_id() -> str | None:
    """The correlation ID to send upstream: the request's, none outside one."""
    return correlation_id() if has_request_context() else None


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
        correlation_id=_request_correlation_id,
        via=via,
    )
    admission = queueing.build_admission(config)
    host = _host_name(config["LM_STUDIO_BASE_URL"])
    admission.configure(host, config["UPSTREAM_SLOTS"])
    app.extensions[EXTENSION] = Upstream(
        client, config["HEALTH_CACHE_SECONDS"], via, admission, host
    )
    app.before_request(_refuse_loops)


def _host_name(url: str) -> str:
    """A host's name for its slots: ``host:port``, shared by every gateway using it."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}{parts.path}"


def get_upstream() -> Upstream:
    """Return the current app's :class:`Upstream`."""
    return current_app.extensions[EXTENSION]

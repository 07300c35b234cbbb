"""The app's door to its model servers: place, call, fail over, stream, health.

:class:`Upstream` is the only object the views, streaming and the CLI use to
reach a model server. It owns one :class:`~.discovery.Host` per configured host
(each with its own client, built from config with two hooks: each attempt's
upstream status goes to ``g`` for the access record, and each call carries the
request's correlation ID), resolves the model a request asks for, fills in the
request defaults both APIs share, and runs every call so:

1. **place**: the hosts to try, best first (:func:`.placement.rank`, from what
   :mod:`.discovery` found and the conversation's host);
2. **admit**: :meth:`Upstream.acquire` counts the call in flight at the chosen
   host until it (or its stream) ends: the one seam where a slot of that host
   is taken (with one host, the slot may have been taken before the view,
   in the quota admission's script once it admitted the request: it is used
   here);
3. **call**, in a scope that a client hang-up cancels;
4. **fail over**: a connection error, a 5xx or a stream cut before its first
   event moves to the next host, inside the one budget of attempts and time
   that a single host gets (``LM_STUDIO_RETRIES``, ``LM_STUDIO_RETRY_BUDGET``);
   each host's circuit breaker hears of it.

With one host (the single-host settings) this is the old door: the host gets
every call with its retries, and its health is probed on demand, cached for
``HEALTH_CACHE_SECONDS``; there is nothing to discover in the background.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app, g, has_request_context, request

from .. import store
from ..lmstudio.chunks import ChatResult
from ..lmstudio.client import (
    RETRY_STATUSES,
    HealthReport,
    LMStudioClient,
)
from ..lmstudio.errors import (
    LMStudioCancelledError,
    LMStudioConnectionError,
    LMStudioError,
    LMStudioLoopError,
    LMStudioProtocolError,
    LMStudioServerError,
    LMStudioStreamCutError,
    LMStudioTimeoutError,
    ModelNotFoundError,
    NoModelLoadedError,
)
from ..lmstudio.sse import SSEEvent
from ..lmstudio.stream import UpstreamStream
from ..lmstudio.watchdog import CallScope
from ..pipeline import correlation_id
from . import queueing
from .admission import Admission, Ticket
from .affinity import REDIS_TIMEOUT as AFFINITY_REDIS_TIMEOUT
from .affinity import Affinity
from .breaker import CircuitBreaker
from .discovery import Discovery, Host
from .hangups import hangup_scope
from .placement import conversation_key, most_common_loaded, rank

EXTENSION = "llm_service.upstream"

__all__ = ["EXTENSION", "HealthReport", "Upstream", "get_upstream", "init_app"]

log = logging.getLogger("llm_service.upstreams")

#: One call to one host: ``send(client, scope, budget)``, budget being the
#: ``deadline`` and ``retries`` keywords of the client's calls.
Send = Callable[[LMStudioClient, CallScope, dict[str, Any]], Any]


class Upstream:
    """The model servers as the app sees them: hosts, placement, health."""

    def __init__(
        self,
        hosts: list[Host],
        cache_seconds: float,
        via: str = "",
        *,
        retries: int = 2,
        retry_budget: float = 60.0,
        affinity: Affinity | None = None,
        discovery: Discovery | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.hosts = list(hosts)
        self._by_name = {host.name: host for host in self.hosts}
        #: Slots per host and the fair queue in front of them (:mod:`.admission`).
        self.admission = admission if admission is not None else Admission()
        #: This process's pseudonym in the ``Via`` header it sends upstream.
        self.via = via
        self.cache_seconds = cache_seconds
        self.retries = retries
        self.retry_budget = retry_budget
        self.affinity = affinity
        self.discovery = discovery
        #: Told each host a request leaves for the next one (metrics).
        self.on_failover: Callable[[Host], None] | None = None

    @property
    def several(self) -> bool:
        """True with more than one host: placement has something to decide."""
        return len(self.hosts) > 1

    # -- what the CLI and make run show --------------------------------------

    @property
    def base_url(self) -> str:
        """The first host's URL (may hold credentials: redact before showing)."""
        return self.hosts[0].client.base_url

    @property
    def sends_token(self) -> bool:
        """True when the gateway sends the first host an API token."""
        return self.hosts[0].client.sends_token

    # -- what other concerns attach (metrics, tracing) -------------------------

    def observe_calls(self, observer_for: Callable[[Host], Any]) -> None:
        """Give each host's client its observer of every call made there."""
        for host in self.hosts:
            host.client.observer = observer_for(host)

    def send_headers(self, hook: Callable[[], Any]) -> None:
        """Add the headers ``hook`` returns to every request sent to any host."""
        for host in self.hosts:
            host.client.extra_headers = hook

    def send_through_sessions(self) -> None:
        """Send every call through its client's requests session (where the
        OpenTelemetry requests instrumentation makes its span)."""
        for host in self.hosts:
            host.client.through_session = True

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
        """The model to ask for: the request's, the configured, or a loaded one.

        With several hosts, the loaded one is the model loaded on most hosts.
        """
        if requested:
            return requested
        configured = current_app.config["DEFAULT_MODEL"]
        if configured:
            return configured
        if self.several:
            self._know_every_host()
            model = most_common_loaded(host.state() for host in self.hosts)
            if model:
                return model
            raise NoModelLoadedError("No host lists a model that can answer.")
        host = self.hosts[0]
        models = self.servable_models()
        if models:
            return models[0]
        with self._heard(host):
            if not self.health().reachable:
                # Ask the way a request naming a model would (with its
                # retries), so a bad token, a wrong path or a web server fail
                # with their own codes.
                with hangup_scope() as scope:
                    models = host.client.list_models(scope=scope)
                if models:
                    return models[0]
            raise NoModelLoadedError("The upstream lists no model that can answer.")

    def answering_model(self, reported: str) -> str:
        """The model that answered, rather than an echo of the requested name."""
        host = self._request_host() or self.hosts[0]
        sole = host.sole_model()
        return sole if sole is not None and reported != sole else reported

    def chat_completion(self, payload: dict[str, Any]) -> ChatResult:
        """Ask for a (not streamed) chat completion; cancelled if the client leaves."""
        return self._call(
            payload,
            lambda client, scope, budget: client.chat_completion(
                payload, scope=scope, **budget
            ),
        )

    def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to ``path``; return the upstream's JSON object as it is."""
        return self._call(
            payload,
            lambda client, scope, budget: client.post_json(
                path, payload, scope=scope, **budget
            ),
        )

    def get_json(self, path: str) -> dict[str, Any]:
        """GET ``path``; return the upstream's JSON object as it is."""
        return self._call(
            {},
            lambda client, scope, budget: client.get_json(path, scope=scope, **budget),
            admit=False,  # a listing: no generation to wait for a slot
        )

    def list_models(self) -> dict[str, Any]:
        """The OpenAI ``list`` of models: the host's, or the union of every host's.

        With several hosts each model appears once, with ``loaded_on`` (the
        hosts where it is loaded now) and ``available_on`` (where it is listed).
        """
        if not self.several:
            return self.get_json("/v1/models")
        self._know_every_host()
        states = [host.state() for host in self.hosts]
        if not any(state.up for state in states):
            return self.get_json("/v1/models")  # fails with the hosts' own error
        listed: dict[str, dict[str, list[str]]] = {}
        for state in states:
            if not state.up:
                continue
            for model in (*state.models, *state.servable):
                where = listed.setdefault(model, {"loaded_on": [], "available_on": []})
                if state.name not in where["available_on"]:
                    where["available_on"].append(state.name)
                if model in state.servable and state.name not in where["loaded_on"]:
                    where["loaded_on"].append(state.name)
        data = [
            {"id": model, "object": "model", "owned_by": "organization_owner", **where}
            for model, where in listed.items()
        ]
        return {"object": "list", "data": data}

    def open_stream(self, path: str, payload: dict[str, Any]) -> Any:
        """Start a stream with the app's stream limits (retried until open).

        It holds a slot of its host until it closes. When the first host in line
        has none free, the stream returned waits in that host's queue first
        (sending its position as comments) and opens once admitted.
        """
        config = current_app.config
        limits = {
            "first_token_timeout": config["STREAM_FIRST_TOKEN_TIMEOUT"],
            "idle_timeout": config["STREAM_IDLE_TIMEOUT"],
            "total_timeout": config["STREAM_TOTAL_TIMEOUT"],
        }

        def send(client: LMStudioClient, scope: CallScope, budget: dict) -> Any:
            return client.open_stream(path, payload, scope=scope, **limits, **budget)

        plan = self._plan(payload)
        stream = FailoverStream(self, plan, send)
        first = plan.hosts[0].slot_key
        plan.ticket = _early_ticket(first) or queueing.enter(self.admission, first)
        if not plan.ticket.admitted:

            def opener(scope: CallScope) -> FailoverStream:
                stream.open(lambda: contextlib.nullcontext(scope))
                return stream

            return queueing.SlotStream(plan.ticket, opener=opener)
        queueing.record_wait(plan.ticket)
        stream.open(hangup_scope)
        return stream

    # -- placing, calling, failing over --------------------------------------

    def _plan(self, payload: dict[str, Any], admit: bool = True) -> _Plan:
        """The hosts to try for ``payload``, best first, and its one budget."""
        model = str(payload.get("model") or "")
        if not self.several:
            return _Plan(self, self.hosts, None, admit)
        self._know_every_host()
        key = None
        affine = None
        if self.affinity is not None:
            key = conversation_key(model, payload.get("messages"))
            affine = self.affinity.get(key) if key else None
        states = [host.state() for host in self.hosts]
        names = rank(model, states, affinity=affine)
        return _Plan(self, [self._by_name[name] for name in names], key, admit)

    def _call(self, payload: dict[str, Any], send: Send, admit: bool = True) -> Any:
        result, release, _host = self._plan(payload, admit).run(send, hangup_scope)
        # At the request's end, before its answer is sent: with its quota's
        # settling, in one trip to the shared store.
        store.defer(release)
        return result

    def acquire(self, host: Host, ticket: Ticket | None = None) -> Callable[[], None]:
        """Take a slot at ``host`` for one call or stream; return its release.

        The chosen host is known, nothing is sent yet: the request waits in the
        host's fair queue for a slot (``ticket``: a place it already has). The
        release is called once the call returns or the stream closes.
        """
        # Before the deferred work runs: it gives back an early slot unclaimed.
        ticket = ticket or _early_ticket(host.slot_key)
        # A call made after another in the same request: the first one's
        # deferred release first, or the two could wait for each other.
        store.run_deferred()
        ticket = ticket or queueing.enter(self.admission, host.slot_key)
        try:
            queueing.wait(ticket)
        except BaseException:
            ticket.release()
            raise
        leave = host.acquire()

        def release() -> None:
            leave()
            ticket.release()

        return release

    def _request_host(self) -> Host | None:
        name = g.get("upstream_host") if has_request_context() else None
        return self._by_name.get(name) if name else None

    def _models_named(self) -> str:
        models = sorted({m for h in self.hosts for m in h.state().models})
        return ", ".join(models[:20]) or "none"

    @contextlib.contextmanager
    def _heard(self, host: Host) -> Iterator[None]:
        """Drop the cached probe when the upstream says no model is loaded."""
        try:
            yield
        except NoModelLoadedError:
            host.forget()
            raise

    # -- health --------------------------------------------------------------

    def start_discovery(self) -> None:
        """Start this process's discovery thread if there is one to run."""
        if self.discovery is not None:
            self.discovery.ensure_started()

    def health(self) -> HealthReport:
        """Probes no older than ``cache_seconds``; with several hosts, a summary.

        The summary is the first reachable host's report (else the first
        host's) with every reachable host's models.
        """
        self.start_discovery()
        if not self.several:
            return self.hosts[0].health(self.cache_seconds)
        _refresh(
            [h for h in self.hosts if not _fresh(h, self.cache_seconds)],
        )
        reports = [host.report for host in self.hosts]
        reachable = [r for r in reports if r is not None and r.reachable]
        first = reachable[0] if reachable else reports[0]
        assert first is not None
        models = list(dict.fromkeys(m for r in reachable for m in r.models))
        servable = list(dict.fromkeys(m for r in reachable for m in r.servable_models))
        return HealthReport(
            url=first.url,
            reachable=bool(reachable),
            latency_ms=first.latency_ms,
            server=first.server,
            models=models,
            loaded=servable,
            error=first.error,
            cause=first.cause,
            busy=bool(reachable) and all(r.busy for r in reachable),
            chained=first.chained,
        )

    def hosts_view(self) -> list[dict[str, Any]]:
        """Each host as ``/health`` shows it (call after :meth:`health`)."""
        waiting = self.admission.snapshot()
        return [
            {**host.view(), "queued": waiting.get(host.slot_key, {}).get("queued", 0)}
            for host in self.hosts
        ]

    def servable_models(self) -> list[str]:
        """Models that can answer, from a fresh probe or else the last good one.

        A probe can fail while the upstream is fine: llama.cpp's server answers
        ``/v1/models`` only between generations. The request itself then tells
        whether the upstream is really down.
        """
        if self.several:
            self._know_every_host()
            return list(
                dict.fromkeys(m for h in self.hosts for m in h.state().servable)
            )
        report = self.health()
        if report.reachable:
            return report.servable_models
        return self.hosts[0].servable_models()

    def sole_model(self) -> str | None:
        """The one model the request's host (else the first) always answers with."""
        return (self._request_host() or self.hosts[0]).sole_model()

    def forget_health(self) -> None:
        """Drop the cached probes (after an upstream said no model is loaded)."""
        for host in self.hosts:
            host.forget()

    def _know_every_host(self) -> None:
        """Probe the hosts never probed yet: once per process, then discovery's."""
        self.start_discovery()
        unknown = [host for host in self.hosts if not host.known]
        if unknown:
            _refresh(unknown)


def _fresh(host: Host, max_age: float) -> bool:
    return host.known and time.monotonic() - host.probed_at < max_age


def _refresh(hosts: list[Host]) -> None:
    """Probe ``hosts`` at once, side by side; each probe is bounded by its timeout."""
    if len(hosts) == 1:
        hosts[0].refresh()
        return
    threads = [
        threading.Thread(target=_refresh_quietly, args=(host,), daemon=True)
        for host in hosts
    ]
    for thread in threads:
        thread.start()
    for thread, host in zip(threads, hosts, strict=True):
        # A probe asks at most three paths, each within the health timeout.
        thread.join(4 * host.client.health_timeout + 1)


def _refresh_quietly(host: Host) -> None:
    try:
        host.refresh()
    except Exception:  # a failed probe is a finding; this is a bug
        log.exception("probing host %s failed", host.name)


def _host_failed(error: LMStudioError) -> bool:
    """True when ``error`` counts against the host (its circuit breaker).

    Unreachable, timed out, broken, or a 5xx: yes. A request the host refused
    (4xx), a rate limit (429) or a client that hung up: no.
    """
    if isinstance(error, LMStudioCancelledError):
        return False
    if isinstance(error, LMStudioConnectionError | LMStudioTimeoutError):
        return True
    if isinstance(error, LMStudioStreamCutError):
        return True
    if isinstance(error, LMStudioServerError):
        return error.status != 429
    if isinstance(error, LMStudioProtocolError):
        return error.status is None or error.status >= 500
    return False


def _may_fail_over(error: LMStudioError) -> bool:
    """True when another host may answer what this one failed, before any byte."""
    if isinstance(error, LMStudioStreamCutError):
        return True
    return error.retryable and (error.status is None or error.status in RETRY_STATUSES)


def _in_flight_only(host: Host, _ticket: Ticket | None) -> Callable[[], None]:
    """Count a call that takes no slot (a listing) in flight at ``host``."""
    return host.acquire()


class _Plan:
    """One request's hosts in order, and the one budget it shares between them.

    Every host but the last in line gets one attempt; the last gets the
    attempts left. No attempt starts after the budget's deadline.
    """

    def __init__(
        self, pool: Upstream, hosts: list[Host], key: str | None, admit: bool = True
    ) -> None:
        self.pool = pool
        self.hosts = hosts
        self.key = key
        #: False for calls that take no slot (``GET /v1/models``).
        self.admit = admit
        #: A place in the first host's queue the request already holds.
        self.ticket: Ticket | None = None
        self.deadline = time.monotonic() + pool.retry_budget
        self.tries = pool.retries + 1
        self._next = 0

    def run(
        self, send: Send, scope: Callable[[], contextlib.AbstractContextManager]
    ) -> tuple[Any, Callable[[], None], Host]:
        """Call the hosts in turn until one answers: its answer, release and host.

        The host's place stays taken until the caller calls the release.
        """
        while True:
            host = self.take()
            last = self._next >= len(self.hosts) or self.tries <= 1
            retries = self.tries - 1 if last else 0
            budget = {"deadline": self.deadline, "retries": retries}
            ticket, self.ticket = self.ticket, None
            admit = self.pool.acquire if self.admit else _in_flight_only
            release = admit(host, ticket)
            try:
                with scope() as call_scope:
                    result = send(host.client, call_scope, budget)
            except LMStudioError as err:
                release()
                if isinstance(err, NoModelLoadedError):
                    host.forget()  # as Upstream._heard does
                if not self.failed(host, err):
                    raise self.final(err) from None
                continue
            except BaseException:
                release()
                raise
            self.succeeded(host)
            return result, release, host

    def take(self) -> Host:
        host = self.hosts[self._next]
        self._next += 1
        host.breaker.allow()  # after the cooldown, this call is the trial
        if has_request_context():
            g.upstream_host = host.name
        return host

    def succeeded(self, host: Host) -> None:
        host.breaker.succeeded()
        if self.key is not None and self.pool.affinity is not None:
            self.pool.affinity.put(self.key, host.name)

    def failed(self, host: Host, error: LMStudioError) -> bool:
        """Note ``host``'s failure; True when the next host should be tried."""
        if _host_failed(error):
            host.breaker.failed()
            if self.pool.discovery is not None:
                self.pool.discovery.kick(host)
        elif not isinstance(error, LMStudioCancelledError):
            host.breaker.succeeded()  # it answered for itself
        self.tries -= max(1, error.attempts)
        retry = (
            _may_fail_over(error)
            and self._next < len(self.hosts)
            and self.tries > 0
            and time.monotonic() < self.deadline
        )
        if retry:
            log.warning(
                "upstream host %s failed (%s, upstream status %s); trying host %s",
                host.name,
                type(error).__name__,
                error.status,
                self.hosts[self._next].name,
            )
            if self.pool.on_failover is not None:
                self.pool.on_failover(host)
        return retry

    def final(self, error: LMStudioError) -> LMStudioError:
        """The error to raise: a model no host knows names those they know."""
        if isinstance(error, ModelNotFoundError) and self.pool.several:
            message = f"{error.message} Models available: {self.pool._models_named()}."
            named = ModelNotFoundError(message, status=error.status)
            named.attempts = error.attempts
            return named
        return error


class FailoverStream:
    """A stream that moves to the next host if it breaks before its first event.

    Until the first event no byte of the answer has reached the client (at
    most keep-alive comments), so another host may answer instead. After it, a
    failure ends the stream with the error event, as for any stream. Offers
    what the relay uses of :class:`~llm_service.lmstudio.stream.UpstreamStream`.
    """

    def __init__(self, pool: Upstream, plan: _Plan, send: Send) -> None:
        self._pool = pool
        self._plan = plan
        self._send = send
        self._stream: UpstreamStream | None = None
        self._host: Host | None = None
        self._release: Callable[[], None] = lambda: None
        self._scope: CallScope | None = None
        self._lock = threading.Lock()
        #: True once :meth:`cancel` was called (the consumer went away).
        self.cancelled = False

    def open(self, scope: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Open on the first host that accepts (raises when none does)."""
        self._stream, self._release, self._host = self._plan.run(self._send, scope)

    @property
    def total_deadline(self) -> float:
        assert self._stream is not None
        return self._stream.total_deadline

    @property
    def request_id(self) -> str | None:
        return self._stream.request_id if self._stream is not None else None

    @property
    def error(self) -> LMStudioError | None:
        """The serving stream's failure, for the call's record (metrics)."""
        return getattr(self._stream, "error", None)

    @error.setter
    def error(self, value: LMStudioError | None) -> None:
        if self._stream is not None:
            self._stream.error = value

    def events(self, tick: float = 0.25) -> Iterator[SSEEvent | None]:
        """Yield the events (None on silence) of whichever host serves the stream."""
        started = False
        while True:
            assert self._stream is not None
            assert self._host is not None
            try:
                for event in self._stream.events(tick):
                    started = started or event is not None
                    yield event
                return
            except LMStudioError as err:
                self._end_stream()
                may_retry = self._plan.failed(self._host, err)
                if started or self.cancelled or not may_retry:
                    raise
            # No event reached the client yet: open on the next host.
            self._host = None
            self.open(self._new_scope)
            if self.cancelled:
                self.close()
                return

    @contextlib.contextmanager
    def _new_scope(self) -> Iterator[CallScope]:
        # Not hangup_scope: the relay already watches the client's socket
        # and cancels through :meth:`cancel`.
        scope = CallScope()
        with self._lock:
            self._scope = scope
            if self.cancelled:
                scope.cancel()
        yield scope

    def cancel(self) -> None:
        """Abort from any thread: the stream, or the opening under way."""
        with self._lock:
            self.cancelled = True
            scope, stream = self._scope, self._stream
        if scope is not None:
            scope.cancel()
        if stream is not None:
            stream.cancel()

    def close(self) -> None:
        """Abort the stream and give the host's place back (at the request's end)."""
        if self._stream is not None:
            self._stream.close()
        release, self._release = self._release, lambda: None
        store.defer(release)

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
        release, self._release = self._release, lambda: None
        release()


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


def _asks_slot_early(upstream: Upstream) -> Callable[[], None]:
    """With one host: ask for its slot along the request's first store trip.

    A generation request (the only POSTs; a listing takes no slot) saves a
    trip to the shared store: the slot is taken in its quota admission's
    script, if that admits it (:class:`.queueing.EarlySlot`). A request with
    no such trip (no quota, not metered, Redis away) has its slot taken by
    the door, as any other.
    """
    admission, host = upstream.admission, upstream.hosts[0].slot_key

    def ask_slot_early() -> None:
        current = request._get_current_object()
        if current.method == "POST" and current.url_rule is not None:
            g.early_slot = queueing.EarlySlot(admission, host)

    return ask_slot_early


def _early_ticket(host: str) -> Ticket | None:
    """The request's slot of ``host`` taken before the view, if one was."""
    early = g.pop("early_slot", None) if has_request_context() else None
    return early.claim(host) if early is not None else None


def _record_attempt(status: int | None) -> None:
    # Called for the attempts of the request's own upstream call only: health
    # probes made on the way (e.g. to pick a model) are not retries.
    if has_request_context():
        state = g._get_current_object()  # once: each use of the proxy costs
        state.upstream_status = status
        state.upstream_attempts = state.get("upstream_attempts", 0) + 1


def _request_correlation_id() -> str | None:
    """The correlation ID to send upstream: the request's, none outside one."""
    return correlation_id() if has_request_context() else None


def init_app(app: Flask) -> None:
    """Create a client per host from the settings; refuse requests that loop."""
    config = app.config
    # Random per process: chains of distinct gateways stay possible.
    via = f"llm-service-{secrets.token_hex(4)}"
    hosts = [
        Host(
            entry["name"],
            LMStudioClient(
                entry["url"],
                api_token=entry["api_token"],
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
            ),
            breaker=CircuitBreaker(
                config["BREAKER_FAILURES"], config["BREAKER_COOLDOWN_SECONDS"]
            ),
            slots=entry["slots"],
            weight=entry["weight"],
        )
        for entry in config["UPSTREAM_HOSTS"]
    ]
    admission = queueing.build_admission(config, store.redis_for(app))
    for host, entry in zip(hosts, config["UPSTREAM_HOSTS"], strict=True):
        # Slots are shared by every gateway using the same server (Redis leases):
        # named by its address, not by this gateway's name for it.
        host.slot_key = _host_name(entry["url"])
        admission.configure(host.slot_key, host.configured_slots)
        host.on_slots = functools.partial(admission.discovered, host.slot_key)
    several = len(hosts) > 1
    affinity = None
    if several and config["AFFINITY"]:
        affinity = Affinity(
            config["AFFINITY_SECONDS"], store.redis_for(app, AFFINITY_REDIS_TIMEOUT)
        )
    discovery = None
    if several and config["DISCOVERY_INTERVAL_SECONDS"] > 0:
        discovery = Discovery(hosts, config["DISCOVERY_INTERVAL_SECONDS"])
    app.extensions[EXTENSION] = Upstream(
        hosts,
        config["HEALTH_CACHE_SECONDS"],
        via,
        retries=config["LM_STUDIO_RETRIES"],
        retry_budget=config["LM_STUDIO_RETRY_BUDGET"],
        affinity=affinity,
        discovery=discovery,
        admission=admission,
    )
    app.before_request(_refuse_loops)
    if not several:
        app.before_request(_asks_slot_early(app.extensions[EXTENSION]))


def _host_name(url: str) -> str:
    """A host's name for its slots: ``host:port``, shared by every gateway using it."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}{parts.path}"


def get_upstream() -> Upstream:
    """Return the current app's :class:`Upstream`."""
    return current_app.extensions[EXTENSION]

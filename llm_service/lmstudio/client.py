"""LMStudioClient: pooled HTTP calls to LM Studio with timeouts and one retry layer."""

from __future__ import annotations

import email.utils
import http.client
import logging
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import backoff
import requests
from requests.cookies import RequestsCookieJar
from requests.models import complexjson
from urllib3.exceptions import NameResolutionError, ReadTimeoutError

from .chunks import (
    BODY_EXCERPT,
    ChatResult,
    UpstreamObject,
    Usage,
    parse_usage,
    read_chat_completion,
)
from .diagnosis import explain
from .errors import (
    LMStudioAuthError,
    LMStudioBusyError,
    LMStudioCancelledError,
    LMStudioConnectionError,
    LMStudioConnectTimeoutError,
    LMStudioError,
    LMStudioLoopError,
    LMStudioProtocolError,
    LMStudioRequestError,
    LMStudioResponseTooLargeError,
    LMStudioServerError,
    LMStudioStreamTimeoutError,
    LMStudioTimeoutError,
    ModelNotFoundError,
    NoModelLoadedError,
    error_message,
    safe_excerpt,
)
from .stream import UpstreamStream
from .transport import Headers, LeanAdapter
from .watchdog import CANCELLED, CallScope

log = logging.getLogger("llm_service.lmstudio")

#: Statuses worth another attempt: the upstream timed out, is overloaded or failed.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BUSY_STATUSES = frozenset({429, 503})
#: Pieces in which an answer's body is read (and checked against the limit).
BODY_READ_SIZE = 65536
#: Statuses a server answers for a path or method it does not serve: the
#: upstream URL points somewhere that is not an OpenAI-compatible server's root.
NOT_SERVED_STATUSES = frozenset({404, 405, 501})
#: The pseudonym every llm-service puts in its ``Via`` response header, so a
#: gateway can tell when its upstream is another llm-service.
VIA_PSEUDONYM = "llm-service"
LOOP_CODE = "upstream_loop"
#: Most retry layers a client keeps made (see ``LMStudioClient._retrier``).
RETRIERS_KEPT = 16

#: Called after every attempt with the upstream status (None: no answer).
AttemptObserver = Callable[[int | None], None]
#: Returns the correlation ID to send with a call (None: send none).
CorrelationSource = Callable[[], str | None]
#: Returns extra headers for each request sent upstream (trace context).
HeaderHook = Callable[[], Mapping[str, str]]


@dataclass
class CallRecord:
    """One finished call made for a request (probes are not calls)."""

    path: str
    #: The model the request named (None when it named none).
    model: str | None
    stream: bool
    #: The whole call: connecting, every attempt and wait; streams: to their end.
    seconds: float
    #: Streams: from sending the request to the first event.
    first_token_seconds: float | None = None
    usage: Usage | None = None
    #: Why the call failed; None when it succeeded (or a stream was cancelled).
    error: LMStudioError | None = None
    #: The caller went away and the call was cancelled.
    cancelled: bool = False


class CallObserver:
    """Told about the calls a client makes for requests; the default ignores all.

    The gateway's metrics subclass it. Methods run on the calling thread (a
    stream's end on whichever thread closes it), must be quick and never raise.
    """

    def call_started(self, stream: bool) -> None:
        """A call (or stream) starts: one more in flight."""

    def retrying(self, error: LMStudioError) -> None:
        """An attempt failed with ``error`` and another one follows."""

    def call_finished(self, call: CallRecord) -> None:
        """A call ended (a stream: when it closed), with its last error if any."""

    def models_listed(self, models: list[str]) -> None:
        """The upstream listed these models (a probe, or ``GET /v1/models``)."""


@dataclass
class HealthReport:
    """What one probe of the upstream found."""

    url: str
    reachable: bool
    latency_ms: float
    server: str | None = None
    models: list[str] = field(default_factory=list)
    #: Models known to be loaded; None when the server cannot tell (llama.cpp).
    loaded: list[str] | None = None
    error: str | None = None
    #: The failure's cause (see :mod:`.diagnosis`), None when the probe passed.
    cause: str | None = None
    #: The probe timed out while this client had a generation in flight: a
    #: server that runs one request at a time (llama.cpp's) is busy, not down.
    busy: bool = False
    #: The upstream answered with llm-service's ``Via``: another gateway.
    chained: bool = False

    @property
    def ready(self) -> bool:
        """True when some model can answer a request now."""
        if not self.reachable:
            return False
        return bool(self.servable_models)

    @property
    def servable_models(self) -> list[str]:
        """Models that can answer now: the loaded ones when known."""
        return list(self.loaded if self.loaded is not None else self.models)


def _retry_wait(
    error: LMStudioError, attempt: int, base: float = 0.5, cap: float = 8.0
) -> float:
    """The wait before retry number ``attempt + 1``: ``Retry-After``, else expo.

    "Equal jitter" keeps at least half of the exponential wait so retries do
    not stampede an upstream that is restarting.
    """
    if error.retry_after is not None:
        return error.retry_after
    ceiling = min(cap, base * 2**attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311


def _no_wait() -> Iterator[float]:
    """backoff's own waits: none (the client waits, through its ``sleep``)."""
    while True:
        yield 0


def _is_retryable(error: LMStudioError) -> bool:
    return error.retryable and (error.status is None or error.status in RETRY_STATUSES)


def _retry_after_seconds(value: str | None, cap: float) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date), capped at ``cap``."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - time.time()
    return max(0.0, min(seconds, cap))


class LMStudioClient:
    """Calls an LM Studio (or other OpenAI-compatible) server.

    One ``requests.Session`` pools connections. Every call has connect and read
    timeouts; :meth:`_call` retries the retryable failures with ``backoff`` within
    ``retry_budget`` seconds, which bounds the whole call including waits: the
    watchdog (:mod:`.watchdog`) ends a call at its deadline even while a read is
    blocked, however slowly the upstream drips its bytes. A caller may pass a
    :class:`CallScope` and cancel it from another thread (its own client left):
    the upstream connection is then closed at once.
    """

    #: How the client waits between attempts. Injectable (``sleep=``, or on the
    #: class for every client) so tests record the waits instead of sleeping.
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def __init__(
        self,
        base_url: str,
        *,
        api_token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        retries: int = 2,
        retry_budget: float = 60.0,
        retry_after_max: float = 10.0,
        health_timeout: float = 2.0,
        pool_size: int = 32,
        max_response_bytes: int = 16 * 1024 * 1024,
        max_sse_line_bytes: int = 4 * 1024 * 1024,
        on_attempt: AttemptObserver | None = None,
        correlation_id: CorrelationSource | None = None,
        via: str | None = None,
        sleep: Callable[[float], None] | None = None,
        observer: CallObserver | None = None,
        extra_headers: HeaderHook | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: Largest answer body read; a larger one is refused, never read whole.
        self.max_response_bytes = max_response_bytes
        #: Largest line (and event) of a streamed answer.
        self.max_sse_line_bytes = max_sse_line_bytes
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retry_budget = retry_budget
        self.retry_after_max = retry_after_max
        self.health_timeout = health_timeout
        self._on_attempt = on_attempt
        self._correlation_id = correlation_id
        if sleep is not None:
            self.sleep = sleep
        #: Told when calls start, fail an attempt, and end (metrics).
        self.observer = observer
        #: Headers added to every request sent upstream (trace context).
        self.extra_headers = extra_headers
        self._flight_lock = threading.Lock()
        self._generations = 0
        self.session = requests.Session()
        # requests re-reads proxies and ~/.netrc from the environment on every
        # call (about a fifth of its cost here): read them once, now.
        settings = self.session.merge_environment_settings(
            self.base_url, {}, None, None, None
        )
        self.session.trust_env = False
        self.session.proxies.update(settings["proxies"])
        self.session.verify = settings["verify"]
        # max_retries=0: backoff below is the only retry layer.
        #: Every call goes straight to this adapter (see _deliver), unless
        #: ``through_session`` (OpenTelemetry's spans) says otherwise.
        self.through_session = False
        self.adapter = LeanAdapter(
            pool_connections=2, pool_maxsize=pool_size, max_retries=0
        )
        self.session.mount("http://", self.adapter)
        self.session.mount("https://", self.adapter)
        #: Each path's URL, checked and quoted once (see _prepare).
        self._urls: dict[str, str] = {}
        # Listed on every call (see _prepare): a dict's speed.
        self.session.headers = Headers(self.session.headers)
        self.session.headers["User-Agent"] = "llm-service"
        self.session.headers["Accept"] = "application/json"
        #: True when calls carry ``Authorization: Bearer`` (the token itself
        #: stays in the session's headers only).
        self.sends_token = bool(api_token)
        if api_token:
            self.session.headers["Authorization"] = f"Bearer {api_token}"
        if via:
            # A request that comes back with this pseudonym went round a loop.
            self.session.headers["Via"] = f"1.1 {via}"
        self.retries = retries
        #: The retry layer around one call or one stream opening, made once
        #: per (kind, retries, budget): a caller trying several hosts gives
        #: each but the last no retries, on every call.
        self._retriers: dict[tuple[str, int, float], Callable] = {}

    def _retrier(self, kind: str, retries: int | None) -> Callable:
        """``_attempt`` (kind "call") or ``_attempt_stream`` ("open") with retries."""
        retries = self.retries if retries is None else retries
        key = (kind, retries, self.retry_budget)
        retrier = self._retriers.get(key)
        if retrier is None:
            if len(self._retriers) >= RETRIERS_KEPT:
                self._retriers.clear()  # bounded; the few in use come back
            attempt = self._attempt if kind == "call" else self._attempt_stream
            retrier = self._retriers[key] = self._with_retries(attempt, retries)
        return retrier

    def _with_retries(self, attempt: Callable, retries: int) -> Callable:
        """Wrap ``attempt`` in the one retry layer: retryable errors only."""
        return backoff.on_exception(
            _no_wait,
            LMStudioError,
            max_tries=retries + 1,
            max_time=self.retry_budget,
            giveup=lambda error: not _is_retryable(error),
            jitter=None,
            on_backoff=self._wait_before_retry,
            on_giveup=self._record_attempts,
            logger=None,
        )(attempt)

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    @property
    def generations_in_flight(self) -> int:
        """Requests (POSTs, streams until closed) this client is waiting on."""
        return self._generations

    def _track_generation(self, delta: int) -> None:
        with self._flight_lock:
            self._generations += delta

    # -- public calls --------------------------------------------------------

    def chat_completion(
        self,
        payload: dict[str, Any],
        *,
        scope: CallScope | None = None,
        **budget: Any,
    ) -> ChatResult:
        """POST ``/v1/chat/completions`` (not streamed) and parse the answer.

        ``budget`` (``deadline``, ``retries``), here and in the other calls,
        lets a caller that tries several hosts share one budget (:meth:`_call`).
        """
        body, request_id = self._call(
            "POST", "/v1/chat/completions", json=payload, scope=scope, **budget
        )
        return read_chat_completion(
            body, model=str(payload.get("model") or ""), request_id=request_id
        )

    def post_json(
        self,
        path: str,
        payload: Any,
        *,
        scope: CallScope | None = None,
        **budget: Any,
    ) -> dict[str, Any]:
        """POST ``payload`` to ``path`` (with retries); return the JSON object."""
        body, _ = self._call("POST", path, json=payload, scope=scope, **budget)
        return body

    def get_json(
        self,
        path: str,
        *,
        scope: CallScope | None = None,
        **budget: Any,
    ) -> dict[str, Any]:
        """GET ``path`` (with retries); return the JSON object."""
        body, _ = self._call("GET", path, scope=scope, **budget)
        return body

    def open_stream(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        first_token_timeout: float = 120.0,
        idle_timeout: float = 60.0,
        total_timeout: float = 600.0,
        scope: CallScope | None = None,
        deadline: float | None = None,
        retries: int | None = None,
    ) -> UpstreamStream:
        """Start a streamed completion; retried only until the upstream accepts it.

        The retry budget covers connecting and the retries; once a request is
        sent, ``first_token_timeout`` runs from that moment to the first event
        (some servers send their headers only with the first token). Once this
        returns, nothing is retried: the caller may already have sent bytes to
        its own client.
        """
        self._track_generation(1)
        scope = scope or CallScope()
        scope.after_send = first_token_timeout
        observer = self.observer
        began = 0.0
        if observer is not None:
            began = time.monotonic()
            observer.call_started(True)
        try:
            response = self._retrier("open", retries)(
                path,
                {**payload, "stream": True},
                correlation_id=self._current_correlation_id(),
                scope=scope,
                deadline=deadline or time.monotonic() + self.retry_budget,
            )
        except BaseException as err:
            self._track_generation(-1)
            if observer is not None:
                observer.call_finished(_failed_call(path, payload, True, began, err))
            raise
        finally:
            scope.finish()

        def closed() -> None:
            self._track_generation(-1)
            if observer is not None:
                observer.call_finished(_stream_call(path, payload, began, stream))

        stream = UpstreamStream(
            response,
            first_token_timeout=first_token_timeout,
            idle_timeout=idle_timeout,
            total_timeout=total_timeout,
            max_line_bytes=self.max_sse_line_bytes,
            on_close=closed,
            started=scope.sent_at,
        )
        return stream

    def list_models(self, *, scope: CallScope | None = None) -> list[str]:
        """Return the model ids of ``GET /v1/models`` (with retries)."""
        body = self.get_json("/v1/models", scope=scope)
        models = self._model_ids(body)
        if self.observer is not None:
            self.observer.models_listed(models)
        return models

    def is_lmstudio(self, *, timeout: float | None = None) -> bool:
        """Ask ``/lmstudio-greeting``, which only LM Studio answers; no retries."""
        try:
            body, _ = self._attempt("GET", "/lmstudio-greeting", timeout=timeout)
        except LMStudioError:
            return False
        return body.get("lmstudio") is True

    def lmstudio_models(self, *, timeout: float | None = None) -> list[dict]:
        """Return LM Studio's ``/api/v0/models`` entries, with ``state``; no retry."""
        body, _ = self._attempt("GET", "/api/v0/models", timeout=timeout)
        data = body.get("data")
        if not isinstance(data, list):
            raise LMStudioProtocolError("/api/v0/models answered without a data list.")
        return [entry for entry in data if isinstance(entry, dict)]

    def props(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Return llama.cpp's ``/props`` (slot count, context size); no retry."""
        body, _ = self._attempt("GET", "/props", timeout=timeout)
        return body

    def probe(self) -> HealthReport:
        """Probe the upstream once, with the short health timeout and no retries."""
        started = time.perf_counter()
        timeout = self.health_timeout
        busy_before = self.generations_in_flight > 0
        # The probe's own scope: the timeout bounds the whole probe, not a read.
        scope = CallScope()
        scope.set_deadline(time.monotonic() + timeout)
        try:
            response = self._send(
                "GET",
                "/v1/models",
                json=None,
                correlation_id=None,
                connect_timeout=timeout,
                read_timeout=timeout,
                scope=scope,
                deadline=None,
            )
            body, _ = self._parse(response)
            models = self._model_ids(body)
        except LMStudioError as err:
            scope.finish()
            latency_ms = round((time.perf_counter() - started) * 1000, 1)
            if (
                isinstance(err, LMStudioTimeoutError)
                and not isinstance(err, LMStudioConnectTimeoutError)
                and (busy_before or self.generations_in_flight > 0)
            ):
                # It accepted the connection and is working on our request.
                return HealthReport(
                    url=self.base_url,
                    reachable=True,
                    latency_ms=latency_ms,
                    busy=True,
                    error="busy: the model server is generating and answers "
                    "/v1/models only between generations",
                )
            return HealthReport(
                url=self.base_url,
                reachable=False,
                latency_ms=latency_ms,
                error=describe(err),
                cause=err.cause,
            )
        scope.finish()
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        report = HealthReport(
            url=self.base_url,
            reachable=True,
            latency_ms=latency_ms,
            server="openai-compatible",
            models=models,
            chained=_is_llm_service(response),
        )
        if self.observer is not None:
            self.observer.models_listed(models)
        if self.is_lmstudio(timeout=timeout):
            report.server = "lmstudio"
            try:
                entries = self.lmstudio_models(timeout=timeout)
            except LMStudioError:
                pass  # an older LM Studio without /api/v0: loaded state unknown
            else:
                report.loaded = [
                    str(entry.get("id"))
                    for entry in entries
                    if entry.get("state") == "loaded"
                    and entry.get("type") != "embeddings"
                ]
        return report

    # -- plumbing ------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        scope: CallScope | None = None,
        deadline: float | None = None,
        retries: int | None = None,
    ) -> tuple[dict[str, Any], str | None]:
        """Make one call with retries; the whole call ends within the budget.

        The call carries the correlation ID of the ``correlation_id`` hook;
        probes (which do not come through here) carry none. A caller trying
        several hosts passes the ``deadline`` of its whole budget and the
        ``retries`` left for this host.
        """
        scope = scope or CallScope()
        deadline = deadline or time.monotonic() + self.retry_budget
        scope.set_deadline(deadline)
        observer = self.observer
        began = 0.0
        if observer is not None:
            began = time.monotonic()
            observer.call_started(False)
        try:
            result = self._retrier("call", retries)(
                method,
                path,
                json=json,
                correlation_id=self._current_correlation_id(),
                scope=scope,
                deadline=deadline,
                observe=True,
            )
        except BaseException as err:
            if observer is not None:
                observer.call_finished(_failed_call(path, json, False, began, err))
            raise
        finally:
            scope.finish()
        if observer is not None:
            observer.call_finished(
                CallRecord(
                    path=path,
                    model=_model_of(json),
                    stream=False,
                    seconds=time.monotonic() - began,
                    usage=parse_usage(result[0].get("usage")),
                )
            )
        return result

    def _current_correlation_id(self) -> str | None:
        return self._correlation_id() if self._correlation_id else None

    def _attempt(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
        scope: CallScope | None = None,
        deadline: float | None = None,
        observe: bool = False,
    ) -> tuple[dict[str, Any], str | None]:
        """Send one request and return ``(json_object, upstream_request_id)``.

        Without a scope (a probe), the attempt gets its own: ``timeout`` then
        bounds it as a whole, not only each read.
        """
        own_scope = scope is None
        if scope is None:
            scope = CallScope()
            scope.set_deadline(time.monotonic() + (timeout or self.read_timeout))
        try:
            response = self._send(
                method,
                path,
                json=json,
                correlation_id=correlation_id,
                connect_timeout=timeout or self.connect_timeout,
                read_timeout=timeout or self.read_timeout,
                scope=scope,
                deadline=deadline,
                observe=observe,
            )
            return self._parse(response)
        finally:
            if own_scope:
                scope.finish()

    def _attempt_stream(
        self,
        path: str,
        payload: Any,
        *,
        correlation_id: str | None,
        scope: CallScope,
        deadline: float,
    ) -> requests.Response:
        """Open one stream; return the response once it is a 200 event stream."""
        # Connecting is bounded by the budget; sending the request moves the
        # deadline to send time + the first-token timeout (scope.after_send).
        scope.set_deadline(deadline)
        response = self._send(
            "POST",
            path,
            json=payload,
            correlation_id=correlation_id,
            connect_timeout=self.connect_timeout,
            # Some servers send their headers only with the first token.
            read_timeout=scope.after_send or self.read_timeout,
            scope=scope,
            deadline=deadline,
            stream=True,
            observe=True,
        )
        content_type = response.headers.get("Content-Type", "")
        if response.status_code == 200 and content_type.startswith("text/event-stream"):
            return response
        try:
            try:
                fits = self._read_body(response)
            except requests.RequestException as err:
                raise LMStudioProtocolError(
                    "The upstream's answer broke off.", status=response.status_code
                ) from err
            if not fits:
                raise self._too_large(response)
            # An error status, or LM Studio's 200 with an error body: raises.
            self._parse(response)
        except LMStudioError:
            if scope.ended:
                raise self._ended_error(scope, stream=True) from None
            raise
        finally:
            response.close()
        raise LMStudioProtocolError(
            "The upstream answered a streaming request without an event stream.",
            status=response.status_code,
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any,
        correlation_id: str | None,
        connect_timeout: float,
        read_timeout: float,
        scope: CallScope,
        deadline: float | None,
        stream: bool = False,
        observe: bool = False,
    ) -> requests.Response:
        """Send one request; translate every ``requests`` failure.

        This and :meth:`_status_error` are the only places that turn transport
        failures and error answers into the client's exception tree. ``deadline``
        is the retry budget's end: no attempt starts after it. ``scope`` ends the
        attempt at its own deadline, or when cancelled, even mid-read.
        """
        connect, read = connect_timeout, read_timeout
        if scope.ended:
            raise self._ended_error(scope, stream)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LMStudioTimeoutError(
                    "The upstream call ran out of its time budget."
                )
            connect = min(connect, remaining)
            if not stream:
                read = min(read, remaining)
        # A read cut to what is left of the budget that then times out ran out
        # of the budget, just as when the scope's deadline wins that race.
        budget_bound = read < read_timeout
        headers = list(self.extra_headers().items()) if self.extra_headers else []
        if correlation_id:
            headers.append(("X-Correlation-ID", correlation_id))
            # llama-cpp-python's server answers an empty 400 to an X-Request-ID
            # that is not a UUID: send it only where every upstream accepts it.
            if _is_uuid(correlation_id):
                headers.append(("X-Request-ID", correlation_id))
        generation = method == "POST" and not stream
        if generation:
            self._track_generation(1)
        try:
            with scope.active():
                response = self._deliver(
                    self._prepare(method, path, json, headers), (connect, read)
                )
                # Read here, in bounded pieces and under the scope's watch, so
                # a failure half-way is translated like any other.
                fits = stream or self._read_body(response)
        except requests.RequestException as err:
            if observe:
                self._observe(None)
            if scope.ended:
                raise self._ended_error(scope, stream) from err
            if budget_bound and _read_timed_out(err):
                raise self._budget_timeout() from err
            raise self._transport_error(err, connect, read, stream) from err
        finally:
            if generation:
                self._track_generation(-1)
        if scope.ended:
            # The read ended early: what arrived is cut short, not an answer.
            response.close()
            if observe:
                self._observe(None)
            raise self._ended_error(scope, stream)
        if observe:
            self._observe(response.status_code)
        if not fits:
            raise self._too_large(response)
        return response

    def _deliver(
        self, prepared: requests.PreparedRequest, timeout: tuple[float, float]
    ) -> requests.Response:
        """Send ``prepared`` with its answer's body left to read.

        Straight to the adapter: Session.send would only time the call, run
        no hooks, follow no redirect (never followed, see :meth:`_prepare`)
        and keep the upstream's cookies in the session's jar (never sent
        again either). Through the session when :attr:`through_session` says
        so: that is where the OpenTelemetry requests instrumentation sees it.
        """
        options = {
            "stream": True,
            "timeout": timeout,
            "verify": self.session.verify,
            "proxies": self.session.proxies,
        }
        if not self.through_session:
            return self.adapter.send(prepared, **options)
        # Session.send reads the request's jar when it looks at a redirect
        # it will not follow: an empty one, never filled from the session's.
        prepared._cookies = RequestsCookieJar()
        return self.session.send(prepared, allow_redirects=False, **options)

    def _prepare(
        self,
        method: str,
        path: str,
        payload: Any,
        headers: Iterable[tuple[str, str]] = (),
    ) -> requests.PreparedRequest:
        """Build the request as ``Session.request`` would, without its per-call work.

        The session's settings are fixed at start (proxies and TLS read once),
        so merging them again on every call (a third of requests' own cost
        here) bought nothing. Left out on purpose: cookies (a cookie an
        upstream sets during one caller's call must never ride on another
        caller's) and redirects (never followed, see ``_send``: a redirected
        POST would be re-sent as a GET; :meth:`_parse` refuses a 3xx).
        """
        url = self._urls.get(path)
        if url is None:
            checked = requests.PreparedRequest()
            checked.prepare_url(self.base_url + path, None)
            url = self._urls[path] = checked.url
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = url
        # One dict built in one go: the session's headers, the call's, then
        # the body's (later names win, whatever their case).
        sent = [*self.session.headers.items(), *headers]
        if payload is None:
            if method not in ("GET", "HEAD"):
                sent.append(("Content-Length", "0"))
        else:
            try:
                body = complexjson.dumps(payload, allow_nan=False).encode("utf-8")
            except ValueError as err:
                raise requests.exceptions.InvalidJSONError(err) from err
            prepared.body = body
            sent.append(("Content-Type", "application/json"))
            sent.append(("Content-Length", str(len(body))))
        prepared.headers = Headers.of(sent)
        return prepared

    def _read_body(self, response: requests.Response) -> bool:
        """Read the body in bounded pieces; False (and closed) when over the limit.

        A ``Content-Length`` over the limit is refused before reading anything;
        without one, reading stops at the first piece past it. Sizes count the
        decoded bytes, so a compressed answer cannot grow past the limit either.
        """
        limit = self.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            return False
        parts, size = [], 0
        for piece in response.iter_content(BODY_READ_SIZE):
            size += len(piece)
            if size > limit:
                response.close()
                return False
            parts.append(piece)
        response._content = b"".join(parts)  # what .json() and .text then read
        return True

    @staticmethod
    def _too_large(response: requests.Response) -> LMStudioResponseTooLargeError:
        return LMStudioResponseTooLargeError(
            "The upstream's answer is larger than the gateway accepts.",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        )

    def _transport_error(
        self,
        error: requests.RequestException,
        connect: float,
        read: float,
        stream: bool,
    ) -> LMStudioError:
        if isinstance(error, requests.ConnectTimeout):
            return LMStudioConnectTimeoutError(
                f"Timed out connecting to the upstream after {connect:g} s."
            )
        read_timed_out = _read_timed_out(error)
        if read_timed_out and stream:
            return self._first_token_timeout(read)
        if isinstance(error, requests.ReadTimeout):
            return LMStudioTimeoutError(
                f"The upstream did not answer within {read:g} s."
            )
        if read_timed_out:
            return LMStudioTimeoutError(
                f"The upstream did not finish its answer within {read:g} s."
            )
        if isinstance(error, requests.ConnectionError):
            cause, seen = _transport_cause(error)
            if cause == "not_http":
                return LMStudioProtocolError(
                    "The upstream's answer was not HTTP.", cause=cause, body=seen
                )
            return LMStudioConnectionError(
                "Could not connect to the upstream.", cause=cause
            )
        return LMStudioProtocolError(
            "The upstream's answer was not valid HTTP.", cause="not_http"
        )

    def _ended_error(self, scope: CallScope, stream: bool) -> LMStudioError:
        """The error for a call its scope ended: cancelled, or out of time."""
        if scope.reason == CANCELLED:
            return LMStudioCancelledError(
                "The call was cancelled: its client went away."
            )
        if stream and scope.sent_at is not None and scope.after_send is not None:
            return self._first_token_timeout(scope.after_send)
        return self._budget_timeout()

    def _budget_timeout(self) -> LMStudioTimeoutError:
        return LMStudioTimeoutError(
            f"The upstream did not finish its answer within the call's "
            f"{self.retry_budget:g} s budget."
        )

    @staticmethod
    def _first_token_timeout(seconds: float) -> LMStudioStreamTimeoutError:
        return LMStudioStreamTimeoutError(
            f"The upstream sent nothing within {seconds:g} s.", kind="first_token"
        )

    def _parse(self, response: requests.Response) -> tuple[dict[str, Any], str | None]:
        status = response.status_code
        request_id = response.headers.get("x-request-id")
        try:
            body = response.json()
        except (ValueError, RecursionError):
            body = None
        message, code = error_message(body)
        is_error_body = isinstance(body, dict) and "error" in body
        if 300 <= status < 400:
            raise LMStudioProtocolError(
                f"The upstream redirected the call (HTTP {status}): the gateway's "
                "upstream URL must point at the model server itself.",
                status=status,
                request_id=request_id,
                cause="not_openai",
            )
        if status >= 400 or is_error_body:
            if not message:
                # An empty (or shapeless) error body: its status text still
                # says more than nothing ("Bad Request").
                message = f"HTTP {status} {response.reason or ''}".strip()
            error = self._status_error(
                status,
                message,
                code,
                path=response.request.path_url if response.request else None,
                api_error=is_error_body,
                body=safe_excerpt(response.text, BODY_EXCERPT),
                request_id=request_id,
                retry_after=_retry_after_seconds(
                    response.headers.get("Retry-After"), self.retry_after_max
                ),
            )
            if status == 500 and _is_handler_exception(body):
                # It explained itself: the same request fails the same way.
                error.retryable = False
            raise error
        if not isinstance(body, dict):
            # OpenAI's API answers objects only: a bare 5, true, "text" or a
            # list is some other server (or a broken one), never an answer.
            problem = "not JSON" if body is None else "not a JSON object"
            content_type = response.headers.get("Content-Type", "")
            raise LMStudioProtocolError(
                f"The upstream's answer is {problem}.",
                status=status,
                body=safe_excerpt(response.text, BODY_EXCERPT),
                request_id=request_id,
                # A web page where the API should be: another web server.
                cause="not_openai" if "html" in content_type else None,
            )
        return UpstreamObject(body, response.content), request_id

    @staticmethod
    def _status_error(
        status: int,
        message: str,
        code: str | None,
        *,
        path: str | None = None,
        api_error: bool = False,
        **details: Any,
    ) -> LMStudioError:
        """Pick the exception class for an error answer, by its body first.

        LM Studio's statuses vary between versions (model not found was 404, is
        now 400), so the body's code and message decide before the status does.
        A 404, 405 or 501 without the API's ``{"error": ...}`` body comes from
        something that does not serve the API at that path (``api_error``).
        """
        # Relayed to clients (and shown on /health): capped, credentials masked.
        text = safe_excerpt(message)
        lowered = message[:10_000].lower()
        if code == LOOP_CODE or status == 508:
            return LMStudioLoopError(
                "The upstream is this gateway itself (the request came back to "
                "it): its upstream URL must point at a model server.",
                status=status,
                **details,
            )
        if "no models loaded" in lowered or "no model loaded" in lowered:
            return NoModelLoadedError(text, status=status, **details)
        if (
            code == "model_not_found"
            or "model not found" in lowered
            or "invalid model identifier" in lowered
            or ("model" in lowered and "not found" in lowered)
        ):
            return ModelNotFoundError(text, status=status, **details)
        not_served = status in NOT_SERVED_STATUSES and not api_error
        if "unexpected endpoint" in lowered or not_served:
            where = f" {path}" if path else " this path"
            return LMStudioProtocolError(
                f"The upstream does not serve{where} (HTTP {status}): the gateway's "
                "upstream URL probably does not point at a model server's root "
                "(e.g. http://localhost:1234).",
                status=status,
                cause="not_openai",
                **details,
            )
        if status in (401, 403):
            return LMStudioAuthError(text, status=status, **details)
        if status in BUSY_STATUSES:
            cause = "rate_limited" if status == 429 else "busy"
            return LMStudioBusyError(text, status=status, cause=cause, **details)
        if status in RETRY_STATUSES or status >= 500 or status < 400:
            # status < 400: a 200 with an error body of unknown meaning.
            return LMStudioServerError(text, status=status, **details)
        return LMStudioRequestError(text, status=status, **details)

    def _observe(self, status: int | None) -> None:
        if self._on_attempt is not None:
            self._on_attempt(status)

    @staticmethod
    def _record_attempts(details: dict) -> None:
        details["exception"].attempts = details["tries"]

    def _wait_before_retry(self, details: dict) -> None:
        """Log the failed attempt and wait (never past the retry budget)."""
        if self.observer is not None:
            self.observer.retrying(details["exception"])
        error = details["exception"]
        wait = _retry_wait(error, attempt=details["tries"] - 1)
        wait = max(0.0, min(wait, self.retry_budget - details["elapsed"]))
        # Never the upstream's text: it may quote the prompt or the token.
        log.warning(
            "upstream attempt %d failed (%s, upstream status %s, message of %d "
            "characters); retrying in %.2f s",
            details["tries"],
            type(error).__name__,
            error.status,
            len(error.message),
            wait,
        )
        self.sleep(wait)

    @staticmethod
    def _model_ids(body: Any) -> list[str]:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise LMStudioProtocolError("/v1/models answered without a data list.")
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]


def _model_of(payload: Any) -> str | None:
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) and model else None


def _failed_call(
    path: str, payload: Any, stream: bool, began: float, error: BaseException
) -> CallRecord:
    """The record of a call that raised ``error`` before it could answer."""
    cancelled = isinstance(error, LMStudioCancelledError)
    return CallRecord(
        path=path,
        model=_model_of(payload),
        stream=stream,
        seconds=time.monotonic() - began,
        error=error if isinstance(error, LMStudioError) and not cancelled else None,
        cancelled=cancelled,
    )


def _stream_call(
    path: str, payload: Any, began: float, stream: UpstreamStream
) -> CallRecord:
    """The record of a stream that has just closed."""
    first = stream.first_event_at
    return CallRecord(
        path=path,
        model=_model_of(payload),
        stream=True,
        seconds=time.monotonic() - began,
        first_token_seconds=None if first is None else first - stream.started,
        usage=parse_usage(stream.usage_data),
        error=stream.error,
        cancelled=stream.cancelled,
    )


def describe(error: LMStudioError) -> str:
    """Say in one line what went wrong (see :func:`.diagnosis.explain`)."""
    return explain(error)


def _read_timed_out(error: requests.RequestException) -> bool:
    """True when a read waited past its timeout (however requests wraps it)."""
    return isinstance(error, requests.ReadTimeout) or bool(
        isinstance(error, requests.ConnectionError)
        and error.args
        and isinstance(error.args[0], ReadTimeoutError)
    )


def _is_handler_exception(body: Any) -> bool:
    """True for llama-cpp-python's answer to an exception in its handler.

    Its server wraps what a request handler raised (``"Llama model must be
    created with embedding=True"``) as ``500 {"error": {"type":
    "internal_server_error", "message": ...}}``: deterministic, unlike a crash.
    """
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and error.get("type") == "internal_server_error"
        and bool(error.get("message"))
    )


#: The form of every UUID the gateway makes itself (most correlation IDs).
_CANONICAL_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def _is_uuid(value: str) -> bool:
    """True when ``uuid.UUID`` takes ``value`` (what llama-cpp-python checks)."""
    if _CANONICAL_UUID.fullmatch(value):
        return True
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _is_llm_service(response: requests.Response) -> bool:
    """True when ``response`` passed through an llm-service gateway."""
    return VIA_PSEUDONYM in response.headers.get("Via", "")


def _transport_cause(error: BaseException) -> tuple[str, str | None]:
    """Name why a connection failed: ``dns``, ``refused``, ``not_http`` or other.

    requests wraps urllib3's error, which wraps the socket's: walk the chain.
    For ``not_http``, also return the start of what the upstream sent instead
    (printable characters only), so ``/health`` can say what it saw.
    """
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, NameResolutionError | socket.gaierror):
            return "dns", None
        if isinstance(current, ConnectionRefusedError):
            return "refused", None
        if isinstance(current, http.client.RemoteDisconnected):
            return "unreachable", None  # a stale keep-alive socket: retried
        if isinstance(current, http.client.BadStatusLine):
            line = str(current.args[0]) if current.args else ""
            return "not_http", "".join(c for c in line if c.isprintable())[:40]
        if isinstance(current, http.client.LineTooLong):
            return "not_http", None
        pending.extend([current.__cause__, current.__context__, *current.args])
        pending.append(getattr(current, "reason", None))
    return "unreachable", None

"""Prometheus metrics: their names, the hooks that feed them, ``GET /metrics``.

Every metric of the service is declared in :data:`SPECS`, the one list of
names (the README's table comes from the same words). The request hooks here
count requests and time the gateway's own work; a :class:`UpstreamObserver`
attached to each upstream client times its calls, first tokens and retries;
``/metrics`` answers in Prometheus's text format.

Several gunicorn workers: each worker is a process with its own counters, so
prometheus_client's multiprocess mode is used whenever
``PROMETHEUS_MULTIPROC_DIR`` is set, which ``gunicorn.conf.py`` does (a fresh
directory per run, removed on exit): each worker writes its values to files
there and ``/metrics`` sums them, whichever worker answers.

Labels are bounded: routes are URL rule templates (``/docs/<name>``, never a
raw path; ``unmatched`` for 404s), status classes (``2xx``), upstream causes
(:mod:`.lmstudio.diagnosis`), error codes, host names, and models the upstream
lists (any other name is ``other``).

The other parts are fed without importing this module: :func:`init_app` gives
each host's client its :class:`UpstreamObserver`, and sets the admission
queue's, the upstream pool's and the usage log's ``on_*`` callbacks (queue
depth and wait, failovers, usage buffer); a scrape of ``/metrics`` sets the
host gauges (:func:`refresh_upstream_state`). What other parts may use:

- ``metric(name)`` returns the metric of that name in :data:`SPECS`
  (``metric("queue_depth").labels(host="a").inc()``), created on first use;
  ``child(name, *values)`` its child for these label values (in the order of
  the spec's labels), kept for the next time (``child("queue_depth", "a")``);
- ``REJECTION_CODES`` and ``AUTH_FAILURE_CODES``: error codes counted as limit
  rejections and failed authentications when a response carries them;
- ``hooks.caller_label``: returns the calling key's name (``tokens_total``'s
  ``key`` label; ``anonymous`` by default);
- ``hooks.known_models``: returns the models some host serves (model labels);
- ``g.queue_time`` (set by the admission queue): time waited, not overhead;
- ``UpstreamObserver(host_name)``: the observer for one host's client.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import (
    Flask,
    Request,
    Response,
    abort,
    current_app,
    g,
    has_request_context,
    request,
)
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

from .upstreams import CallObserver, CallRecord, LMStudioError
from .window import Window

EXTENSION = "llm_service.metrics"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "llm_service_"
#: Label of a model no host lists, of a route no rule matched, of anonymous use.
OTHER_MODEL = "other"
UNMATCHED_ROUTE = "unmatched"
ANONYMOUS = "anonymous"
#: Most model label values one process uses; further names count as ``other``.
MAX_MODELS = 50

#: The gateway's own time is well under a millisecond: fine buckets there.
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
#: Requests and upstream calls last from milliseconds to minutes.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class Spec:
    """One metric: its kind, meaning, labels and how workers' values combine."""

    kind: str
    help: str
    labels: tuple[str, ...] = ()
    #: For gauges under several workers: livesum, max, mostrecent...
    mode: str = "livesum"
    buckets: tuple[float, ...] = LATENCY_BUCKETS


SPECS: dict[str, Spec] = {
    # -- the gateway ---------------------------------------------------------
    "requests_total": Spec(
        "counter",
        "Requests answered, by route template, method and status class.",
        ("route", "method", "status_class"),
    ),
    "request_duration_seconds": Spec(
        "histogram",
        "Whole request time, by route template (streams: to their end).",
        ("route",),
    ),
    "gateway_overhead_seconds": Spec(
        "histogram",
        "Time a request spent in the gateway itself: its duration less the time "
        "waiting for the upstream (and in the queue).",
        ("route",),
        buckets=OVERHEAD_BUCKETS,
    ),
    "requests_in_flight": Spec("gauge", "Requests being handled now."),
    "limit_rejections_total": Spec(
        "counter", "Requests refused by a limit, by error code.", ("kind",)
    ),
    # -- upstream hosts ------------------------------------------------------
    "upstream_up": Spec(
        "gauge",
        "1 when the host answered its last health probe, else 0.",
        ("host",),
        mode="mostrecent",
    ),
    "upstream_in_flight": Spec(
        "gauge", "Calls (and open streams) in flight at a host.", ("host",)
    ),
    "upstream_request_duration_seconds": Spec(
        "histogram",
        "Upstream calls, retries and waits included (streams: to their end).",
        ("host", "model", "stream"),
    ),
    "upstream_time_to_first_token_seconds": Spec(
        "histogram",
        "Streams: from sending the request upstream to its first event.",
        ("host", "model"),
    ),
    "upstream_retries_total": Spec(
        "counter", "Upstream attempts that failed and were retried.", ("host",)
    ),
    "upstream_errors_total": Spec(
        "counter",
        "Failed upstream attempts, by cause (dns, refused, timeout, busy...).",
        ("host", "cause"),
    ),
    "tokens_total": Spec(
        "counter",
        "Tokens the upstream reported, by model, direction (prompt or "
        "completion) and API key name.",
        ("model", "direction", "key"),
    ),
    # -- several hosts, the admission queue, keys and usage records ----------
    "upstream_slots": Spec(
        "gauge", "Generations a host runs at once.", ("host",), "max"
    ),
    "upstream_circuit_state": Spec(
        "gauge",
        "1 for a host's circuit breaker state (closed, open, half_open).",
        ("host", "state"),
        "mostrecent",
    ),
    "upstream_failovers_total": Spec(
        "counter",
        "Requests moved to another host after this one failed.",
        ("host",),
    ),
    "queue_depth": Spec("gauge", "Requests waiting for a slot.", ("host",)),
    "queue_wait_seconds": Spec(
        "histogram",
        "Time requests waited for a slot.",
        ("host",),
        buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    ),
    "auth_failures_total": Spec(
        "counter", "Failed authentications, by error code.", ("kind",)
    ),
    "usage_buffer_depth": Spec("gauge", "Usage records waiting to be written."),
    "usage_records_dropped_total": Spec(
        "counter", "Usage records dropped: the buffer was full."
    ),
}

#: Error codes counted in ``limit_rejections_total`` (``kind`` label).
REJECTION_CODES: set[str] = {
    "rate_limited",
    "token_quota_exceeded",
    "concurrency_limit_exceeded",
    "queue_full",
    "queue_timeout",
}
#: Error codes counted in ``auth_failures_total`` (``kind`` label).
AUTH_FAILURE_CODES: set[str] = {"invalid_api_key", "api_key_expired", "api_key_revoked"}

_created: dict[str, Any] = {}
_create_lock = threading.Lock()


def metric(name: str) -> Any:
    """Return the metric ``name`` of :data:`SPECS` (without the prefix)."""
    found = _created.get(name)
    if found is not None:
        return found
    spec = SPECS[name]
    with _create_lock:
        if name not in _created:
            full = PREFIX + name
            if spec.kind == "counter":
                # prometheus_client adds ``_total`` itself.
                made = Counter(full.removesuffix("_total"), spec.help, spec.labels)
            elif spec.kind == "gauge":
                made = Gauge(full, spec.help, spec.labels, multiprocess_mode=spec.mode)
            else:
                made = Histogram(full, spec.help, spec.labels, buckets=spec.buckets)
            _created[name] = made
        return _created[name]


_children: dict[tuple[str, tuple[str, ...]], Any] = {}


def child(name: str, *values: str) -> Any:
    """The child of metric ``name`` for label ``values`` (in its spec's order).

    Kept once made: ``labels()`` sorts and checks the names and takes a lock
    on every call. Label values are bounded (see above), so this is too.
    """
    key = (name, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric(name).labels(*values)
    return found


def _default_known_models() -> Iterable[str]:
    return ()


@dataclass
class Hooks:
    """What later parts of the service plug in; see the module's docstring."""

    caller_label: Callable[[], str | None] = lambda: None
    known_models: Callable[[], Iterable[str]] = _default_known_models


hooks = Hooks()


class ModelLabels:
    """Bounded label values for model names.

    A name is its own label once a host has listed it (a health probe, which
    every scrape of ``/metrics`` makes, or ``hooks.known_models``) or it is the
    configured default model; any other name, such as one a caller made up, is
    ``other``. At most :data:`MAX_MODELS` names are kept. Under several workers
    the names one worker learns are shared with the others through a small
    file in the metrics directory, read again when it changes.
    """

    FILE = "models.json"
    #: Least seconds between two looks at the shared file.
    CHECK_SECONDS = 1.0

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._seen_mtime = 0.0

    def _path(self) -> str | None:
        directory = os.environ.get(MULTIPROC_ENV)
        return os.path.join(directory, self.FILE) if directory else None

    def learn(self, models: Iterable[str]) -> None:
        with self._lock:
            before = len(self._known)
            for model in models:
                if len(self._known) >= MAX_MODELS:
                    break
                self._known.add(model)
            grew = len(self._known) > before
            known = sorted(self._known)
        path = self._path()
        if grew and path:
            self._reload(path)
            with self._lock:
                known = sorted(self._known)
            temporary = f"{path}.{os.getpid()}"
            with open(temporary, "w") as file:
                json.dump(known, file)
            os.replace(temporary, path)

    def _reload(self, path: str) -> None:
        """Take in the names other workers learned (when the file changed)."""
        try:
            mtime = os.stat(path).st_mtime
            if mtime == self._seen_mtime:
                return
            with open(path) as file:
                names = json.load(file)
        except (OSError, ValueError):
            return
        self._seen_mtime = mtime
        if isinstance(names, list):
            with self._lock:
                for name in names[:MAX_MODELS]:
                    if isinstance(name, str) and len(self._known) < MAX_MODELS:
                        self._known.add(name)

    def __call__(self, model: str | None) -> str:
        if not model:
            return OTHER_MODEL
        if model in self._known:
            return model
        now = time.monotonic()
        if now - self._checked_at >= self.CHECK_SECONDS:
            self._checked_at = now
            path = self._path()
            if path:
                self._reload(path)
                if model in self._known:
                    return model
        # Whatever a later discovery knows (several hosts) counts too.
        if model in hooks.known_models():
            self.learn([model])
            return model
        return OTHER_MODEL


model_labels = ModelLabels()


@dataclass(slots=True)
class _Request:
    """What the hooks note about one request (kept on ``g``)."""

    started: float
    upstream_seconds: float = 0.0
    #: Calls started but not yet finished within the request's context.
    pending_calls: int = 0
    #: A streamed answer: counted when its last byte is sent, not at teardown.
    streamed: bool = False
    done: bool = False
    #: Time spent waiting in the admission queue (``g.queue_time``).
    queue_seconds: float = 0.0


class UpstreamObserver(CallObserver):
    """Feeds one host's metrics from its client's calls."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._in_flight = child("upstream_in_flight", host)
        self._retries = child("upstream_retries_total", host)
        # Made now, as before their first sample: a scrape lists them already.
        for name in (
            "upstream_errors_total",
            "upstream_request_duration_seconds",
            "upstream_time_to_first_token_seconds",
        ):
            metric(name)

    def call_started(self, stream: bool) -> None:
        self._in_flight.inc()
        if has_request_context():
            state = g.get("metrics")
            if state is not None:
                state.pending_calls += 1

    def retrying(self, error: LMStudioError) -> None:
        self._retries.inc()
        child("upstream_errors_total", self.host, error.cause).inc()

    def call_finished(self, call: CallRecord) -> None:
        self._in_flight.dec()
        host, model = self.host, model_labels(call.model)
        if call.error is not None:
            child("upstream_errors_total", host, call.error.cause).inc()
        if not call.cancelled:
            stream = "true" if call.stream else "false"
            child("upstream_request_duration_seconds", host, model, stream).observe(
                call.seconds
            )
        if call.first_token_seconds is not None:
            child("upstream_time_to_first_token_seconds", host, model).observe(
                call.first_token_seconds
            )
        key = None
        if has_request_context():
            state = g.get("metrics")
            if state is not None:
                state.upstream_seconds += call.seconds
                state.pending_calls -= 1
            key = hooks.caller_label()
        if call.usage is not None:
            key = key or ANONYMOUS
            child("tokens_total", model, "prompt", key).inc(call.usage.prompt)
            child("tokens_total", model, "completion", key).inc(call.usage.completion)

    def models_listed(self, models: Iterable[str]) -> None:
        model_labels.learn(models)


def route_label(current: Request | None = None) -> str:
    """The matched URL rule's template, never the raw path.

    ``current``: the request, when the caller holds it already (the proxy
    costs a lookup).
    """
    rule = (request if current is None else current).url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def _start() -> None:
    g.metrics = _Request(started=time.perf_counter())
    metric("requests_in_flight").inc()


def _after(response: Response) -> Response:
    """Note a streamed answer; count error codes of the others."""
    if response.is_streamed:
        context = g._get_current_object()
        state = context.get("metrics")
        if state is not None:
            # Flask runs teardown when the view returns and again after the
            # stream; the request is done only when the server closes the body.
            state.streamed = True
            state.queue_seconds = context.get("queue_time") or 0.0
            app = current_app._get_current_object()
            route, method = route_label(), request.method
            status = response.status_code
            response.call_on_close(lambda: _done(app, state, route, method, status))
            return response
    return _count_error_code(response)


def _count_error_code(response: Response) -> Response:
    """Count limit rejections and failed authentications by their error code."""
    if response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if code in REJECTION_CODES:
        child("limit_rejections_total", code).inc()
    elif code in AUTH_FAILURE_CODES:
        child("auth_failures_total", code).inc()
    return response


def _finish(_error: BaseException | None) -> None:
    context = g._get_current_object()
    state = context.get("metrics")
    if state is None or state.streamed:
        return
    del context.metrics
    state.queue_seconds = context.get("queue_time") or 0.0
    current = request._get_current_object()
    _done(
        current_app._get_current_object(),
        state,
        route_label(current),
        current.method,
        context.get("response_status", 500),
    )


def _done(app: Flask, state: _Request, route: str, method: str, status: int) -> None:
    """Count a finished request (maybe outside its context: a stream's end)."""
    if state.done:
        return
    state.done = True
    elapsed = time.perf_counter() - state.started
    metric("requests_in_flight").dec()
    child("requests_total", route, method, f"{status // 100}xx").inc()
    child("request_duration_seconds", route).observe(elapsed)
    if state.pending_calls == 0:
        # A stream cancelled from another thread is not timed here: its
        # upstream time is unknown to this request.
        waited = state.upstream_seconds + state.queue_seconds
        child("gateway_overhead_seconds", route).observe(max(0.0, elapsed - waited))
    app.extensions[EXTENSION].window.record(elapsed, status >= 500)


def collecting_registry() -> CollectorRegistry:
    """The registry to expose: every worker's values in multiprocess mode."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def scrape(accept: str = "") -> tuple[bytes, str]:
    """Every worker's metrics now, in the format ``accept`` prefers, and its type.

    Prometheus asks for OpenMetrics; anything else gets the classic text format.
    """
    encode, content_type = choose_encoder(accept)
    return encode(collecting_registry()), content_type


def on_metrics_listener() -> bool:
    """True when this request came in on ``METRICS_BIND``'s address."""
    bind = current_app.config["METRICS_BIND"]
    if not bind:
        return False
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        port = sock.getsockname()[1]
    except OSError:
        return False
    return port == int(bind.rpartition(":")[2])


def monitoring_allowed() -> None:
    """404 for monitoring routes on the wrong listener.

    With ``METRICS_BIND`` set, ``/metrics`` and ``/status`` are served there
    only; on that address nothing else is.
    """
    if current_app.config["METRICS_BIND"] and not on_metrics_listener():
        abort(404)


def _only_monitoring_on_metrics_listener() -> None:
    if (
        current_app.config["METRICS_BIND"]
        and request.blueprint not in MONITORING_BLUEPRINTS
        and on_metrics_listener()
    ):
        abort(404)


#: Blueprints served on the metrics listener when there is one.
MONITORING_BLUEPRINTS = frozenset({"monitoring"})


def refresh_upstream_state() -> None:
    """Probe the hosts (cached) so their gauges and the model labels are current.

    ``upstream_up``, ``upstream_slots`` and ``upstream_circuit_state`` describe
    the hosts, not this process's traffic: whichever worker is scraped sets them.
    """
    from .upstreams import get_upstream
    from .upstreams.breaker import CLOSED, HALF_OPEN, OPEN

    upstream = get_upstream()
    report = upstream.health()
    if report.reachable:
        model_labels.learn(report.models)
    for host in upstream.hosts:
        label = host_label(host.client.base_url)
        view = host.view()
        up = report.reachable if not upstream.several else view["status"] != "down"
        metric("upstream_up").labels(host=label).set(1 if up else 0)
        if upstream.several and view["status"] in ("up", "busy"):
            model_labels.learn(view["models"])
        metric("upstream_slots").labels(host=label).set(
            upstream.admission.slots(host.slot_key)
        )
        circuit = metric("upstream_circuit_state")
        for state in (CLOSED, OPEN, HALF_OPEN):
            circuit.labels(host=label, state=state).set(
                1 if state == view["circuit"] else 0
            )


@dataclass
class Metrics:
    """The app's metrics state: its (first) host's label and its traffic window."""

    host: str
    window: Window


def _observe_admission(upstream: Any) -> None:
    """Feed the queue's metrics (this process's requests waiting, and waits)."""
    labels = {h.slot_key: host_label(h.client.base_url) for h in upstream.hosts}
    failovers = metric("upstream_failovers_total")
    for name in ("queue_depth", "queue_wait_seconds"):
        metric(name)  # listed by a scrape before their first sample, as ever

    def depth_changed(key: str, waiting: int) -> None:
        child("queue_depth", labels.get(key, key)).set(waiting)

    def admitted(key: str, waited: float) -> None:
        child("queue_wait_seconds", labels.get(key, key)).observe(waited)

    upstream.admission.on_depth = depth_changed
    upstream.admission.on_admitted = admitted
    upstream.on_failover = lambda h: failovers.labels(
        host=host_label(h.client.base_url)
    ).inc()


def _observe_usage_log(app: Flask) -> None:
    """Feed the usage-record buffer's metrics (this process's buffer)."""
    from .usage import EXTENSION as USAGE

    usage_log = app.extensions.get(USAGE)
    if usage_log is None:
        return
    depth = metric("usage_buffer_depth")
    dropped = metric("usage_records_dropped_total")
    usage_log.on_depth = depth.set
    usage_log.on_drop = dropped.inc


def host_label(base_url: str) -> str:
    """The one host's label: ``host:port`` of its URL (never its credentials)."""
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def init_app(app: Flask) -> None:
    """Count every request and observe the upstream client (``/metrics``: status.py)."""
    from .upstreams import EXTENSION as UPSTREAM

    if not app.config["METRICS"]:
        return
    host = host_label(app.config["LM_STUDIO_BASE_URL"])
    model_labels.learn([m for m in (app.config["DEFAULT_MODEL"],) if m])
    upstream = app.extensions[UPSTREAM]
    # Each host its own label (host:port of its URL), several hosts included.
    upstream.observe_calls(lambda h: UpstreamObserver(host_label(h.client.base_url)))
    _observe_admission(upstream)
    _observe_usage_log(app)
    window = Window(os.environ.get(MULTIPROC_ENV))
    app.extensions[EXTENSION] = Metrics(host, window)
    # Before every other hook: requests refused by one (limits, loops, the
    # drain) are counted too.
    first = app.before_request_funcs.setdefault(None, [])
    if app.config["METRICS_BIND"]:
        # The listener is bound at start: without one there is nothing to refuse.
        first.insert(0, _only_monitoring_on_metrics_listener)
    first.insert(0, _start)
    app.after_request(_after)
    app.teardown_request(_finish)

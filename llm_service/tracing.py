"""W3C trace context on every request, and optional OpenTelemetry tracing.

Every request gets a trace context: the caller's ``traceparent`` (and its
``tracestate``) when valid, else a new trace. The gateway's part of it is a span
id of its own; that context goes upstream in ``traceparent``/``tracestate`` on
each call, and each log line made for the request carries ``trace_id`` and
``span_id`` beside its correlation ID, so a trace in another system leads to
the gateway's log lines and the model server's.

OpenTelemetry is switched on by its standard ``OTEL_TRACES_EXPORTER`` variable
(anything but ``none``; unset means off here) with the other ``OTEL_*``
variables as usual (``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``...).
Then the Flask and requests instrumentations make a span for each request and
each upstream call (its child), and the trace context above is the request
span's. Off, nothing of OpenTelemetry is imported: it costs nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from flask import Flask, g, has_request_context, request

from .config import ConfigError
from .ids import random_hex

log = logging.getLogger("llm_service.tracing")

EXTENSION = "llm_service.tracing"
EXPORTER_SETTING = "OTEL_TRACES_EXPORTER"
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?"
)
#: tracestate: at most 512 characters of list members (W3C's advice for
#: propagation), printable ASCII only; anything else is dropped, not mended.
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
#: Sampled: a caller that starts no trace gets one its spans would record.
SAMPLED = "01"


@dataclass(frozen=True)
class TraceContext:
    """The request's place in a trace: the gateway's span within it."""

    trace_id: str
    span_id: str
    flags: str = SAMPLED
    #: The caller's span, when it sent a valid ``traceparent``.
    parent_id: str | None = None
    state: str | None = None

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` for calls this span makes."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """Return ``(trace_id, parent_id, flags)`` of a valid header, else None.

    Version ``00`` has exactly four fields; a later version may add more after
    them (read as 00); ``ff`` and all-zero ids are invalid.
    """
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, rest = match["version"], match["rest"]
    if version == "ff" or (version == "00" and rest):
        return None
    if match["trace"] == _ZERO_TRACE or match["parent"] == _ZERO_SPAN:
        return None
    return match["trace"], match["parent"], match["flags"]


def incoming_context() -> TraceContext:
    """The caller's trace continued, or a new one; a new span id either way."""
    headers = request.headers
    parsed = parse_traceparent(headers.get("traceparent"))
    if parsed is None:
        # One draw for both ids: 32 hex digits of trace, 16 of span.
        drawn = random_hex(24)
        return TraceContext(trace_id=drawn[:32], span_id=drawn[32:])
    span_id = random_hex(8)
    trace_id, parent_id, flags = parsed
    state = headers.get("tracestate")
    if state is not None and not _TRACESTATE.fullmatch(state.strip()):
        state = None
    return TraceContext(
        trace_id=trace_id,
        span_id=span_id,
        flags=flags,
        parent_id=parent_id,
        state=state.strip() if state else None,
    )


def _otel_context() -> TraceContext | None:
    """The trace context of OpenTelemetry's current span (the request's)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    state = context.trace_state.to_header() if context.trace_state else ""
    return TraceContext(
        trace_id=format(context.trace_id, "032x"),
        span_id=format(context.span_id, "016x"),
        flags=format(int(context.trace_flags), "02x"),
        state=state or None,
    )


def current() -> TraceContext | None:
    """This request's trace context (None outside a request)."""
    if not has_request_context():
        return None
    return g.get("trace")


def _start_trace_with(otel: bool) -> Any:
    if not otel:
        return _start_trace

    def start() -> None:
        g.trace = _otel_context() or incoming_context()

    return start


def _start_trace() -> None:
    g.trace = incoming_context()


def outgoing_headers() -> dict[str, str]:
    """``traceparent``/``tracestate`` for an upstream call made for a request."""
    trace = current()
    if trace is None:
        return {}
    headers = {"traceparent": trace.traceparent}
    if trace.state:
        headers["tracestate"] = trace.state
    return headers


def _exporters(setting: Any) -> list[Any]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names, or the one a test gives."""
    if not isinstance(setting, str):
        return [setting]  # an exporter object (tests: an in-memory one)
    from opentelemetry.util._importlib_metadata import entry_points

    exporters = []
    for name in (part.strip() for part in setting.split(",")):
        if not name or name == "none":
            continue
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ConfigError(
                f"{EXPORTER_SETTING}={setting!r}: no span exporter named {name!r} "
                "is installed (otlp needs `pip install opentelemetry-exporter-otlp`)."
            )
        exporters.append(next(iter(found)).load()())
    return exporters


def enabled(setting: Any) -> bool:
    """True when ``OTEL_TRACES_EXPORTER`` asks for spans."""
    if setting is None:
        return False
    if not isinstance(setting, str):
        return True
    return any(part.strip() not in {"", "none"} for part in setting.split(","))


def _instrument(app: Flask, setting: Any) -> Any:
    """Make spans for requests and upstream calls; return the tracer provider."""
    try:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
        )
    except ImportError:
        raise ConfigError(
            f"{EXPORTER_SETTING} is set but OpenTelemetry is not installed: "
            "`pip install llm-service[tracing]`, or unset it."
        ) from None

    provider = TracerProvider(resource=Resource.create({"service.name": "llm-service"}))
    for exporter in _exporters(setting):
        # A test's exporter sees each span as it ends; others get batches.
        simple = not isinstance(setting, str)
        processor = SimpleSpanProcessor if simple else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    FlaskInstrumentor.instrument_app(app, tracer_provider=provider)
    # The request's span must cover every other hook, the pipeline's too.
    hooks = app.before_request_funcs[None]
    hooks.remove(app._before_request)
    hooks.insert(0, app._before_request)
    RequestsInstrumentor().instrument(tracer_provider=provider)
    return provider


def init_app(app: Flask) -> None:
    """Give each request a trace context; send it upstream; spans when asked."""
    from .upstreams import EXTENSION as UPSTREAM

    setting = app.config.get(EXPORTER_SETTING)
    otel = enabled(setting)
    provider = _instrument(app, setting) if otel else None
    app.extensions[EXTENSION] = provider
    # First of all (after OpenTelemetry's, which opens the span): every later
    # hook's log lines carry the trace.
    hooks = app.before_request_funcs.setdefault(None, [])
    hooks.insert(1 if otel else 0, _start_trace_with(otel))
    # With OpenTelemetry the requests instrumentation sends the call's own span.
    if otel:
        app.extensions[UPSTREAM].send_through_sessions()
    else:
        app.extensions[UPSTREAM].send_headers(outgoing_headers)


def uninstrument(app: Flask) -> None:
    """Undo :func:`init_app`'s instrumentation (tests build several apps)."""
    provider = app.extensions.get(EXTENSION)
    if provider is None:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    RequestsInstrumentor().uninstrument()
    FlaskInstrumentor.uninstrument_app(app)
    provider.shutdown()

"""W3C trace context: accepted or started, sent upstream, on every log line;
OpenTelemetry spans for the request and its upstream call when switched on."""

from __future__ import annotations

import json

import pytest

from llm_service import tracing
from llm_service.config import ConfigError
from tests.conftest import capture_logs
from tests.fakes.lmstudio import FakeLMStudio

CHAT = {"model": "loaded-model", "messages": [{"role": "user", "content": "hi"}]}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture(scope="module")
def fake():
    with FakeLMStudio(models=["loaded-model"], loaded=["loaded-model"]) as server:
        yield server


@pytest.fixture
def gateway(app_factory, fake):
    fake.clear_records()
    return app_factory(LM_STUDIO_URL=fake.url)


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (TRACEPARENT, (TRACE, PARENT, "01")),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, "00")),
        # A later version may add fields; they are read as version 00.
        (f"01-{TRACE}-{PARENT}-01-what-comes-next", (TRACE, PARENT, "01")),
        (f"00-{TRACE}-{PARENT}-01-extra", None),  # 00 has exactly four fields
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),
        (f"00-{TRACE[:-1]}-{PARENT}-01", None),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_parsing(header, parsed):
    assert tracing.parse_traceparent(header) == parsed


def test_the_callers_trace_goes_upstream_with_the_gateways_span(gateway, fake):
    answer = gateway.test_client().post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc,other=1"},
    )
    assert answer.status_code == 200
    sent = fake.requests[-1].headers
    trace_id, parent_id, flags = tracing.parse_traceparent(sent["traceparent"])
    assert trace_id == TRACE
    assert parent_id != PARENT  # the gateway's own span, child of the caller's
    assert flags == "01"
    assert sent["tracestate"] == "vendor=abc,other=1"


def test_a_request_without_a_trace_starts_one(gateway, fake):
    gateway.test_client().post("/v1/chat/completions", json=CHAT)
    gateway.test_client().post("/v1/chat/completions", json=CHAT)
    first, second = (r.headers["traceparent"] for r in fake.requests[-2:])
    assert tracing.parse_traceparent(first) is not None
    assert first.split("-")[1] != second.split("-")[1]
    assert "tracestate" not in fake.requests[-1].headers


@pytest.mark.parametrize("state", ["a=1\r\nx: y", "k=" + "v" * 600, "caf\u00e9=1"])
def test_an_invalid_tracestate_is_dropped(gateway, fake, state):
    headers = {"traceparent": TRACEPARENT}
    environ = {"HTTP_TRACESTATE": state}
    gateway.test_client().post(
        "/v1/chat/completions", json=CHAT, headers=headers, environ_base=environ
    )
    assert "tracestate" not in fake.requests[-1].headers


def test_every_log_line_of_a_request_carries_its_trace(gateway, fake):
    fake.fault("status", times=1, status=503)
    with capture_logs() as logs:
        gateway.test_client().post(
            "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
        )
    records = [json.loads(line) for line in logs.lines]
    assert len(records) >= 2  # the retry's warning, and the access record
    for record in records:
        assert record["trace_id"] == TRACE
        assert record["correlation_id"] != "-"
    assert len({record["span_id"] for record in records}) == 1


def test_text_log_lines_carry_the_trace_too(app_factory, fake):
    app = app_factory(LM_STUDIO_URL=fake.url, LOG_FORMAT="text")
    with capture_logs() as logs:
        app.test_client().get("/health/live", headers={"traceparent": TRACEPARENT})
    assert f"trace_id={TRACE}" in logs.lines[-1]


def test_tracing_is_off_unless_an_exporter_is_named():
    assert not tracing.enabled(None)
    assert not tracing.enabled("none")
    assert not tracing.enabled(" none ")
    assert tracing.enabled("console")
    assert tracing.enabled("none,otlp")


def test_an_exporter_that_is_not_installed_is_a_config_error(app_factory):
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        app_factory(OTEL_TRACES_EXPORTER="no-such-exporter")


def test_tracing_off_imports_nothing_of_opentelemetry(app_factory):
    app = app_factory()
    assert app.extensions[tracing.EXTENSION] is None
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)


@pytest.fixture
def spans(app_factory, fake):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    app = app_factory(LM_STUDIO_URL=fake.url, OTEL_TRACES_EXPORTER=exporter)
    try:
        yield app, exporter
    finally:
        tracing.uninstrument(app)


def test_spans_for_the_request_and_its_upstream_call_are_linked(spans, fake):
    from opentelemetry.trace import SpanKind

    app, exporter = spans
    with capture_logs() as logs:
        answer = app.test_client().post(
            "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
        )
    assert answer.status_code == 200
    finished = exporter.get_finished_spans()
    (server,) = [s for s in finished if s.kind == SpanKind.SERVER]
    (upstream,) = [s for s in finished if s.kind == SpanKind.CLIENT]
    assert server.name == "POST /v1/chat/completions"  # the route, not the path
    # The caller's trace, continued: the request's span is the caller's child,
    # and the upstream call's span the request's.
    assert format(server.context.trace_id, "032x") == TRACE
    assert format(server.parent.span_id, "016x") == PARENT
    assert upstream.context.trace_id == server.context.trace_id
    assert upstream.parent.span_id == server.context.span_id
    # The model server is told the upstream call's span.
    sent = tracing.parse_traceparent(fake.requests[-1].headers["traceparent"])
    assert sent[:2] == (TRACE, format(upstream.context.span_id, "016x"))
    # And the log lines name the request's span.
    record = json.loads(logs.lines[-1])
    assert record["span_id"] == format(server.context.span_id, "016x")

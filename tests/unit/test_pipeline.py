"""Request pipeline: correlation IDs, timing, security headers, access records."""

import json
import logging
import uuid

import pytest
import requests

from tests.conftest import UPSTREAM

SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def assert_pipeline_headers(response):
    assert response.headers["X-Correlation-ID"]
    assert float(response.headers["X-Process-Time"]) >= 0
    for name, value in SECURITY.items():
        assert response.headers[name] == value
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_headers_on_success(client):
    assert_pipeline_headers(client.get("/health/live"))


def test_headers_on_404(client):
    response = client.get("/missing")
    assert response.status_code == 404
    assert_pipeline_headers(response)


def test_headers_on_422(client):
    response = client.post("/llm/message", json={})
    assert response.status_code == 422
    assert_pipeline_headers(response)


def test_headers_on_500(app_factory, monkeypatch):
    client = app_factory(TESTING=False).test_client()
    monkeypatch.setattr("llm_service.message.load_json_body", lambda schema: 1 / 0)
    response = client.post("/llm/message", json={})
    assert response.status_code == 500
    assert_pipeline_headers(response)


def test_hsts_only_over_https(client):
    assert "Strict-Transport-Security" not in client.get("/").headers
    secure = client.get("/", base_url="https://gateway.test")
    assert "max-age" in secure.headers["Strict-Transport-Security"]


def test_hsts_behind_a_trusted_proxy_that_says_https(app_factory):
    proxied = app_factory(TRUSTED_PROXIES=1).test_client()
    https = proxied.get("/", headers={"X-Forwarded-Proto": "https"})
    assert "max-age" in https.headers["Strict-Transport-Security"]
    http = proxied.get("/", headers={"X-Forwarded-Proto": "http"})
    assert "Strict-Transport-Security" not in http.headers


def test_forwarded_proto_is_ignored_without_trusted_proxies(client):
    response = client.get("/", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in response.headers


@pytest.mark.parametrize("header", ["X-Correlation-ID", "X-Request-ID"])
@pytest.mark.parametrize("value", ["abc-123", "a.b:c_d-e", "x" * 128, "0"])
def test_valid_incoming_id_is_kept(client, header, value):
    response = client.get("/", headers={header: value})
    assert response.headers["X-Correlation-ID"] == value
    assert response.json["correlation_id"] == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 129,
        "x" * 10_000,
        "has space",
        "semi;colon",
        "ünïcode",
        "a\tb",
        "<script>",
    ],
)
@pytest.mark.parametrize("header", ["X-Correlation-ID", "X-Request-ID"])
def test_hostile_incoming_id_is_replaced(client, header, value):
    response = client.get("/", headers={header: value})
    chosen = response.headers["X-Correlation-ID"]
    assert chosen != value
    uuid.UUID(chosen)
    assert response.json["correlation_id"] == chosen


def test_hostile_correlation_id_falls_back_to_a_valid_request_id(client):
    headers = {"X-Correlation-ID": "bad id", "X-Request-ID": "req-7"}
    assert client.get("/", headers=headers).headers["X-Correlation-ID"] == "req-7"


def test_each_request_gets_its_own_id(client):
    ids = {client.get("/").headers["X-Correlation-ID"] for _ in range(5)}
    assert len(ids) == 5


def test_access_record_is_json_with_fields(client, upstream, log_output):
    upstream.post(
        f"{UPSTREAM}/v1/chat/completions",
        json={
            "model": "m",
            "choices": [
                {"message": {"content": "the secret answer"}, "finish_reason": "stop"}
            ],
        },
    )
    client.post(
        "/llm/message",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "my secret prompt"}],
        },
        headers={"X-Correlation-ID": "log-1"},
    )
    access = [
        json.loads(line) for line in log_output.lines if '"llm_service.access"' in line
    ]
    assert len(access) == 1
    record = access[0]
    assert record["correlation_id"] == "log-1"
    assert record["method"] == "POST"
    assert record["path"] == "/llm/message"
    assert record["status"] == 200
    assert record["upstream_status"] == 200
    assert record["upstream_retries"] == 0
    assert record["duration_ms"] >= 0
    assert record["level"] == "INFO"
    assert record["timestamp"].endswith("+00:00")
    everything = "\n".join(log_output.lines)
    assert "secret" not in everything


def test_access_record_counts_retries(client, upstream, log_output):
    upstream.post(f"{UPSTREAM}/v1/chat/completions", body=requests.ConnectionError("x"))
    client.post(
        "/llm/message",
        json={"model": "m", "messages": [{"role": "user", "content": "q"}]},
    )
    access = [
        json.loads(line) for line in log_output.lines if '"llm_service.access"' in line
    ]
    assert access[0]["upstream_retries"] == 2
    assert access[0]["status"] == 503


def test_api_token_is_never_logged(app_factory, upstream):
    from tests.conftest import capture_logs

    app = app_factory(LM_STUDIO_API_TOKEN="sk-lm-SECRET:TOKEN", LOG_LEVEL="DEBUG")
    with capture_logs() as handler:
        upstream.post(
            f"{UPSTREAM}/v1/chat/completions",
            status=401,
            json={"error": {"message": "bad key sk-lm-SECRET:TOKEN"}},
        )
        response = app.test_client().post(
            "/llm/message",
            json={"model": "m", "messages": [{"role": "user", "content": "q"}]},
        )
    assert response.status_code == 502
    assert handler.lines
    assert "SECRET" not in "\n".join(handler.lines)
    assert "SECRET" not in response.get_data(as_text=True)


def test_api_token_is_never_logged_from_start_up_to_failure(app_factory, upstream):
    """Start-up, a refused connection, a 401, a probe and the CLI, all at DEBUG:
    every record any logger makes (the root's too) is free of the token."""
    import logging

    from llm_service.logs import ROOT_LOGGER, JsonFormatter

    handler = _AllRecords()
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(ROOT_LOGGER), logging.getLogger()]
    root_level = logging.getLogger().level
    for logger in loggers:
        logger.addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        app = app_factory(LM_STUDIO_API_TOKEN="sk-lm-SECRET:TOKEN", LOG_LEVEL="DEBUG")
        client = app.test_client()
        chat = f"{UPSTREAM}/v1/chat/completions"
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        upstream.post(chat, body=requests.ConnectionError("refused"))
        assert client.post("/llm/message", json=body).status_code == 503
        upstream.replace("POST", chat, status=401, json={"error": "bad token"})
        assert client.post("/llm/message", json=body).status_code == 502
        upstream.get(f"{UPSTREAM}/v1/models", body=requests.ConnectionError("x"))
        assert client.get("/health").status_code == 503
        app.test_cli_runner().invoke(args=["lmstudio", "ping"])
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        logging.getLogger().setLevel(root_level)
    assert len(handler.lines) >= 4
    assert "SECRET" not in "\n".join(handler.lines)


class _AllRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_text_format(app_factory):
    import logging

    app = app_factory(LOG_FORMAT="text")
    handler = logging.getLogger("llm_service").handlers[-1]
    record = logging.LogRecord(
        "llm_service.x", logging.INFO, "", 0, "hello %s", ("w",), None
    )
    record.correlation_id = "c-1"
    line = handler.format(record)
    assert "hello w" in line
    assert "[c-1]" in line
    assert not line.startswith("{")
    assert app.config["LOG_FORMAT"] == "text"


def test_a_stream_has_one_access_record_written_when_it_ends(
    client, upstream, log_output
):
    """Flask runs teardown when the view returns and again when a stream ends:
    the record is written once, with the stream's whole duration."""
    events = [
        {"model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    upstream.post(
        f"{UPSTREAM}/v1/chat/completions",
        body=body + b"data: [DONE]\n\n",
        content_type="text/event-stream",
    )
    response = client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        | {"stream": True},
        buffered=False,
    )
    access = lambda: [  # noqa: E731
        line for line in log_output.lines if '"llm_service.access"' in line
    ]
    assert access() == []  # not before the stream is sent
    assert b"[DONE]" in b"".join(response.response)
    response.close()
    (record,) = [json.loads(line) for line in access()]
    assert record["status"] == 200
    assert record["path"] == "/v1/chat/completions"
    # Written after the request's context is gone, still naming its request.
    assert record["correlation_id"] == response.headers["X-Correlation-ID"]
    assert record["upstream_status"] == 200


@pytest.mark.parametrize(
    "initial",
    [
        [],
        [("Content-Type", "application/json")],
        # Already there, some twice or in another case: set replaces the first
        # and drops the rest; a default leaves them be.
        [
            ("x-correlation-id", "old"),
            ("Content-Type", "text/plain"),
            ("VIA", "1.0 proxy"),
            ("Cache-Control", "max-age=60"),
            ("X-Correlation-ID", "older"),
            ("cache-control", "private"),
        ],
        [("X-Upstream-Host", "a"), ("X-Frame-Options", "SAMEORIGIN")],
    ],
)
def test_headers_are_updated_as_set_and_setdefault_one_by_one(initial):
    from werkzeug.datastructures import Headers

    from llm_service.pipeline import update_headers

    updates = [
        ("X-Correlation-ID", "c-1", True),
        ("Via", "1.1 llm-service", True),
        ("Cache-Control", "no-store", False),
        ("X-Frame-Options", "DENY", False),
        ("X-Upstream-Host", "b", True),
    ]
    expected = Headers(initial)
    for name, value, replace in updates:
        if replace:
            expected.set(name, value)
        else:
            expected.setdefault(name, value)
    updated = Headers(initial)
    update_headers(updated, updates)
    assert updated.to_wsgi_list() == expected.to_wsgi_list()


def test_pipeline_headers_keep_what_a_view_set(app_factory):
    app = app_factory()

    @app.get("/own-headers")
    def own_headers():
        return "", 200, {"Cache-Control": "max-age=5", "Via": "1.0 view"}

    headers = app.test_client().get("/own-headers").headers
    assert headers.getlist("Cache-Control") == ["max-age=5"]  # a default
    assert headers.getlist("Via") == ["1.1 llm-service"]  # set
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Correlation-ID"]


@pytest.mark.parametrize(("level", "written"), [("INFO", 1), ("WARNING", 0)])
def test_access_record_follows_the_log_level(app_factory, level, written):
    from tests.conftest import capture_logs

    app = app_factory(LOG_LEVEL=level)
    with capture_logs() as handler:
        app.test_client().get("/health/live")
    access = [line for line in handler.lines if '"llm_service.access"' in line]
    assert len(access) == written

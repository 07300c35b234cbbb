"""Request pipeline: correlation IDs, timing, security headers, access records."""

import json
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
def test_hostile_incoming_id_is_replaced(client, value):
    response = client.get("/", headers={"X-Correlation-ID": value})
    chosen = response.headers["X-Correlation-ID"]
    assert chosen != value
    uuid.UUID(chosen)


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

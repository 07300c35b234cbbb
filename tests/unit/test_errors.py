"""The error contract: every failure maps to one documented status and shape."""

import json

import pytest
import requests

from tests.conftest import UPSTREAM

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "secret prompt"}]}


def assert_contract(response, status, code):
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error", "correlation_id"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    return body


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (
            {
                "status": 404,
                "json": {"error": {"code": "model_not_found", "message": "x"}},
            },
            404,
            "model_not_found",
        ),
        (
            {"status": 400, "json": {"error": 'Invalid model identifier "m"'}},
            404,
            "model_not_found",
        ),
        (
            {
                "status": 200,
                "json": {"error": "No models loaded. Please load a model."},
            },
            503,
            "no_model_loaded",
        ),
        (
            {"status": 400, "json": {"error": {"message": "Context length exceeded"}}},
            400,
            "upstream_rejected_request",
        ),
        (
            {"status": 422, "json": {"detail": "bad field"}},
            422,
            "upstream_rejected_request",
        ),
        (
            {"status": 401, "json": {"error": {"code": "invalid_api_key"}}},
            502,
            "upstream_auth_failed",
        ),
        ({"status": 500, "json": {"error": "crash"}}, 502, "upstream_error"),
        ({"status": 502, "body": "<html>bad gateway</html>"}, 502, "upstream_error"),
        ({"status": 503, "json": {}}, 503, "upstream_busy"),
        ({"status": 429, "json": {}}, 503, "upstream_busy"),
        (
            {"status": 200, "body": "<html>not json</html>"},
            502,
            "upstream_invalid_response",
        ),
        ({"status": 200, "json": {"choices": []}}, 502, "upstream_invalid_response"),
        (
            {"status": 200, "json": {"error": "Unexpected endpoint or method."}},
            502,
            "upstream_invalid_response",
        ),
        ({"body": requests.ConnectionError("refused")}, 503, "upstream_unavailable"),
        ({"body": requests.ReadTimeout("slow")}, 504, "upstream_timeout"),
    ],
)
def test_upstream_failures_map_to_the_table(client, upstream, reply, status, code):
    upstream.post(CHAT, **reply)
    response = client.post("/llm/message", json=BODY)
    assert_contract(response, status, code)


def test_rejection_carries_upstream_message(client, upstream):
    upstream.post(
        CHAT, status=400, json={"error": {"message": "Context length exceeded"}}
    )
    body = client.post("/llm/message", json=BODY).get_json()
    assert body["error"]["message"] == "Context length exceeded"


def test_unreachable_says_when_to_retry(client, upstream):
    upstream.post(CHAT, body=requests.ConnectionError("refused"))
    response = client.post("/llm/message", json=BODY)
    assert response.headers["Retry-After"] == "5"


def test_busy_passes_upstream_retry_after(client, upstream):
    upstream.post(CHAT, status=503, headers={"Retry-After": "7"}, json={})
    response = client.post("/llm/message", json=BODY)
    assert response.headers["Retry-After"] == "7"


def test_errors_reveal_nothing_internal(client, upstream):
    upstream.post(CHAT, body=requests.ConnectionError("refused at 10.1.2.3"))
    text = client.post("/llm/message", json=BODY).get_data(as_text=True)
    assert "10.1.2.3" not in text
    assert "lmstudio.test" not in text
    assert "Traceback" not in text


def test_unknown_route_404(client):
    assert_contract(client.get("/nope"), 404, "not_found")


def test_wrong_method_405_keeps_allow(client):
    response = client.get("/llm/message")
    assert_contract(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unexpected_exception_is_500_without_trace(
    app_factory, monkeypatch, log_output
):
    app = app_factory(TESTING=False)
    client = app.test_client()

    def explode(*args, **kwargs):
        raise RuntimeError("internal detail 0xdeadbeef")

    monkeypatch.setattr("llm_service.message.chat_payload", explode)
    response = client.post(
        "/llm/message", json=BODY, headers={"X-Correlation-ID": "c-500"}
    )
    body = assert_contract(response, 500, "internal_error")
    assert "0xdeadbeef" not in json.dumps(body)
    assert "correlation ID" in body["error"]["message"]
    # The exception is logged, with the request's correlation ID.
    errors = [r for r in log_output.records if r.levelname == "ERROR"]
    assert errors
    assert errors[0].correlation_id == "c-500"
    assert errors[0].exc_info[0] is RuntimeError

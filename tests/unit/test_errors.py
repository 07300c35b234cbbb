"""The error contract: every failure maps to one documented status and shape."""

import json

import pytest
import requests

from llm_service import errors
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


def _codes_the_package_answers() -> set[str]:
    """Every code literal given to Failure/APIError, and the code tables' values."""
    import ast
    from pathlib import Path

    import llm_service

    found: set[str] = set()
    for path in Path(llm_service.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name in ("Failure", "APIError") and len(node.args) >= 2:
                    code = node.args[1]
                    if isinstance(code, ast.Constant) and isinstance(code.value, str):
                        found.add(code.value)
    found |= set(errors.HTTP_CODES.values())
    found |= set(errors.STREAM_TIMEOUT_CODES.values())
    return found


def test_every_code_answered_is_registered():
    codes = _codes_the_package_answers()
    # The scan must see the codes (a broken scan would pass vacuously).
    assert {"upstream_loop", "server_shutting_down", "invalid_json"} <= codes
    assert codes <= set(errors.ERROR_CODES), codes - set(errors.ERROR_CODES)


def test_an_unknown_http_error_gets_its_class_code(app):
    from werkzeug.exceptions import ImATeapot, NotImplemented

    with app.test_request_context("/"):
        assert errors.describe_failure(ImATeapot()).code == "bad_request"
        assert errors.describe_failure(NotImplemented()).code == "internal_error"


def test_openapi_documents_every_http_code_of_the_registry(client):
    spec = client.get("/openapi.json").get_json()
    documented = json.dumps(spec)
    for code, entry in errors.ERROR_CODES.items():
        # 499 is never sent (the client has gone): only the access log has it.
        if entry.meaning and entry.statuses != (499,):
            assert f"`{code}`" in documented or f'"{code}"' in documented, code


def test_readme_error_tables_are_generated_from_the_registry():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "settings_doc", root / "scripts" / "settings_doc.py"
    )
    settings_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings_doc)
    readme = (root / "README.md").read_text()
    assert settings_doc.fill(readme) == readme
    for code in errors.ERROR_CODES:
        assert f"`{code}`" in readme, code

"""flask lmstudio ping / check."""

import json
import socket

import pytest
import requests

from llm_service.lmstudio import CAUSES
from tests.conftest import UPSTREAM

pytestmark = pytest.mark.mock_llm

MODELS = f"{UPSTREAM}/v1/models"


def test_ping_ok(runner, upstream):
    upstream.get(MODELS, json={"data": [{"id": "a"}, {"id": "b"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(f"{UPSTREAM}/api/v0/models", json={"data": []})
    result = runner.invoke(args=["lmstudio", "ping"])
    assert result.exit_code == 0
    assert result.output.startswith(f"OK {UPSTREAM}")
    assert "2 model(s)" in result.output


def test_ping_unreachable(runner, upstream):
    upstream.get(MODELS, body=requests.ConnectionError("refused"))
    result = runner.invoke(args=["lmstudio", "ping"])
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_check_all_steps(runner, upstream):
    upstream.get(MODELS, json={"data": [{"id": "qwen"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(
        f"{UPSTREAM}/api/v0/models",
        json={"data": [{"id": "qwen", "type": "llm", "state": "loaded"}]},
    )
    upstream.post(
        f"{UPSTREAM}/v1/chat/completions",
        json={
            "model": "qwen",
            "choices": [{"message": {"content": "OK"}, "finish_reason": "length"}],
        },
    )
    result = runner.invoke(args=["lmstudio", "check", "--generate"])
    assert result.exit_code == 0, result.output
    for step in ("connect", "auth", "server", "models", "loaded", "generate"):
        assert f"[ok]   {step}" in result.output
    assert "LM Studio" in result.output
    assert "All checks passed." in result.output


def test_check_unreachable_says_what_to_do(runner, upstream):
    refused = ConnectionRefusedError(111, "Connection refused")
    upstream.get(MODELS, body=requests.ConnectionError(refused))
    result = runner.invoke(args=["lmstudio", "check"])
    assert result.exit_code == 1
    assert "[FAIL] connect" in result.output
    assert "lms server start" in result.output


def test_check_auth_failure(runner, upstream):
    upstream.get(MODELS, status=401, json={"error": {"code": "invalid_api_key"}})
    result = runner.invoke(args=["lmstudio", "check"])
    assert result.exit_code == 1
    assert "[FAIL] auth" in result.output
    assert "LLM_SERVICE_LM_STUDIO_API_TOKEN" in result.output


def test_check_generation_failure(runner, upstream):
    upstream.get(MODELS, json={"data": [{"id": "gemma"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", status=404)
    upstream.post(
        f"{UPSTREAM}/v1/chat/completions",
        status=400,
        json={"error": "No models loaded. Please load a model."},
    )
    result = runner.invoke(args=["lmstudio", "check", "--generate"])
    assert result.exit_code == 1
    assert "[FAIL] generate" in result.output


def test_check_names_a_dns_failure_as_such(runner, upstream):
    unknown = socket.gaierror(-2, "Name or service not known")
    upstream.get(MODELS, body=requests.ConnectionError(unknown))
    result = runner.invoke(args=["lmstudio", "check"])
    assert result.exit_code == 1
    assert "[FAIL] connect" in result.output
    assert "DNS lookup failed" in result.output
    assert "nothing is listening" not in result.output
    assert "lms server start" not in result.output


@pytest.mark.parametrize(
    ("answer", "step", "cause"),
    [
        ({"status": 401, "json": {"error": "token needed"}}, "auth", "auth"),
        ({"status": 403, "json": {"error": "forbidden"}}, "auth", "auth"),
        (
            {"status": 404, "body": "<h1>Not Found</h1>", "content_type": "text/html"},
            "server",
            "not_openai",
        ),
        ({"status": 404, "json": {"detail": "Not Found"}}, "server", "not_openai"),
        ({"status": 501, "body": "Unsupported method"}, "server", "not_openai"),
        (
            {"status": 200, "body": "<html>hi</html>", "content_type": "text/html"},
            "server",
            "not_openai",
        ),
        ({"status": 429, "json": {"error": "slow down"}}, "connect", "rate_limited"),
        (
            {"status": 508, "json": {"error": {"code": "upstream_loop"}}},
            "server",
            "loop",
        ),
    ],
    ids=["401", "403", "404-html", "404-fastapi", "501", "200-html", "429", "loop"],
)
def test_check_gives_each_cause_its_own_advice(runner, upstream, answer, step, cause):
    upstream.get(MODELS, **answer)
    result = runner.invoke(args=["lmstudio", "check"])
    assert result.exit_code == 1
    assert f"[FAIL] {step}" in result.output
    assert CAUSES[cause].advice in result.output
    assert "lms server start" not in result.output
    assert "All checks passed" not in result.output


def test_check_fails_when_no_model_is_loaded(runner, upstream):
    upstream.get(MODELS, json={"data": [{"id": "qwen"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(
        f"{UPSTREAM}/api/v0/models",
        json={"data": [{"id": "qwen", "type": "llm", "state": "not-loaded"}]},
    )
    result = runner.invoke(args=["lmstudio", "check"])
    assert "no model is loaded" in result.output
    assert "All checks passed" not in result.output
    assert result.exit_code == 1


def test_check_reports_a_chained_gateway(runner, upstream):
    upstream.get(
        MODELS, json={"data": [{"id": "qwen"}]}, headers={"Via": "1.1 llm-service"}
    )
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", status=404)
    result = runner.invoke(args=["lmstudio", "check"])
    assert "[FAIL] server" in result.output
    assert "another llm-service" in result.output
    assert "All checks passed" not in result.output
    assert result.exit_code == 1


def test_check_output_has_no_log_lines(capsys, runner, upstream):
    # capsys first: the app (and its log handler) is built while it captures.
    # The generation is retried once: that retry must not print a JSON log line.
    upstream.get(MODELS, json={"data": [{"id": "gemma"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", status=404)
    upstream.post(f"{UPSTREAM}/v1/chat/completions", status=503, json={})
    upstream.post(
        f"{UPSTREAM}/v1/chat/completions",
        json={"model": "gemma", "choices": [{"message": {"content": "OK"}}]},
    )
    result = runner.invoke(args=["lmstudio", "check", "--generate"])
    assert result.exit_code == 0, result.output
    printed = result.output + "".join(capsys.readouterr())
    assert printed.strip()
    assert not any(line.startswith("{") for line in printed.splitlines())
    assert "retrying" not in printed


SECOND = "http://second.test:8080"


@pytest.fixture
def two_hosts(app_factory, upstream):
    """A CLI runner for an app with two hosts: ``first`` answers, ``second`` not."""
    hosts = [{"name": "first", "url": UPSTREAM}, {"name": "second", "url": SECOND}]
    app = app_factory(
        UPSTREAMS=json.dumps(hosts), LM_STUDIO_URL=None, DISCOVERY_INTERVAL_SECONDS=0
    )
    upstream.get(MODELS, json={"data": [{"id": "qwen"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(f"{UPSTREAM}/api/v0/models", json={"data": []})
    upstream.get(f"{SECOND}/v1/models", body=requests.ConnectionError("refused"))
    return app.test_cli_runner()


def test_check_looks_at_every_host(two_hosts):
    result = two_hosts.invoke(args=["lmstudio", "check"])
    assert result.exit_code == 1
    first, second = result.output.split("host second:")
    assert first.startswith("host first:")
    assert "[ok]   connect" in first
    assert "[FAIL] connect" in second
    assert "second.test" in second


def test_ping_probes_every_host(two_hosts):
    result = two_hosts.invoke(args=["lmstudio", "ping"])
    assert result.exit_code == 1
    assert f"OK first: {UPSTREAM}" in result.output
    assert f"FAIL second: {SECOND}" in result.output

"""flask lmstudio ping / check."""

import pytest
import requests

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
    upstream.get(MODELS, body=requests.ConnectionError("refused"))
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

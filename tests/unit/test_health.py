"""GET /, /health, /health/live, /health/ready."""

import pytest
import requests

from llm_service import __version__
from tests.conftest import UPSTREAM

pytestmark = pytest.mark.mock_llm

MODELS = f"{UPSTREAM}/v1/models"
GREETING = f"{UPSTREAM}/lmstudio-greeting"
V0 = f"{UPSTREAM}/api/v0/models"


def lmstudio_up(upstream, state="loaded"):
    upstream.get(MODELS, json={"data": [{"id": "qwen"}]})
    upstream.get(GREETING, json={"lmstudio": True})
    upstream.get(V0, json={"data": [{"id": "qwen", "type": "llm", "state": state}]})


def test_index_links(client):
    body = client.get("/").json
    assert body["service"] == "llm-service"
    assert body["version"] == __version__
    assert body["links"]["health"] == "/health"
    assert body["links"]["message"] == "/llm/message"


def test_health_ok(client, upstream):
    lmstudio_up(upstream)
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["uptime_seconds"] >= 0
    lm = body["lm_studio"]
    assert lm["url"] == UPSTREAM
    assert lm["reachable"] is True
    assert lm["server"] == "lmstudio"
    assert lm["models"] == ["qwen"]
    assert lm["loaded_models"] == ["qwen"]
    assert lm["latency_ms"] >= 0


def test_health_unreachable_is_503_with_reason(client, upstream):
    upstream.get(MODELS, body=requests.ConnectionError("refused"))
    response = client.get("/health")
    assert response.status_code == 503
    body = response.json
    assert body["status"] == "unavailable"
    assert body["lm_studio"]["reachable"] is False
    assert body["error"]["code"] == "upstream_unavailable"
    assert "not reachable" in body["error"]["message"]
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    assert response.headers["Retry-After"]


def test_live_never_calls_upstream(client, upstream):
    # The strict mock fails on any call that was not registered.
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.json["status"] == "alive"
    assert len(upstream.calls) == 0


def test_ready_with_a_loaded_model(client, upstream):
    lmstudio_up(upstream)
    response = client.get("/health/ready")
    assert response.status_code == 200
    body = response.json
    (host,) = body.pop("hosts")
    assert body == {
        "status": "ready",
        "models": ["qwen"],
        "correlation_id": response.headers["X-Correlation-ID"],
    }
    assert host["name"] == "default"
    assert host["status"] == "up"
    assert host["loaded_models"] == ["qwen"]
    assert host["circuit"] == "closed"


def test_not_ready_without_loaded_model(client, upstream):
    lmstudio_up(upstream, state="not-loaded")
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json["status"] == "not_ready"
    assert response.json["error"]["code"] == "no_model_loaded"


def test_not_ready_when_unreachable(client, upstream):
    upstream.get(MODELS, body=requests.ConnectionError("refused"))
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json["error"]["code"] == "upstream_unavailable"


def test_probe_is_cached(app_factory, upstream):
    client = app_factory(HEALTH_CACHE_SECONDS=60).test_client()
    lmstudio_up(upstream)
    for _ in range(5):
        assert client.get("/health").status_code == 200
        assert client.get("/health/ready").status_code == 200
    assert len(upstream.calls) == 3  # one probe: models, greeting, v0


def test_health_routes_are_not_rate_limited(app_factory, upstream):
    client = app_factory(RATE_LIMIT_REQUESTS=1, HEALTH_CACHE_SECONDS=60).test_client()
    lmstudio_up(upstream)
    statuses = {
        client.get(path).status_code for path in ["/health", "/health/live"] * 5
    }
    assert statuses == {200}


def test_a_call_that_hears_no_model_is_loaded_drops_the_cached_probe(
    app_factory, upstream
):
    client = app_factory(HEALTH_CACHE_SECONDS=60).test_client()
    lmstudio_up(upstream)
    assert client.get("/health/ready").status_code == 200
    upstream.post(
        f"{UPSTREAM}/v1/chat/completions",
        status=400,
        json={"error": "No models loaded. Please load a model."},
    )
    hello = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/llm/message", json=hello)
    assert response.json["error"]["code"] == "no_model_loaded"
    assert client.get("/health/ready").status_code == 200
    # The cached probe was dropped: the next one asked the upstream again.
    assert [call.request.url for call in upstream.calls].count(MODELS) == 2

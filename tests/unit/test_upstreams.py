"""The door to the model servers (llm_service.upstreams): what it owns."""

import pytest

from llm_service.errors import describe_failure
from llm_service.lmstudio.errors import NoModelLoadedError
from llm_service.upstreams import get_upstream
from tests.conftest import UPSTREAM

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"
MODELS = f"{UPSTREAM}/v1/models"
GREETING = f"{UPSTREAM}/lmstudio-greeting"
HELLO = [{"role": "user", "content": "Hello!"}]
NO_MODEL = {"error": "No models loaded. Please load a model."}


def probed_once(upstream):
    upstream.get(MODELS, json={"data": [{"id": "gemma"}]})
    upstream.get(GREETING, status=404)


def test_the_error_mapper_changes_no_upstream_state(app_factory, upstream):
    app = app_factory(HEALTH_CACHE_SECONDS=60)
    probed_once(upstream)
    with app.test_request_context("/llm/message"):
        cached = get_upstream().health()
        failure = describe_failure(NoModelLoadedError("none"))
        assert failure.code == "no_model_loaded"
        assert get_upstream().health() is cached  # still cached: no new probe


def test_the_door_drops_its_health_cache_when_no_model_is_loaded(app_factory, upstream):
    client = app_factory(HEALTH_CACHE_SECONDS=60).test_client()
    probed_once(upstream)
    assert client.get("/health").status_code == 200
    upstream.post(CHAT, json=NO_MODEL)
    response = client.post("/llm/message", json={"model": "m", "messages": HELLO})
    assert response.json["error"]["code"] == "no_model_loaded"
    # The next health check asks again instead of answering from the cache.
    upstream.get(MODELS, json={"data": []})
    assert client.get("/health/ready").status_code == 503
    assert len([c for c in upstream.calls if c.request.url == MODELS]) == 2


def test_both_apis_share_one_rule_for_request_defaults(app_factory, upstream):
    app = app_factory(DEFAULT_MODEL="configured", DEFAULT_MAX_TOKENS=77)
    with app.test_request_context("/"):
        door = get_upstream()
        assert door.request_defaults({"messages": HELLO, "top_p": None}) == {
            "messages": HELLO,
            "model": "configured",
            "max_tokens": 77,
        }
        assert door.request_defaults({"model": "m", "max_completion_tokens": 5}) == {
            "model": "m",
            "max_completion_tokens": 5,
        }


def test_calls_carry_the_correlation_id_without_being_handed_it(client, upstream):
    from responses import matchers

    upstream.get(
        MODELS,
        json={"data": []},
        match=[matchers.header_matcher({"X-Correlation-ID": "door-1"})],
    )
    response = client.get("/v1/models", headers={"X-Correlation-ID": "door-1"})
    assert response.status_code == 200

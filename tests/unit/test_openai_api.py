"""The /v1 routes through Flask's test client: the gateway's own limits."""

import pytest
from responses import matchers

from tests.conftest import UPSTREAM

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def limited(app_factory):
    return app_factory(MAX_MAX_TOKENS=100, DEFAULT_MAX_TOKENS=50).test_client()


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}),
        ("/v1/completions", {"model": "m", "prompt": "Once"}),
    ],
)
def test_max_tokens_above_the_setting_is_422(limited, path, body, field):
    response = limited.post(path, json={**body, field: 101})
    assert response.status_code == 422
    error = response.json["error"]
    assert error["code"] == "validation_error"
    assert error["param"] == field
    assert "at most 100" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}),
        ("/v1/completions", {"model": "m", "prompt": "Once"}),
    ],
)
def test_max_tokens_at_the_setting_is_relayed(limited, upstream, path, body):
    upstream.post(
        UPSTREAM + path,
        json={"object": "x", "choices": []},
        match=[matchers.json_params_matcher({"max_tokens": 100}, strict_match=False)],
    )
    assert limited.post(path, json={**body, "max_tokens": 100}).status_code == 200


def test_default_max_tokens_is_sent_when_none_is_given(limited, upstream):
    upstream.post(
        f"{UPSTREAM}/v1/chat/completions",
        json={"object": "chat.completion", "choices": []},
        match=[matchers.json_params_matcher({"max_tokens": 50}, strict_match=False)],
    )
    body = {"model": "m", "messages": MESSAGES}
    assert limited.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("value", [0, 1, "true", "yes", "on"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}),
        ("/v1/completions", {"model": "m", "prompt": "Once"}),
        ("/llm/message", {"messages": MESSAGES}),
    ],
)
def test_stream_must_be_a_json_boolean(client, path, body, value):
    """Found by the fuzz: marshmallow's Boolean took 0, 1 and "yes" for stream."""
    response = client.post(path, json={**body, "stream": value})
    assert response.status_code == 422
    assert response.json["error"]["code"] == "validation_error"

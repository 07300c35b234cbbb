"""POST /llm/message: validation, the upstream payload, the answer."""

import functools

import pytest
import requests
from responses import matchers

from tests.conftest import UPSTREAM
from tests.support.bodies import chat_completion, usage

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"
MODELS = f"{UPSTREAM}/v1/models"
HELLO = [{"role": "user", "content": "Hello!"}]


#: The answer these tests expect: its text and its 9 + 3 tokens.
completion = functools.partial(chat_completion, text="Hi there.", usage=usage(9, 3))


def test_answer_has_the_seed_contract(client, upstream):
    upstream.post(CHAT, json=completion())
    response = client.post(
        "/llm/message",
        json={"model": "my-model", "messages": HELLO, "temperature": 0.7},
        headers={"X-Correlation-ID": "req-123"},
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["response"] == "Hi there."
    assert body["model"] == "loaded-model"  # the one that answered
    assert body["tokens_used"] == 12
    assert body["usage"] == {"prompt": 9, "completion": 3, "total": 12}
    assert body["finish_reason"] == "stop"
    assert body["correlation_id"] == "req-123"
    assert isinstance(body["processing_time"], float)
    assert response.headers["X-Correlation-ID"] == "req-123"


def test_upstream_gets_the_request_fields(client, upstream):
    sent = {
        "model": "my-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello!"},
        ],
        "temperature": 0.2,
        "max_tokens": 50,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["\n\n"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.1,
        "repeat_penalty": 1.1,
    }
    upstream.post(
        CHAT,
        json=completion(),
        match=[
            matchers.json_params_matcher({**sent, "stream": False}),
            matchers.header_matcher({"X-Correlation-ID": "abc"}),
        ],
    )
    response = client.post(
        "/llm/message", json=sent, headers={"X-Correlation-ID": "abc"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "usage",
    [False, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}],
    ids=["missing", "zeros"],
)
def test_unknown_token_counts_are_null(client, upstream, usage):
    upstream.post(CHAT, json=completion(usage=usage))
    body = client.post("/llm/message", json={"messages": HELLO, "model": "m"}).json
    assert body["tokens_used"] is None
    assert body["usage"] is None


def test_default_max_tokens_is_applied(app_factory, upstream):
    client = app_factory(DEFAULT_MAX_TOKENS=64).test_client()
    upstream.post(
        CHAT,
        json=completion(),
        match=[matchers.json_params_matcher({"max_tokens": 64}, strict_match=False)],
    )
    assert (
        client.post("/llm/message", json={"messages": HELLO, "model": "m"}).status_code
        == 200
    )


def test_configured_default_model(app_factory, upstream):
    client = app_factory(DEFAULT_MODEL="house-model").test_client()
    upstream.post(
        CHAT,
        json=completion(),
        match=[
            matchers.json_params_matcher({"model": "house-model"}, strict_match=False)
        ],
    )
    assert client.post("/llm/message", json={"messages": HELLO}).status_code == 200


def test_without_model_uses_the_loaded_one(client, upstream):
    upstream.get(MODELS, json={"data": [{"id": "gemma"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", status=404)
    upstream.post(
        CHAT,
        json=completion(model="gemma"),
        match=[matchers.json_params_matcher({"model": "gemma"}, strict_match=False)],
    )
    assert (
        client.post("/llm/message", json={"messages": HELLO}).json["model"] == "gemma"
    )


def test_without_model_and_none_loaded(client, upstream):
    upstream.get(MODELS, json={"data": []})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", status=404)
    response = client.post("/llm/message", json={"messages": HELLO})
    assert response.status_code == 503
    assert response.json["error"]["code"] == "no_model_loaded"


LONG = "x" * 257


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        ({"messages": HELLO, "temperature": -0.1}, "temperature"),
        ({"messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "temperature": True}, "temperature"),
        ({"messages": HELLO, "top_p": 1.5}, "top_p"),
        ({"messages": HELLO, "top_p": -1}, "top_p"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 100000}, "max_tokens"),
        ({"messages": HELLO, "stop": 5}, "stop"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": HELLO, "seed": "x"}, "seed"),
        ({"messages": HELLO, "model": ""}, "model"),
        ({"messages": HELLO, "model": LONG}, "model"),
        ({"messages": HELLO, "unknown": 1}, "unknown"),
        ({"messages": HELLO, "stream": "maybe"}, "stream"),
    ],
)
def test_invalid_bodies_get_422_with_field_details(client, body, field):
    response = client.post("/llm/message", json=body)
    assert response.status_code == 422
    error = response.json["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]
    assert response.json["correlation_id"] == response.headers["X-Correlation-ID"]


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"", "application/json", 400, "invalid_json"),
        (b"{not json", "application/json", 400, "invalid_json"),
        (b'{"messages": "\xff\xfe"}', "application/json", 400, "invalid_json"),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 422, "validation_error"),
        (b"null", "application/json", 422, "validation_error"),
        (b'{"messages": []}', "text/plain", 415, "unsupported_media_type"),
        (
            b"messages=hi",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        (
            b'{"a": "' + b"x" * 20000 + b'"}',
            "application/json",
            413,
            "payload_too_large",
        ),
    ],
    ids=[
        "empty",
        "malformed",
        "invalid-utf8",
        "deep-nesting",
        "array",
        "null",
        "text-plain",
        "form",
        "oversize",
    ],
)
def test_bad_bodies(client, data, content_type, status, code):
    response = client.post("/llm/message", data=data, content_type=content_type)
    assert response.status_code == status
    assert response.json["error"]["code"] == code
    assert response.json["correlation_id"]


def test_failed_probe_falls_back_to_the_last_known_model(client, upstream):
    """llama.cpp answers /v1/models only between generations: a busy upstream."""
    upstream.get(MODELS, json={"data": [{"id": "gemma"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", status=404)
    upstream.post(CHAT, json=completion(model="gemma"))
    assert client.post("/llm/message", json={"messages": HELLO}).status_code == 200
    upstream.replace("GET", MODELS, body=requests.ReadTimeout("busy generating"))
    upstream.post(
        CHAT,
        json=completion(model="gemma"),
        match=[matchers.json_params_matcher({"model": "gemma"}, strict_match=False)],
    )
    assert client.post("/llm/message", json={"messages": HELLO}).status_code == 200

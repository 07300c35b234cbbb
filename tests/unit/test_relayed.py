"""A non-streamed /v1 answer goes out in the upstream's own bytes, parsed once."""

from __future__ import annotations

import json

import flask
import pytest

from llm_service import usage
from tests.conftest import UPSTREAM
from tests.unit.test_auth import HELLO, bearer, create_key
from tests.unit.test_usage import records

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"
#: As an upstream may write it: its own key order and spacing, raw UTF-8.
UPSTREAM_BYTES = (
    b'{"object": "chat.completion", "model": "qwen-7b", "id": "c-1",\n'
    b' "choices": [{"index": 0, "finish_reason": "stop",'
    b' "message": {"role": "assistant", "content": "H\xc3\xa9 \\u00e9"}}],\n'
    b' "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}\n'
)


def test_the_answer_is_the_upstreams_own_bytes(client, upstream):
    upstream.post(CHAT, body=UPSTREAM_BYTES, content_type="application/json")
    response = client.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 200
    assert response.data == UPSTREAM_BYTES
    assert response.mimetype == "application/json"
    assert response.headers["Content-Length"] == str(len(UPSTREAM_BYTES))
    assert response.json["choices"][0]["message"]["content"] == "Hé é"


def test_an_answer_not_in_utf8_is_encoded_again(client, upstream):
    answer = {"object": "chat.completion", "model": "m", "choices": []}
    utf16 = json.dumps(answer).encode("utf-16")
    upstream.post(CHAT, body=utf16, content_type="application/json; charset=utf-16")
    response = client.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 200
    assert response.json == answer
    assert response.data != utf16


def test_usage_is_read_from_the_parsed_answer_not_parsed_again(
    app_factory, tmp_path, upstream, monkeypatch
):
    database = f"sqlite:///{tmp_path}/usage.db"
    app = app_factory(DATABASE_URL=database, USAGE_FLUSH_SECONDS=0.05)
    key = create_key(app)

    def refused(*args, **kwargs):
        raise AssertionError("the relayed answer was parsed again")

    monkeypatch.setattr(flask.Response, "get_json", refused)
    upstream.post(CHAT, body=UPSTREAM_BYTES, content_type="application/json")
    response = app.test_client().post(
        "/v1/chat/completions", json=HELLO, headers=bearer(key)
    )
    assert response.status_code == 200
    assert app.extensions[usage.EXTENSION].flush(5)
    (record,) = records(database)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (5, 2)
    assert record["model"] == "qwen-7b"


def test_the_request_body_is_parsed_once(app_factory, tmp_path, upstream, monkeypatch):
    """Auth, metering and validation read one parse of the body."""
    app = app_factory(DATABASE_URL=f"sqlite:///{tmp_path}/usage.db")
    key = create_key(app)
    body = json.dumps(HELLO).encode()
    parsed = []
    loads = json.loads

    def counting(s, *args, **kwargs):
        if s == body:
            parsed.append(kwargs)
        return loads(s, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    upstream.post(CHAT, body=UPSTREAM_BYTES, content_type="application/json")
    response = app.test_client().post(
        "/v1/chat/completions",
        data=body,
        content_type="application/json",
        headers=bearer(key),
    )
    assert response.status_code == 200
    assert len(parsed) == 1
    assert "parse_constant" in parsed[0]  # standard JSON only (no NaN)

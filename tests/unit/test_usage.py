"""Usage records: one per request, tokens real or counted, /v1/usage, the CLI."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
from sqlalchemy import create_engine, text

from llm_service import usage
from llm_service.ids import new_uuid7_hex
from tests.conftest import UPSTREAM
from tests.unit.test_auth import COMPLETION, HELLO, bearer, create_key

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"


@pytest.fixture
def database(tmp_path):
    return f"sqlite:///{tmp_path}/usage.db"


@pytest.fixture
def app(app_factory, database):
    return app_factory(DATABASE_URL=database, USAGE_FLUSH_SECONDS=0.05)


def records(database: str) -> list[dict]:
    with create_engine(database).connect() as connection:
        rows = connection.execute(
            text("SELECT * FROM usage_records ORDER BY created_at")
        )
        return [dict(row._mapping) for row in rows]


def sse(*events: dict) -> bytes:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + b"data: [DONE]\n\n"


def delta(content: str) -> dict:
    return {
        "model": "qwen-7b",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }


def test_one_record_per_request_with_real_usage(app, database, upstream):
    key = create_key(app)
    upstream.post(CHAT, json=COMPLETION)
    client = app.test_client()
    response = client.post(
        "/v1/chat/completions",
        json=HELLO,
        headers={**bearer(key), "X-Correlation-ID": "req-1"},
    )
    assert response.status_code == 200
    assert app.extensions[usage.EXTENSION].flush(5)
    (record,) = records(database)
    assert record["key_name"] == "alice"
    assert record["model"] == "qwen-7b"
    assert record["upstream"] == "default"  # the host's name, never its URL
    assert record["route"] == "openai.chat_completions"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (5, 2)
    assert not record["usage_estimated"]
    assert record["status"] == 200
    assert record["correlation_id"] == "req-1"
    assert record["latency_ms"] > 0
    assert "Hi" not in json.dumps(record, default=str)  # never the prompt


def test_a_stream_without_usage_counts_chunks(app, database, upstream):
    key = create_key(app)
    body = sse(delta("Hel"), delta("lo"), delta("!"))
    upstream.post(CHAT, body=body, content_type="text/event-stream")
    response = app.test_client().post(
        "/v1/chat/completions", json={**HELLO, "stream": True}, headers=bearer(key)
    )
    assert b"[DONE]" in response.get_data()
    assert app.extensions[usage.EXTENSION].flush(5)
    (record,) = records(database)
    assert record["completion_tokens"] == 3
    assert record["prompt_tokens"] == 6  # the estimate
    assert record["usage_estimated"]
    assert record["ttft_ms"] is not None


def test_a_stream_with_usage_uses_it(app, database, upstream):
    key = create_key(app)
    final = {"model": "qwen-7b", "choices": [], "usage": COMPLETION["usage"]}
    upstream.post(CHAT, body=sse(delta("Hi"), final), content_type="text/event-stream")
    response = app.test_client().post(
        "/llm/message", json={**HELLO, "stream": True}, headers=bearer(key)
    )
    assert b"event: done" in response.get_data()
    assert app.extensions[usage.EXTENSION].flush(5)
    (record,) = records(database)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (5, 2)
    assert not record["usage_estimated"]


def test_v1_usage_answers_the_callers_own_usage(app, upstream):
    alice = create_key(app)
    bob = create_key(app, "bob")
    client = app.test_client()
    for key in (alice, alice, bob):
        upstream.post(CHAT, json=COMPLETION)
        client.post("/v1/chat/completions", json=HELLO, headers=bearer(key))
    assert app.extensions[usage.EXTENSION].flush(5)
    body = client.get("/v1/usage", headers=bearer(alice)).get_json()
    assert body["key"] == "alice"
    assert body["since"].endswith("T00:00:00+00:00")  # RFC 3339, UTC
    assert body["until"].endswith("+00:00")
    assert (body["requests"], body["prompt_tokens"]) == (2, 10)
    assert (body["completion_tokens"], body["total_tokens"]) == (4, 14)
    assert body["by_model"] == [
        {
            "model": "qwen-7b",
            "requests": 2,
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "total_tokens": 14,
            "estimated_requests": 0,
        }
    ]
    later = client.get("/v1/usage?since=2999-01-01", headers=bearer(alice)).get_json()
    assert later["requests"] == 0
    bad = client.get("/v1/usage?since=yesterday", headers=bearer(alice))
    assert bad.status_code == 422
    assert client.get("/v1/usage").status_code == 401
    output = app.test_cli_runner().invoke(args=["keys", "usage"]).output
    assert "alice" in output
    assert "bob" in output
    output = app.test_cli_runner().invoke(args=["keys", "usage", "bob"]).output
    assert "alice" not in output


def test_a_full_buffer_drops_counts_and_logs(caplog):
    buffer = usage.UsageLog(capacity=2, flush_seconds=60)
    engine = create_engine("sqlite://")
    try:
        for n in range(5):
            buffer.put({"id": str(n)}, engine)
        assert buffer.stats()["dropped"] == 3
        assert buffer.stats()["buffered"] == 2
        assert "3 record(s) dropped" in caplog.text or "dropped" in caplog.text
    finally:
        buffer.stop()


def test_the_writer_wakes_for_every_record(tmp_path, app_factory):
    app = app_factory(DATABASE_URL=f"sqlite:///{tmp_path}/w.db")
    from llm_service import db

    db.prepare(app)
    with app.app_context():
        engine = db.engine()
    buffer = usage.UsageLog(capacity=10, flush_seconds=0.01)
    row = {
        "created_at": datetime(2025, 1, 1),
        "route": "r",
        "status": 200,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "usage_estimated": False,
        "latency_ms": 1.0,
        "correlation_id": "c",
    }
    try:
        buffer.put({**row, "id": "first"}, engine)
        assert buffer.flush(5)
        time.sleep(0.1)  # the writer is idle again
        buffer.put({**row, "id": "second"}, engine)
        deadline = time.monotonic() + 5  # not flush(): it would wake the writer
        while buffer.stats()["written"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert buffer.stats()["written"] == 2
    finally:
        buffer.stop()


@pytest.mark.parametrize("relayed", [True, False])
def test_a_relayed_answer_is_read_without_parsing_the_body(
    app_factory, database, upstream, monkeypatch, relayed
):
    """A relayed answer carries its parsed object; any other is parsed once."""
    from types import SimpleNamespace

    from llm_service import openai_api

    # The body names no model (the default is asked for): the answer's counts.
    app = app_factory(
        DATABASE_URL=database, USAGE_FLUSH_SECONDS=0.05, DEFAULT_MODEL="qwen-7b"
    )
    if not relayed:  # encoded again by Flask, as a view's plain dict is
        post = openai_api._post
        monkeypatch.setattr(openai_api, "_post", lambda *a: dict(post(*a).answer))
    parses = []

    def loads(data):
        parses.append(data)
        return json.loads(data)

    monkeypatch.setattr(usage, "json", SimpleNamespace(loads=loads))
    get_json = app.response_class.get_json
    monkeypatch.setattr(
        app.response_class,
        "get_json",
        lambda self, *a, **k: parses.append(self) or get_json(self, *a, **k),
    )
    key = create_key(app)
    upstream.post(CHAT, json={**COMPLETION, "model": "qwen-7b-q4"})
    body = {"messages": HELLO["messages"]}
    response = app.test_client().post(
        "/v1/chat/completions", json=body, headers=bearer(key)
    )
    assert response.status_code == 200
    assert len(parses) == (0 if relayed else 1)
    assert app.extensions[usage.EXTENSION].flush(5)
    (record,) = records(database)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (5, 2)
    assert not record["usage_estimated"]
    assert record["model"] == "qwen-7b-q4"


def test_a_relayed_answer_not_sent_counts_nothing(app):
    """Only a 200 JSON answer going out as it is has its usage read."""
    with app.test_request_context("/v1/chat/completions", method="POST", json=HELLO):
        found = usage.meter()
        error = app.response_class("{}", status=502, mimetype="application/json")
        usage._observe(error)
    assert found.prompt_tokens is None
    assert found.measured() == (0, 0, False)


def test_record_ids_are_version_7_uuids_in_time_order(monkeypatch):
    """Time-ordered ids go in at the end of the table's index, not all over it."""
    import uuid

    ids = [new_uuid7_hex() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:10]:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert value == parsed.hex  # 32 hex digits, as the column holds
    now = time.time_ns()
    monkeypatch.setattr(usage.time, "time_ns", lambda: now + 1_000_000)
    later = new_uuid7_hex()
    assert later > max(ids)
    assert int(later[:12], 16) == now // 1_000_000 + 1


@pytest.mark.parametrize(
    ("path", "body", "content_type", "expected"),
    [
        # Every string of the messages counts: "system", "Be brief.", "user",
        # "text", "Hi": 25 characters -> 7 tokens, + 4 per message.
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ],
                "max_tokens": 7,
                "model": "m",
            },
            "application/json",
            ("m", 15, 7),
        ),
        ("/v1/completions", {"prompt": "abcdefghi"}, "application/json", (None, 3, 0)),
        ("/v1/completions", {"prompt": ["ab", "cd"]}, "application/json", (None, 1, 0)),
        ("/v1/embeddings", {"input": ["abcde"]}, "application/json", (None, 2, 0)),
        ("/v1/chat/completions", {"messages": []}, "text/plain", (None, 0, 0)),
        ("/v1/chat/completions", None, "application/json", (None, 0, 0)),
    ],
)
def test_the_prompt_estimate_counts_the_text_a_body_sends(
    app, path, body, content_type, expected
):
    """Reservations rest on it: text characters / 4, + 4 per chat message."""
    data = json.dumps(body) if body is not None else "{not json"
    with app.test_request_context(
        path, method="POST", data=data, content_type=content_type
    ):
        found = usage.meter()
    model, prompt, max_tokens = expected
    if max_tokens == 0 and path != "/v1/embeddings":
        max_tokens = app.config["DEFAULT_MAX_TOKENS"]
    assert (found.model, found.prompt_estimate, found.max_tokens) == (
        model,
        prompt,
        max_tokens,
    )

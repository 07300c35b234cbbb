"""A stream's end (slot, quota, usage record) is settled once, before its last event.

The client must not be able to read a stream's final event (``[DONE]``,
``/llm/message``'s ``done``, or the error event) while the stream still holds
its key's concurrency unit or its host's slot; a stream that never gets to a
final event (the client hung up) settles when its body is closed. Either way
exactly once.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text

from llm_service import quotas, upstreams, usage
from tests.conftest import UPSTREAM
from tests.unit.test_auth import HELLO, bearer, create_key

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


@pytest.fixture
def database(tmp_path):
    return f"sqlite:///{tmp_path}/usage.db"


@pytest.fixture
def app(app_factory, database):
    return app_factory(DATABASE_URL=database, USAGE_FLUSH_SECONDS=0.05)


@pytest.fixture
def stream(app):
    """Open a stream (unread, as gunicorn gets it); every one closed after."""
    opened = []

    def open_stream(path: str, key: str):
        response = app.test_client().post(
            path, json={**HELLO, "stream": True}, headers=bearer(key), buffered=False
        )
        opened.append(response)
        return response

    yield open_stream
    for response in opened:
        response.close()


def sse(*events: dict, done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def delta(content: str) -> dict:
    return {
        "model": "qwen-7b",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }


def held(app) -> dict[str, int]:
    """What streams of this app hold now, and the usage records made so far."""
    counters = app.extensions[quotas.EXTENSION].memory
    with counters._lock:
        leases = sum(len(windows.leases) for windows in counters._keys.values())
    hosts = app.extensions[upstreams.EXTENSION].admission.snapshot().values()
    stats = app.extensions[usage.EXTENSION].stats()
    return {
        "quota_leases": leases,
        "slots": sum(host["in_flight"] for host in hosts),
        "records": stats["buffered"] + stats["written"],
    }


def read_each(response, app) -> list[tuple[bytes, dict[str, int]]]:
    """Each chunk the client gets, with what was held when it got it."""
    try:
        return [(chunk, held(app)) for chunk in response.response]
    finally:
        response.close()


ENDED = {"quota_leases": 0, "slots": 0, "records": 1}


@pytest.mark.parametrize(
    ("path", "final"),
    [("/v1/chat/completions", b"data: [DONE]"), ("/llm/message", b"event: done")],
)
def test_the_final_event_comes_after_the_stream_has_ended(
    app, database, upstream, stream, path, final
):
    key = create_key(app, "alice", "--concurrency", "1")
    last = {"model": "qwen-7b", "choices": [], "usage": USAGE}
    upstream.post(
        CHAT,
        body=sse(delta("Hel"), delta("lo"), last),
        content_type="text/event-stream",
    )
    chunks = read_each(stream(path, key), app)
    *before, (last_chunk, at_end) = chunks
    assert final in last_chunk
    assert any(state["quota_leases"] == 1 for _, state in before)  # it was held
    assert at_end == ENDED
    assert held(app) == ENDED  # and nothing more at the body's close
    assert app.extensions[usage.EXTENSION].flush(5)
    with create_engine(database).connect() as connection:
        query = "SELECT prompt_tokens, completion_tokens FROM usage_records"
        # The final event's usage (/llm/message's ``done`` carries it) was read.
        assert connection.execute(text(query)).all() == [(5, 2)]


def test_an_error_event_comes_after_the_stream_has_ended(app, upstream, stream):
    key = create_key(app, "alice", "--concurrency", "1")
    broken = {"error": {"message": "model crashed"}}
    upstream.post(
        CHAT,
        body=sse(delta("Hel"), broken, done=False),
        content_type="text/event-stream",
    )
    *_, (last_chunk, at_end) = read_each(stream("/v1/chat/completions", key), app)
    assert b'"error"' in last_chunk
    assert b"[DONE]" not in last_chunk
    assert at_end == ENDED
    assert held(app) == ENDED


def test_a_client_that_hangs_up_settles_once_at_the_close(app, upstream, stream):
    key = create_key(app, "alice", "--concurrency", "1")
    upstream.post(
        CHAT, body=sse(delta("Hel"), delta("lo")), content_type="text/event-stream"
    )
    response = stream("/v1/chat/completions", key)
    chunks = iter(response.response)
    assert b"Hel" in next(chunks)
    assert held(app) == {"quota_leases": 1, "slots": 1, "records": 0}
    response.close()  # what gunicorn does when a write to the client fails
    assert held(app) == ENDED
    response.close()
    assert held(app) == ENDED


def test_a_failed_final_write_settles_once(app, upstream, stream):
    key = create_key(app, "alice", "--concurrency", "1")
    upstream.post(CHAT, body=sse(delta("Hi")), content_type="text/event-stream")
    response = stream("/v1/chat/completions", key)
    for chunk in response.response:
        if b"[DONE]" in chunk:
            break  # the write of the final event failed: gunicorn closes
    assert held(app) == ENDED
    response.close()
    assert held(app) == ENDED

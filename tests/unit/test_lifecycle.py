"""Shutdown state: new requests refused with 503 once the worker drains."""

import time

import pytest

from llm_service.lifecycle import Drain, drain


@pytest.fixture
def draining(monkeypatch):
    """The process is draining (as after SIGTERM); undone after the test."""
    monkeypatch.setattr(drain, "_streams_end_at", None)
    drain.begin(30)
    return drain


def test_streams_end_two_seconds_before_the_worker_stops():
    state = Drain()
    assert not state.draining
    assert not state.streams_must_end()
    before = time.monotonic()
    state.begin(4)
    assert state.draining
    assert before + 2 <= state._streams_end_at <= time.monotonic() + 2
    short = Drain()
    short.begin(1)  # a short grace keeps half of it for the streams
    assert not short.streams_must_end()
    time.sleep(0.55)
    assert short.streams_must_end()


@pytest.mark.parametrize("path", ["/health/live", "/llm/message", "/v1/models"])
def test_new_requests_get_503_server_shutting_down(client, draining, path):
    method = client.post if path == "/llm/message" else client.get
    response = method(path, json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    error = response.get_json()["error"]
    assert error["code"] == "server_shutting_down"
    if path.startswith("/v1/"):
        assert error["type"] == "server_error"

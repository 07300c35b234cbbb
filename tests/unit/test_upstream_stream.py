"""UpstreamStream alone: its limits are judged by when events arrive."""

import threading
import time
import types

import pytest

from llm_service.lmstudio import stream as stream_module
from llm_service.lmstudio.errors import LMStudioStreamTimeoutError
from llm_service.lmstudio.stream import UpstreamStream

CHUNK = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'


class HeldBody:
    """A response body whose bytes come only when the test releases them."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = threading.Event()
        self.sent = False

    def read1(self, _size: int) -> bytes:
        self.release.wait(10)
        if self.sent:
            self.closed.wait(10)  # then silence, until the stream is closed
            return b""
        self.sent = True
        return CHUNK

    def shutdown(self) -> None:
        self.closed.set()
        self.release.set()


class Response:
    def __init__(self, raw: HeldBody) -> None:
        self.raw = raw
        self.headers: dict[str, str] = {}

    def close(self) -> None:
        pass


@pytest.fixture
def clock(monkeypatch):
    """stream.py's clock, moved by the test (other modules keep the real one)."""
    now = [0.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr(stream_module, "time", fake_time)
    return now


def test_a_first_event_that_arrives_late_is_a_timeout_however_late_we_look(clock):
    """The flaky test_stream_timeouts[first-token]: a process stalled across the
    deadline once read the late first token as if it had come in time."""
    body = HeldBody()
    upstream = UpstreamStream(
        Response(body), first_token_timeout=10, idle_timeout=10, total_timeout=100
    )
    clock[0] = 1.0  # the consumer starts waiting with 9 s left

    def arrive_late():
        time.sleep(0.05)
        clock[0] = 11.0  # past the first-token limit...
        body.release.set()  # ...the first event arrives

    threading.Thread(target=arrive_late).start()
    events = upstream.events(tick=100)
    with pytest.raises(LMStudioStreamTimeoutError) as info:
        next(events)
    assert info.value.kind == "first_token"


def test_a_first_event_in_time_is_relayed(clock):
    body = HeldBody()
    upstream = UpstreamStream(
        Response(body), first_token_timeout=10, idle_timeout=10, total_timeout=100
    )
    clock[0] = 1.0
    body.release.set()
    event = next(upstream.events(tick=100))
    assert event.json()["choices"][0]["delta"]["content"] == "hi"
    upstream.close()

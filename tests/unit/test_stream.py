"""UpstreamStream on its own: a bounded buffer, and silence measured upstream."""

import threading
import time

import pytest

from llm_service.lmstudio import (
    LMStudioResponseTooLargeError,
    LMStudioStreamTimeoutError,
    UpstreamStream,
)
from tests.support.bodies import chat_chunk
from tests.support.sse import frame

EVENT = frame(chat_chunk("x" * 200))
FINAL = frame(chat_chunk(finish="stop")) + frame("[DONE]")


class Raw:
    """A socket-like body: hands out ``pieces``, then blocks or ends."""

    def __init__(self, pieces, *, then_block=False):
        self.pieces = iter(pieces)
        self.then_block = then_block
        self.read_bytes = 0
        self.closed = threading.Event()

    def read1(self, _size):
        for piece in self.pieces:
            self.read_bytes += len(piece)
            return piece
        if self.then_block:
            self.closed.wait(30)
        return b""

    def shutdown(self):
        self.closed.set()


class Response:
    def __init__(self, raw):
        self.raw = raw
        self.headers = {}

    def close(self):
        self.raw.closed.set()


def open_stream(raw, **limits):
    options = {
        "first_token_timeout": 5.0,
        "idle_timeout": 5.0,
        "total_timeout": 30.0,
        **limits,
    }
    return UpstreamStream(Response(raw), **options)


def wait_until_steady(read_bytes, timeout=5.0):
    """Wait until a counter stops moving (the reader is blocked); return it."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now = read_bytes()
        if now == last:
            return now
        last = now
        time.sleep(0.1)
    return read_bytes()


def test_a_consumer_that_does_not_read_stops_the_reader():
    """The reader stops at the buffer's size: TCP then slows the upstream down.

    Before, every event went into an unbounded queue: 300 MB upstream, 300 MB
    held in the worker.
    """
    raw = Raw(EVENT * 100 for _ in range(10_000))  # ~250 MB on offer, made as read
    stream = open_stream(raw, buffer_bytes=64 * 1024)
    try:
        held = wait_until_steady(lambda: raw.read_bytes)
        assert held < 256 * 1024, held
        # Reading resumes as the consumer takes events.
        events = stream.events(tick=0.05)
        for _ in range(2000):
            assert next(events) is not None
        assert raw.read_bytes > held
    finally:
        stream.close()


def test_a_slow_consumer_is_not_an_upstream_stall():
    """The whole answer arrived; the consumer was busy for longer than the idle
    limit (a client reading slowly): the events are delivered, no timeout."""
    raw = Raw([EVENT * 50, FINAL])
    stream = open_stream(raw, idle_timeout=0.2, buffer_bytes=4096)
    events = stream.events(tick=0.05)
    received = [next(events)]
    time.sleep(0.6)  # blocked writing to the client
    received += [event for event in events if event is not None]
    assert len(received) == 51
    assert stream.saw_finish


def test_real_upstream_silence_still_stalls():
    raw = Raw([EVENT], then_block=True)
    stream = open_stream(raw, idle_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(LMStudioStreamTimeoutError) as info:
        for _ in stream.events(tick=0.05):
            pass
    assert info.value.kind == "idle"
    assert 0.25 < time.monotonic() - started < 3


def test_the_total_limit_holds_while_events_are_waiting():
    raw = Raw(EVENT * 100 for _ in range(10_000))
    stream = open_stream(raw, total_timeout=0.3, buffer_bytes=4096)

    def consume_slowly():
        for _ in stream.events(tick=0.05):
            time.sleep(0.01)

    with pytest.raises(LMStudioStreamTimeoutError) as info:
        consume_slowly()
    assert info.value.kind == "total"


def test_a_line_over_the_limit_ends_the_stream():
    raw = Raw([b"data: " + b"x" * 5000], then_block=True)
    stream = open_stream(raw, max_line_bytes=4096)
    with pytest.raises(LMStudioResponseTooLargeError):
        for _ in stream.events(tick=0.05):
            pass
    assert raw.closed.is_set()


def test_cancel_wakes_a_reader_waiting_for_room():
    raw = Raw(EVENT * 100 for _ in range(10_000))
    stream = open_stream(raw, buffer_bytes=4096)
    wait_until_steady(lambda: raw.read_bytes)
    stream.cancel()
    stream._reader.join(5)
    assert not stream._reader.is_alive()
    assert list(stream.events()) == []

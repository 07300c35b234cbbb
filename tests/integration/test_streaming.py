"""Streaming through the real gateway: unbuffered relay, errors, timeouts, cancel."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time

import pytest
import requests

from tests.integration.conftest import FAST_FAILURE
from tests.servers import GatewayServer
from tests.support.sse import data_of, read_events

CHAT = {
    "model": "fake-model-1",
    "messages": [{"role": "user", "content": "alpha beta gamma delta epsilon"}],
    "stream": True,
}
MESSAGE = {"messages": CHAT["messages"], "stream": True}

#: Short stream limits so each one can be crossed quickly.
STREAM_LIMITS = {
    "STREAM_KEEPALIVE_SECONDS": 0.3,
    "STREAM_FIRST_TOKEN_TIMEOUT": 1.5,
    "STREAM_IDLE_TIMEOUT": 1.0,
    "STREAM_TOTAL_TIMEOUT": 4.0,
}


@pytest.fixture(scope="module")
def stream_gateway(fake):
    settings = {"LM_STUDIO_URL": fake.url, **FAST_FAILURE, **STREAM_LIMITS}
    with GatewayServer(settings) as server:
        yield server


def open_raw_stream(gateway) -> socket.socket:
    """Send a streamed chat request on a bare socket the test can close at will."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    body = json.dumps(CHAT).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def upstream_closed_at(fake, record) -> float | None:
    """When the fake saw the connection of ``record`` close (None: still open)."""
    conn = next((c for c in fake.connections if c.id == record.connection_id), None)
    return conn.closed_at if conn else None


def test_v1_stream_relays_each_chunk_as_it_arrives(gateway, fake):
    fake.stream_interval = 0.2
    events = read_events(f"{gateway.url}/v1/chat/completions", CHAT)
    payloads = data_of(events)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Echo: alpha beta gamma delta epsilon"
    # Not batched: the content chunks arrive about one interval apart.
    arrivals = [t for t, e in events if '"content"' in e]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) >= 5
    assert all(gap > 0.1 for gap in gaps), gaps


def test_v1_stream_usage_only_when_asked(gateway):
    plain = [
        json.loads(p)
        for p in data_of(read_events(f"{gateway.url}/v1/chat/completions", CHAT))[:-1]
    ]
    assert not any(c.get("usage") for c in plain)
    asked = {**CHAT, "stream_options": {"include_usage": True}}
    chunks = [
        json.loads(p)
        for p in data_of(read_events(f"{gateway.url}/v1/chat/completions", asked))[:-1]
    ]
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert chunks[-1]["choices"] == []


def test_message_stream_events(gateway):
    events = read_events(f"{gateway.url}/llm/message", MESSAGE)
    kinds = [e.split("\n", 1)[0] for _, e in events]
    assert kinds[-1] == "event: done"
    assert set(kinds[:-1]) == {"event: delta"}
    deltas = [json.loads(d)["content"] for d in data_of(events)[:-1]]
    final = json.loads(data_of(events)[-1])
    assert (
        "".join(deltas) == final["response"] == "Echo: alpha beta gamma delta epsilon"
    )
    assert final["model"] == "fake-model-1"
    assert final["finish_reason"] == "stop"
    assert final["tokens_used"] == final["usage"]["total"] > 0
    assert final["correlation_id"]
    assert final["processing_time"] > 0


def test_message_stream_unknown_usage_is_null(gateway, fake):
    fake.usage_mode = "missing"
    final = json.loads(data_of(read_events(f"{gateway.url}/llm/message", MESSAGE))[-1])
    assert final["tokens_used"] is None
    assert final["usage"] is None


#: Mid-stream faults of the fake and the code each must end the stream with.
#: ``stream_end`` ends the body cleanly with neither a finish_reason nor [DONE].
MID_STREAM_FAULTS = {
    "stream_error": "upstream_stream_error",
    "stream_cut": "upstream_stream_cut",
    "stream_end": "upstream_stream_cut",
}


@pytest.mark.parametrize("kind", sorted(MID_STREAM_FAULTS))
def test_v1_failure_mid_stream_is_an_error_event_without_done(gateway, fake, kind):
    fake.fault(kind, times=1, after=2)
    payloads = data_of(read_events(f"{gateway.url}/v1/chat/completions", CHAT))
    assert "[DONE]" not in payloads
    assert len(payloads) == 3  # two chunks, then the error
    error = json.loads(payloads[-1])["error"]
    assert error["code"] == MID_STREAM_FAULTS[kind]
    assert error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("kind", sorted(MID_STREAM_FAULTS))
def test_message_failure_mid_stream_is_an_error_event(gateway, fake, kind):
    fake.fault(kind, times=1, after=2)
    events = read_events(f"{gateway.url}/llm/message", MESSAGE)
    assert not any(e.startswith("event: done") for _, e in events)
    last = events[-1][1]
    assert last.startswith("event: error")
    body = json.loads(last.split("data: ", 1)[1])
    assert body["error"]["code"] == MID_STREAM_FAULTS[kind]
    assert body["correlation_id"]


def test_retried_before_the_first_byte(gateway, fake):
    fake.fault(
        "status", times=1, status=503, body={"error": "loading"}, path="/v1/chat"
    )
    payloads = data_of(read_events(f"{gateway.url}/v1/chat/completions", CHAT))
    assert payloads[-1] == "[DONE]"
    assert sum(r.path == "/v1/chat/completions" for r in fake.requests) == 2


def test_upstream_down_before_streaming_is_a_plain_503(gateway, fake):
    fake.refuse(drop_connections=True)
    try:
        response = requests.post(
            f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=20
        )
    finally:
        fake.accept()
    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "upstream_unavailable"


def test_keepalive_comments_while_waiting_for_the_first_token(stream_gateway, fake):
    fake.first_token_delay = 1.0
    events = read_events(f"{stream_gateway.url}/v1/chat/completions", CHAT)
    assert events[0][1] == ": keep-alive"
    assert data_of(events)[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ({"first_token_delay": 3.0}, "upstream_first_token_timeout"),
        ({"fault": ("slow_stream", {"interval": 2.5})}, "upstream_stream_stalled"),
        ({"stream_interval": 0.5}, "stream_timeout"),
    ],
    ids=["first-token", "idle", "total"],
)
def test_stream_timeouts(stream_gateway, fake, setup, code):
    if "fault" in setup:
        kind, params = setup["fault"]
        fake.fault(kind, times=1, **params)
    else:
        for name, value in setup.items():
            setattr(fake, name, value)
    fake.reply = " ".join(["word"] * 20)  # 20 chunks: long enough for each limit
    started = time.monotonic()
    events = read_events(f"{stream_gateway.url}/v1/chat/completions", CHAT)
    elapsed = time.monotonic() - started
    payloads = data_of(events)
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["error"]["code"] == code
    assert elapsed < 6


def test_connect_timeout_has_its_own_code():
    """A server whose accept queue is full drops SYNs: connecting times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the (tiny) backlog
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    settings = {
        "LM_STUDIO_URL": f"http://127.0.0.1:{port}",
        "LM_STUDIO_CONNECT_TIMEOUT": 0.5,
        "LM_STUDIO_RETRIES": 0,
        "DEFAULT_MODEL": "m",
    }
    try:
        with GatewayServer(settings) as gateway:
            response = requests.post(
                f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=20
            )
    finally:
        for sock in [*fillers, listener]:
            sock.close()
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_connect_timeout"


def hang_up(gateway, fake, *, after_data: bool) -> tuple[float | None, object]:
    """Open a stream, hang up (after its first chunk, or while nothing flows).

    Return the seconds from the hang-up to the upstream connection's close (None:
    not closed within 5 s), and the fake's record of the upstream request.
    Chunks come a second apart and no keep-alive is due for 10 s, so only the
    disconnect watcher can close the upstream sooner than about a second.
    """
    fake.stream_interval = 1.0
    fake.reply = " ".join(["word"] * 10)
    if not after_data:
        fake.first_token_delay = 10
    sock = open_raw_stream(gateway)
    if after_data:
        received = b""
        while b"data: " not in received:
            received += sock.recv(65536)
    else:
        assert fake.wait_for(
            lambda: any(r.path == "/v1/chat/completions" for r in fake.requests), 5
        )
        time.sleep(0.3)  # the gateway is now waiting for the first token
    upstream = [r for r in fake.requests if r.path == "/v1/chat/completions"][-1]
    sock.close()
    disconnected = time.monotonic()
    closed_at = fake.wait_for(lambda: upstream_closed_at(fake, upstream), timeout=5)
    return (None if closed_at is None else closed_at - disconnected), upstream


def test_client_disconnect_closes_the_upstream_at_once(gateway, fake):
    gap, upstream = hang_up(gateway, fake, after_data=True)
    assert gap is not None
    assert gap < 0.5, f"upstream closed {gap:.3f} s after the client left"
    assert upstream.chunks_sent < 3  # generation stopped early


def test_client_leaving_during_a_silent_upstream_cancels_it(gateway, fake):
    """While the model reads a long prompt nothing flows; a hang-up still stops it."""
    gap, upstream = hang_up(gateway, fake, after_data=False)
    assert gap is not None
    assert gap < 0.5, f"upstream closed {gap:.3f} s after the client left"
    assert upstream.chunks_sent == 0


@pytest.mark.performance
@pytest.mark.parametrize("after_data", [True, False], ids=["flowing", "silent"])
def test_cancellation_gap_meets_the_readme_target(gateway, fake, after_data):
    """README, Performance: client gone -> upstream closed within 100 ms."""
    gap, _ = hang_up(gateway, fake, after_data=after_data)
    assert gap is not None
    assert gap <= 0.100, f"upstream closed {gap * 1000:.1f} ms after the client left"


@pytest.mark.slow
@pytest.mark.performance
def test_200_concurrent_streams_and_health_still_answers(gateway, fake):
    fake.stream_interval = 1.0
    fake.reply = " ".join(["word"] * 6)
    opened = threading.Barrier(201, timeout=60)
    results = []

    def hold_stream():
        try:
            with requests.post(
                f"{gateway.url}/v1/chat/completions", json=CHAT, stream=True, timeout=60
            ) as response:
                first = response.raw.read1(65536)
                opened.wait()
                rest = b"".join(iter(lambda: response.raw.read1(65536), b""))
                results.append((response.status_code, first + rest))
        except Exception as err:
            results.append((None, repr(err).encode()))

    threads = [threading.Thread(target=hold_stream) for _ in range(200)]
    for thread in threads:
        thread.start()
    opened.wait()  # every stream has its first bytes and is still open
    started = time.monotonic()
    health = requests.get(f"{gateway.url}/health/live", timeout=5)
    health_seconds = time.monotonic() - started
    short = requests.get(f"{gateway.url}/v1/models", timeout=5)
    for thread in threads:
        thread.join(60)
    assert health.status_code == 200
    assert short.status_code == 200
    assert health_seconds < 1.0
    assert len(results) == 200
    assert all(status == 200 and b"[DONE]" in body for status, body in results)


def test_a_stream_is_one_access_record_with_its_whole_duration(gateway, fake):
    """Logged once, when the body is closed (gunicorn), not when the view returns."""
    fake.stream_interval = 0.1
    correlation = f"one-record-{time.monotonic_ns()}"
    started = time.monotonic()
    response = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"X-Correlation-ID": correlation},
        stream=True,
        timeout=30,
    )
    body = response.content
    elapsed_ms = (time.monotonic() - started) * 1000
    assert b"[DONE]" in body
    deadline = time.monotonic() + 5
    while True:
        records = [
            json.loads(line)
            for line in gateway.logs().splitlines()
            if correlation in line and '"llm_service.access"' in line
        ]
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # a second record, if any, would be written by now
    records = [
        json.loads(line)
        for line in gateway.logs().splitlines()
        if correlation in line and '"llm_service.access"' in line
    ]
    assert len(records) == 1
    # The stream's whole time (chunks 0.1 s apart), not the view's.
    assert records[0]["duration_ms"] >= 0.5 * elapsed_ms

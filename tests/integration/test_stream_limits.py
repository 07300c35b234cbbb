"""Hostile upstreams and slow clients: bounded buffers, deadlines, strict chunks.

The fake's ``flood``, ``long_line`` and ``bad_chunk`` faults send what a broken
or hostile model server could; raw sockets with a small receive buffer play a
client that reads slowly or not at all.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from tests.integration.conftest import FAST_FAILURE
from tests.integration.test_streaming import CHAT, MESSAGE, upstream_closed_at
from tests.servers import GatewayServer
from tests.support.sse import data_of, read_events
from tests.unit.test_chunks import MALFORMED_CHUNKS

SLOW_CLIENT_LIMITS = {
    "STREAM_KEEPALIVE_SECONDS": 0.3,
    "STREAM_FIRST_TOKEN_TIMEOUT": 2.0,
    "STREAM_IDLE_TIMEOUT": 1.0,
    "STREAM_TOTAL_TIMEOUT": 5.0,
}
TOTAL = SLOW_CLIENT_LIMITS["STREAM_TOTAL_TIMEOUT"]
#: A receive buffer this small keeps the kernel from absorbing the stream.
CLIENT_RCVBUF = 64 * 1024


@pytest.fixture(scope="module")
def slow_gateway(fake):
    settings = {"LM_STUDIO_URL": fake.url, **FAST_FAILURE, **SLOW_CLIENT_LIMITS}
    with GatewayServer(settings) as server:
        yield server


def open_slow_client(gateway, model: str) -> socket.socket:
    """Start a streamed chat on a socket with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gateway.port))
    body = json.dumps({**CHAT, "model": model}).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def drain(sock: socket.socket, limit: int = 400_000_000) -> tuple[int, bytes, bool]:
    """Read until EOF: (bytes read, the last bytes, whether EOF came)."""
    total, tail = 0, b""
    sock.settimeout(5)
    try:
        while total < limit:
            data = sock.recv(1 << 20)
            if not data:
                return total, tail, True
            total += len(data)
            tail = (tail + data)[-4096:]
    except (TimeoutError, ConnectionError):
        return total, tail, False
    return total, tail, False


def chat_request(fake):
    return [r for r in fake.requests if r.path == "/v1/chat/completions"][-1]


def test_a_client_that_stops_reading_stops_the_upstream(slow_gateway, fake):
    """The gateway stops reading the upstream when its buffer is full.

    Before, it read and queued all of it: 300 MB per stream in the worker.
    """
    sock = open_slow_client(slow_gateway, "fault:flood?bytes=200000000")
    try:
        time.sleep(2.0)
        events_sent = chat_request(fake).chunks_sent
    finally:
        sock.close()
    # ~1.1 KB each: the flood has ~180,000; the buffers between hold a few MB.
    assert events_sent < 20_000, events_sent


def test_a_client_that_stops_reading_is_cut_at_the_total_limit(slow_gateway, fake):
    """A write blocked on the client ends at STREAM_TOTAL_TIMEOUT, and so does
    the upstream call; before, the stream outlived its limit for as long as the
    client kept still."""
    started = time.monotonic()
    sock = open_slow_client(slow_gateway, "fault:flood?bytes=200000000")
    try:
        upstream = chat_request(fake)
        # The client keeps still: the gateway must end the stream on its own.
        closed_at = fake.wait_for(
            lambda: upstream_closed_at(fake, upstream), TOTAL + 1.5
        )
        received, _, eof = drain(sock)
        ended = time.monotonic() - started
    finally:
        sock.close()
    assert closed_at is not None, "the upstream call outlived the total limit"
    assert closed_at - started < TOTAL + 1.0
    # The gateway hung up on the upstream (not the upstream idling out after
    # the gateway had read and held the whole flood).
    connection = next(c for c in fake.connections if c.id == upstream.connection_id)
    assert connection.closed_by == "peer"
    assert eof
    assert received < 30_000_000, received  # what the socket buffers held
    assert ended < TOTAL + 3.0, ended


def test_a_slow_client_does_not_make_the_upstream_look_stalled(slow_gateway, fake):
    """The answer arrived while the client was slow for longer than the idle
    limit: it is delivered whole. Before, ``upstream_stream_stalled``."""
    sock = open_slow_client(slow_gateway, "fault:flood?bytes=8000000")
    try:
        time.sleep(2.5)  # > STREAM_IDLE_TIMEOUT, with the relay's write blocked
        received, tail, eof = drain(sock)
    finally:
        sock.close()
    assert eof
    assert received > 8_000_000
    assert b"upstream_stream_stalled" not in tail
    assert b"data: [DONE]" in tail


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/llm/message"])
def test_a_stream_line_over_the_limit_ends_with_an_error_event(gateway, fake, path):
    fake.fault("long_line", times=1, bytes=5_000_000)
    body = CHAT if path.startswith("/v1") else MESSAGE
    events = read_events(f"{gateway.url}{path}", body)
    last = events[-1][1]
    payload = json.loads(last.split("data: ", 1)[1])
    assert payload["error"]["code"] == "upstream_response_too_large"
    assert not any("[DONE]" in e or e.startswith("event: done") for _, e in events)
    if path == "/llm/message":
        assert last.startswith("event: error")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/llm/message"])
def test_an_answer_over_the_limit_is_a_502(gateway, fake, path, chunked):
    fake.fault("flood", times=1, path="/v1/chat", bytes=20_000_000, chunked=chunked)
    body = {**(CHAT if path.startswith("/v1") else MESSAGE), "stream": False}
    response = requests.post(f"{gateway.url}{path}", json=body, timeout=30)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_response_too_large"
    assert len([r for r in fake.requests if r.path == "/v1/chat/completions"]) == 1


@pytest.mark.parametrize("after", [0, 2], ids=["first", "third"])
@pytest.mark.parametrize("data", MALFORMED_CHUNKS.values(), ids=MALFORMED_CHUNKS.keys())
def test_a_malformed_chunk_ends_a_message_stream_with_an_error(
    gateway, fake, data, after
):
    """Before: a string delta gave gunicorn's HTML 500, a number as content
    ended the stream with neither ``done`` nor ``error``."""
    fake.fault("bad_chunk", times=1, data=data, after=after)
    events = read_events(f"{gateway.url}/llm/message", MESSAGE)
    kinds = [e.split("\n", 1)[0] for _, e in events]
    assert kinds[-1] == "event: error"
    assert "event: done" not in kinds
    error = json.loads(data_of(events)[-1])["error"]
    assert error["code"] == "upstream_invalid_response"


@pytest.mark.parametrize(
    "data",
    [
        MALFORMED_CHUNKS["delta-string"],
        MALFORMED_CHUNKS["content-number"],
        MALFORMED_CHUNKS["nested-too-deep"],
        '{"error": ' + "[" * 100_000,
    ],
    ids=["delta-string", "content-number", "nested-too-deep", "error-too-deep"],
)
def test_v1_relays_malformed_chunks_as_they_are(gateway, fake, data):
    fake.fault("bad_chunk", times=1, data=data, after=1)
    payloads = data_of(read_events(f"{gateway.url}/v1/chat/completions", CHAT))
    assert data in payloads
    assert payloads[-1] == "[DONE]"


@pytest.mark.parametrize(
    "frame",
    [
        "event: note\ndata: line one\ndata: line two\n\n",
        'id: 7\ndata: {"a":\ndata: 1}\n\n',
    ],
    ids=["named-multiline", "id-multiline"],
)
def test_v1_relays_events_as_they_came(gateway, fake, frame):
    """Before: the relay re-framed each event as one ``data:`` line, losing
    ``event:`` names, ids and the line breaks of multi-line data."""
    fake.fault("raw_event", times=1, frame=frame, after=1)
    response = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        timeout=30,
    )
    assert response.status_code == 200
    assert frame in response.text
    assert response.text.endswith("data: [DONE]\n\n")

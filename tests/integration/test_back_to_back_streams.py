"""A stream's end is settled before the client can read it.

A key with a concurrency quota of 1, on a host with one slot, sends its next
streamed request the instant it reads the stream's final event (``[DONE]``, or
``/llm/message``'s ``done``), before the chunked body's terminator: the first
stream's quota unit and slot must be free by then, in Redis and in the
process, so the next one is neither refused nor queued.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import redis

from tests.integration.test_keys import flask_keys, gunicorn_env
from tests.integration.test_redis_limits import redis_url  # noqa: F401 - fixture
from tests.servers import GatewayServer

ROUNDS = 50
CHAT = {
    "model": "fake-model-1",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}
#: Per route: the request's path and the bytes of its stream's final event.
ROUTES = {
    "openai": ("/v1/chat/completions", b"data: [DONE]\n\n"),
    "message": ("/llm/message", b"event: done\n"),
}


@pytest.fixture(scope="module", params=["memory", "redis"])
def one_at_a_time(request, fake, tmp_path_factory):
    """A gateway on a one-slot host; keys: one request at once, and unlimited."""
    folder = tmp_path_factory.mktemp("one-at-a-time")
    database = f"sqlite:///{folder}/gateway.db"
    settings = {
        "LM_STUDIO_URL": fake.url,
        "DATABASE_URL": database,
        "UPSTREAM_SLOTS": 1,
        "LM_STUDIO_TIMEOUT": 20,
        "RATE_LIMIT_REQUESTS": 100000,
    }
    gunicorn = {}
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        settings["RATE_LIMIT_STORAGE_URI"] = url
        # Two workers: the next request is often served by the other one.
        gunicorn["workers"] = 2
    keys = {}
    for name, options in (("serial", ["--concurrency", "1"]), ("free", [])):
        env = gunicorn_env(folder, DATABASE_URL=database)
        created = flask_keys(env, "create", name, *options)
        assert created.returncode == 0, created.stderr
        keys[name] = created.stdout.strip()
    with GatewayServer(settings, **gunicorn) as server:
        yield server, keys


def read_until_final_event(sock: socket.socket, final: bytes) -> bytes:
    """What the gateway sent, up to the final event (or the connection's end)."""
    received = b""
    deadline = time.monotonic() + 30
    while final not in received and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        received += data
    return received


def back_to_back(server: GatewayServer, key: str, route: str) -> list[bytes]:
    """Run ``ROUNDS`` streams, each sent the instant the last one's end is read.

    Each is sent before the previous stream's chunked terminator arrives (the
    previous connection is left open meanwhile); what each got is returned.
    """
    path, final = ROUTES[route]
    body = json.dumps(CHAT).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    previous: socket.socket | None = None
    answers = []
    try:
        for _ in range(ROUNDS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(head + body)
            if previous is not None:
                previous.close()
            previous = sock
            answers.append(read_until_final_event(sock, final))
    finally:
        if previous is not None:
            previous.close()
    return answers


def refused(answers: list[bytes]) -> dict[int, str]:
    statuses = {
        n: answer.split(b" ", 2)[1].decode() for n, answer in enumerate(answers)
    }
    return {n: status for n, status in statuses.items() if status != "200"}


def queued(answers: list[bytes]) -> list[int]:
    """The streams that waited for the host's slot (they say so first)."""
    return [n for n, answer in enumerate(answers) if b": queued position=" in answer]


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_back_to_back_streams_of_a_concurrency_one_key_are_never_refused(
    one_at_a_time, route
):
    server, keys = one_at_a_time
    answers = back_to_back(server, keys["serial"], route)
    assert refused(answers) == {}
    assert queued(answers) == []
    assert all(ROUTES[route][1] in answer for answer in answers)


def test_back_to_back_streams_never_wait_for_the_one_slot(one_at_a_time):
    server, keys = one_at_a_time
    answers = back_to_back(server, keys["free"], "openai")
    assert refused(answers) == {}
    assert queued(answers) == []

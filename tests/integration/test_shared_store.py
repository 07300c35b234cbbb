"""The shared store as a keyed request uses it: round trips, leases, outages.

A keyed request (RPM, TPM and concurrency quotas) with slot leases, both in a
real Redis behind a relay that counts round trips and connections.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
import requests

from tests.databases import RedisServer, RoundTrips
from tests.integration.test_keys import flask_keys, gunicorn_env
from tests.servers import GatewayServer

#: Long leases: no renewal runs while trips are counted.
LEASES = {"QUOTA_LEASE_SECONDS": 300, "SLOT_LEASE_SECONDS": 300}


def chat(stream: bool = False, model: str = "fake-model-1") -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "stream": stream,
    }


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()  # resumed first if a test froze it


@pytest.fixture
def keyed(fake, tmp_path, redis_server):
    """Start a gateway (Redis reached through a counting relay) and make a key."""
    relay = RoundTrips(redis_server.port)
    database = f"sqlite:///{tmp_path}/gateway.db"
    started: list[GatewayServer] = []

    def start(*key_options: str, workers: int = 1, **settings: object):
        created = flask_keys(
            gunicorn_env(tmp_path, DATABASE_URL=database), "create", "k", *key_options
        )
        assert created.returncode == 0, created.stderr
        gateway = GatewayServer(
            {
                "LM_STUDIO_URL": fake.url,
                "DATABASE_URL": database,
                "RATE_LIMIT_STORAGE_URI": relay.url,
                "LM_STUDIO_TIMEOUT": 30,
                **LEASES,
                **settings,
            },
            workers=workers,
        ).start()
        started.append(gateway)
        return gateway, {"Authorization": f"Bearer {created.stdout.strip()}"}

    yield start, relay
    for gateway in started:
        gateway.stop()
    relay.stop()


def send(gateway, headers, stream: bool = False, **kwargs) -> requests.Response:
    response = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat(stream, **kwargs),
        headers=headers,
        timeout=30,
    )
    response.content  # noqa: B018 - read to the end, the stream's too
    return response


QUOTAS = ("--rpm", "100000", "--tpm", "100000000", "--concurrency", "10")


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_a_keyed_request_costs_two_round_trips_on_one_connection(
    keyed, redis_server, stream
):
    """Quota admission and slot lease in one script (the lease taken only if
    admitted), then the lease's release and the quota's settling together:
    two trips, over the one client's connection (plus the slot channel's
    subscription)."""
    start, relay = keyed
    redis_url = redis_server.url
    gateway, headers = start(*QUOTAS)
    for _ in range(3):  # scripts loaded, connections made
        assert send(gateway, headers, stream).status_code == 200
    before, _ = relay.count()
    answers = [send(gateway, headers, stream) for _ in range(10)]
    after, connections = relay.count()
    assert [a.status_code for a in answers] == [200] * 10
    assert after - before == 2 * 10
    assert connections <= 2
    # Redis forgot its scripts (a restart, SCRIPT FLUSH): they are loaded again.
    redis.Redis.from_url(redis_url).script_flush()
    assert send(gateway, headers, stream).status_code == 200
    assert held_leases(redis_url) == (0, 0)


def test_a_request_refused_by_its_quota_costs_one_round_trip_and_no_slot(
    keyed, redis_server
):
    """The slot lease goes in the admission's script, taken only if admitted:
    a key over its quota takes no slot, and has nothing to give back."""
    start, relay = keyed
    gateway, headers = start("--rpm", "3")
    for _ in range(3):  # scripts loaded, connections made; the window full
        assert send(gateway, headers, False).status_code == 200
    zadds = _zadds(redis_server.url)
    before, _ = relay.count()
    answers = [send(gateway, headers, False) for _ in range(10)]
    after, _ = relay.count()
    assert [a.status_code for a in answers] == [429] * 10
    assert after - before == 10
    assert _zadds(redis_server.url) == zadds  # no lease, no line, no request
    assert held_leases(redis_server.url) == (0, 0)


def _zadds(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return stats.get("cmdstat_zadd", {}).get("calls", 0)


def held_leases(url: str) -> tuple[int, int]:
    """``(quota leases, slot leases)`` held in Redis now (read at one instant)."""
    client = redis.Redis.from_url(url)
    quota = client.keys("llm_service:quota:*:leases")
    slots = [
        k
        for k in client.keys("llm_service:slots:*")
        if not k.endswith((b":waiting", b":seen", b":freed"))
    ]
    pipe = client.pipeline(transaction=True)
    for key in quota + slots:
        pipe.zcard(key)
    counts = pipe.execute()
    return sum(counts[: len(quota)]), sum(counts[len(quota) :])


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_leases_are_back_before_the_client_has_the_answer(keyed, redis_server, stream):
    """A concurrency-1 key calling back to back, on a host with one slot, over
    two workers: every answer received means both leases are already given
    back, so no call is refused or queued for the one before it."""
    start, _ = keyed
    gateway, headers = start(
        "--concurrency", "1", workers=2, UPSTREAM_SLOTS=1, QUEUE_TIMEOUT=1
    )
    headers = {**headers, "Connection": "close"}  # both workers serve
    statuses, held = [], []
    for n in range(20):
        model = "fault:status?status=500" if n % 5 == 4 else "fake-model-1"
        statuses.append(send(gateway, headers, stream, model=model).status_code)
        held.append(held_leases(redis_server.url))
    assert 429 not in statuses
    assert statuses.count(200) == 16
    assert held == [(0, 0)] * 20


def test_leases_come_back_when_a_stream_is_cut_by_its_client(keyed, redis_server):
    start, _ = keyed
    gateway, headers = start("--concurrency", "1")
    with requests.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat(True, model="fault:slow_stream?interval=2"),
        headers=headers,
        stream=True,
        timeout=30,
    ) as response:
        lines = response.iter_lines()
        assert next(lines)
        assert held_leases(redis_server.url) == (1, 1)
    deadline = time.monotonic() + 10
    while held_leases(redis_server.url) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_leases(redis_server.url) == (0, 0)
    assert send(gateway, headers).status_code == 200


def test_a_frozen_redis_costs_a_keyed_request_one_bounded_wait(
    keyed, redis_server, fake
):
    """Redis stops answering while a keyed call is at the model server: its
    answer waits for one store timeout at most (its end-writes go together),
    and the next calls count in the process after one more."""
    start, _ = keyed
    gateway, headers = start(*QUOTAS)
    assert send(gateway, headers).status_code == 200
    seen = len(fake.requests)
    fake.first_token_delay = 1.0
    result = {}

    def call():
        began = time.monotonic()
        result["status"] = send(gateway, headers).status_code
        result["elapsed"] = time.monotonic() - began

    caller = threading.Thread(target=call, daemon=True)
    try:
        caller.start()
        assert fake.wait_for(lambda: len(fake.requests) > seen, timeout=10)
        redis_server.process.send_signal(signal.SIGSTOP)
        caller.join(30)
        fake.first_token_delay = 0
        timed = []
        for stream in (False, True, False, True):
            began = time.monotonic()
            status = send(gateway, headers, stream).status_code
            timed.append((status, round(time.monotonic() - began, 2)))
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        fake.first_token_delay = 0
    assert result["status"] == 200
    # The upstream's second, then one store timeout (0.5 s) for the slot's
    # release and the quota's settling together (in turn, they took two).
    assert result["elapsed"] < 1.0 + 0.5 + 0.4, result
    assert [status for status, _ in timed] == [200] * 4
    # Then at most one timeout each (the quota's admission; the slots' store
    # when its back-off ends), counted in the process meanwhile.
    assert max(elapsed for _, elapsed in timed) < 0.5 + 0.4, timed
    logs = gateway.logs()
    assert "could not settle a quota in Redis" in logs
    assert "quota storage unreachable" in logs

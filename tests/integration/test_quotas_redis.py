"""Per-key quotas exact across two gateway instances x two workers sharing Redis."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from tests.databases import RedisServer
from tests.integration.test_keys import flask_keys, gunicorn_env
from tests.servers import GatewayServer

HELLO = {"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]}
LEASE_SECONDS = 3


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.fixture
def cluster(fake, redis_url, tmp_path):
    """Make keys, then start two instances x two workers on one database + Redis."""
    database = f"sqlite:///{tmp_path}/gateway.db"
    env = gunicorn_env(tmp_path, DATABASE_URL=database)
    # Key ids restart at 1 in each test's database: start from empty counters.
    redis.Redis.from_url(redis_url).flushdb()
    started: list[GatewayServer] = []

    def start(*key_options: list[str]) -> tuple[list[str], list[GatewayServer]]:
        keys = []
        for n, options in enumerate(key_options):
            created = flask_keys(env, "create", f"key{n}", *options)
            assert created.returncode == 0, created.stderr
            keys.append(created.stdout.strip())
        settings = {
            "LM_STUDIO_URL": fake.url,
            "DATABASE_URL": database,
            "RATE_LIMIT_STORAGE_URI": redis_url,
            "QUOTA_LEASE_SECONDS": LEASE_SECONDS,
            "LM_STUDIO_TIMEOUT": 30,
        }
        for _ in range(2):
            started.append(GatewayServer(settings, workers=2).start())
        return keys, started

    yield start
    for server in started:
        server.stop()


def post(url: str, key: str) -> requests.Response:
    return requests.post(
        f"{url}/v1/chat/completions",
        json=HELLO,
        # A new connection per request: every worker of both instances serves.
        headers={"Authorization": f"Bearer {key}", "Connection": "close"},
        timeout=60,
    )


def max_in_flight(fake) -> int:
    events = []
    for record in fake.requests:
        if record.path == "/v1/chat/completions":
            events.append((record.received_at, 1))
            events.append((record.finished_at or time.monotonic(), -1))
    peak = current = 0
    for _, step in sorted(events):
        current += step
        peak = max(peak, current)
    return peak


def test_rpm_is_exact_across_instances_and_workers(cluster):
    (key,), gateways = cluster(["--rpm", "30"])
    urls = [gateway.url for gateway in gateways]
    barrier = threading.Barrier(50)

    def attempt(n: int) -> int:
        if n < 50:
            barrier.wait(timeout=30)  # the first 50 leave together
        return post(urls[n % 2], key).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(attempt, range(200)))
    elapsed = time.monotonic() - started
    assert elapsed < 55, "all attempts must fall inside one window"
    assert statuses.count(200) == 30
    assert statuses.count(429) == 170
    served = {
        line.split("pid: ")[1]
        for g in gateways
        for line in g.logs().splitlines()
        if "Booting worker" in line
    }
    assert len(served) == 4


def test_concurrency_is_never_exceeded_and_leases_come_back_after_a_kill(cluster, fake):
    (key,), gateways = cluster(["--concurrency", "3"])
    fake.first_token_delay = 0.4
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(
            pool.map(lambda n: post(gateways[n % 2].url, key).status_code, range(20))
        )
    assert statuses.count(200) >= 3
    assert set(statuses) <= {200, 429}
    assert max_in_flight(fake) <= 3

    # Three slow requests hold the three slots through instance 0; kill it -9.
    fake.first_token_delay = 30
    holders = ThreadPoolExecutor(max_workers=3)
    for _ in range(3):
        holders.submit(post, gateways[0].url, key)
    assert fake.wait_for(
        lambda: sum(r.finished_at is None for r in fake.requests) >= 3, timeout=20
    )
    fake.first_token_delay = 0
    assert post(gateways[1].url, key).status_code == 429  # all three are taken
    kill_instance(gateways[0])
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < 4 * LEASE_SECONDS:
        response = post(gateways[1].url, key)
        if response.status_code == 200:
            break
        assert response.json()["error"]["code"] == "concurrency_limit_exceeded"
        time.sleep(0.1)
    back_after = time.monotonic() - killed_at
    holders.shutdown(wait=False, cancel_futures=True)
    assert response.status_code == 200
    # Leases are renewed every LEASE/3 s: they end between 2/3 and 1 lease
    # after the last renewal, i.e. after the kill.
    assert LEASE_SECONDS * 2 / 3 - 0.5 <= back_after <= LEASE_SECONDS + 1.5, back_after
    print(f"slots of the killed instance came back after {back_after:.2f} s")


def kill_instance(gateway: GatewayServer) -> None:
    """SIGKILL gunicorn's master and its workers: no code of theirs runs."""
    master = gateway.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    for pid in [master, *map(int, children)]:
        os.kill(pid, signal.SIGKILL)
    gateway.process.wait(10)


def test_tokens_are_reserved_then_settled_in_redis(cluster, redis_url):
    (key,), gateways = cluster(["--tpm", "1000"])
    headers = {"Authorization": f"Bearer {key}"}
    body = {**HELLO, "max_tokens": 500}
    url = f"{gateways[0].url}/v1/chat/completions"
    first = requests.post(url, json=body, headers=headers, timeout=30)
    reserved = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert reserved > 500  # prompt estimate + max_tokens
    used = first.json()["usage"]["total_tokens"]
    second = requests.post(
        f"{gateways[1].url}/v1/chat/completions", json=body, headers=headers, timeout=30
    )
    # The first request now counts for what it used, not what it reserved.
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1000 - used - reserved
    total = redis.Redis.from_url(redis_url).get(
        next(k for k in redis.Redis.from_url(redis_url).keys("*tokens-total*"))
    )
    assert int(total) == 2 * used

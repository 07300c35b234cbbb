"""A shared rate limit: two gunicorn processes counting in a real Redis."""

from __future__ import annotations

import time

import pytest
import redis
import requests

from tests.databases import RedisServer
from tests.servers import GatewayServer

HELLO = {"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer()
    yield server.url
    server.stop()


def test_limit_holds_across_two_worker_processes(fake, redis_url):
    settings = {
        "LM_STUDIO_URL": fake.url,
        "RATE_LIMIT_REQUESTS": 6,
        "RATE_LIMIT_STORAGE_URI": redis_url,
    }
    with GatewayServer(settings, workers=2) as gateway:
        statuses = []
        for _ in range(10):
            # A new connection each time, so both processes take requests.
            response = requests.post(
                f"{gateway.url}/llm/message",
                json=HELLO,
                headers={"Connection": "close"},
                timeout=10,
            )
            statuses.append(response.status_code)
        logs = gateway.logs()
    assert statuses == [200] * 6 + [429] * 4
    assert logs.count("Booting worker") == 2
    keys = redis.Redis.from_url(redis_url).keys("*llm_service*")
    assert keys, "the counters live in Redis"


def test_one_redis_round_trip_counts_a_request_and_fills_its_headers(fake, redis_url):
    """The hit answers the window's count and end: no GET or TTL after it."""
    settings = {
        "LM_STUDIO_URL": fake.url,
        "RATE_LIMIT_REQUESTS": 3,
        "RATE_LIMIT_STORAGE_URI": redis_url,
    }
    store = redis.Redis.from_url(redis_url)
    store.flushdb()
    with GatewayServer(settings) as gateway:
        store.config_resetstat()
        answers = [
            requests.post(f"{gateway.url}/llm/message", json=HELLO, timeout=10)
            for _ in range(4)
        ]
        stats = store.info("commandstats")
        (key,) = store.keys("LIMITS*llm_service*")
        ttl_ms, now = store.pttl(key), time.time()
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == [
        "2",
        "1",
        "0",
        "0",
    ]
    # The window's own end, as Redis has it (to the second).
    reset = int(answers[-1].headers["X-RateLimit-Reset"])
    assert 0 <= reset - (now + ttl_ms / 1000) < 1.5
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60
    # One script per request counts it and reads the window (commands run by
    # scripts are counted too); the headers cost no further command.
    assert stats["cmdstat_incrby"]["calls"] == 4
    assert stats["cmdstat_pttl"]["calls"] == 4
    assert "cmdstat_get" not in stats
    assert "cmdstat_ttl" not in stats


def test_the_hits_figures_are_read_once_by_the_thread_that_hit(redis_url):
    """Later reads (or another thread's) ask Redis: never a stale count."""
    import threading

    from llm_service.limits import HitStatsRedisStorage

    storage = HitStatsRedisStorage(f"llm-service-{redis_url}")
    storage.clear("once")
    assert storage.incr("once", 60) == 1
    other = HitStatsRedisStorage(f"llm-service-{redis_url}")
    assert other.incr("once", 60) == 2  # another gateway process counts too
    assert storage.get("once") == 1  # this thread's hit, no round trip
    assert storage.get("once") == 2  # then Redis itself
    seen = []
    assert storage.incr("once", 60) == 3
    thread = threading.Thread(target=lambda: seen.append(storage.get("once")))
    thread.start()
    thread.join()
    other.incr("once", 60)
    assert seen == [3]  # from Redis: another thread has no hit of its own
    assert storage.get("once") == 3  # this thread's own hit
    assert time.time() + 58 <= storage.get_expiry("once") <= time.time() + 61

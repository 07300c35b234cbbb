"""A shared rate limit: two gunicorn processes counting in a real Redis."""

from __future__ import annotations

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

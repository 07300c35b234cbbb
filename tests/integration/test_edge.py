"""The edge under real gunicorn: limits per client, trusted proxies, a frozen Redis,
credentials never shown, log lines never forged."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import requests

from tests.databases import RedisServer
from tests.servers import GatewayServer, import_wsgi

HELLO = {"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]}


def post(gateway, path="/llm/message", timeout=10, **kwargs):
    return requests.post(f"{gateway.url}{path}", json=HELLO, timeout=timeout, **kwargs)


# -- one bucket per client ------------------------------------------------------


def test_five_per_minute_is_five_across_all_routes(fake):
    settings = {"LM_STUDIO_URL": fake.url, "RATE_LIMIT_REQUESTS": 5}
    routes = ["/llm/message", "/v1/chat/completions", "/v1/completions"]
    with GatewayServer(settings) as gateway:
        statuses = []
        for _ in range(3):
            for path in routes:
                statuses.append(post(gateway, path).status_code)
            models = requests.get(f"{gateway.url}/v1/models", timeout=10)
            statuses.append(models.status_code)
    assert sum(status != 429 for status in statuses) == 5
    assert statuses[5:] == [429] * 7


# -- forwarded headers only from trusted proxies ------------------------------


@pytest.mark.parametrize(
    ("addresses", "admitted"),
    [
        # The test client is 127.0.0.1: a list without it ignores its headers.
        ('["10.0.0.0/8"]', 5),
        # Loopback is the default: the same headers then name 12 clients.
        (None, 12),
    ],
)
def test_spoofed_forwarded_for_only_from_trusted_peers(fake, addresses, admitted):
    settings = {
        "LM_STUDIO_URL": fake.url,
        "RATE_LIMIT_REQUESTS": 5,
        "TRUSTED_PROXIES": 1,
    }
    if addresses is not None:
        settings["TRUSTED_PROXY_ADDRESSES"] = addresses
    with GatewayServer(settings) as gateway:
        statuses = [
            post(gateway, headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
            for n in range(12)
        ]
    assert statuses.count(200) == admitted
    assert statuses.count(429) == 12 - admitted


# -- a frozen Redis -----------------------------------------------------------


@pytest.fixture
def redis_server():
    """A redis-server of this test's own: it gets frozen."""
    server = RedisServer()
    yield server.process, server.url
    server.stop()  # resumed first if the test left it frozen


def _timed_post(gateway) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        status = post(gateway, timeout=15).status_code
    except requests.RequestException:
        status = None
    return status, time.monotonic() - started


def _storage(gateway) -> str | None:
    health = requests.get(f"{gateway.url}/health", timeout=10).json()
    return health.get("rate_limit_storage")


def test_frozen_redis_neither_stalls_nor_fails_requests(fake, redis_server):
    process, url = redis_server
    settings = {
        "LM_STUDIO_URL": fake.url,
        "RATE_LIMIT_REQUESTS": 100000,
        "RATE_LIMIT_STORAGE_URI": url,
        "HEALTH_CACHE_SECONDS": 0,
    }
    # One process: the fallback and its recovery are each worker's own, and
    # with two (the default with Redis) the requests are spread over both.
    with GatewayServer(settings, workers=1) as gateway:
        assert post(gateway).status_code == 200
        before = _storage(gateway)

        process.send_signal(signal.SIGSTOP)
        frozen = [_timed_post(gateway) for _ in range(15)]
        during = _storage(gateway)

        process.send_signal(signal.SIGCONT)
        # Flask-Limiter probes the store again after 1, 2, 4 ... 32 s.
        deadline = time.monotonic() + 75
        after = [_timed_post(gateway)]
        while _storage(gateway) != "redis" and time.monotonic() < deadline:
            time.sleep(0.3)
            after.append(_timed_post(gateway))
        recovered = _storage(gateway)
        logs = gateway.logs()

    statuses = [status for status, _ in frozen + after]
    assert statuses == [200] * len(statuses)
    # One request may wait for the store twice (its call, then the first
    # re-check: 2 x 0.5 s); none waits for redis-py's retries or for ever.
    slowest = max(elapsed for _, elapsed in frozen)
    assert slowest < 2.5, [round(elapsed, 2) for _, elapsed in frozen]
    assert sorted(elapsed for _, elapsed in frozen)[len(frozen) // 2] < 1.0
    assert before == "redis"
    assert during == "memory-fallback"
    assert recovered == "redis"
    assert "falling back to in-memory storage" in logs
    assert "Rate limit storage recovered" in logs


# -- credentials never shown --------------------------------------------------

SECRET = "pa55word"


def test_credentials_in_the_upstream_url_are_never_shown(fake):
    authority = fake.url.split("//", 1)[1]
    secret_url = f"http://admin:{SECRET}@{authority}"
    settings = {"LM_STUDIO_URL": secret_url, "HEALTH_CACHE_SECONDS": 0}
    with GatewayServer(settings) as gateway:
        health = requests.get(f"{gateway.url}/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["lm_studio"]["url"] == f"http://***@{authority}"
        bodies = [health.text]
        bodies.append(requests.get(f"{gateway.url}/openapi.json", timeout=10).text)
        fake.refuse(drop_connections=True)
        try:
            for path in ("/health", "/health/ready"):
                down = requests.get(f"{gateway.url}{path}", timeout=10)
                assert down.status_code == 503
                assert "http://***@" in down.json()["error"]["message"]
                bodies.append(down.text)
            bodies.append(post(gateway).text)
        finally:
            fake.accept()
        logs = gateway.logs()
    for text in [*bodies, logs]:
        assert SECRET not in text


def test_start_up_error_does_not_show_the_password():
    env = {
        "PATH": "/usr/bin:/bin",
        "LLM_SERVICE_ENV_FILE": os.devnull,
        "LLM_SERVICE_LM_STUDIO_URL": f"ftp://admin:{SECRET}@host",
    }
    result = import_wsgi(env, timeout=30)
    assert result.returncode == 3
    assert "LLM_SERVICE_LM_STUDIO_URL='ftp://***@host' is invalid" in result.stderr
    assert SECRET not in result.stderr + result.stdout


# -- text logs cannot be forged -----------------------------------------------


def test_text_log_lines_cannot_be_forged(fake):
    settings = {"LM_STUDIO_URL": fake.url, "LOG_FORMAT": "text"}
    forged = "2030-01-01 00:00:00,000 CRITICAL llm_service [-] forged"
    with GatewayServer(settings) as gateway:
        for separator in ("%0a", "%0d%0a", "%0d", "%c2%85"):
            path = f"/x{separator}{forged.replace(' ', '%20')}"
            assert requests.get(gateway.url + path, timeout=10).status_code == 404
        logs = gateway.logs()
    assert len([line for line in logs.splitlines() if "forged" in line]) == 4
    for line in re.split(r"[\r\n\x85\u2028\u2029]", logs):
        assert not line.startswith("2030-01-01"), line


def test_trusted_hosts_ignore_case(fake):
    settings = {"LM_STUDIO_URL": fake.url, "TRUSTED_HOSTS": '["Gateway.Example"]'}
    with GatewayServer(settings) as gateway:
        for host in ("gateway.example", "GATEWAY.EXAMPLE", "Gateway.Example:8000"):
            response = requests.get(
                f"{gateway.url}/", headers={"Host": host}, timeout=5
            )
            assert response.status_code == 200, host
        bad = requests.get(
            f"{gateway.url}/", headers={"Host": "evil.example"}, timeout=5
        )
        assert bad.status_code == 400

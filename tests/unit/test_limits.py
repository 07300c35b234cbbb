"""Rate limits, CORS, trusted hosts and trusted proxies."""

import pytest


@pytest.fixture
def limited(app_factory):
    return app_factory(RATE_LIMIT_REQUESTS=3).test_client()


def test_exactly_n_requests_per_window(limited):
    statuses = [limited.post("/llm/message", json={}).status_code for _ in range(5)]
    assert statuses == [422, 422, 422, 429, 429]


def test_429_contract_and_headers(limited):
    for _ in range(3):
        limited.post("/llm/message", json={})
    response = limited.post("/llm/message", json={})
    assert response.status_code == 429
    assert response.json["error"]["code"] == "rate_limited"
    assert "3 per 1 minute" in response.json["error"]["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 61
    assert response.headers["X-RateLimit-Limit"] == "3"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["X-RateLimit-Reset"]) > 0


def test_remaining_counts_down_and_no_retry_after_on_success(limited):
    response = limited.post("/llm/message", json={})
    assert response.headers["X-RateLimit-Remaining"] == "2"
    assert "Retry-After" not in response.headers


def test_limit_is_per_client(limited):
    for _ in range(3):
        limited.post("/llm/message", json={})
    other = limited.post(
        "/llm/message", json={}, environ_base={"REMOTE_ADDR": "10.9.9.9"}
    )
    assert other.status_code == 422


def test_trusted_proxy_sets_client_address(app_factory):
    client = app_factory(RATE_LIMIT_REQUESTS=1, TRUSTED_PROXIES=1).test_client()
    first = {"X-Forwarded-For": "203.0.113.1"}
    second = {"X-Forwarded-For": "203.0.113.2"}
    assert client.post("/llm/message", json={}, headers=first).status_code == 422
    assert client.post("/llm/message", json={}, headers=first).status_code == 429
    assert client.post("/llm/message", json={}, headers=second).status_code == 422


def test_forwarded_for_ignored_without_trusted_proxies(app_factory):
    client = app_factory(RATE_LIMIT_REQUESTS=1).test_client()
    client.post("/llm/message", json={}, headers={"X-Forwarded-For": "203.0.113.1"})
    spoofed = client.post(
        "/llm/message", json={}, headers={"X-Forwarded-For": "203.0.113.2"}
    )
    assert spoofed.status_code == 429


def test_cors_allows_listed_origin(app_factory):
    client = app_factory(ALLOWED_ORIGINS=["https://app.example.com"]).test_client()
    response = client.get("/", headers={"Origin": "https://app.example.com"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    exposed = response.headers["Access-Control-Expose-Headers"]
    assert "X-Correlation-ID" in exposed
    assert "X-Process-Time" in exposed


def test_cors_preflight(app_factory):
    client = app_factory(ALLOWED_ORIGINS=["https://app.example.com"]).test_client()
    response = client.options(
        "/llm/message",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type",
        },
    )
    assert response.status_code == 200
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_cors_ignores_other_origins(app_factory):
    client = app_factory(ALLOWED_ORIGINS=["https://app.example.com"]).test_client()
    response = client.get("/", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_no_cors_by_default(client):
    response = client.get("/", headers={"Origin": "https://app.example.com"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_trusted_hosts(app_factory):
    client = app_factory(TRUSTED_HOSTS=["api.example.com"]).test_client()
    good = client.get("/", headers={"Host": "api.example.com"})
    assert good.status_code == 200
    bad = client.get("/", headers={"Host": "evil.example"})
    assert bad.status_code == 400
    assert bad.json["error"]["code"] == "bad_request"
    assert bad.headers["X-Correlation-ID"] == bad.json["correlation_id"]


def test_memory_storage_counts_and_resets_per_window(monkeypatch):
    from llm_service.limits import WindowCounterStorage

    clock = [1000.0]
    monkeypatch.setattr("llm_service.limits.time.time", lambda: clock[0])
    storage = WindowCounterStorage()
    assert [storage.incr("a", 60) for _ in range(3)] == [1, 2, 3]
    assert storage.get("a") == 3
    assert storage.get_expiry("a") == 1060.0
    clock[0] = 1061.0  # the window has passed: a new one starts at 1
    assert storage.get("a") == 0
    assert storage.incr("a", 60) == 1
    storage.incr("b", 5)
    clock[0] = 1080.0  # b's window is long gone: the next hit sweeps it away
    storage.incr("a", 60)
    assert "b" not in storage._windows
    storage.clear("a")
    assert storage.get("a") == 0


def test_limited_requests_start_no_threads(app_factory, monkeypatch):
    """limits' MemoryStorage started a timer thread per spaced-out request."""
    import threading
    import time

    client = app_factory(RATE_LIMIT_REQUESTS=1000).test_client()
    client.post("/llm/message", json={})
    started = []
    original = threading.Thread.start

    def counting_start(thread):
        started.append(thread.name)
        original(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(10):
        time.sleep(0.015)  # longer than MemoryStorage's 10 ms expiry timer
        client.post("/llm/message", json={})
    assert started == []


def test_redis_storage_uri_is_used_as_given(app_factory):
    from llm_service.limits import _storage_uri

    assert _storage_uri("redis://h:6379/0") == "redis://h:6379/0"
    assert _storage_uri("memory://") == "llm-service-memory://"


def test_retry_after_and_reset_are_the_windows_real_reset_time(
    app_factory, monkeypatch
):
    """The window opened at the first request; a 429 says when it ends."""
    clock = [1000.0]
    monkeypatch.setattr("llm_service.limits.time.time", lambda: clock[0])
    client = app_factory(RATE_LIMIT_REQUESTS=2).test_client()
    client.post("/llm/message", json={})  # opens the window: it ends at 1060
    clock[0] = 1010.0
    client.post("/llm/message", json={})
    clock[0] = 1017.5
    response = client.post("/llm/message", json={})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "43"  # ceil(1060 - 1017.5)
    assert response.headers["X-RateLimit-Reset"] == "1060"
    clock[0] = 1059.2
    assert client.post("/llm/message", json={}).headers["Retry-After"] == "1"
    clock[0] = 1060.0
    assert client.post("/llm/message", json={}).status_code == 422  # a new window

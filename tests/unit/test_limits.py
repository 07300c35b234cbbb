"""Rate limits, CORS, trusted hosts and trusted proxies."""

import pytest
import requests


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


def test_storage_uris_pick_the_gateways_own_stores(app_factory):
    from llm_service.limits import _storage_uri

    assert _storage_uri("redis://h:6379/0") == "llm-service-redis://h:6379/0"
    assert _storage_uri("redis+sentinel://h/m") == "redis+sentinel://h/m"
    assert _storage_uri("memory://") == "llm-service-memory://"


# -- one bucket per client across routes --------------------------------------

#: Every rate-limited route, each called so it answers without the upstream.
LIMITED_ROUTES = [
    ("post", "/llm/message"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/embeddings"),
    ("get", "/v1/models"),
]


def test_limit_is_one_bucket_per_client_across_routes(app_factory, upstream):
    from tests.conftest import UPSTREAM

    upstream.get(f"{UPSTREAM}/v1/models", json={"data": [{"id": "m"}]})
    client = app_factory(RATE_LIMIT_REQUESTS=5).test_client()
    answers = [
        getattr(client, method)(path, json={}) if method == "post" else client.get(path)
        for _ in range(3)
        for method, path in LIMITED_ROUTES
    ]
    statuses = [response.status_code for response in answers]
    assert sum(status != 429 for status in statuses) == 5
    assert statuses[5:] == [429] * 10
    remaining = [r.headers["X-RateLimit-Remaining"] for r in answers[:5]]
    assert remaining == ["4", "3", "2", "1", "0"]
    limited = answers[5]
    assert limited.headers["X-RateLimit-Limit"] == "5"
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert "Retry-After" not in answers[0].headers
    # Another client still has its own bucket, and health is never limited.
    other = client.post(
        "/llm/message", json={}, environ_base={"REMOTE_ADDR": "10.9.9.9"}
    )
    assert other.status_code == 422
    assert client.get("/health/live").status_code == 200


# -- forwarded headers only from trusted proxies ------------------------------

STRANGER = {"REMOTE_ADDR": "198.51.100.7"}


def test_spoofed_forwarded_for_is_ignored_from_an_untrusted_peer(app_factory):
    client = app_factory(RATE_LIMIT_REQUESTS=5, TRUSTED_PROXIES=1).test_client()
    statuses = [
        client.post(
            "/llm/message",
            json={},
            headers={"X-Forwarded-For": f"203.0.113.{n}"},
            environ_base=STRANGER,
        ).status_code
        for n in range(12)
    ]
    assert statuses == [422] * 5 + [429] * 7


def test_forwarded_headers_honoured_from_a_configured_network(app_factory):
    app = app_factory(
        RATE_LIMIT_REQUESTS=1,
        TRUSTED_PROXIES=1,
        TRUSTED_PROXY_ADDRESSES=["10.0.0.0/8"],
    )
    client = app.test_client()
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    for n in range(3):
        response = client.post(
            "/llm/message",
            json={},
            headers={"X-Forwarded-For": f"203.0.113.{n}", "X-Forwarded-Proto": "https"},
            environ_base=proxy,
        )
        assert response.status_code == 422  # each its own client
        assert "Strict-Transport-Security" in response.headers
    # Loopback is no longer trusted once the list names other addresses.
    local = [
        client.post(
            "/llm/message", json={}, headers={"X-Forwarded-For": f"203.0.113.{n}"}
        ).status_code
        for n in range(5, 7)
    ]
    assert local == [422, 429]


def test_forwarded_proto_and_host_ignored_from_an_untrusted_peer(app_factory):
    app = app_factory(TRUSTED_PROXIES=1, TRUSTED_HOSTS=["api.example.com"])
    client = app.test_client()
    headers = {
        "Host": "evil.example",
        "X-Forwarded-Host": "api.example.com",
        "X-Forwarded-Proto": "https",
    }
    assert client.get("/", headers=headers, environ_base=STRANGER).status_code == 400
    trusted = client.get("/", headers=headers)  # from 127.0.0.1: a trusted proxy
    assert trusted.status_code == 200
    assert "Strict-Transport-Security" in trusted.headers


@pytest.mark.parametrize(
    ("peer", "addresses", "honoured"),
    [
        ("127.0.0.1", None, True),
        ("127.8.9.10", None, True),
        ("::1", None, True),
        ("::ffff:127.0.0.1", None, True),
        ("10.0.0.1", None, False),
        ("fe80::1%eth0", ["fe80::/10"], True),
        ("", None, False),
        ("", ["unix"], True),
        ("192.0.2.1", ["192.0.2.1"], True),
        ("192.0.2.2", ["192.0.2.1"], False),
    ],
)
def test_which_peers_are_trusted(app_factory, peer, addresses, honoured):
    settings = {"RATE_LIMIT_REQUESTS": 1, "TRUSTED_PROXIES": 1}
    if addresses is not None:
        settings["TRUSTED_PROXY_ADDRESSES"] = addresses
    client = app_factory(**settings).test_client()
    statuses = [
        client.post(
            "/llm/message",
            json={},
            headers={"X-Forwarded-For": f"203.0.113.{n}"},
            environ_base={"REMOTE_ADDR": peer},
        ).status_code
        for n in range(2)
    ]
    assert statuses == ([422, 422] if honoured else [422, 429])


def test_trusted_proxy_addresses_setting(monkeypatch):
    from llm_service import create_app
    from llm_service.config import ConfigError

    assert create_app({"TESTING": True}).config["TRUSTED_PROXY_ADDRESSES"] == [
        "127.0.0.0/8",
        "::1/128",
    ]
    monkeypatch.setenv(
        "LLM_SERVICE_TRUSTED_PROXY_ADDRESSES", '["10.0.0.5", "10.1.0.0/16", "unix"]'
    )
    config = create_app({"TESTING": True}).config
    assert config["TRUSTED_PROXY_ADDRESSES"] == ["10.0.0.5/32", "10.1.0.0/16", "unix"]
    monkeypatch.setenv("LLM_SERVICE_TRUSTED_PROXY_ADDRESSES", '["10.0.0.300"]')
    with pytest.raises(ConfigError, match="TRUSTED_PROXY_ADDRESSES"):
        create_app({"TESTING": True})


# -- host names and CORS methods ----------------------------------------------


@pytest.mark.parametrize(
    ("configured", "host"),
    [
        ("api.example.com", "API.Example.COM"),
        ("API.example.com", "api.example.com"),
        ("api.example.com", "API.EXAMPLE.COM:8000"),
        (".Example.com", "API.example.COM"),
    ],
)
def test_trusted_hosts_compare_case_insensitively(app_factory, configured, host):
    client = app_factory(TRUSTED_HOSTS=[configured]).test_client()
    assert client.get("/", headers={"Host": host}).status_code == 200
    assert client.get("/", headers={"Host": "EVIL.example"}).status_code == 400


def test_cors_advertises_only_methods_some_route_accepts(app_factory):
    app = app_factory(ALLOWED_ORIGINS=["https://app.example.com"])
    response = app.test_client().options(
        "/v1/models",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "GET",
        },
    )
    advertised = {
        m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")
    }
    accepted = set().union(*(rule.methods for rule in app.url_map.iter_rules()))
    assert advertised == accepted
    assert not advertised & {"PUT", "PATCH", "DELETE"}


# -- a slow or lost limit store ------------------------------------------------


def test_storage_waits_are_bounded():
    from llm_service.limits import STORAGE_TIMEOUT, _storage_options

    assert STORAGE_TIMEOUT <= 0.5
    for uri in ("redis://h:6379/0", "rediss://h", "redis+sentinel://h:26379/m"):
        options = _storage_options(uri)
        assert options["socket_timeout"] == STORAGE_TIMEOUT
        assert options["socket_connect_timeout"] == STORAGE_TIMEOUT
        assert options["retry"].get_retries() == 0
    assert (
        _storage_options("redis+sentinel://h/m")["sentinel_kwargs"]["socket_timeout"]
        == STORAGE_TIMEOUT
    )
    assert _storage_options("memory://") == {}


def test_lost_store_falls_back_to_memory_and_health_says_so(app_factory, upstream):
    from tests.conftest import UPSTREAM

    upstream.get(f"{UPSTREAM}/v1/models", body=requests.ConnectionError("down"))
    # Nothing listens on port 1: every store call fails at once.
    app = app_factory(
        RATE_LIMIT_REQUESTS=2, RATE_LIMIT_STORAGE_URI="redis://127.0.0.1:1/0"
    )
    client = app.test_client()
    statuses = [client.post("/llm/message", json={}).status_code for _ in range(3)]
    assert statuses == [422, 422, 429]  # counted per process, still exact here
    limited = client.post("/llm/message", json={})
    assert limited.headers["X-RateLimit-Limit"] == "2"
    assert int(limited.headers["Retry-After"]) >= 1
    health = client.get("/health").json
    assert health["rate_limit_storage"] == "memory-fallback"


def test_health_names_the_configured_storage(app_factory, upstream):
    from tests.conftest import UPSTREAM

    upstream.get(f"{UPSTREAM}/v1/models", body=requests.ConnectionError("down"))
    assert app_factory().test_client().get("/health").json["rate_limit_storage"] == (
        "memory"
    )


def test_store_failing_after_the_hit_is_not_a_500(app_factory, monkeypatch):
    """The headers read the store again; a failure there must not cost the answer."""
    import redis

    from llm_service.limits import EXTENSION

    app = app_factory(RATE_LIMIT_REQUESTS=2)
    limiter = app.extensions[EXTENSION]

    def fail(*args, **kwargs):
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(limiter.limiter, "get_window_stats", fail)
    client = app.test_client()
    first = client.post("/llm/message", json={})
    assert first.status_code == 422
    assert "X-RateLimit-Remaining" not in first.headers
    client.post("/llm/message", json={})
    limited = client.post("/llm/message", json={})
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "60"


def test_store_failing_while_another_thread_falls_back_is_not_a_500(
    app_factory, monkeypatch
):
    """Threads whose store call fails after another thread switched to memory."""
    import redis

    from llm_service.limits import EXTENSION

    app = app_factory(RATE_LIMIT_STORAGE_URI="redis://127.0.0.1:1/0")
    limiter = app.extensions[EXTENSION]

    def fail_after_another_thread_switched(*args, **kwargs):
        limiter._storage_dead = True  # what the other thread just did
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(limiter._limiter, "hit", fail_after_another_thread_switched)
    assert app.test_client().post("/llm/message", json={}).status_code == 422


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


def test_a_disabled_limiter_limits_nobody_and_adds_no_headers(app_factory):
    """Flask-Limiter registers no hooks then: the exemptions go to its filter."""
    client = app_factory(RATE_LIMIT_REQUESTS=1, RATELIMIT_ENABLED=False).test_client()
    answers = [client.post("/llm/message", json={}) for _ in range(3)]
    assert [a.status_code for a in answers] == [422, 422, 422]
    assert all("X-RateLimit-Limit" not in a.headers for a in answers)

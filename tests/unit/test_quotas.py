"""Per-key quotas (per-process counters), their headers, and usage metering."""

from __future__ import annotations

import pytest

from llm_service import quotas, store
from llm_service.auth import Caller
from tests.conftest import UPSTREAM
from tests.servers import free_port
from tests.unit.test_auth import COMPLETION, HELLO, bearer, create_key

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"


@pytest.fixture
def make_app(app_factory, tmp_path):
    def build(**overrides):
        return app_factory(
            **{"DATABASE_URL": f"sqlite:///{tmp_path}/q.db", **overrides}
        )

    return build


def chat(client, key, **body):
    return client.post(
        "/v1/chat/completions", json={**HELLO, **body}, headers=bearer(key)
    )


def test_requests_per_minute_with_openai_headers(make_app, upstream):
    app = make_app()
    key = create_key(app, "alice", "--rpm", "2")
    client = app.test_client()
    for _ in range(2):
        upstream.post(CHAT, json=COMPLETION)
    first, second, third = (chat(client, key) for _ in range(3))
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.status_code == 429
    assert third.get_json()["error"]["code"] == "rate_limited"
    assert third.get_json()["error"]["type"] == "rate_limit_error"
    assert 55 <= int(third.headers["Retry-After"]) <= 60
    assert "x-ratelimit-limit-tokens" not in first.headers


def test_tokens_are_reserved_then_settled_with_real_usage(make_app, upstream):
    app = make_app()
    key = create_key(app, "alice", "--tpm", "1000")
    client = app.test_client()
    upstream.post(CHAT, json=COMPLETION)  # usage: 7 tokens
    response = chat(client, key, max_tokens=500)
    assert response.status_code == 200
    # Reserved: prompt estimate ("user" + "Hi": 6 chars -> 2, + 4 per message)
    # + max_tokens.
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - 506)
    # Settled to the 7 tokens used, so 901 more (6 + 895) fit now.
    upstream.post(CHAT, json=COMPLETION)
    response = chat(client, key, max_tokens=895)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - 7 - 901)
    # Both settled: 14 used; 996 (6 + 990) alone would fit, but not beside them.
    refused = chat(client, key, max_tokens=990)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "token_quota_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1


def test_a_reservation_above_the_tpm_is_refused_at_once(make_app, upstream):
    app = make_app()
    key = create_key(app, "alice", "--tpm", "100")
    response = chat(app.test_client(), key, max_tokens=200)
    assert response.status_code == 429
    error = response.get_json()["error"]
    assert error["code"] == "token_quota_exceeded"
    assert "can never be admitted" in error["message"]
    assert "Retry-After" not in response.headers  # waiting would not help
    assert len(upstream.calls) == 0


def test_concurrency_is_released_when_the_answer_ends(make_app, upstream):
    app = make_app()
    key = create_key(app, "alice", "--concurrency", "1")
    client = app.test_client()
    for _ in range(3):
        upstream.post(CHAT, json=COMPLETION)
    for _ in range(3):  # one at a time: each ends before the next
        assert chat(client, key).status_code == 200


def test_concurrency_leases_are_held_until_finished():
    counters = quotas.MemoryQuotas()
    caller = Caller(name="a", key_id=1, concurrency=1)
    first = counters.admit(caller, 0, "r1", 1000)
    assert first.allowed
    refused = counters.admit(caller, 0, "r2", 1000)
    assert (refused.allowed, quotas.REFUSALS[refused.refusal][0]) == (
        False,
        "concurrency_limit_exceeded",
    )
    admission = quotas.Admission(1, "r1", 0, True, counters, caller, first)
    counters.finish(admission, 0)
    assert counters.admit(caller, 0, "r3", 1000).allowed


def test_anonymous_callers_keep_the_per_client_limit(make_app, upstream):
    app = make_app(RATE_LIMIT_REQUESTS=1)
    client = app.test_client()
    upstream.post(CHAT, json=COMPLETION)
    assert client.post("/v1/chat/completions", json=HELLO).status_code == 200
    response = client.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 429
    assert "x-ratelimit-limit-requests" not in response.headers


def test_memory_counters_use_a_moving_window(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(quotas.time, "monotonic", lambda: clock[0])
    counters = quotas.MemoryQuotas()
    caller = Caller(name="a", key_id=1, rpm=2)
    assert counters.admit(caller, 0, "r1", 1000).allowed
    clock[0] += 59
    assert counters.admit(caller, 0, "r2", 1000).allowed
    clock[0] += 0.5
    assert not counters.admit(caller, 0, "r3", 1000).allowed
    clock[0] += 0.6  # r1 is now 60.1 s old: one unit is free again, not two
    assert counters.admit(caller, 0, "r4", 1000).allowed
    verdict = counters.admit(caller, 0, "r5", 1000)
    assert not verdict.allowed
    assert 57_000 < verdict.retry_ms <= 59_000  # until r2 leaves the window


def test_health_shows_the_quota_storage(make_app, upstream):
    upstream.get(f"{UPSTREAM}/v1/models", json={"object": "list", "data": []})
    body = make_app().test_client().get("/health").get_json()
    assert body["quotas"]["storage"] == "memory"
    assert body["quotas"]["shared"] is False
    assert "workers x instances" in body["quotas"]["note"]
    assert body["usage_records"]["dropped"] == 0


def test_openapi_lists_the_quota_codes(client):
    chat_op = client.get("/openapi.json").get_json()["paths"]["/v1/chat/completions"]
    described = chat_op["post"]["responses"]["429"]["description"]
    assert "token_quota_exceeded" in described
    assert "concurrency_limit_exceeded" in described


def test_redis_down_falls_back_to_process_counters_and_says_so(make_app, upstream):

    app = make_app(RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}/0")
    key = create_key(app, "alice", "--rpm", "1")
    client = app.test_client()
    upstream.post(CHAT, json=COMPLETION)
    upstream.get(f"{UPSTREAM}/v1/models", json={"object": "list", "data": []})
    assert chat(client, key).status_code == 200  # admitted all the same
    assert chat(client, key).status_code == 429  # and still limited
    admin = create_key(app, "ops", "--admin")
    status = client.get("/health", headers=bearer(admin)).get_json()["quotas"]
    assert status["storage"] == "memory"
    assert status["degraded"] is True


def test_redis_replies_are_parsed_by_hiredis(make_app):
    """The C parser is a pinned dependency: the pure-Python one costs ~4% CPU.

    (Redis round trips on every keyed request; bench: deployed gateway, c=16.)
    """
    app = make_app(RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}/0")
    client = store.redis_for(app)
    connection = client.connection_pool.make_connection()  # does not connect
    assert type(connection._parser).__name__ == "_HiredisParser"

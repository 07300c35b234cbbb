"""API keys: the CLI, who may call, which models, /health details, the docs."""

from __future__ import annotations

import base64
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from llm_service import auth
from llm_service.keys_cli import parse_when
from llm_service.models import utcnow
from tests.conftest import UPSTREAM

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"
MODELS = f"{UPSTREAM}/v1/models"
HELLO = {"model": "qwen-7b", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {
    "object": "chat.completion",
    "model": "qwen-7b",
    "choices": [{"message": {"role": "assistant", "content": "Hi."}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


@pytest.fixture
def database(tmp_path):
    return f"sqlite:///{tmp_path}/keys.db"


@pytest.fixture
def make_app(app_factory, database):
    def build(**overrides):
        return app_factory(**{"DATABASE_URL": database, **overrides})

    return build


@pytest.fixture
def keyed_app(make_app):
    return make_app()


def create_key(app, name="alice", *options: str) -> str:
    result = app.test_cli_runner().invoke(args=["keys", "create", name, *options])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[0]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_is_random_prefixed_and_stored_only_as_a_hash(keyed_app, database):
    key = create_key(keyed_app)
    other = create_key(keyed_app, "bob")
    assert key.startswith("sk-llm-")
    assert other.startswith("sk-llm-")
    assert key != other
    assert len(key.partition("_")[2]) >= 32  # 192 random bits, URL-safe base64
    with create_engine(database).connect() as connection:
        stored = " ".join(
            str(value)
            for row in connection.execute(text("SELECT * FROM api_keys"))
            for value in row
        )
    assert key not in stored
    assert key.partition("_")[2] not in stored
    assert auth.hash_key(key) in stored


def test_without_keys_the_gateway_stays_open(keyed_app, upstream):
    upstream.post(CHAT, json=COMPLETION)
    response = keyed_app.test_client().post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 200


def test_bearer_and_x_api_key_both_work(keyed_app, upstream):
    key = create_key(keyed_app)
    upstream.post(CHAT, json=COMPLETION)
    upstream.post(CHAT, json=COMPLETION)
    client = keyed_app.test_client()
    assert (
        client.post("/v1/chat/completions", json=HELLO, headers=bearer(key)).status_code
        == 200
    )
    assert (
        client.post(
            "/v1/chat/completions", json=HELLO, headers={"x-api-key": key}
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-llm-000000000000_wrong"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"x-api-key": "sk-llm-abc"},
    ],
    ids=["none", "unknown", "malformed", "basic", "truncated"],
)
def test_a_missing_or_wrong_key_is_401_with_www_authenticate(keyed_app, headers):
    create_key(keyed_app)
    client = keyed_app.test_client()
    for path in ("/v1/chat/completions", "/llm/message"):
        response = client.post(path, json=HELLO, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = response.get_json()
        code = body["error"]["code"]
        assert code == "invalid_api_key"
    assert body["error"]["message"]


def test_a_wrong_secret_with_a_real_lookup_id_is_refused(keyed_app):
    key = create_key(keyed_app)
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    response = keyed_app.test_client().post(
        "/v1/chat/completions", json=HELLO, headers=bearer(forged)
    )
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "invalid_api_key"


def test_revoked_key_is_refused_and_auto_stays_closed(keyed_app):
    key = create_key(keyed_app)
    result = keyed_app.test_cli_runner().invoke(args=["keys", "revoke", "alice"])
    assert result.exit_code == 0, result.output
    client = keyed_app.test_client()
    response = client.post("/v1/chat/completions", json=HELLO, headers=bearer(key))
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "api_key_revoked"
    # No key is left, but one existed: the gateway does not reopen.
    response = client.post("/v1/chat/completions", json=HELLO)
    assert response.get_json()["error"]["code"] == "invalid_api_key"


def test_expired_key_is_refused(keyed_app):
    key = create_key(keyed_app, "old", "--expires", "2000-01-01")
    response = keyed_app.test_client().post(
        "/llm/message", json=HELLO, headers=bearer(key)
    )
    assert response.status_code == 401
    assert response.get_json()["error"] == {
        "code": "api_key_expired",
        "message": "The API key has expired.",
    }


def test_a_key_limited_to_some_models_lists_only_those(keyed_app, upstream):
    listing = {
        "object": "list",
        "data": [
            {"id": "qwen2.5-7b", "object": "model"},
            {"id": "Llama-3.1-8B", "object": "model"},
            {"id": "mistral-7b", "object": "model"},
        ],
    }
    models = CHAT.replace("/chat/completions", "/models")
    upstream.get(models, json=listing)
    upstream.get(models, json=listing)
    limited = create_key(keyed_app, "alice", "--models", "qwen*,llama-3*")
    everything = create_key(keyed_app, "bob")
    client = keyed_app.test_client()
    seen = client.get("/v1/models", headers=bearer(limited)).get_json()
    assert [m["id"] for m in seen["data"]] == ["qwen2.5-7b", "Llama-3.1-8B"]
    assert seen["object"] == "list"
    seen = client.get("/v1/models", headers=bearer(everything)).get_json()
    assert [m["id"] for m in seen["data"]] == [
        "qwen2.5-7b",
        "Llama-3.1-8B",
        "mistral-7b",
    ]


def test_forbidden_model_is_403_and_never_reaches_the_upstream(keyed_app, upstream):
    key = create_key(keyed_app, "alice", "--models", "qwen*,llama-3*")
    client = keyed_app.test_client()
    body = {**HELLO, "model": "mistral-7b"}
    response = client.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert response.status_code == 403
    error = response.get_json()["error"]
    assert error["code"] == "model_not_allowed"
    assert error["type"] == "permission_error"
    # Naming no model is refused too: the loaded one may be outside the globs.
    body = {"messages": HELLO["messages"]}
    response = client.post("/llm/message", json=body, headers=bearer(key))
    assert response.status_code == 403
    assert "qwen*" in response.get_json()["error"]["message"]
    assert len(upstream.calls) == 0
    upstream.post(CHAT, json=COMPLETION)
    allowed = {**HELLO, "model": "Llama-3.1-8B"}  # globs ignore case
    assert (
        client.post(
            "/v1/chat/completions", json=allowed, headers=bearer(key)
        ).status_code
        == 200
    )


def test_auth_off_ignores_keys_and_required_needs_one(make_app, upstream):
    create_key(make_app())
    upstream.post(CHAT, json=COMPLETION)
    assert (
        make_app(AUTH="off").test_client().post("/llm/message", json=HELLO).status_code
        == 200
    )
    fresh = make_app(AUTH="required", DATABASE_URL="sqlite://")
    response = fresh.test_client().post("/llm/message", json=HELLO)
    assert response.status_code == 401


def test_revocation_takes_effect_within_the_cache_time(make_app, database):
    app = make_app(AUTH_CACHE_SECONDS=0.3)
    key = create_key(app)
    client = app.test_client()
    models = {"object": "list", "data": []}
    import responses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(MODELS, json=models)
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        # Revoked behind the worker's back (another instance's CLI).
        with create_engine(database).begin() as connection:
            connection.execute(text("UPDATE api_keys SET revoked_at = '2020-01-01'"))
        assert (
            client.get("/v1/models", headers=bearer(key)).status_code == 200
        )  # cached
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = client.get("/v1/models", headers=bearer(key)).status_code
            if status == 401:
                break
            time.sleep(0.05)
    assert status == 401


def test_keys_stay_in_use_while_the_database_is_down(make_app, database, tmp_path):
    app = make_app(AUTH_CACHE_SECONDS=0)
    key = create_key(app)
    client = app.test_client()
    import responses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(MODELS, json={"object": "list", "data": []})
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        (tmp_path / "keys.db").rename(tmp_path / "moved.db")
        (tmp_path / "keys.db").mkdir()  # SQLite cannot open a directory
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200


def test_no_key_set_and_no_database_is_503_auth_unavailable(app_factory, tmp_path):
    (tmp_path / "db").mkdir()
    app = app_factory(DATABASE_URL=f"sqlite:///{tmp_path}/db")  # a directory
    client = app.test_client()
    response = client.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "auth_unavailable"
    assert response.headers["Retry-After"]
    assert client.get("/health/live").status_code == 200


def test_failed_authentications_spend_the_address_limit(make_app, upstream):
    app = make_app(RATE_LIMIT_REQUESTS=3)
    key = create_key(app)
    client = app.test_client()
    wrong = bearer("sk-llm-000000000000_guess")
    statuses = [
        client.post("/v1/chat/completions", json=HELLO, headers=wrong).status_code
        for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]
    # Guessing through the unlimited routes is counted too.
    app = make_app(RATE_LIMIT_REQUESTS=3)
    client = app.test_client()
    statuses = [client.get("/health/live", headers=wrong).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert client.get("/health/live").status_code == 200  # no key: not a guess
    # A valid key has its own quotas: the per-address limit does not apply.
    for _ in range(5):
        upstream.post(CHAT, json=COMPLETION)
    for _ in range(5):
        response = client.post("/v1/chat/completions", json=HELLO, headers=bearer(key))
        assert response.status_code == 200


def test_valid_keys_skip_the_address_limiter_entirely(make_app, upstream):
    app = make_app(RATE_LIMIT_REQUESTS=2)
    key = create_key(app)
    limiter = app.extensions["llm_service.limiter"]
    checked = []
    identify = limiter.identify_request
    limiter.identify_request = lambda: checked.append(1) or identify()
    client = app.test_client()
    for _ in range(3):
        upstream.post(CHAT, json=COMPLETION)
        response = client.post("/v1/chat/completions", json=HELLO, headers=bearer(key))
        assert response.status_code == 200
        assert "X-RateLimit-Limit" not in response.headers
    assert checked == []  # decided before any of Flask-Limiter's work
    # Everyone else still goes through it, and the keyed calls spent nothing.
    wrong = bearer("sk-llm-000000000000_guess")
    response = client.post("/v1/chat/completions", json=HELLO, headers=wrong)
    assert response.status_code == 401
    assert response.headers["X-RateLimit-Remaining"] == "1"
    assert checked == [1]


def test_health_details_only_for_admin_keys_once_keys_exist(keyed_app, upstream):
    upstream.get(MODELS, json={"object": "list", "data": []})
    client = keyed_app.test_client()
    assert "lm_studio" in client.get("/health").get_json()
    key = create_key(keyed_app)
    admin = create_key(keyed_app, "root", "--admin")
    response = client.get("/health", headers=bearer(admin))
    assert response.get_json()["lm_studio"]["url"] == UPSTREAM
    for headers in ({}, bearer(key)):
        answer = client.get("/health", headers=headers)
        assert answer.status_code == response.status_code  # the same for everyone
        assert answer.get_json()["status"] == response.get_json()["status"]
        assert "lm_studio" not in answer.get_json()
        assert UPSTREAM.split("//")[1] not in answer.get_data(as_text=True)
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 503  # no model, but public


def test_docs_are_public_unless_configured(make_app):
    app = make_app()
    create_key(app)
    assert app.test_client().get("/openapi.json").status_code == 200
    closed = make_app(DOCS_PUBLIC=False).test_client()
    assert closed.get("/openapi.json").status_code == 401
    assert closed.get("/docs").status_code == 401


def test_openapi_declares_the_bearer_scheme(client):
    spec = client.get("/openapi.json").get_json()
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    # The key, or none: needed only once a key exists (auto) or with required.
    assert chat["security"] == [{"bearerAuth": []}, {}]
    assert "invalid_api_key" in chat["responses"]["401"]["description"]
    assert "model_not_allowed" in chat["responses"]["403"]["description"]
    assert "security" not in spec["paths"]["/health/live"]["get"]


def test_rotate_with_and_without_grace(keyed_app, upstream):
    runner = keyed_app.test_cli_runner()
    client = keyed_app.test_client()
    first = create_key(keyed_app)
    result = runner.invoke(args=["keys", "rotate", "alice", "--grace", "1h"])
    assert result.exit_code == 0, result.output
    second = result.stdout.splitlines()[0]
    assert second != first
    assert "old secret works until" in result.stderr
    for _ in range(2):
        upstream.post(CHAT, json=COMPLETION)
    for key in (first, second):
        response = client.post("/v1/chat/completions", json=HELLO, headers=bearer(key))
        assert response.status_code == 200
    third = runner.invoke(args=["keys", "rotate", "alice"]).stdout.splitlines()[0]
    for key in (first, second):
        response = client.post("/v1/chat/completions", json=HELLO, headers=bearer(key))
        assert response.status_code == 401
    upstream.post(CHAT, json=COMPLETION)
    assert (
        client.post(
            "/v1/chat/completions", json=HELLO, headers=bearer(third)
        ).status_code
        == 200
    )


def test_list_never_shows_secrets(keyed_app):
    key = create_key(keyed_app, "alice", "--rpm", "10", "--models", "qwen*")
    keyed_app.test_cli_runner().invoke(args=["keys", "revoke", "alice"])
    output = keyed_app.test_cli_runner().invoke(args=["keys", "list"]).output
    assert "alice" in output
    assert "revoked" in output
    assert "qwen*" in output
    assert key not in output
    assert key.partition("_")[2] not in output


def test_cli_refuses_bad_input(keyed_app):
    runner = keyed_app.test_cli_runner()
    create_key(keyed_app)
    assert runner.invoke(args=["keys", "create", "alice"]).exit_code != 0
    assert runner.invoke(args=["keys", "create", "a b"]).exit_code != 0
    result = runner.invoke(args=["keys", "create", "x", "--expires", "soon"])
    assert result.exit_code != 0
    assert "duration" in result.output
    assert runner.invoke(args=["keys", "revoke", "nobody"]).exit_code != 0


def test_parse_when():
    now = utcnow()
    assert abs(parse_when("30d", past=False) - (now + timedelta(days=30))) < timedelta(
        seconds=5
    )
    assert parse_when("24h", past=True) < now
    assert parse_when("2025-01-31", past=False) == datetime(2025, 1, 31)
    assert parse_when("2025-01-31T12:00:00+02:00", past=False) == datetime(
        2025, 1, 31, 10
    )
    with pytest.raises(ValueError, match="duration"):
        parse_when("tomorrow", past=False)


@pytest.mark.parametrize(
    ("bind", "local"),
    [
        ("127.0.0.1:8000", True),
        ("127.1.2.3:8000", True),
        ("localhost:8000", True),
        ("[::1]:8000", True),
        ("unix:/run/llm.sock", True),
        ("0.0.0.0:8000", False),
        ("[::]:8000", False),
        ("192.168.1.5:8000", False),
        ("gateway.example.com:80", False),
    ],
)
def test_is_loopback(bind, local):
    assert auth.is_loopback(bind) is local


def test_exposure_problem_names_the_fix(make_app):
    app = make_app()
    problem = auth.exposure_problem(app, ["0.0.0.0:8000"])
    assert "\n" not in problem
    assert "flask keys create" in problem
    assert "LLM_SERVICE_AUTH=off" in problem
    assert auth.exposure_problem(app, ["127.0.0.1:8000"]) is None
    assert auth.exposure_problem(make_app(AUTH="off"), ["0.0.0.0:8000"]) is None
    create_key(app)
    assert auth.exposure_problem(app, ["0.0.0.0:8000"]) is None


def test_public_routes_without_a_key_never_read_the_keys(app):
    client = app.test_client()
    assert client.get("/health/live").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert app.extensions[auth.EXTENSION]._keys is None  # never loaded


def test_monitoring_is_for_admin_keys_once_keys_exist(keyed_app, upstream):
    client = keyed_app.test_client()
    # No key yet: the operator's pages are open, as before.
    assert client.get("/metrics").status_code == 200
    user = create_key(keyed_app, "alice")
    admin = create_key(keyed_app, "root", "--admin")
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.json["error"]["code"] == "invalid_api_key"
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    refused = client.get("/metrics", headers=bearer(user))
    assert (refused.status_code, refused.json["error"]["code"]) == (
        403,
        "admin_key_required",
    )
    assert client.get("/metrics", headers=bearer(admin)).status_code == 200
    # The status page asks a browser for the key as a Basic password.
    page = client.get("/status")
    assert page.status_code == 401
    assert page.headers["WWW-Authenticate"].startswith("Basic")
    basic = base64.b64encode(f"ops:{admin}".encode()).decode()
    shown = client.get("/status", headers={"Authorization": f"Basic {basic}"})
    assert shown.status_code == 200
    assert "text/html" in shown.headers["Content-Type"]

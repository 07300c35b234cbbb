"""API keys end to end: gunicorn's start-up check, the CLI, the openai SDK."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import openai
import pytest
import requests
from sqlalchemy import create_engine, text

from tests.databases import PostgresServer
from tests.servers import ROOT, GatewayServer, free_port


def gunicorn_env(tmp_path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE_")}
    env["LLM_SERVICE_ENV_FILE"] = os.devnull
    env["LLM_SERVICE_DATABASE_URL"] = f"sqlite:///{tmp_path}/gateway.db"
    env.update({f"LLM_SERVICE_{k}": v for k, v in settings.items()})
    return env


def flask_keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi:app", "keys", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("address", ["0.0.0.0", "[::]"])
def test_refuses_to_listen_beyond_loopback_without_a_key(tmp_path, address):
    env = gunicorn_env(tmp_path)
    env["GUNICORN_BIND"] = f"{address}:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "refusing" in line]
    assert len(lines) == 1, result.stderr
    assert "flask keys create" in lines[0]
    assert "LLM_SERVICE_AUTH=off" in lines[0]
    assert "Traceback" not in result.stderr
    assert "Booting worker" not in result.stderr


def test_starts_beyond_loopback_with_a_key_or_auth_off(tmp_path, fake):
    for settings, make_key in (({"AUTH": "off"}, False), ({}, True)):
        env = gunicorn_env(tmp_path, LM_STUDIO_URL=fake.url, **settings)
        if make_key:
            assert flask_keys(env, "create", "ops").returncode == 0
        server = GatewayServer({"LM_STUDIO_URL": fake.url, **settings})
        server.env.update(env)
        server.env["GUNICORN_BIND"] = f"0.0.0.0:{server.port}"
        with server:
            pass  # it answered /health/live on loopback


def test_the_refusal_honours_dotenv(tmp_path):
    dotenv = tmp_path / "gateway.env"
    dotenv.write_text("LLM_SERVICE_AUTH=off\n")
    env = gunicorn_env(tmp_path)
    env["LLM_SERVICE_ENV_FILE"] = str(dotenv)
    env["GUNICORN_BIND"] = f"0.0.0.0:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(5)  # still serving: AUTH=off came from the file
    finally:
        process.terminate()
        process.communicate(timeout=30)


# -- keys in use: the openai SDK, the CLI, SQLite and PostgreSQL ---------------

MODEL = "fake-model-1"
HELLO = [{"role": "user", "content": "Hello from the SDK"}]


_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients():
    """Close the test's SDK clients: an open pooled socket warns when collected."""
    yield
    while _clients:
        _clients.pop().close()


def sdk(gateway: GatewayServer, key: str) -> openai.OpenAI:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=30
    )
    _clients.append(client)
    return client


def records(url: str) -> list:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT * FROM usage_records")).all()
    finally:
        engine.dispose()


def test_openai_sdk_with_keys(fake, tmp_path):
    database = f"sqlite:///{tmp_path}/gateway.db"
    env = gunicorn_env(tmp_path, DATABASE_URL=database)
    key = flask_keys(env, "create", "app", "--models", "fake-*", "--rpm", "2")
    key = key.stdout.strip()
    settings = {"LM_STUDIO_URL": fake.url, "DATABASE_URL": database}
    with GatewayServer(settings) as gateway:
        client = sdk(gateway, key)
        answer = client.chat.completions.create(model=MODEL, messages=HELLO)
        assert answer.choices[0].message.content == "Echo: Hello from the SDK"
        with pytest.raises(openai.AuthenticationError) as refused:
            sdk(gateway, "sk-llm-0123456789ab_wrong").models.list()
        assert refused.value.code == "invalid_api_key"
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="other-model", messages=HELLO)
        assert refused.value.code == "model_not_allowed"
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO
        )
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=HELLO)
        assert refused.value.code == "rate_limited"
        assert int(refused.value.response.headers["retry-after"]) > 0
    models = [r.json.get("model") for r in fake.requests if r.json]
    assert "other-model" not in models  # refused before the upstream


def test_cli_round_trip(fake, tmp_path, database_url):
    env = gunicorn_env(tmp_path, DATABASE_URL=database_url)
    created = flask_keys(env, "create", "alice", "--tpm", "5000")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    settings = {
        "LM_STUDIO_URL": fake.url,
        "DATABASE_URL": database_url,
        "AUTH_CACHE_SECONDS": 0.5,
        "USAGE_FLUSH_SECONDS": 0.1,
    }
    with GatewayServer(settings, workers=2) as gateway:
        client = sdk(gateway, key)
        for _ in range(3):
            client.chat.completions.create(model=MODEL, messages=HELLO)
        stream = client.chat.completions.create(
            model=MODEL, messages=HELLO, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            usage = requests.get(
                f"{gateway.url}/v1/usage",
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            ).json()
            if usage["requests"] == 4:
                break
            time.sleep(0.2)
        assert usage["requests"] == 4
        assert usage["key"] == "alice"
        assert usage["requests"] == 4
        assert usage["total_tokens"] > 0
        table = flask_keys(env, "usage")
        assert table.returncode == 0, table.stderr
        row = next(line for line in table.stdout.splitlines() if "alice" in line)
        assert row.split()[1:3] == [MODEL, "4"]
        assert flask_keys(env, "revoke", "alice").returncode == 0
        time.sleep(1)  # the workers' key cache: AUTH_CACHE_SECONDS
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model=MODEL, messages=HELLO)
        assert refused.value.code == "api_key_revoked"
    assert len(records(database_url)) == 4  # the refused one is not a use


def test_postgresql_down_mid_load_fails_nothing_and_loses_nothing(fake, tmp_path):
    with PostgresServer() as postgres:
        env = gunicorn_env(tmp_path, DATABASE_URL=postgres.url)
        key = flask_keys(env, "create", "load").stdout.strip()
        settings = {
            "LM_STUDIO_URL": fake.url,
            "DATABASE_URL": postgres.url,
            "AUTH_CACHE_SECONDS": 0.2,  # refreshes fail while it is down
            "USAGE_FLUSH_SECONDS": 0.1,
        }
        statuses = []
        with GatewayServer(settings, workers=2) as gateway:
            client = sdk(gateway, key)

            def load(count: int) -> None:
                for _ in range(count):
                    raw = client.chat.completions.with_raw_response.create(
                        model=MODEL, messages=HELLO
                    )
                    statuses.append(raw.http_response.status_code)

            load(10)
            postgres.stop("immediate")
            load(30)  # the database is down
            postgres.start()
            load(10)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(records(postgres.url)) < 50:
                time.sleep(0.25)
            logs = gateway.logs()
        assert statuses == [200] * 50
        assert len(records(postgres.url)) == 50
        assert "usage records not written yet" in logs
        assert "written again after a database outage" in logs


def test_a_stopping_worker_writes_the_records_it_holds(fake, tmp_path):
    database = f"sqlite:///{tmp_path}/gateway.db"
    settings = {
        "LM_STUDIO_URL": fake.url,
        "DATABASE_URL": database,
        "USAGE_FLUSH_SECONDS": 60,  # nothing is written before the stop
    }
    with GatewayServer(settings) as gateway:
        for _ in range(3):
            response = requests.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": MODEL, "messages": HELLO},
                timeout=30,
            )
            assert response.status_code == 200
        assert records(database) == []
    assert len(records(database)) == 3  # written on SIGTERM

"""API keys end to end: gunicorn's start-up check, the CLI, the openai SDK."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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

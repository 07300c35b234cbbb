"""Gateway processes with their own settings: limits, hosts, shutdown, start-up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.servers import ROOT, GatewayServer, import_wsgi

HELLO = {"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]}


def test_rate_limit_accepts_exactly_n_per_window(fake):
    with GatewayServer(
        {"LM_STUDIO_URL": fake.url, "RATE_LIMIT_REQUESTS": 5}
    ) as gateway:
        statuses = [
            requests.post(
                f"{gateway.url}/llm/message", json=HELLO, timeout=10
            ).status_code
            for _ in range(8)
        ]
        assert statuses == [200] * 5 + [429] * 3
        limited = requests.post(f"{gateway.url}/llm/message", json=HELLO, timeout=10)
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        # Health stays reachable while the client is limited.
        assert requests.get(f"{gateway.url}/health", timeout=5).status_code == 200


def test_trusted_hosts(fake):
    settings = {"LM_STUDIO_URL": fake.url, "TRUSTED_HOSTS": '["gateway.example"]'}
    with GatewayServer(settings) as gateway:
        good = requests.get(
            f"{gateway.url}/", headers={"Host": "gateway.example"}, timeout=5
        )
        assert good.status_code == 200
        bad = requests.get(
            f"{gateway.url}/", headers={"Host": "evil.example"}, timeout=5
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "bad_request"
        assert bad.headers["X-Correlation-ID"] == bad.json()["correlation_id"]


def test_sigterm_lets_requests_in_flight_finish(fake):
    fake.first_token_delay = 1.5
    gateway = GatewayServer({"LM_STUDIO_URL": fake.url}).start()
    results: list[int] = []

    def call():
        response = requests.post(f"{gateway.url}/llm/message", json=HELLO, timeout=30)
        results.append(response.status_code)

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    assert fake.wait_for(
        lambda: sum(r.path == "/v1/chat/completions" for r in fake.requests) >= 5, 5
    )
    gateway.terminate()
    for thread in threads:
        thread.join(30)
    code = gateway.stop()
    assert results == [200] * 5
    assert code == 0


def test_bad_setting_stops_start_up_with_a_clear_message():
    env = {"LLM_SERVICE_LM_STUDIO_PORT": "abc", "LLM_SERVICE_ENV_FILE": "/dev/null"}
    result = import_wsgi({"PATH": "/usr/bin:/bin", **env}, timeout=30)
    assert result.returncode == 3
    assert "LLM_SERVICE_LM_STUDIO_PORT='abc' is invalid" in result.stderr
    assert "an integer from 1 to 65535" in result.stderr
    assert "Traceback" not in result.stderr


def test_gunicorn_refuses_to_start_on_a_bad_setting():
    gateway = GatewayServer({"LM_STUDIO_TIMEOUT": "-1"})
    with pytest.raises(RuntimeError, match="LLM_SERVICE_LM_STUDIO_TIMEOUT"):
        gateway.start(timeout=20)
    assert gateway.process.wait(20) != 0
    gateway.stop()


def test_dotenv_never_overrides_the_real_environment(tmp_path):
    env_file = tmp_path / "gateway.env"
    env_file.write_text(
        "LLM_SERVICE_LM_STUDIO_URL=http://from-dotenv:1\n"
        "LLM_SERVICE_RATE_LIMIT_REQUESTS=7\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "LLM_SERVICE_ENV_FILE": str(env_file),
        "LLM_SERVICE_LM_STUDIO_URL": "http://from-environment:2",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import wsgi; c = wsgi.app.config; "
            "print(c['LM_STUDIO_BASE_URL'], c['RATE_LIMIT_REQUESTS'])",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    # The real variable wins; what only .env sets is loaded.
    assert result.stdout.split() == ["http://from-environment:2", "7"]


def test_dotenv_is_loaded(tmp_path, fake):
    env_file = tmp_path / "gateway.env"
    env_file.write_text(f"LLM_SERVICE_LM_STUDIO_URL={fake.url}\n")
    gateway = GatewayServer({})
    gateway.env["LLM_SERVICE_ENV_FILE"] = str(env_file)
    with gateway:
        health = requests.get(f"{gateway.url}/health", timeout=5).json()
        assert health["lm_studio"]["url"] == fake.url
    time.sleep(0)  # nothing else to wait for


def test_api_token_never_reaches_the_process_output(fake):
    """Start-up, success, a refused connection and a refused token, at DEBUG:
    nothing gunicorn or the app prints carries the token."""
    token = "sk-lm-SECRET-7f3a"
    fake.api_token = token
    settings = {
        "LM_STUDIO_URL": fake.url,
        "LM_STUDIO_API_TOKEN": token,
        "LM_STUDIO_RETRIES": 0,
        "LOG_LEVEL": "DEBUG",
    }
    with GatewayServer(settings, log_level="debug") as gateway:
        url = f"{gateway.url}/llm/message"
        assert requests.post(url, json=HELLO, timeout=10).status_code == 200
        fake.api_token = "another-token"
        assert requests.post(url, json=HELLO, timeout=10).status_code == 502
        fake.refuse(drop_connections=True)
        try:
            assert requests.post(url, json=HELLO, timeout=10).status_code == 503
            assert requests.get(f"{gateway.url}/health", timeout=10).status_code == 503
        finally:
            fake.accept()
        logs = gateway.logs()
    assert "upstream call failed" in logs  # the failures were logged
    assert "SECRET" not in logs

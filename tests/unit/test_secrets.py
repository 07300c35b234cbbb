"""Credentials in URL-valued settings are never shown: responses, logs, CLI, errors."""

import json
import logging

import pytest
import requests

from llm_service import create_app
from llm_service.config import ConfigError, redact_url, secret_values
from tests.conftest import capture_logs

pytestmark = pytest.mark.mock_llm

SECRET_URL = "http://admin:pa55word@lmstudio.test:1234"
HOST = SECRET_URL  # what the mocked upstream sees
SHOWN = "http://***@lmstudio.test:1234"
REDIS_URL = "redis://:r3dis-pass@127.0.0.1:1/0"
SECRETS = ("pa55word", "admin:pa55word", "r3dis-pass")


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
def secret_app(app_factory):
    return app_factory(LM_STUDIO_URL=SECRET_URL)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (SECRET_URL, SHOWN),
        ("https://tok3n@h:8443/v1", "https://***@h:8443/v1"),
        ("http://h:1/?token=abc&mode=x", "http://h:1/?token=***&mode=***"),
        ("redis://:pw@r:6379/0", "redis://***@r:6379/0"),
        (
            "redis+sentinel://:pw@s1:26379,s2:26379/m",
            "redis+sentinel://***@s1:26379,s2:26379/m",
        ),
        ("admin:pw@h:1", "***@h:1"),
        ("http://a@b@h/x", "http://***@h/x"),
        ("http://[::1", "http://[::1"),
        ("http://h:1234", "http://h:1234"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_secret_values_cover_every_sensitive_setting():
    secrets = secret_values(
        {
            "LM_STUDIO_URL": "http://admin:pa%40ss@h?key=qwerty",
            "LM_STUDIO_API_TOKEN": "sk-123456",
            "RATE_LIMIT_STORAGE_URI": REDIS_URL,
            "LM_STUDIO_HOST": "not-a-secret",
        }
    )
    for expected in ("pa%40ss", "pa@ss", "qwerty", "sk-123456", "r3dis-pass"):
        assert expected in secrets
    assert "admin" not in secrets  # a user name before a password is not secret
    assert "not-a-secret" not in secrets


def test_health_json_hides_userinfo(secret_app, upstream):
    upstream.get(f"{HOST}/v1/models", json={"data": [{"id": "m"}]})
    upstream.get(f"{HOST}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(f"{HOST}/api/v0/models", json={"data": []})
    response = secret_app.test_client().get("/health")
    assert response.status_code == 200
    assert response.json["lm_studio"]["url"] == SHOWN
    assert_no_secret(response.get_data(as_text=True))


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_503_message_hides_userinfo(secret_app, upstream, path):
    upstream.get(f"{HOST}/v1/models", body=requests.ConnectionError("refused"))
    response = secret_app.test_client().get(path)
    assert response.status_code == 503
    assert SHOWN in response.json["error"]["message"]
    assert_no_secret(response.get_data(as_text=True))


def test_openapi_hides_userinfo(app_factory):
    app = app_factory(LM_STUDIO_URL=SECRET_URL, RATE_LIMIT_STORAGE_URI=REDIS_URL)
    text = app.test_client().get("/openapi.json").get_data(as_text=True)
    assert json.loads(text)["openapi"]
    assert_no_secret(text)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_logs_hide_secrets_at_every_level(app_factory, log_format):
    app_factory(
        LM_STUDIO_URL=SECRET_URL,
        RATE_LIMIT_STORAGE_URI=REDIS_URL,
        LM_STUDIO_API_TOKEN="sk-lm-T0KEN",
        LOG_FORMAT=log_format,
        LOG_LEVEL="DEBUG",
    )
    logger = logging.getLogger("llm_service.anything")
    with capture_logs() as handler:
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            logger.log(level, "upstream %s", SECRET_URL, extra={"store": REDIS_URL})
        try:
            raise ValueError(f"cannot reach {SECRET_URL} with sk-lm-T0KEN")
        except ValueError:
            logger.critical("start-up failed", exc_info=True)
        # Any URL a library prints, not only the configured ones.
        logger.warning("other: %s", "https://someone:hunter22@elsewhere/x")
    text = "\n".join(handler.lines)
    assert len(handler.lines) == 6
    assert_no_secret(text)
    assert "sk-lm-T0KEN" not in text
    assert "hunter22" not in text
    assert "ValueError: cannot reach http://***@lmstudio.test:1234" in text
    assert "lmstudio.test:1234" in text  # the host itself is still there


def test_limiter_logs_go_through_the_scrubbing_handler(app_factory):
    from llm_service.logs import _HANDLER_NAME

    app_factory(RATE_LIMIT_STORAGE_URI=REDIS_URL)
    handlers = logging.getLogger("flask-limiter").handlers
    (handler,) = [h for h in handlers if h.get_name() == _HANDLER_NAME]
    record = logging.LogRecord(
        "flask-limiter", logging.WARNING, "", 0, "store %s", (REDIS_URL,), None
    )
    line = handler.format(record)
    assert "redis://***@127.0.0.1:1/0" in line
    assert_no_secret(line)


@pytest.mark.parametrize("command", [["ping"], ["check"]])
def test_cli_output_hides_userinfo(secret_app, upstream, command):
    upstream.get(f"{HOST}/v1/models", body=requests.ConnectionError("refused"))
    result = secret_app.test_cli_runner().invoke(args=["lmstudio", *command])
    assert result.exit_code == 1
    assert SHOWN in result.output
    assert_no_secret(result.output)


def test_cli_success_hides_userinfo(secret_app, upstream):
    upstream.get(f"{HOST}/v1/models", json={"data": [{"id": "m"}]})
    upstream.get(f"{HOST}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(f"{HOST}/api/v0/models", json={"data": []})
    result = secret_app.test_cli_runner().invoke(args=["lmstudio", "ping"])
    assert result.exit_code == 0
    assert result.output.startswith(f"OK {SHOWN}")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LM_STUDIO_URL", "ftp://admin:pa55word@host"),
        ("LM_STUDIO_URL", "http://admin:pa55word@host:99999"),
        ("LM_STUDIO_URL", "http://admin:pa55word@[::1"),
        ("RATE_LIMIT_STORAGE_URI", "mongodb://u:r3dis-pass@host"),
    ],
)
def test_config_error_hides_userinfo(monkeypatch, name, value):
    monkeypatch.setenv(f"LLM_SERVICE_{name}", value)
    with pytest.raises(ConfigError) as info:
        create_app()
    message = str(info.value)
    assert f"LLM_SERVICE_{name}=" in message
    assert "***@" in message
    assert_no_secret(message)


def test_make_run_messages_hide_userinfo(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "run_gateway.py"
    spec = importlib.util.spec_from_file_location("run_gateway", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Not on this machine: nothing is started, and the script says so.
    assert module.start_local_backend("http://admin:pa55word@192.0.2.1:1234") is None
    output = capsys.readouterr().out
    assert "http://***@192.0.2.1:1234" in output
    assert_no_secret(output)

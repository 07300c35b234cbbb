"""Settings: defaults, layering, validation at start-up."""

import os

import pytest

from llm_service import config, create_app
from llm_service.config import (
    SETTINGS,
    ConfigError,
    check_not_self,
    unknown_variables,
)
from llm_service.config import instance_path as real_instance_path
from tests.servers import import_wsgi


def test_defaults():
    config = create_app().config
    assert config["LM_STUDIO_BASE_URL"] == "http://localhost:1234"
    assert config["LM_STUDIO_TIMEOUT"] == 30.0
    assert config["MAX_REQUEST_SIZE"] == 10000
    assert config["MAX_CONTENT_LENGTH"] == 10000
    assert config["RATE_LIMIT_REQUESTS"] == 100
    assert config["RATE_LIMIT_STORAGE_URI"] == "memory://"
    assert config["LOG_LEVEL"] == "INFO"
    assert config["LOG_FORMAT"] == "json"
    assert config["DEBUG"] is False
    assert config["ALLOWED_ORIGINS"] is None
    assert config["TRUSTED_HOSTS"] is None
    assert config["LM_STUDIO_API_TOKEN"] is None


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_HOST", "10.0.0.5")
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_PORT", "4321")
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_TIMEOUT", "12.5")
    monkeypatch.setenv("LLM_SERVICE_DEBUG", "false")
    monkeypatch.setenv("LLM_SERVICE_LOG_FORMAT", "text")
    monkeypatch.setenv("LLM_SERVICE_TRUSTED_HOSTS", '["api.example.com"]')
    monkeypatch.setenv("LLM_SERVICE_ALLOWED_ORIGINS", "https://a.com, https://b.com")
    config = create_app().config
    assert config["LM_STUDIO_BASE_URL"] == "http://10.0.0.5:4321"
    assert config["LM_STUDIO_TIMEOUT"] == 12.5
    assert config["LOG_FORMAT"] == "text"
    assert config["TRUSTED_HOSTS"] == ["api.example.com"]
    assert config["ALLOWED_ORIGINS"] == ["https://a.com", "https://b.com"]


def test_test_config_overrides_environment(monkeypatch):
    monkeypatch.setenv("LLM_SERVICE_RATE_LIMIT_REQUESTS", "5")
    assert create_app({"RATE_LIMIT_REQUESTS": 7}).config["RATE_LIMIT_REQUESTS"] == 7


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://gpu-box:1234", "http://gpu-box:1234"),
        ("http://gpu-box:1234/", "http://gpu-box:1234"),
        ("http://gpu-box:1234/v1", "http://gpu-box:1234"),
        ("https://llm.example.com/lmstudio/v1/", "https://llm.example.com/lmstudio"),
    ],
)
def test_url_overrides_host_and_port(monkeypatch, url, expected):
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_HOST", "ignored")
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_URL", url)
    assert create_app().config["LM_STUDIO_BASE_URL"] == expected


def test_ipv6_host():
    config = create_app({"LM_STUDIO_HOST": "::1"}).config
    assert config["LM_STUDIO_BASE_URL"] == "http://[::1]:1234"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LM_STUDIO_PORT", "abc", "an integer from 1 to 65535"),
        ("LM_STUDIO_PORT", "70000", "an integer from 1 to 65535"),
        ("LM_STUDIO_TIMEOUT", "-1", "a number of seconds > 0"),
        ("LM_STUDIO_TIMEOUT", "0", "a number of seconds > 0"),
        ("LM_STUDIO_TIMEOUT", "soon", "a number of seconds > 0"),
        ("MAX_REQUEST_SIZE", "0", "an integer >= 1"),
        ("RATE_LIMIT_REQUESTS", "true", "an integer >= 1"),
        ("ALLOWED_ORIGINS", '["https://a.com"', "a JSON list of strings"),
        ("TRUSTED_HOSTS", "[1, 2]", "a JSON list of strings"),
        ("LOG_LEVEL", "LOUD", "one of DEBUG, INFO"),
        ("LOG_FORMAT", "xml", "one of json, text"),
        ("DEBUG", "maybe", "true or false"),
        ("LM_STUDIO_URL", "localhost:1234", "an http:// or https:// URL"),
        ("LM_STUDIO_HOST", "http://x", "a host name or IP address"),
        ("RATE_LIMIT_STORAGE_URI", "mongodb://x", "a storage URI"),
        ("LM_STUDIO_RETRIES", "-1", "an integer from 0 to 10"),
        ("TRUSTED_PROXIES", "x", "an integer from 0 to 10"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(
    monkeypatch, name, value, expected
):
    monkeypatch.setenv(f"LLM_SERVICE_{name}", value)
    with pytest.raises(ConfigError) as info:
        create_app()
    message = str(info.value)
    assert f"LLM_SERVICE_{name}=" in message
    assert expected in message


def test_default_max_tokens_within_maximum():
    with pytest.raises(ConfigError, match="DEFAULT_MAX_TOKENS"):
        create_app({"DEFAULT_MAX_TOKENS": 100, "MAX_MAX_TOKENS": 50})


def test_every_setting_is_documented():
    """README's table and .env.example list every setting, so docs cannot drift."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    example = (root / ".env.example").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env_var}`" in readme, setting.env_var
        assert f"{setting.env_var}=" in example, setting.env_var


def test_an_unknown_variable_is_warned_with_the_closest_name():
    warnings = unknown_variables(["LLM_SERVICE_LM_STUDIO_PROT", "PATH"])
    assert warnings == [
        "LLM_SERVICE_LM_STUDIO_PROT is not a setting and is ignored: did you mean "
        "LLM_SERVICE_LM_STUDIO_PORT?"
    ]


def test_every_known_variable_passes_in_silence():
    names = [setting.env_var for setting in SETTINGS]
    names += ["LLM_SERVICE_ENV_FILE", "LLM_SERVICE_LOCAL_CACHE_DIR"]
    assert unknown_variables(names) == []


def test_wsgi_warns_about_a_typo():
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE_")},
        "LLM_SERVICE_ENV_FILE": os.devnull,
        "LLM_SERVICE_RATE_LIMIT_REQUEST": "5",
    }
    result = import_wsgi(env)
    assert result.returncode == 0, result.stderr
    assert "did you mean LLM_SERVICE_RATE_LIMIT_REQUESTS?" in result.stderr


@pytest.mark.parametrize(
    ("url", "bind"),
    [
        ("http://localhost:8000", "127.0.0.1:8000"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://localhost:8000", "0.0.0.0:8000"),
        ("http://[::1]:8000", "[::]:8000"),
    ],
)
def test_an_upstream_at_the_gateways_own_address_is_refused(url, bind):
    with pytest.raises(ConfigError, match="own address"):
        check_not_self(url, bind)


@pytest.mark.parametrize(
    ("url", "bind"),
    [
        ("http://localhost:1234", "127.0.0.1:8000"),
        ("http://192.0.2.1:8000", "0.0.0.0:8000"),
        ("http://localhost:8000", "unix:/tmp/gateway.sock"),
    ],
)
def test_other_upstreams_are_accepted(url, bind):
    check_not_self(url, bind)


@pytest.fixture
def instance(tmp_path, monkeypatch):
    """An instance folder of the test's own, for the app and the server alike."""
    monkeypatch.setattr(config, "instance_path", lambda: str(tmp_path))
    return tmp_path


def test_instance_path_is_where_flask_looks():
    from flask import Flask

    app = Flask("llm_service", instance_relative_config=True)
    # The function itself: the autouse instance_path fixture replaced the name.
    assert real_instance_path() == app.instance_path


def test_instance_config_reaches_app_and_server_settings(instance, monkeypatch):
    (instance / "config.py").write_text(
        "CLIENT_HEADER_TIMEOUT = 3\nLM_STUDIO_RETRY_BUDGET = 7\nLOG_FORMAT = 'text'\n"
    )
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_RETRY_BUDGET", "9")  # env wins
    server = config.server_settings()
    assert server["CLIENT_HEADER_TIMEOUT"] == 3.0
    assert server["LM_STUDIO_RETRY_BUDGET"] == 9.0
    app = create_app()
    assert app.config["LOG_FORMAT"] == "text"
    assert app.config["CLIENT_HEADER_TIMEOUT"] == 3.0


def test_env_file_reaches_server_settings(instance, tmp_path, monkeypatch):
    env_file = tmp_path / "service.env"
    env_file.write_text(
        "LLM_SERVICE_CLIENT_HEADER_TIMEOUT=4\nLLM_SERVICE_LM_STUDIO_RETRIES=5\n"
    )
    # Registered with monkeypatch so the values load_dotenv sets are undone.
    for name in ("CLIENT_HEADER_TIMEOUT", "LM_STUDIO_RETRIES", "ENV_FILE"):
        monkeypatch.setenv(f"LLM_SERVICE_{name}", "")
        monkeypatch.delenv(f"LLM_SERVICE_{name}")
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_RETRIES", "1")  # set: not overridden
    monkeypatch.setenv("LLM_SERVICE_ENV_FILE", str(env_file))
    config.load_env_file(tmp_path / "absent.env")
    server = config.server_settings()
    assert server["CLIENT_HEADER_TIMEOUT"] == 4.0
    assert server["LM_STUDIO_RETRIES"] == 1


def test_server_settings_are_checked(instance, monkeypatch):
    monkeypatch.setenv("LLM_SERVICE_CLIENT_HEADER_TIMEOUT", "0")
    with pytest.raises(ConfigError, match="LLM_SERVICE_CLIENT_HEADER_TIMEOUT"):
        config.server_settings()


def test_instance_config_sits_between_defaults_and_environment(
    instance_path, monkeypatch
):
    """instance/config.py overrides the defaults; the environment overrides it."""
    instance_path.mkdir()
    (instance_path / "config.py").write_text(
        "RATE_LIMIT_REQUESTS = 7\nLM_STUDIO_PORT = 4321\nLOG_FORMAT = 'text'\n"
    )
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_PORT", "5555")
    config = create_app().config
    assert config["RATE_LIMIT_REQUESTS"] == 7
    assert config["LOG_FORMAT"] == "text"
    assert config["LM_STUDIO_PORT"] == 5555


def test_instance_config_example_is_a_working_config(instance_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "instance" / "config.py.example"
    instance_path.mkdir()
    (instance_path / "config.py").write_text(
        example.read_text().replace(
            "RATE_LIMIT_REQUESTS = 100", "RATE_LIMIT_REQUESTS = 9"
        )
    )
    config = create_app().config
    assert config["RATE_LIMIT_REQUESTS"] == 9
    assert config["LM_STUDIO_BASE_URL"] == "http://localhost:1234"


def test_bad_instance_value_stops_start_up(instance_path):
    instance_path.mkdir()
    (instance_path / "config.py").write_text("LM_STUDIO_TIMEOUT = -3\n")
    with pytest.raises(ConfigError, match="LM_STUDIO_TIMEOUT"):
        create_app()


def test_retry_after_max_setting_reaches_the_client(app_factory, sleeps):
    """LLM_SERVICE_LM_STUDIO_RETRY_AFTER_MAX caps the wait, not just the client's
    own default."""
    import responses
    from responses.registries import OrderedRegistry

    from tests.conftest import UPSTREAM

    app = app_factory(LM_STUDIO_RETRY_AFTER_MAX=3, DEFAULT_MODEL="m")
    chat = f"{UPSTREAM}/v1/chat/completions"
    answer = {"model": "m", "choices": [{"message": {"content": "ok"}}]}
    with responses.RequestsMock(registry=OrderedRegistry) as ordered:
        ordered.post(chat, status=503, headers={"Retry-After": "3600"}, json={})
        ordered.post(chat, status=429, headers={"Retry-After": "2"}, json={})
        ordered.post(chat, json=answer)
        response = app.test_client().post(
            "/llm/message", json={"messages": [{"role": "user", "content": "q"}]}
        )
    assert response.status_code == 200
    assert sleeps == [3.0, 2.0]

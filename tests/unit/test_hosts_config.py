"""LLM_SERVICE_UPSTREAMS: parsing, validation naming the entry, secrets kept."""

import json

import pytest

from llm_service import create_app
from llm_service.config import ConfigError, secret_values
from llm_service.upstreams import get_upstream
from tests.conftest import TEST_CONFIG, capture_logs

HOSTS = [
    {"name": "gpu-a", "url": "http://admin:s3cret-pw@a.test:1234/v1/"},
    {"name": "gpu-b", "url": "http://b.test:1234", "api_token": "tok-b-123456"},
    {"name": "mini", "url": "https://c.test", "slots": 1, "weight": 0.5},
]


def build(**settings):
    return create_app({**TEST_CONFIG, "LM_STUDIO_URL": None, **settings})


def test_a_list_of_hosts_in_the_environment(monkeypatch):
    monkeypatch.setenv("LLM_SERVICE_UPSTREAMS", json.dumps(HOSTS))
    app = build()
    hosts = app.config["UPSTREAM_HOSTS"]
    assert [h["name"] for h in hosts] == ["gpu-a", "gpu-b", "mini"]
    assert hosts[0]["url"] == "http://admin:s3cret-pw@a.test:1234"
    assert hosts[1]["api_token"] == "tok-b-123456"
    assert hosts[2]["slots"] == 1
    assert hosts[2]["weight"] == 0.5
    assert hosts[0]["weight"] == 1.0
    with app.app_context():
        assert [h.name for h in get_upstream().hosts] == ["gpu-a", "gpu-b", "mini"]


def test_instance_config_may_list_the_hosts(instance_path):
    instance_path.mkdir()
    (instance_path / "config.py").write_text(f"UPSTREAMS = {HOSTS!r}\n")
    config = create_app().config
    assert len(config["UPSTREAM_HOSTS"]) == 3
    assert config["LM_STUDIO_BASE_URL"] == "http://admin:s3cret-pw@a.test:1234"


def test_the_single_host_settings_mean_a_list_of_one():
    hosts = create_app({**TEST_CONFIG, "LM_STUDIO_API_TOKEN": "tok-1234"}).config[
        "UPSTREAM_HOSTS"
    ]
    assert hosts == [
        {
            "name": "default",
            "url": TEST_CONFIG["LM_STUDIO_URL"],
            "api_token": "tok-1234",
            "slots": None,
            "weight": 1.0,
        }
    ]


@pytest.mark.parametrize(
    ("single", "value"),
    [
        ("LM_STUDIO_URL", "http://x:1"),
        ("LM_STUDIO_HOST", "x"),
        ("LM_STUDIO_PORT", "1234"),
        ("LM_STUDIO_API_TOKEN", "tok-1234"),
    ],
)
def test_setting_both_is_an_error_naming_both(monkeypatch, single, value):
    monkeypatch.setenv(f"LLM_SERVICE_{single}", value)
    monkeypatch.setenv("LLM_SERVICE_UPSTREAMS", json.dumps(HOSTS))
    with pytest.raises(ConfigError) as info:
        create_app()
    assert "LLM_SERVICE_UPSTREAMS" in str(info.value)
    assert f"LLM_SERVICE_{single}" in str(info.value)


@pytest.mark.parametrize(
    ("hosts", "named"),
    [
        ("not json", "JSON list"),
        ({"name": "a"}, "JSON list"),
        (["http://a:1"], "entry 1"),
        ([{"url": "http://a:1"}], "entry 1: name"),
        ([{"name": "a b", "url": "http://a:1"}], "entry 1: name"),
        ([{"name": "a"}], "entry 1 (a): url is missing"),
        ([{"name": "a", "url": "ftp://a"}], "entry 1 (a): url"),
        (
            [{"name": "a", "url": "http://a:1"}, {"name": "b", "url": "x"}],
            "entry 2 (b): url",
        ),
        ([{"name": "a", "url": "http://a:1", "slots": 0}], "entry 1 (a): slots"),
        ([{"name": "a", "url": "http://a:1", "slots": True}], "entry 1 (a): slots"),
        ([{"name": "a", "url": "http://a:1", "weight": -1}], "entry 1 (a): weight"),
        ([{"name": "a", "url": "http://a:1", "api_token": 5}], "(a): api_token"),
        ([{"name": "a", "url": "http://a:1", "token": "x"}], "unknown key 'token'"),
        (
            [{"name": "a", "url": "http://a:1"}, {"name": "a", "url": "http://b:1"}],
            "'a' is used twice",
        ),
    ],
)
def test_a_bad_entry_is_named(hosts, named):
    value = hosts if isinstance(hosts, str) else json.dumps(hosts)
    with pytest.raises(ConfigError, match="LLM_SERVICE_UPSTREAMS") as info:
        build(UPSTREAMS=value)
    assert named in str(info.value)


def test_a_bad_url_is_named_without_its_password():
    hosts = [{"name": "a", "url": "gopher://me:s3cret-pw@a", "api_token": "tok-xyz1"}]
    with pytest.raises(ConfigError) as info:
        build(UPSTREAMS=hosts)
    assert "s3cret-pw" not in str(info.value)
    assert "tok-xyz1" not in str(info.value)


def test_every_hosts_secrets_are_scrubbed():
    found = secret_values({"UPSTREAMS": HOSTS})
    assert {"admin:s3cret-pw", "s3cret-pw", "tok-b-123456"} <= set(found)
    # Before parsing too (the JSON text of the environment).
    assert "tok-b-123456" in secret_values({"UPSTREAMS": json.dumps(HOSTS)})


def test_logs_and_health_never_show_a_hosts_credentials(upstream):
    app = build(UPSTREAMS=HOSTS, DISCOVERY_INTERVAL_SECONDS=0)
    for url in ("http://admin:s3cret-pw@a.test:1234", "http://b.test:1234"):
        upstream.get(f"{url}/v1/models", json={"data": [{"id": "m"}]})
        upstream.get(f"{url}/lmstudio-greeting", status=404)
        upstream.get(f"{url}/props", status=404)
    upstream.get("https://c.test/v1/models", status=500)
    with capture_logs() as logs:
        app.logger.warning("leaking %s and %s", HOSTS[0]["url"], "tok-b-123456")
        body = app.test_client().get("/health").get_data(as_text=True)
    for secret in ("s3cret-pw", "tok-b-123456"):
        assert secret not in body
        assert not any(secret in line for line in logs.lines)
    hosts = json.loads(body)["hosts"]
    assert [h["url"] for h in hosts] == [
        "http://***@a.test:1234",
        "http://b.test:1234",
        "https://c.test",
    ]
    assert [h["status"] for h in hosts] == ["up", "up", "down"]

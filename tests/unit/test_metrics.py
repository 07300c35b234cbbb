"""Metrics: what each request and upstream call adds, bounded labels, /metrics.

The app runs in-process against the fake LM Studio over a real socket; values
are read from prometheus_client's registry (one process here), as deltas.
"""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from llm_service import metrics
from llm_service.config import ConfigError
from llm_service.window import SLOT_SECONDS, Window
from tests.fakes.lmstudio import FakeLMStudio

CHAT = {"model": "loaded-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def fake():
    with FakeLMStudio(models=["loaded-model"], loaded=["loaded-model"]) as server:
        yield server


@pytest.fixture
def gateway(app_factory, fake):
    fake.clear_faults()
    app = app_factory(LM_STUDIO_URL=fake.url, LM_STUDIO_RETRY_AFTER_MAX=0)
    return app


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metrics.PREFIX + name, labels) or 0.0


def host_of(app) -> str:
    return app.extensions[metrics.EXTENSION].host


def test_a_keyed_callers_tokens_count_under_its_keys_name(app_factory, fake, tmp_path):
    """tokens_total's ``key`` label is the API key's name (README, Monitoring)."""
    from tests.unit.test_auth import bearer, create_key

    app = app_factory(
        LM_STUDIO_URL=fake.url, DATABASE_URL=f"sqlite:///{tmp_path}/keys.db"
    )
    key = create_key(app)  # named "alice"
    client = app.test_client()
    client.get("/health")  # the probe lists the models: their names become labels
    labels = {"model": "loaded-model", "direction": "prompt"}
    alice, anonymous = (
        value("tokens_total", **labels, key="alice"),
        value("tokens_total", **labels, key="anonymous"),
    )
    answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert answer.status_code == 200
    prompt = answer.get_json()["usage"]["prompt_tokens"]
    assert value("tokens_total", **labels, key="alice") == alice + prompt
    assert value("tokens_total", **labels, key="anonymous") == anonymous


def test_requests_are_counted_by_route_template_and_status_class(gateway):
    client = gateway.test_client()
    before = value(
        "requests_total", route="/docs/<name>", method="GET", status_class="4xx"
    )
    unmatched = value(
        "requests_total", route="unmatched", method="GET", status_class="4xx"
    )
    client.get("/docs/not-an-asset")
    client.get("/no/such/path/12345")
    client.get("/another/raw/path")
    assert (
        value("requests_total", route="/docs/<name>", method="GET", status_class="4xx")
        == before + 1
    )
    # Raw paths never become labels: every unmatched one is one series.
    assert (
        value("requests_total", route="unmatched", method="GET", status_class="4xx")
        == unmatched + 2
    )
    assert "/no/such/path/12345" not in client.get("/metrics").get_data(as_text=True)


def test_a_generation_feeds_the_upstream_and_token_metrics(gateway, fake):
    client = gateway.test_client()
    client.get("/health")  # the probe lists the models: their names become labels
    host = host_of(gateway)
    labels = {"host": host, "model": "loaded-model", "stream": "false"}
    calls = value("upstream_request_duration_seconds_count", **labels)
    prompt = value(
        "tokens_total", model="loaded-model", direction="prompt", key="anonymous"
    )
    overhead = value("gateway_overhead_seconds_count", route="/v1/chat/completions")
    in_flight = value("requests_in_flight")
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 200
    usage = answer.get_json()["usage"]
    assert value("upstream_request_duration_seconds_count", **labels) == calls + 1
    assert (
        value("tokens_total", model="loaded-model", direction="prompt", key="anonymous")
        == prompt + usage["prompt_tokens"]
    )
    assert (
        value("gateway_overhead_seconds_count", route="/v1/chat/completions")
        == overhead + 1
    )
    assert value("upstream_in_flight", host=host) == 0
    assert value("requests_in_flight") == in_flight


def test_overhead_leaves_out_the_time_spent_waiting_for_the_upstream(gateway, fake):
    client = gateway.test_client()
    route = "/v1/chat/completions"
    total = value("request_duration_seconds_sum", route=route)
    overhead = value("gateway_overhead_seconds_sum", route=route)
    fake.fault("stall", times=1, seconds=0.4)
    assert client.post(route, json=CHAT).status_code == 200
    assert value("request_duration_seconds_sum", route=route) - total >= 0.4
    assert value("gateway_overhead_seconds_sum", route=route) - overhead < 0.2


def test_a_stream_records_its_time_to_first_token(gateway, fake):
    client = gateway.test_client()
    client.get("/health")
    host = host_of(gateway)
    before = value(
        "upstream_time_to_first_token_seconds_count", host=host, model="loaded-model"
    )
    slow = value(
        "upstream_time_to_first_token_seconds_bucket",
        host=host,
        model="loaded-model",
        le="0.25",
    )
    fake.first_token_delay = 0.3
    try:
        answer = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert b"[DONE]" in answer.get_data()
        answer.close()
    finally:
        fake.first_token_delay = 0.0
    labels = {"host": host, "model": "loaded-model"}
    assert value("upstream_time_to_first_token_seconds_count", **labels) == before + 1
    # 0.3 s to the first token: not in the 0.25 s bucket.
    assert (
        value("upstream_time_to_first_token_seconds_bucket", le="0.25", **labels)
        == slow
    )


def test_a_stream_is_counted_once_when_its_last_byte_is_sent(gateway, fake):
    """Flask tears a streamed request down twice: it must count once, at the end."""
    client = gateway.test_client()
    route = "/v1/chat/completions"
    ok = {"route": route, "method": "POST", "status_class": "2xx"}
    before = value("requests_total", **ok)
    overhead = value("gateway_overhead_seconds_count", route=route)
    in_flight = value("requests_in_flight")
    fake.stream_interval = 0.05
    try:
        answer = client.post(route, json={**CHAT, "stream": True}, buffered=False)
        # Headers sent, the stream going on.
        assert value("requests_in_flight") == in_flight + 1
        assert value("requests_total", **ok) == before
        assert b"[DONE]" in answer.get_data()
        answer.close()
    finally:
        fake.stream_interval = 0.0
    assert value("requests_total", **ok) == before + 1
    assert value("gateway_overhead_seconds_count", route=route) == overhead + 1
    assert value("requests_in_flight") == in_flight
    # The stream's time counts as the request's duration, not as overhead.
    assert value("request_duration_seconds_sum", route=route) > 0


def test_model_names_a_caller_invents_collapse_to_other(gateway, fake):
    client = gateway.test_client()
    client.get("/health")
    names = [f"made-up-{n}" for n in range(3)]
    for name in names:
        client.post("/v1/chat/completions", json={**CHAT, "model": name})
    text = client.get("/metrics").get_data(as_text=True)
    assert not any(name in text for name in names)
    assert 'model="other"' in text


def test_retries_and_upstream_errors_are_counted_by_cause(gateway, fake):
    client = gateway.test_client()
    host = host_of(gateway)
    retries = value("upstream_retries_total", host=host)
    busy = value("upstream_errors_total", host=host, cause="busy")
    fake.fault("status", times=1, status=503)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert value("upstream_retries_total", host=host) == retries + 1
    assert value("upstream_errors_total", host=host, cause="busy") == busy + 1


def test_a_refused_connection_is_an_error_of_its_cause(app_factory):
    app = app_factory(LM_STUDIO_URL="http://127.0.0.1:9", LM_STUDIO_RETRIES=0)
    host = host_of(app)
    before = value("upstream_errors_total", host=host, cause="refused")
    answer = app.test_client().post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 503
    assert value("upstream_errors_total", host=host, cause="refused") == before + 1
    assert value("upstream_in_flight", host=host) == 0


def test_limit_rejections_are_counted(app_factory, fake):
    app = app_factory(LM_STUDIO_URL=fake.url, RATE_LIMIT_REQUESTS=1)
    client = app.test_client()
    before = value("limit_rejections_total", kind="rate_limited")
    client.post("/v1/chat/completions", json=CHAT)
    refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429
    assert value("limit_rejections_total", kind="rate_limited") == before + 1
    # Monitoring is never limited.
    assert client.get("/metrics").status_code == 200
    assert client.get("/status").status_code == 200


def test_metrics_answers_in_prometheus_text_format(gateway):
    answer = gateway.test_client().get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = answer.get_data(as_text=True)
    assert "# TYPE llm_service_gateway_overhead_seconds histogram" in text
    assert f'llm_service_upstream_up{{host="{host_of(gateway)}"}} 1.0' in text


def test_metrics_can_be_turned_off(app_factory, fake):
    app = app_factory(LM_STUDIO_URL=fake.url, METRICS=False)
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    page = client.get("/status")
    assert page.status_code == 200
    assert b"Metrics are off" in page.data


def test_with_a_metrics_address_the_main_one_serves_no_monitoring(app_factory, fake):
    app = app_factory(LM_STUDIO_URL=fake.url, METRICS_BIND="127.0.0.1:9464")
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    assert client.get("/status").status_code == 404
    assert client.get("/health/live").status_code == 200


@pytest.mark.parametrize(
    "bind", ["0.0.0.0:9464", "10.0.0.1:9464", "example.com:9464", "127.0.0.1", ":x"]
)
def test_the_metrics_address_must_be_loopback(app_factory, bind):
    with pytest.raises(ConfigError, match="LLM_SERVICE_METRICS_BIND"):
        app_factory(METRICS_BIND=bind)


@pytest.mark.parametrize("bind", ["127.0.0.1:9464", "[::1]:9464", "localhost:9464"])
def test_loopback_metrics_addresses_are_accepted(app_factory, bind):
    assert app_factory(METRICS_BIND=bind).config["METRICS_BIND"] == bind


def test_metrics_are_created_on_first_use():
    depth = metrics.metric("queue_depth")
    assert depth is metrics.metric("queue_depth")
    depth.labels(host="a").inc()
    assert value("queue_depth", host="a") == 1
    depth.labels(host="a").dec()


def test_every_metric_in_the_readme(app):
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name in metrics.SPECS:
        assert f"llm_service_{name}" in readme, name


def test_the_window_sums_recent_slots_only():
    window = Window()
    now = 1_000_000.0
    window.record(0.1, error=False, now=now - 400)  # outside 5 minutes
    window.record(0.2, error=False, now=now - 100)
    window.record(2.0, error=True, now=now - 5)
    window.record(0.02, error=False, now=now)
    last_minute = window.summary(60, now)
    assert (last_minute.requests, last_minute.errors) == (2, 1)
    five = window.summary(300, now)
    assert five.requests == 3
    assert five.latency_p50 is not None
    assert 0.1 < five.latency_p50 <= 0.25
    assert 1.0 < five.latency_p95 <= 2.5
    assert five.rate == pytest.approx(3 / five.seconds)
    # A slot reused a lap later starts from zero.
    window.record(0.02, error=False, now=now + 31 * SLOT_SECONDS)
    assert window.summary(SLOT_SECONDS, now + 31 * SLOT_SECONDS).requests == 1


def test_a_request_counts_in_the_first_bucket_its_time_fits():
    from llm_service import window as window_module

    window = Window()
    now = 1_000_000.0
    for seconds in (0.005, 0.0051, 120, 121):
        window.record(seconds, error=False, now=now)
    offset = (int(now // SLOT_SECONDS) % window_module.SLOTS) * window_module._SLOT.size
    slot = window_module._SLOT.unpack_from(window._buffer, offset)
    buckets = slot[4:]
    assert (buckets[0], buckets[1], buckets[-2], buckets[-1]) == (1, 1, 1, 1)
    assert sum(buckets) == 4
    assert slot[1:4] == (4, 0, 0.005 + 0.0051 + 120 + 121)


def test_workers_windows_are_summed(tmp_path, monkeypatch):
    """Each process writes a file of its own; a summary reads them all."""
    first, second = Window(str(tmp_path)), Window(str(tmp_path))
    first.record(0.1, error=False, now=1000.0)
    monkeypatch.setattr("llm_service.window.process_id", lambda: 12345)
    second.record(0.1, error=True, now=1001.0)
    assert "window-12345.bin" in {p.name for p in tmp_path.iterdir()}
    summary = first.summary(60, 1002.0)
    assert (summary.requests, summary.errors) == (2, 1)


# -- hosts, the queue, keys and usage records --------------------------------


def test_a_scrape_sets_each_hosts_slots_and_circuit(app_factory, fake):
    app = app_factory(LM_STUDIO_URL=fake.url, UPSTREAM_SLOTS=3)
    app.test_client().get("/metrics")
    host = host_of(app)
    assert value("upstream_slots", host=host) == 3
    assert value("upstream_up", host=host) == 1
    assert value("upstream_circuit_state", host=host, state="closed") == 1
    assert value("upstream_circuit_state", host=host, state="open") == 0


def test_waiting_requests_feed_the_queue_depth_and_wait(app_factory, fake):
    from llm_service.upstreams import EXTENSION as UPSTREAM

    app = app_factory(LM_STUDIO_URL=fake.url, UPSTREAM_SLOTS=1)
    upstream = app.extensions[UPSTREAM]
    (entry,) = upstream.hosts
    host = host_of(app)
    waits = value("queue_wait_seconds_count", host=host)
    running = upstream.admission.enter(entry.slot_key, "first")
    waiting = upstream.admission.enter(entry.slot_key, "second")
    assert not waiting.admitted
    assert value("queue_depth", host=host) == 1
    running.release()
    assert waiting.wait(5)
    assert value("queue_depth", host=host) == 0
    assert value("queue_wait_seconds_count", host=host) == waits + 2
    waiting.release()


def test_a_request_moved_to_another_host_counts_a_failover(app_factory):
    import json

    with (
        FakeLMStudio(models=["loaded-model"], loaded=["loaded-model"]) as broken,
        FakeLMStudio(models=["loaded-model"], loaded=["loaded-model"]) as spare,
    ):
        broken.fault("status", status=503, path="/v1/chat/completions")
        # Equal hosts are tried in a random order weighted by their weight: the
        # broken one goes first but about once in 10,000.
        hosts = [
            {"name": "broken", "url": broken.url, "weight": 100},
            {"name": "here", "url": spare.url, "weight": 0.01},
        ]
        app = app_factory(
            UPSTREAMS=json.dumps(hosts),
            LM_STUDIO_URL=None,
            DISCOVERY_INTERVAL_SECONDS=0,
            LM_STUDIO_RETRY_AFTER_MAX=0,
        )
        label = metrics.host_label(broken.url)
        before = value("upstream_failovers_total", host=label)
        answer = app.test_client().post(
            "/v1/chat/completions",
            json={
                "model": "loaded-model",
                # A conversation no host has seen: no affinity, the first host.
                "messages": [{"role": "user", "content": f"new {time.time_ns()}"}],
            },
        )
    assert answer.status_code == 200
    assert answer.headers["X-Upstream-Host"] == "here"
    assert value("upstream_failovers_total", host=label) == before + 1


def test_failed_authentications_and_quota_refusals_are_counted(
    app_factory, fake, tmp_path
):
    app = app_factory(
        LM_STUDIO_URL=fake.url, DATABASE_URL=f"sqlite:///{tmp_path}/keys.db"
    )
    runner = app.test_cli_runner()
    result = runner.invoke(args=["keys", "create", "alice", "--rpm", "1"])
    key = result.stdout.splitlines()[0]
    client = app.test_client()
    invalid = value("auth_failures_total", kind="invalid_api_key")
    refused = value("limit_rejections_total", kind="rate_limited")
    assert client.get("/v1/models", headers={"x-api-key": "sk-nope"}).status_code == 401
    assert value("auth_failures_total", kind="invalid_api_key") == invalid + 1
    body = {"model": "loaded-model", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    first = client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == 200
    answer = client.post("/v1/chat/completions", json=body, headers=headers)
    assert answer.status_code == 429
    assert value("limit_rejections_total", kind="rate_limited") == refused + 1


def test_the_usage_buffer_feeds_its_depth_and_drops(app_factory, fake, tmp_path):
    from llm_service import db
    from llm_service.usage import EXTENSION as USAGE

    app = app_factory(
        LM_STUDIO_URL=fake.url,
        DATABASE_URL=f"sqlite:///{tmp_path}/usage.db",
        USAGE_BUFFER_SIZE=1,
        USAGE_FLUSH_SECONDS=30,
    )
    usage_log = app.extensions[USAGE]
    dropped = value("usage_records_dropped_total")
    with app.app_context():
        engine = db.engine()
        record = {"id": "x" * 32}
        usage_log.put(record, engine)
        assert value("usage_buffer_depth") == 1
        usage_log.put(dict(record, id="y" * 32), engine)  # the buffer is full
    usage_log.stop()
    assert value("usage_records_dropped_total") == dropped + 1


def test_a_child_is_made_once_and_is_the_labelled_metric():
    depth = metrics.child("queue_depth", "child-host")
    assert depth is metrics.child("queue_depth", "child-host")
    assert depth is metrics.metric("queue_depth").labels(host="child-host")
    tokens = metrics.child("tokens_total", "m", "prompt", "k")
    assert tokens is metrics.metric("tokens_total").labels(
        model="m", direction="prompt", key="k"
    )

"""Monitoring under real gunicorn: the separate metrics address, trace context."""

from __future__ import annotations

import json

import requests

from tests.servers import GatewayServer, free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_metrics_address_serves_monitoring_and_only_it(fake):
    metrics_port = free_port()
    settings = {"LM_STUDIO_URL": fake.url, "METRICS_BIND": f"127.0.0.1:{metrics_port}"}
    with GatewayServer(settings, workers=2) as gateway:
        side = f"http://127.0.0.1:{metrics_port}"
        assert requests.get(f"{side}/metrics", timeout=5).status_code == 200
        assert requests.get(f"{side}/status", timeout=5).status_code == 200
        assert requests.get(f"{side}/status/style.css", timeout=5).status_code == 200
        # The API is not on the metrics address...
        assert requests.get(f"{side}/health/live", timeout=5).status_code == 404
        assert (
            requests.post(
                f"{side}/v1/chat/completions", json=CHAT, timeout=5
            ).status_code
            == 404
        )
        # ...and monitoring is no longer on the main one.
        assert requests.get(f"{gateway.url}/metrics", timeout=5).status_code == 404
        assert requests.get(f"{gateway.url}/status", timeout=5).status_code == 404
        assert requests.get(f"{gateway.url}/health/live", timeout=5).status_code == 200
        text = requests.get(f"{side}/metrics", timeout=5).text
        assert 'route="/health/live"' in text


def test_the_trace_reaches_the_upstream_and_the_logs(fake, gateway):
    parent = f"00-{TRACE}-00f067aa0ba902b7-01"
    answer = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json=CHAT,
        headers={"traceparent": parent, "X-Correlation-ID": "trace-test-1"},
        timeout=10,
    )
    assert answer.status_code == 200
    sent = fake.requests[-1].headers["traceparent"]
    assert sent.split("-")[1] == TRACE
    records = [
        json.loads(line)
        for line in gateway.logs().splitlines()
        if line.startswith("{") and "trace-test-1" in line
    ]
    assert records
    assert all(record["trace_id"] == TRACE for record in records)

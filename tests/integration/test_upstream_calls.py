"""Upstream calls under hostile upstreams: wall-clock budgets, cancellation,
answers that are not the API, and upstream text that must not leak."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from tests.integration.conftest import FAST_FAILURE
from tests.servers import GatewayServer

HELLO = {
    "model": "fake-model-1",
    "messages": [{"role": "user", "content": "Hello there"}],
}
TOKEN = "sk-live-5ecret-token-1234567890"
PROMPT = "my private prompt about the merger"


@pytest.fixture(scope="module")
def tight(fake):
    """A gateway with a short budget: per-read timeout 2 s, whole call 3 s."""
    settings = {
        **FAST_FAILURE,
        "LM_STUDIO_URL": fake.url,
        "LM_STUDIO_TIMEOUT": 2,
        "LM_STUDIO_RETRY_BUDGET": 3,
        "STREAM_FIRST_TOKEN_TIMEOUT": 6,
    }
    with GatewayServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def patient(fake):
    """A gateway that would wait 30 s for an answer."""
    settings = {
        **FAST_FAILURE,
        "LM_STUDIO_URL": fake.url,
        "LM_STUDIO_TIMEOUT": 30,
        "LM_STUDIO_RETRY_BUDGET": 30,
    }
    with GatewayServer(settings) as server:
        yield server


# -- item 4: the retry budget caps the whole call, however slow the drip ------


@pytest.mark.parametrize("part", ["headers", "body"])
@pytest.mark.parametrize("path", ["/llm/message", "/v1/chat/completions"])
def test_drip_upstream_is_cut_at_the_budget(tight, fake, part, path):
    # One byte every 0.3 s: no single read waits the 2 s read timeout, but the
    # whole answer would take 30-50 s.
    fake.fault("drip", interval=0.3, part=part)
    started = time.monotonic()
    response = requests.post(f"{tight.url}{path}", json=HELLO, timeout=20)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    body = response.json()
    code = body["error"]["code"]
    assert code == "upstream_timeout"
    assert elapsed < 3 + 2, f"answered after {elapsed:.1f} s with a 3 s budget"
    # The upstream saw its connection closed: it can stop working.
    record = fake.requests[-1]
    assert fake.wait_for(lambda: _connection(fake, record).closed_at, timeout=2)


def test_stream_headers_may_wait_the_first_token_timeout(tight, fake):
    """A server that sends its headers with the first token is not cut at the
    retry budget (3 s) but at STREAM_FIRST_TOKEN_TIMEOUT (6 s), from the send."""
    fake.fault("stall", times=1, seconds=4)
    started = time.monotonic()
    with requests.post(
        f"{tight.url}/llm/message",
        json={**HELLO, "stream": True},
        stream=True,
        timeout=20,
    ) as response:
        text = response.content.decode()
    assert response.status_code == 200, text
    assert "event: done" in text
    assert time.monotonic() - started >= 4


def test_stream_first_token_timeout_runs_from_the_send(tight, fake):
    fake.fault("drip", interval=0.5, part="headers")
    started = time.monotonic()
    response = requests.post(
        f"{tight.url}/v1/chat/completions",
        json={**HELLO, "stream": True},
        timeout=20,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_first_token_timeout"
    assert 6 <= elapsed < 6 + 2.5


# -- issue 10 item 4: non-streamed calls are cancelled upstream ----------------


def _connection(fake, record):
    return next(c for c in fake.connections if c.id == record.connection_id)


def _raw_post(gateway, path, body):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


@pytest.mark.parametrize("path", ["/llm/message", "/v1/chat/completions"])
def test_client_hangup_closes_the_upstream_connection(patient, fake, path):
    fake.first_token_delay = 8  # a long generation, answered in one piece
    sock = _raw_post(patient, path, HELLO)
    assert fake.wait_for(lambda: fake.requests, timeout=5)
    record = fake.requests[-1]
    time.sleep(0.2)  # the gateway is now blocked reading the upstream
    sock.close()
    hung_up = time.monotonic()
    closed = fake.wait_for(lambda: _connection(fake, record).closed_at, timeout=6)
    assert closed, "the upstream connection stayed open after the client left"
    delay = closed - hung_up
    assert record.client_disconnected
    # The fake polls every 50 ms; generous for a loaded machine, far below 8 s.
    assert delay < 1.0, f"the upstream connection closed {delay * 1000:.0f} ms late"


def test_gateway_giving_up_closes_the_upstream_connection(tight, fake):
    fake.first_token_delay = 10
    started = time.monotonic()
    response = requests.post(f"{tight.url}/llm/message", json=HELLO, timeout=20)
    assert response.status_code == 504
    record = fake.requests[-1]
    closed = fake.wait_for(lambda: _connection(fake, record).closed_at, timeout=5)
    assert closed
    assert closed - started < 3 + 1.5


def test_answers_keep_their_usage_and_v1_bodies_stay_verbatim(gateway, fake):
    message = requests.post(f"{gateway.url}/llm/message", json=HELLO, timeout=10)
    assert message.json()["usage"]["total"] > 0
    relayed = requests.post(
        f"{gateway.url}/v1/chat/completions", json=HELLO, timeout=10
    ).json()
    assert relayed["object"] == "chat.completion"
    assert relayed["choices"][0]["logprobs"] is None  # as the upstream sent it
    assert relayed["system_fingerprint"] == "fake-model-1"


# -- item 7 / 16: answers that are not JSON objects ----------------------------


@pytest.mark.parametrize("answer", ["5", "true", '"a string"', "[1, 2]", "null"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/llm/message", HELLO),
        ("POST", "/v1/chat/completions", HELLO),
        ("POST", "/v1/embeddings", {"input": "x"}),
        ("GET", "/v1/models", None),
    ],
)
def test_non_object_json_is_a_502(gateway, fake, answer, method, path, body):
    fake.fault(
        "malformed",
        times=1,
        path=path if path.startswith("/v1") else None,
        body=answer,
        content_type="application/json",
    )
    response = requests.request(method, f"{gateway.url}{path}", json=body, timeout=10)
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    code = body["error"]["code"]
    assert code == "upstream_invalid_response"
    assert "internal error" not in response.text.lower()


# -- item 9: upstream text that quotes the request -----------------------------


@pytest.fixture(scope="module")
def secret_gateway():
    from tests.fakes.lmstudio import FakeLMStudio

    with FakeLMStudio(api_token=TOKEN) as fake:
        settings = {
            **FAST_FAILURE,
            "LM_STUDIO_URL": fake.url,
            "LM_STUDIO_API_TOKEN": TOKEN,
            "LM_STUDIO_RETRY_BUDGET": 5,
        }
        with GatewayServer(settings) as server:
            yield server, fake


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("path", ["/llm/message", "/v1/chat/completions"])
def test_echoing_upstream_leaks_no_token_and_logs_no_prompt(
    secret_gateway, status, path
):
    gateway, fake = secret_gateway
    fake.clear_faults()
    fake.fault("echo", status=status)
    long_prompt = PROMPT + " padding" * 200
    body = {**HELLO, "messages": [{"role": "user", "content": long_prompt}]}
    response = requests.post(f"{gateway.url}{path}", json=body, timeout=15)
    fake.clear_faults()
    assert response.status_code in (400, 502)
    assert TOKEN not in response.text
    assert TOKEN[-12:] not in response.text
    error = response.json()["error"]
    assert len(error["message"]) <= 500
    logs = gateway.logs()
    assert TOKEN[-12:] not in logs
    assert PROMPT not in logs
    assert "Invalid request, you sent" not in logs


def test_health_shows_no_echoed_token(secret_gateway):
    gateway, fake = secret_gateway
    fake.clear_faults()
    fake.fault("echo", path="/v1/models", status=403)
    response = requests.get(f"{gateway.url}/health", timeout=10)
    fake.clear_faults()
    assert response.status_code == 503
    assert TOKEN[-12:] not in response.text
    assert TOKEN[-12:] not in gateway.logs()

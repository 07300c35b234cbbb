"""The real gateway (gunicorn) in front of the fake LM Studio over real sockets."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

HELLO = {
    "model": "fake-model-1",
    "messages": [{"role": "user", "content": "Hello there"}],
}


def send(gateway, body=HELLO, **kwargs):
    return requests.post(f"{gateway.url}/llm/message", json=body, timeout=30, **kwargs)


def test_happy_path(gateway, fake):
    response = send(gateway, headers={"X-Correlation-ID": "it-1"})
    assert response.status_code == 200
    body = response.json()
    assert body["response"] == "Echo: Hello there"
    assert body["model"] == "fake-model-1"
    assert body["tokens_used"] == body["usage"]["total"] > 0
    assert body["correlation_id"] == "it-1"
    # The correlation ID travelled upstream.
    chat = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert chat[-1].headers["x-correlation-id"] == "it-1"


def test_index_health_live_ready(gateway, fake):
    assert requests.get(gateway.url, timeout=5).json()["service"] == "llm-service"
    health = requests.get(f"{gateway.url}/health", timeout=5)
    assert health.status_code == 200
    assert health.json()["lm_studio"]["loaded_models"] == ["fake-model-1"]
    assert requests.get(f"{gateway.url}/health/live", timeout=5).status_code == 200
    ready = requests.get(f"{gateway.url}/health/ready", timeout=5)
    assert ready.json()["models"] == ["fake-model-1"]


def test_model_omitted_uses_loaded_model(gateway, fake):
    response = send(gateway, {"messages": HELLO["messages"]})
    assert response.status_code == 200
    chat = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert chat[-1].json["model"] == "fake-model-1"


def test_unknown_model_is_404(gateway, fake):
    fake.models = ["a", "b"]
    fake.loaded = ["a"]
    response = send(gateway, {**HELLO, "model": "missing"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_no_model_loaded_is_503(gateway, fake):
    fake.loaded = []
    response = send(gateway)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_model_loaded"


def test_refused_is_503_and_recovers(gateway, fake):
    fake.refuse(drop_connections=True)
    try:
        response = send(gateway)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "upstream_unavailable"
        assert response.headers["Retry-After"] == "5"
        assert requests.get(f"{gateway.url}/health", timeout=5).status_code == 503
    finally:
        fake.accept()
    assert send(gateway).status_code == 200


def test_stall_is_504_within_the_timeout(gateway, fake):
    fake.fault("stall", times=1, seconds=30, path="/v1/chat")
    started = time.monotonic()
    response = send(gateway)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert elapsed < 5  # LM_STUDIO_TIMEOUT=2, no retry of a read timeout


def test_500_is_retried_then_502(gateway, fake):
    fake.fault("status", status=500, body={"error": "boom"}, path="/v1/chat")
    response = send(gateway)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    chat = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert len(chat) == 3  # the first attempt and two retries


def test_transient_503_is_retried_to_success(gateway, fake):
    fake.fault(
        "status", times=1, status=503, headers={"Retry-After": "1"}, path="/v1/chat"
    )
    started = time.monotonic()
    response = send(gateway)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.9  # waited as the upstream asked


def test_malformed_json_is_502(gateway, fake):
    fake.fault("malformed", times=1, path="/v1/chat")
    response = send(gateway)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_invalid_response"


def test_200_with_error_is_not_success(gateway, fake):
    fake.fault("error200", times=1, error="Something broke", path="/v1/chat")
    response = send(gateway)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


def test_reset_connection_is_retried(gateway, fake):
    fake.fault("reset", times=1, path="/v1/chat")
    assert send(gateway).status_code == 200


def test_stale_keep_alive_connection_is_survived(gateway, fake):
    """LM Studio closes idle keep-alive sockets after 5 s; reuse must not fail."""
    fake.idle_timeout = 0.3
    # Drop the gateway's pooled sockets so the next ones get the short timeout.
    fake.refuse(drop_connections=True)
    fake.accept()
    time.sleep(0.1)
    assert send(gateway).status_code == 200
    time.sleep(0.8)  # the pooled socket is closed by the upstream meanwhile
    assert send(gateway).status_code == 200
    closed = [c for c in fake.connections if c.closed_by == "idle_timeout"]
    assert closed


def test_20_concurrent_requests_each_get_their_own_id(gateway, fake):
    fake.first_token_delay = 0.2

    def one(i):
        response = send(
            gateway, {**HELLO, "messages": [{"role": "user", "content": f"n{i}"}]}
        )
        return (
            response.status_code,
            response.headers["X-Correlation-ID"],
            response.json(),
        )

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert all(status == 200 for status, _, _ in results)
    ids = {cid for _, cid, _ in results}
    assert len(ids) == 20
    assert all(body["correlation_id"] == cid for _, cid, body in results)
    assert sorted(body["response"] for _, _, body in results) == sorted(
        f"Echo: n{i}" for i in range(20)
    )


def raw_request(gateway, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_invalid_utf8_body(gateway):
    response = requests.post(
        f"{gateway.url}/llm/message",
        data=b'{"messages": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_chunked_oversize_body_is_413(gateway):
    def body():
        yield b'{"messages": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    response = requests.post(
        f"{gateway.url}/llm/message",
        data=body(),
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def chunked(body: bytes, piece: int = 1000):
    """Send ``body`` with chunked transfer encoding (no Content-Length)."""
    for start in range(0, len(body), piece):
        yield body[start : start + piece]


def padded(size: int) -> bytes:
    """A valid /llm/message body of exactly ``size`` bytes (JSON whitespace)."""
    body = b'{"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]'
    return body + b" " * (size - len(body) - 1) + b"}"


@pytest.mark.parametrize(
    ("size", "status"), [(10_000, 200), (10_001, 413)], ids=["at-limit", "over"]
)
def test_chunked_body_limit_is_exact(gateway, size, status):
    """MAX_REQUEST_SIZE (10,000 by default) is accepted, one byte more is not."""
    body = padded(size)
    assert len(body) == size
    response = requests.post(
        f"{gateway.url}/llm/message",
        data=chunked(body),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == status, response.text
    if status == 413:
        assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("size", "status"), [(10_000, 200), (10_001, 413)], ids=["at-limit", "over"]
)
def test_sized_body_limit_is_exact(gateway, size, status):
    response = requests.post(
        f"{gateway.url}/llm/message",
        data=padded(size),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == status, response.text


def status_of(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("path_length", "app_answers"), [(8000, True), (8300, False)], ids=["8000", "8300"]
)
def test_request_line_limit_is_8_kb(gateway, path_length, app_answers):
    """gunicorn refuses a request line over 8 KB before the app runs."""
    path = "/" + "a" * (path_length - 1)
    answer = raw_request(
        gateway, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    status, body = status_of(answer)
    if app_answers:
        assert status == 404
        assert b'"not_found"' in body  # the app's error contract
    else:
        assert status == 414  # URI Too Long
        assert b"correlation_id" not in body  # gunicorn's own plain answer


@pytest.mark.parametrize(
    ("value_length", "app_answers"),
    [(32_000, True), (33_000, False)],
    ids=["32000", "33000"],
)
def test_header_field_limit_is_32_kb(gateway, value_length, app_answers):
    """gunicorn refuses a header field over 32 KB before the app runs."""
    header = b"X-Padding: " + b"p" * value_length
    answer = raw_request(
        gateway,
        b"GET /health/live HTTP/1.1\r\nHost: x\r\n"
        + header
        + b"\r\nConnection: close\r\n\r\n",
    )
    status, body = status_of(answer)
    if app_answers:
        assert status == 200
        assert b'"alive"' in body
    else:
        assert status == 431  # Request Header Fields Too Large
        assert b"correlation_id" not in body


def test_10kb_correlation_id_is_replaced(gateway):
    response = requests.get(
        f"{gateway.url}/health/live",
        headers={"X-Correlation-ID": "a" * 10_000},
        timeout=5,
    )
    assert response.status_code == 200
    assert len(response.headers["X-Correlation-ID"]) == 36


def test_header_injection_attempt_is_refused(gateway):
    answer = raw_request(
        gateway,
        b"GET /health/live HTTP/1.1\r\nHost: x\r\n"
        b"X-Correlation-ID: abc\r\n evil: 1\r\nConnection: close\r\n\r\n",
    )
    status_line = answer.split(b"\r\n", 1)[0]
    # gunicorn refuses obsolete header folding before the app sees it.
    assert b" 400 " in status_line
    assert b"evil" not in answer.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [("/nope", "GET", 404), ("/llm/message", "GET", 405), ("/health", "POST", 405)],
)
def test_http_errors_are_json(gateway, path, method, status):
    response = requests.request(method, gateway.url + path, timeout=5)
    assert response.status_code == status
    assert response.json()["correlation_id"] == response.headers["X-Correlation-ID"]


def test_worker_survives_everything_above(gateway):
    """No request killed the worker: the log shows no worker restart or trace."""
    assert requests.get(f"{gateway.url}/health/live", timeout=5).status_code == 200
    logs = gateway.logs()
    assert "Traceback" not in logs
    assert "WORKER TIMEOUT" not in logs
    assert logs.count("Booting worker") == 1

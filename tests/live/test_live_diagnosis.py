"""A newcomer's first hour against the real model server (issue 10).

The README's own example, verbatim; what the bundled llama.cpp server cannot
do (embeddings), relayed in its own words; a busy server that is not down; and
the bundled server stopping a non-streamed generation whose client left.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

import local_backend
from tests.support.readme import README_BODY, README_HEADERS


@pytest.fixture
def bundled(model_server):
    if model_server.process is None:
        pytest.skip("these behaviours are the bundled llama.cpp server's")
    return model_server


def test_readme_example_verbatim(live_gateway, bundled):
    requests.get(f"{live_gateway.url}/health", timeout=30)
    response = requests.post(
        f"{live_gateway.url}/llm/message",
        data=README_BODY,
        headers=README_HEADERS,
        timeout=180,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["correlation_id"] == "my-request-1"
    assert body["response"].strip()
    # The model that answered, not an echo of the name the example asks for.
    assert body["model"] == local_backend.MODEL_ALIAS


def test_embeddings_relay_the_servers_own_explanation(live_gateway, bundled):
    started = time.monotonic()
    response = requests.post(
        f"{live_gateway.url}/v1/embeddings", json={"input": "hello"}, timeout=60
    )
    assert response.status_code == 502
    assert "embedding=True" in response.json()["error"]["message"]
    assert time.monotonic() - started < 5  # not retried


def test_health_is_not_503_while_a_generation_runs(live_gateway, bundled):
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 300."}],
        "max_tokens": 300,
        "temperature": 0,
    }
    generation = threading.Thread(
        target=requests.post,
        args=(f"{live_gateway.url}/llm/message",),
        kwargs={"json": body, "timeout": 180},
        daemon=True,
    )
    generation.start()
    time.sleep(1.5)
    health = requests.get(f"{live_gateway.url}/health", timeout=30)
    ready = requests.get(f"{live_gateway.url}/health/ready", timeout=30)
    still_generating = generation.is_alive()
    generation.join(180)
    assert health.status_code == 200, health.text
    assert ready.status_code == 200, ready.text
    if still_generating:
        assert health.json()["status"] == "busy"


#: A prompt the bundled model answers at temperature 0 by repeating itself
#: until max_tokens: a generation that would run ~30 s if nothing stopped it.
ENDLESS = {
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "Name three colors."}]
    },
    "/v1/completions": {"prompt": "Name three colors."},
}


@pytest.mark.parametrize("path", list(ENDLESS))
def test_bundled_server_stops_a_generation_whose_client_left(bundled, path):
    """Straight to the bundled server: a non-streamed request whose client
    hangs up frees it within a token or two (llama-cpp-python alone runs the
    generation to its end, and the next request waited ~15-30 s)."""
    payload = json.dumps(
        {**ENDLESS[path], "max_tokens": 600, "temperature": 0, "seed": 1}
    ).encode()
    address = (bundled.process.host, bundled.process.port)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}"
            "\r\n\r\n".encode()
            + payload
        )
        time.sleep(1.5)  # the generation is under way
    left = time.monotonic()
    response = requests.post(
        f"{bundled.url}{path}",
        json={**ENDLESS[path], "max_tokens": 1, "temperature": 0},
        timeout=120,
    )
    waited = time.monotonic() - left
    assert response.status_code == 200, response.text
    assert waited < 3, f"the next request waited {waited:.2f} s"


@pytest.mark.parametrize("path", list(ENDLESS))
def test_bundled_server_answers_in_full_when_the_client_stays(bundled, path):
    """What stops an abandoned generation never cuts one short."""
    response = requests.post(
        f"{bundled.url}{path}",
        json={**ENDLESS[path], "max_tokens": 40, "temperature": 0, "seed": 1},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 40
    assert body["choices"][0]["finish_reason"] == "length"

"""The real gateway in front of a real model server (LM Studio or llama.cpp)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.servers import ROOT
from tests.support.sse import data, events_of

QUESTION = [{"role": "user", "content": "Name three colors."}]


def ask(gateway, **body):
    body.setdefault("messages", QUESTION)
    return requests.post(f"{gateway.url}/llm/message", json=body, timeout=180)


def test_message_returns_text_tokens_and_model(live_gateway, model_server):
    response = ask(live_gateway, max_tokens=24)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response"].strip()
    assert body["tokens_used"] > 0
    assert body["usage"]["completion"] > 0
    assert body["model"] == model_server.model


@pytest.mark.parametrize("max_tokens", [1, 5, 12])
def test_max_tokens_is_honoured(live_gateway, max_tokens):
    body = ask(live_gateway, max_tokens=max_tokens, temperature=0.8).json()
    assert 0 < body["usage"]["completion"] <= max_tokens


def test_temperature_zero_with_seed_is_repeatable(live_gateway):
    first = ask(live_gateway, temperature=0, seed=42, max_tokens=16).json()
    second = ask(live_gateway, temperature=0, seed=42, max_tokens=16).json()
    assert first["response"] == second["response"]
    assert first["response"].strip()


def test_multi_turn_conversation_with_system_message(live_gateway):
    response = ask(
        live_gateway,
        messages=[
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "My name is Ana."},
            {"role": "assistant", "content": "Hello Ana."},
            {"role": "user", "content": "What is my name?"},
        ],
        max_tokens=16,
        temperature=0,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["usage"]["prompt"] > 20  # all four turns reached the model
    assert body["tokens_used"] > body["usage"]["prompt"]


def test_eight_concurrent_requests(live_gateway):
    def one(i):
        response = ask(
            live_gateway,
            messages=[{"role": "user", "content": f"Count to {i + 2}."}],
            max_tokens=8,
        )
        return response.status_code, response.headers["X-Correlation-ID"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert [status for status, _ in results] == [200] * 8
    assert len({cid for _, cid in results}) == 8


def test_health_and_ready_report_the_model(live_gateway, model_server):
    health = requests.get(f"{live_gateway.url}/health", timeout=30)
    assert health.status_code == 200
    assert model_server.model in health.json()["lm_studio"]["models"]
    ready = requests.get(f"{live_gateway.url}/health/ready", timeout=30)
    assert ready.status_code == 200
    assert model_server.model in ready.json()["models"]


@pytest.mark.parametrize("command", [["ping"], ["check", "--generate"]])
def test_flask_cli(model_server, command):
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi:app", "lmstudio", *command],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "LLM_SERVICE_ENV_FILE": "/dev/null",
            "LLM_SERVICE_LM_STUDIO_URL": model_server.url,
            "LLM_SERVICE_LM_STUDIO_TIMEOUT": "120",
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert model_server.url in result.stdout or "[ok]" in result.stdout


def test_openai_sdk_stream_arrives_chunk_by_chunk(live_gateway, model_server):
    client = openai.OpenAI(base_url=f"{live_gateway.url}/v1", api_key="x", timeout=180)
    stream = client.chat.completions.create(
        model=model_server.model,
        messages=QUESTION,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, pieces, usage = [], [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) >= 3
    assert "".join(pieces).strip()
    # Chunks are relayed as generated, not in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.05
    # llama-cpp-python sends no usage in streams even when asked; LM Studio does.
    if usage is not None:
        assert 0 < usage.completion_tokens <= 24


def test_message_stream_live(live_gateway, model_server):
    with requests.post(
        f"{live_gateway.url}/llm/message",
        json={"messages": QUESTION, "max_tokens": 16, "stream": True},
        stream=True,
        timeout=180,
    ) as response:
        text = response.content.decode()
    events = [e for e in events_of(text) if e.startswith("event: ")]
    assert events[-1].startswith("event: done")
    assert sum(e.startswith("event: delta") for e in events) >= 2
    final = json.loads(data(events[-1]))
    assert final["response"].strip()
    assert final["model"] == model_server.model
    # Unknown (null) when the upstream reports no usage, never made up.
    assert final["tokens_used"] is None or final["tokens_used"] > 0


def test_closing_a_stream_early_stops_generation(live_gateway, model_server):
    """After the client leaves, the model server is free again at once."""
    client = openai.OpenAI(base_url=f"{live_gateway.url}/v1", api_key="x", timeout=180)
    stream = client.chat.completions.create(
        model=model_server.model,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=400,
        temperature=0.8,
        stream=True,
    )
    for count, _chunk in enumerate(stream):
        if count == 3:
            break
    stream.close()
    left = time.monotonic()
    # One request at a time runs on llama.cpp's server: if the abandoned
    # generation went on (~400 tokens, many seconds), this one would wait.
    response = ask(live_gateway, max_tokens=1)
    waited = time.monotonic() - left
    assert response.status_code == 200
    assert waited < 5, f"the next request waited {waited:.1f} s"


def test_hanging_up_a_non_streamed_request_stops_generation(live_gateway):
    """A client that leaves a non-streamed call frees the model server too.

    The gateway closes the upstream connection when the client hangs up. LM
    Studio, llama.cpp's llama-server and the bundled server stop generating
    then (a plain llama-cpp-python server would run on to the end: the bundled
    one runs through local_backend/serve.py for this).
    """
    payload = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "Write a long story about a dragon."}
            ],
            "max_tokens": 400,
            "temperature": 0.8,
        }
    ).encode()
    sock = socket.create_connection(("127.0.0.1", live_gateway.port), timeout=10)
    sock.sendall(
        b"POST /llm/message HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    time.sleep(2)  # the generation is under way
    sock.close()
    left = time.monotonic()
    # One request at a time runs on the model server: if the abandoned
    # generation went on (~400 tokens, many seconds), this one would wait.
    response = ask(live_gateway, max_tokens=1)
    waited = time.monotonic() - left
    assert response.status_code == 200
    assert waited < 5, f"the next request waited {waited:.1f} s"


def test_upstream_killed_then_recovered(live_gateway, model_server):
    if model_server.process is None:
        pytest.skip("the upstream is not the tests' own server, so it is not killed")
    model_server.process.stop()
    down = ask(live_gateway, max_tokens=4)
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "upstream_unavailable"
    assert requests.get(f"{live_gateway.url}/health", timeout=30).status_code == 503
    model_server.process.start(timeout=300)
    up = ask(live_gateway, max_tokens=4)
    assert up.status_code == 200, up.text

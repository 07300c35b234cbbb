"""Tests for the fake LM Studio server used by the integration tests."""

import http.client
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.fakes.lmstudio import NO_MODELS_LOADED, FakeLMStudio

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


@pytest.fixture
def fake():
    with FakeLMStudio() as server:
        yield server


def chat(fake, content="hello world", stream=False, timeout=5, **fields):
    body = {
        "model": "fake-model-1",
        "messages": [{"role": "user", "content": content}],
        **fields,
    }
    if stream:
        body["stream"] = True
    return requests.post(fake.url + CHAT, json=body, stream=stream, timeout=timeout)


def sse_payloads(response):
    """Return the `data:` payloads of an SSE response, as read."""
    payloads = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payloads.append(line[len(b"data: ") :].decode())
    return payloads


def timed_events(response):
    """Yield (arrival time, payload) per HTTP chunk as it arrives."""
    for data in response.iter_content(chunk_size=None):
        yield time.monotonic(), data


# -- lifecycle -------------------------------------------------------------


def test_start_binds_a_free_port_and_url():
    server = FakeLMStudio().start()
    try:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert requests.get(server.url + "/v1/models", timeout=5).ok
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/v1/models", timeout=2)


def test_refuse_and_accept_on_the_same_port(fake):
    port = fake.port
    fake.refuse()
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url + "/v1/models", timeout=2)
    fake.accept()
    assert fake.port == port
    assert requests.get(fake.url + "/v1/models", timeout=5).ok


class _ConnectFirst:
    """The acceptor's waker, but a client connects (and is accepted) first."""

    def __init__(self, fake, waker):
        self.fake, self.waker, self.client = fake, waker, None

    def send(self, data):
        self.client = socket.create_connection(("127.0.0.1", self.fake.port))
        deadline = time.monotonic() + 5
        while not self.fake._open_sockets and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.waker.send(data)


def test_a_dying_server_drops_a_connection_accepted_while_it_stops_listening(fake):
    """``refuse(drop_connections=True)`` leaves no connection alive (a dead
    process keeps none), even one accepted in its last moments of listening."""
    connect_first = _ConnectFirst(fake, fake._wake_acceptor)
    fake._wake_acceptor = connect_first
    fake.refuse(drop_connections=True)
    late = connect_first.client
    assert late is not None
    # At once (a live handler would keep it open for its idle timeout, 5 s).
    late.settimeout(1.0)
    try:
        assert late.recv(1) == b""  # shut down by the server, not left serving
    finally:
        late.close()


def test_refuse_fault_is_undone_by_clear_faults(fake):
    fake.fault("refuse")
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url + "/v1/models", timeout=2)
    fake.clear_faults()
    assert requests.get(fake.url + "/v1/models", timeout=5).ok


def test_stop_is_prompt_with_a_stall_and_a_stream_open():
    server = FakeLMStudio().start()
    server.fault("stall", path="/v1/models", seconds=60)
    server.fault("slow_stream", interval=30)
    outcomes = []

    def call(fn):
        try:
            outcomes.append(fn())
        except requests.RequestException as exc:
            outcomes.append(exc)

    def stream():
        with chat(server, stream=True, timeout=30) as response:
            return sse_payloads(response)

    clients = [
        threading.Thread(target=call, args=(fn,), daemon=True)
        for fn in (
            lambda: requests.get(server.url + "/v1/models", timeout=30),
            stream,
        )
    ]
    for client in clients:
        client.start()
    assert server.wait_for(
        lambda: (
            len(server.requests) == 2
            and any(record.chunks_sent for record in server.requests)
        )
    )

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    for client in clients:
        client.join(2)
        assert not client.is_alive()
    assert all(record.closed_by == "stop" for record in server.connections)
    assert len(outcomes) == 2


# -- models and probes -----------------------------------------------------


def test_v1_models_lists_every_downloaded_model():
    with FakeLMStudio(models=["a", "b"], loaded=["a"]) as server:
        body = requests.get(server.url + "/v1/models", timeout=5).json()
    assert body == {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "owned_by": "organization_owner"},
            {"id": "b", "object": "model", "owned_by": "organization_owner"},
        ],
    }


def test_lmstudio_greeting_and_v0_models():
    with FakeLMStudio(models=["a", "text-embed"], loaded=["a"]) as server:
        greeting = requests.get(server.url + "/lmstudio-greeting", timeout=5)
        v0 = requests.get(server.url + "/api/v0/models", timeout=5).json()
    assert greeting.json() == {"lmstudio": True}
    loaded, unloaded = v0["data"]
    assert loaded["id"] == "a"
    assert loaded["state"] == "loaded"
    assert loaded["type"] == "llm"
    assert loaded["loaded_context_length"] > 0
    assert unloaded["state"] == "not-loaded"
    assert unloaded["type"] == "embeddings"
    for key in (
        "object",
        "publisher",
        "arch",
        "compatibility_type",
        "quantization",
        "max_context_length",
    ):
        assert key in loaded


@pytest.mark.parametrize("path", ["/lmstudio-greeting", "/api/v0/models"])
def test_llama_cpp_mode_has_no_lmstudio_paths(path):
    with FakeLMStudio(lmstudio=False) as server:
        response = requests.get(server.url + path, timeout=5)
    # FastAPI's answer for a path it does not serve.
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_llama_cpp_mode_accepts_only_uuid_request_ids():
    with FakeLMStudio(lmstudio=False) as server:
        url = server.url + "/v1/models"
        refused = requests.get(url, headers={"X-Request-ID": "my-1"}, timeout=5)
        accepted = requests.get(
            url, headers={"X-Request-ID": str(uuid.uuid4())}, timeout=5
        )
    assert (refused.status_code, refused.content) == (400, b"")
    assert refused.reason == "Bad Request"
    assert accepted.status_code == 200


def test_llama_cpp_mode_without_embeddings_says_why():
    with FakeLMStudio(lmstudio=False, embeddings=False) as server:
        response = requests.post(
            server.url + "/v1/embeddings", json={"input": "hi"}, timeout=5
        )
    assert response.status_code == 500
    assert "embedding=True" in response.json()["error"]["message"]


def test_garbage_fault_is_not_http(fake):
    fake.fault("garbage", times=1, data="hello\r\n")
    with pytest.raises(requests.ConnectionError, match="BadStatusLine"):
        requests.get(fake.url + "/v1/models", timeout=5)


@pytest.mark.parametrize(("method", "status"), [("GET", 404), ("POST", 405)])
def test_web_server_fault_answers_html(fake, method, status):
    fake.fault("web_server", times=1)
    response = requests.request(method, fake.url + CHAT, timeout=5)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/models"), ("GET", "/"), ("PUT", CHAT), ("PATCH", "/v1/models")],
)
def test_unknown_path_or_method_answers_200_with_error(fake, method, path):
    response = requests.request(method, fake.url + path, timeout=5)
    assert response.status_code == 200
    assert response.json() == {
        "error": f"Unexpected endpoint or method. ({method} {path})"
    }


def test_trailing_slash_is_tolerated_like_express(fake):
    assert requests.get(fake.url + "/v1/models/", timeout=5).json()["object"] == "list"


# -- chat completions ------------------------------------------------------


def test_chat_completion_echoes_with_usage(fake):
    response = chat(fake, "hello there world")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "fake-model-1"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Echo: hello there world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert response.headers["Content-Type"].startswith("application/json")


def test_reply_string_and_callable(fake):
    fake.reply = "fixed answer"
    assert chat(fake).json()["choices"][0]["message"]["content"] == "fixed answer"
    fake.reply = lambda request: request["messages"][-1]["content"].upper()
    assert chat(fake, "shout").json()["choices"][0]["message"]["content"] == "SHOUT"


def test_single_loaded_model_answers_whatever_was_asked():
    with FakeLMStudio(models=["a", "b"], loaded=["a"]) as server:
        body = chat(server, model="b").json()
    assert body["model"] == "a"


def test_several_loaded_models_answer_as_requested():
    with FakeLMStudio(models=["a", "b"], loaded=["a", "b"]) as server:
        body = chat(server, model="b").json()
    assert body["model"] == "b"


@pytest.mark.parametrize(
    ("status", "message"),
    [(404, 'Model "nope" not found'), (400, 'Invalid model identifier "nope".')],
)
def test_unknown_model(fake, status, message):
    fake.unknown_model_status = status
    response = chat(fake, model="nope")
    assert response.status_code == status
    assert response.json() == {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
    }


def test_no_model_loaded(fake):
    fake.loaded = []
    response = chat(fake)
    assert response.status_code == 400
    assert response.json() == {"error": NO_MODELS_LOADED}


@pytest.mark.parametrize(
    ("max_tokens", "content", "finish_reason"),
    [
        (2, "one two", "length"),
        (-1, "one two three", "stop"),
        (3, "one two three", "stop"),
    ],
)
def test_max_tokens_cuts_the_reply(fake, max_tokens, content, finish_reason):
    fake.reply = "one two three"
    body = chat(fake, max_tokens=max_tokens).json()
    assert body["choices"][0]["message"]["content"] == content
    assert body["choices"][0]["finish_reason"] == finish_reason
    assert body["usage"]["completion_tokens"] == len(content.split())


def test_usage_modes(fake):
    fake.usage_mode = "zeros"
    assert chat(fake).json()["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }
    fake.usage_mode = "missing"
    assert "usage" not in chat(fake).json()


def test_first_token_delay_delays_a_plain_answer(fake):
    fake.first_token_delay = 0.2
    started = time.monotonic()
    assert chat(fake).ok
    assert time.monotonic() - started >= 0.2


# -- streaming -------------------------------------------------------------


def test_stream_sends_openai_chunks(fake):
    with chat(fake, "a b", stream=True, stream_options={"include_usage": True}) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Transfer-Encoding"] == "chunked"
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    content, (final, usage) = chunks[:-2], chunks[-2:]
    assert content[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "Echo:",
    }
    assert [c["choices"][0]["delta"]["content"] for c in content] == [
        "Echo:",
        " a",
        " b",
    ]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert final["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }


@pytest.mark.parametrize("usage_mode", ["normal", "missing"])
def test_stream_usage_chunk_only_when_asked_and_known(fake, usage_mode):
    fake.usage_mode = usage_mode
    with chat(fake, stream=True) as r:
        assert not any('"usage"' in p for p in sse_payloads(r))
    with chat(fake, stream=True, stream_options={"include_usage": True}) as r:
        has_usage = any('"usage"' in p for p in sse_payloads(r))
    assert has_usage == (usage_mode == "normal")


def test_stream_max_tokens_finishes_with_length(fake):
    fake.reply = "one two three four"
    with chat(fake, stream=True, max_tokens=2) as r:
        chunks = [json.loads(p) for p in sse_payloads(r)[:-1]]
    assert len(chunks) == 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_chunks_arrive_one_at_a_time(fake):
    fake.reply = "w1 w2 w3 w4 w5"
    fake.stream_interval = 0.1
    with chat(fake, stream=True) as r:
        arrivals = [when for when, data in timed_events(r) if b'"content"' in data]
    assert len(arrivals) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= 0.07 for gap in gaps), gaps


def test_stream_first_token_delay_comes_after_the_headers(fake):
    fake.first_token_delay = 0.3
    started = time.monotonic()
    with chat(fake, stream=True) as r:
        headers_at = time.monotonic()
        first_at, _ = next(timed_events(r))
    assert headers_at - started < 0.25
    assert first_at - started >= 0.3


def test_streams_run_in_parallel(fake):
    fake.stream_interval = 0.1
    fake.reply = "a b c d"
    results = []

    def stream():
        with chat(fake, stream=True) as r:
            results.append(sse_payloads(r)[-1])

    clients = [threading.Thread(target=stream) for _ in range(4)]
    started = time.monotonic()
    for client in clients:
        client.start()
    for client in clients:
        client.join(5)
    assert results == ["[DONE]"] * 4
    assert time.monotonic() - started < 1.0  # 4 x 0.3 s if serialized


def test_client_leaving_a_stream_is_recorded(fake):
    fake.stream_interval = 0.05
    fake.reply = " ".join(["word"] * 40)
    with chat(fake, stream=True) as r:
        next(r.iter_content(chunk_size=None))
    assert fake.wait_for(lambda: fake.requests[0].client_disconnected)
    record = fake.requests[0]
    assert record.chunks_sent < 40
    assert fake.wait_for(lambda: fake.connections[0].peer_closed)


# -- other endpoints -------------------------------------------------------


def test_text_completion(fake):
    body = requests.post(
        fake.url + "/v1/completions",
        json={"model": "fake-model-1", "prompt": "say this"},
        timeout=5,
    ).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Echo: say this"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == 2 + 3


def test_text_completion_stream(fake):
    with requests.post(
        fake.url + "/v1/completions",
        json={"prompt": "x", "stream": True},
        stream=True,
        timeout=5,
    ) as r:
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]]
    assert "".join(texts) == "Echo: x"


def test_embeddings_are_deterministic(fake):
    def embed(value):
        return requests.post(
            fake.url + "/v1/embeddings",
            json={"model": "fake-model-1", "input": value},
            timeout=5,
        ).json()

    single = embed("some text")
    assert single["object"] == "list"
    assert single["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    [item] = single["data"]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert len(item["embedding"]) == 8
    assert all(-1 <= value <= 1 for value in item["embedding"])

    several = embed(["some text", "other"])
    assert [d["index"] for d in several["data"]] == [0, 1]
    assert several["data"][0]["embedding"] == item["embedding"]
    assert several["data"][1]["embedding"] != item["embedding"]


# -- authentication --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/models", {}),
        ("/v1/models", {"Authorization": "Bearer wrong"}),
        ("/nowhere", {}),
    ],
)
def test_token_required_when_set(fake, path, headers):
    fake.api_token = "sk-lm-test:secret"
    response = requests.get(fake.url + path, headers=headers, timeout=5)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["code"] == "invalid_api_key"
    assert error["message"]


def test_right_token_is_accepted(fake):
    fake.api_token = "sk-lm-test:secret"
    headers = {"Authorization": "Bearer sk-lm-test:secret"}
    assert requests.get(fake.url + "/v1/models", headers=headers, timeout=5).ok


# -- connections -----------------------------------------------------------


def test_keep_alive_reuses_then_closes_an_idle_connection():
    with FakeLMStudio(idle_timeout=0.3) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        for _ in range(2):
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            response.read()
            assert response.headers["Connection"] == "keep-alive"
            assert response.headers["Keep-Alive"] == "timeout=1"
        assert server.wait_for(lambda: server.connections[0].closed_by, timeout=2)
        [record] = server.connections
        assert record.requests == 2
        assert record.closed_by == "idle_timeout"
        assert not record.peer_closed
        idle = record.closed_at - server.requests[-1].finished_at
        assert 0.25 <= idle < 1.0
        # The client sees the stale socket only when it reuses it.
        conn.request("GET", "/v1/models")
        with pytest.raises(ConnectionError):
            conn.getresponse()
        conn.close()


def test_connection_close_from_the_client_is_honoured(fake):
    response = requests.get(
        fake.url + "/v1/models", headers={"Connection": "close"}, timeout=5
    )
    assert response.headers["Connection"] == "close"
    assert "Keep-Alive" not in response.headers
    assert fake.wait_for(lambda: fake.connections[0].closed_by == "server")


def test_peer_close_is_recorded(fake):
    with socket.create_connection(("127.0.0.1", fake.port)):
        assert fake.wait_for(lambda: fake.connections)
    assert fake.wait_for(lambda: fake.connections[0].closed_at)
    record = fake.connections[0]
    assert record.peer_closed
    assert record.requests == 0
    assert record.closed_at >= record.opened_at


def test_requests_are_recorded(fake):
    before = time.monotonic()
    requests.post(
        fake.url + CHAT + "?trace=1",
        json={"model": "fake-model-1", "messages": []},
        headers={"X-Request-ID": "abc"},
        timeout=5,
    )
    requests.get(fake.url + "/v1/models", timeout=5)
    first, second = fake.requests
    assert (first.method, first.path, first.query) == ("POST", CHAT, "trace=1")
    assert first.headers["x-request-id"] == "abc"
    assert first.json == {"model": "fake-model-1", "messages": []}
    assert first.body == json.dumps(first.json).encode()
    assert before <= first.received_at <= first.finished_at <= second.received_at
    assert first.status == 200
    assert first.fault is None
    assert second.json is None
    assert first.connection_id == fake.connections[0].id
    fake.clear_records()
    assert fake.requests == []


def test_chunked_request_body_is_read(fake):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    body = [b'{"messages": [{"role": "user", ', b'"content": "hi"}]}']
    conn.request("POST", CHAT, body=iter(body), encode_chunked=True)
    assert conn.getresponse().status == 200
    assert fake.requests[0].json["messages"][0]["content"] == "hi"
    conn.close()


def test_wait_for_returns_the_last_value_on_timeout(fake):
    started = time.monotonic()
    assert fake.wait_for(lambda: 0, timeout=0.1) == 0
    assert time.monotonic() - started < 0.5


# -- faults ----------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 408, 429, 500, 502, 503])
def test_status_fault_applies_times_then_clears(fake, status):
    fault = fake.fault(
        "status",
        times=2,
        status=status,
        body={"error": {"message": "busy"}},
        headers={"Retry-After": "1"},
    )
    for _ in range(2):
        response = chat(fake)
        assert response.status_code == status
        assert response.json() == {"error": {"message": "busy"}}
        assert response.headers["Retry-After"] == "1"
    assert chat(fake).status_code == 200
    assert fault.hits == 2
    assert fake.faults == []
    assert [r.fault for r in fake.requests] == ["status", "status", None]


def test_fault_limited_to_a_path_lasts_until_cleared(fake):
    fake.fault("status", status=500, path=CHAT)
    assert requests.get(fake.url + "/v1/models", timeout=5).status_code == 200
    assert chat(fake).status_code == 500
    assert chat(fake).status_code == 500
    fake.clear_faults()
    assert chat(fake).status_code == 200


@pytest.mark.parametrize(
    ("variant", "content_type"),
    [("html", "text/html"), ("truncated", "application/json")],
)
def test_malformed_fault(fake, variant, content_type):
    fake.fault("malformed", times=1, variant=variant)
    response = chat(fake)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(content_type)
    with pytest.raises(requests.JSONDecodeError):
        response.json()


@pytest.mark.parametrize("error", ["model crashed", {"message": "model crashed"}])
def test_error200_fault(fake, error):
    fake.fault("error200", times=1, error=error)
    response = chat(fake)
    assert response.status_code == 200
    assert response.json() == {"error": error}


@pytest.mark.parametrize("rst", [False, True])
def test_reset_fault_closes_without_answer(fake, rst):
    fake.fault("reset", times=1, rst=rst)
    with pytest.raises(requests.ConnectionError):
        chat(fake)
    assert fake.requests[0].status is None
    assert fake.wait_for(lambda: fake.connections[0].closed_by == "fault")
    assert chat(fake).ok


def test_stall_fault_then_answers(fake):
    fake.fault("stall", times=1, seconds=0.3)
    started = time.monotonic()
    assert chat(fake).ok
    assert time.monotonic() - started >= 0.3


def test_stall_fault_notices_the_client_leaving(fake):
    fake.fault("stall", times=1, seconds=30)
    with pytest.raises(requests.ReadTimeout):
        chat(fake, timeout=0.2)
    assert fake.wait_for(lambda: fake.requests[0].client_disconnected)
    assert fake.requests[0].status is None


def test_stream_fault_waits_for_a_stream(fake):
    fake.fault("stream_error", times=1)
    assert chat(fake).ok  # not a stream: the fault stays queued
    assert len(fake.faults) == 1
    with chat(fake, stream=True) as r:
        payloads = sse_payloads(r)
    assert fake.faults == []
    assert fake.requests[-1].fault == "stream_error"
    assert "[DONE]" not in payloads


@pytest.mark.parametrize("error", [None, "boom", {"message": "boom", "code": 1}])
def test_stream_error_fault(fake, error):
    fake.reply = "a b c d e"
    params = {} if error is None else {"error": error}
    fake.fault("stream_error", times=1, after=3, **params)
    with chat(fake, stream=True) as r:
        payloads = [json.loads(p) for p in sse_payloads(r)]
    assert len(payloads) == 4
    assert all("error" not in p for p in payloads[:3])
    expected = {"message": "Injected stream error"} if error is None else error
    assert payloads[3] == {"error": expected}
    assert chat(fake).ok  # the connection is still usable


def test_stream_cut_fault(fake):
    fake.reply = "a b c d e"
    fake.fault("stream_cut", times=1, after=2)
    received = []

    def read_all(response):
        received.extend(line for line in response.iter_lines() if line)

    with (
        chat(fake, stream=True) as r,
        pytest.raises(requests.exceptions.ChunkedEncodingError),
    ):
        read_all(r)
    assert len(received) == 2
    assert fake.requests[0].fault == "stream_cut"


def test_stream_end_fault_ends_cleanly_without_a_finish(fake):
    fake.reply = "a b c d e"
    fake.fault("stream_end", times=1, after=2)
    with chat(fake, stream=True) as r:
        payloads = sse_payloads(r)  # the body ends cleanly: no error here
    chunks = [json.loads(p) for p in payloads]
    assert len(chunks) == 2
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert fake.requests[0].fault == "stream_end"


def test_slow_stream_fault(fake):
    fake.reply = "a b c"
    fake.fault("slow_stream", times=1, interval=0.15)
    with chat(fake, stream=True) as r:
        arrivals = [when for when, data in timed_events(r) if b'"content"' in data]
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] >= 0.25


def test_fault_arguments_are_checked(fake):
    with pytest.raises(ValueError, match="unknown fault kind"):
        fake.fault("explode")
    with pytest.raises(TypeError, match="unexpected"):
        fake.fault("status", statuss=500)
    with pytest.raises(ValueError, match="times"):
        fake.fault("status", times=0)
    with pytest.raises(ValueError, match="neither"):
        fake.fault("refuse", times=1)


# -- command line ----------------------------------------------------------


def test_runs_as_a_script_until_interrupted():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.lmstudio", "--port", "0"],
        cwd=PROJECT_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Skip anything printed before the address (a warning on a busy machine).
        lines = [process.stderr.readline() for _ in range(1)]
        while "listening on " not in lines[-1] and len(lines) < 20 and lines[-1]:
            lines.append(process.stderr.readline())
        assert "listening on " in lines[-1], lines
        url = lines[-1].split("listening on ")[1].split()[0]
        response = requests.get(url + "/lmstudio-greeting", timeout=5)
        assert response.json() == {"lmstudio": True}
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0  # generous: the machine may be busy building
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


def test_model_name_picks_a_fault(fake):
    response = chat(fake, model='fault:status?status=502&body="bad gateway"')
    assert response.status_code == 502
    assert response.json() == "bad gateway"
    assert fake.requests[-1].fault == "status"
    # One request only: the next one with a normal model is served.
    assert chat(fake).status_code == 200


def test_model_name_fault_ignores_unknown_kinds_and_params():
    from tests.fakes.lmstudio import fault_from_model

    assert fault_from_model({"model": "fault:nonsense"}) is None
    assert fault_from_model({"model": "fake-model-1"}) is None
    fault = fault_from_model({"model": "fault:stall?seconds=0.5&bogus=1"})
    assert (fault.kind, fault.params) == ("stall", {"seconds": 0.5})

"""The LM Studio client: retries, timeouts, error shapes, parsing, probes."""

import http.client
import json
import socket

import pytest
import requests
import responses
from responses import matchers
from responses.registries import OrderedRegistry

from llm_service.lmstudio import (
    LMStudioAuthError,
    LMStudioBusyError,
    LMStudioClient,
    LMStudioConnectionError,
    LMStudioProtocolError,
    LMStudioRequestError,
    LMStudioResponseTooLargeError,
    LMStudioServerError,
    LMStudioTimeoutError,
    ModelNotFoundError,
    NoModelLoadedError,
)
from tests.support.bodies import chat_completion

pytestmark = pytest.mark.mock_llm

BASE = "http://lmstudio.test:1234"
CHAT = f"{BASE}/v1/chat/completions"
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client():
    lm = LMStudioClient(BASE, retries=2, retry_budget=30, retry_after_max=10)
    yield lm
    lm.close()


@pytest.fixture
def ordered():
    """A strict mock whose registrations answer in order (retry sequences)."""
    with responses.RequestsMock(registry=OrderedRegistry) as mock:
        yield mock


def test_chat_completion_parses_answer(client, upstream):
    upstream.post(CHAT, json=chat_completion(model="answered-by"))
    result = client.chat_completion(PAYLOAD)
    assert result.text == "Hello."
    # LM Studio answers with its loaded model whatever was asked: report that one.
    assert result.model == "answered-by"
    assert result.finish_reason == "stop"
    assert (result.usage.prompt, result.usage.completion, result.usage.total) == (
        5,
        2,
        7,
    )


def test_sends_correlation_id_and_token(upstream):
    lm = LMStudioClient(BASE, api_token="sk-lm-abc:def", correlation_id=lambda: "cid-1")
    upstream.post(
        CHAT,
        json=chat_completion(),
        match=[
            matchers.header_matcher(
                {
                    "Authorization": "Bearer sk-lm-abc:def",
                    "X-Correlation-ID": "cid-1",
                }
            ),
            matchers.json_params_matcher(PAYLOAD),
        ],
    )
    lm.chat_completion(PAYLOAD)


@pytest.mark.parametrize(
    "usage",
    [
        False,
        {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        {"prompt_tokens": "5", "completion_tokens": 2, "total_tokens": 7},
        "n/a",
    ],
    ids=["missing", "zeros", "not-int", "not-dict"],
)
def test_unknown_usage_is_none(client, upstream, usage):
    upstream.post(CHAT, json=chat_completion(usage=usage))
    assert client.chat_completion(PAYLOAD).usage is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retries_retryable_status_then_succeeds(client, ordered, sleeps, status):
    ordered.post(CHAT, status=status, json={"error": "busy"})
    ordered.post(CHAT, json=chat_completion())
    assert client.chat_completion(PAYLOAD).text == "Hello."
    assert len(sleeps) == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, LMStudioRequestError),
        (401, LMStudioAuthError),
        (403, LMStudioAuthError),
        (422, LMStudioRequestError),
        (501, LMStudioServerError),
    ],
)
def test_no_retry_on_other_statuses(client, upstream, sleeps, status, error):
    upstream.post(CHAT, status=status, json={"error": {"message": "nope"}})
    with pytest.raises(error) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.status == status
    assert info.value.attempts == 1
    assert sleeps == []


def test_gives_up_after_retry_count(client, upstream, sleeps):
    upstream.post(CHAT, status=500, json={"error": "boom"})
    with pytest.raises(LMStudioServerError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.attempts == 3
    assert len(upstream.calls) == 3
    assert len(sleeps) == 2
    # Exponential with jitter: the second wait's range lies above the first's.
    assert 0.25 <= sleeps[0] <= 0.5 <= sleeps[1] <= 1.0


def test_a_hosts_own_retry_count_holds_on_every_call(client, upstream, sleeps):
    """A caller trying several hosts gives one no retries: every call, not just
    the first (the retry layer for that count is made once and kept)."""
    upstream.post(CHAT, status=500, json={"error": "boom"})
    for _ in range(2):
        with pytest.raises(LMStudioServerError) as info:
            client.chat_completion(PAYLOAD, retries=0)
        assert info.value.attempts == 1
    with pytest.raises(LMStudioServerError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.attempts == 3
    assert len(upstream.calls) == 5
    assert len(sleeps) == 2
    assert len(client._retriers) == 2


def test_honours_retry_after(client, ordered, sleeps):
    ordered.post(CHAT, status=429, headers={"Retry-After": "3"}, json={"error": "x"})
    ordered.post(CHAT, json=chat_completion())
    client.chat_completion(PAYLOAD)
    assert sleeps == [3.0]


def test_caps_retry_after(client, ordered, sleeps):
    ordered.post(CHAT, status=503, headers={"Retry-After": "3600"}, json={})
    ordered.post(CHAT, json=chat_completion())
    client.chat_completion(PAYLOAD)
    assert sleeps == [10.0]


def test_busy_error_keeps_retry_after(client, upstream):
    upstream.post(CHAT, status=503, headers={"Retry-After": "2"}, json={})
    with pytest.raises(LMStudioBusyError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.retry_after == 2.0


def test_retries_connection_errors(client, ordered, sleeps):
    ordered.post(CHAT, body=requests.ConnectionError("reset by peer"))
    ordered.post(CHAT, json=chat_completion())
    assert client.chat_completion(PAYLOAD).text == "Hello."


def test_connection_error_after_retries(client, upstream):
    upstream.post(CHAT, body=requests.ConnectionError("refused"))
    with pytest.raises(LMStudioConnectionError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, requests.ConnectionError)


def test_read_timeout_is_not_retried(client, upstream, sleeps):
    upstream.post(CHAT, body=requests.ReadTimeout("slow"))
    with pytest.raises(LMStudioTimeoutError):
        client.chat_completion(PAYLOAD)
    assert len(upstream.calls) == 1


def test_connect_timeout_is_retried_as_connection_error(client, upstream):
    upstream.post(CHAT, body=requests.ConnectTimeout("no route"))
    with pytest.raises(LMStudioConnectionError):
        client.chat_completion(PAYLOAD)
    assert len(upstream.calls) == 3


def test_every_attempt_has_timeouts(upstream):
    lm = LMStudioClient(BASE, connect_timeout=1.5, read_timeout=7)
    upstream.post(CHAT, json=chat_completion())
    seen = {}

    original = lm.adapter.send

    def spy(*args, **kwargs):
        seen["timeout"] = kwargs["timeout"]
        return original(*args, **kwargs)

    lm.adapter.send = spy
    lm.chat_completion(PAYLOAD)
    assert seen["timeout"] == (1.5, 7)


def test_budget_bounds_the_last_attempts_timeout(upstream, monkeypatch):
    """An attempt never gets more time than is left of the whole budget."""
    lm = LMStudioClient(BASE, read_timeout=30, retry_budget=4)
    clock = iter([100.0, 103.0])  # the call starts, then 3 s later the attempt
    monkeypatch.setattr(
        "llm_service.lmstudio.client.time.monotonic", lambda: next(clock)
    )
    seen = {}
    original = lm.adapter.send

    def spy(*args, **kwargs):
        seen["timeout"] = kwargs["timeout"]
        return original(*args, **kwargs)

    lm.adapter.send = spy
    upstream.post(CHAT, json=chat_completion())
    lm.chat_completion(PAYLOAD)
    assert seen["timeout"] == (1.0, 1.0)


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        # LM Studio's three error shapes, and its 200-with-error.
        (200, {"error": "No models loaded. Please load a model."}, NoModelLoadedError),
        (400, {"error": "No models loaded. Please load a model."}, NoModelLoadedError),
        # The singular wording, as other OpenAI-compatible servers put it.
        (400, {"error": {"message": "No model loaded"}}, NoModelLoadedError),
        (
            404,
            {"error": {"message": 'Model "x" not found', "code": "model_not_found"}},
            ModelNotFoundError,
        ),
        (
            400,
            {"error": {"message": 'Invalid model identifier "x".'}},
            ModelNotFoundError,
        ),
        (400, {"message": "The model 'x' was not found"}, ModelNotFoundError),
        (
            401,
            {
                "error": {
                    "type": "invalid_request",
                    "code": "invalid_api_key",
                    "message": "Invalid API key",
                }
            },
            LMStudioAuthError,
        ),
        (400, {"detail": "context length exceeded"}, LMStudioRequestError),
        (
            200,
            {"error": "Unexpected endpoint or method. (POST /x)"},
            LMStudioProtocolError,
        ),
        (200, {"error": "something odd"}, LMStudioServerError),
    ],
)
def test_error_shapes(client, upstream, status, body, error):
    upstream.post(CHAT, status=status, json=body)
    with pytest.raises(error):
        client.chat_completion(PAYLOAD)


def test_200_with_error_is_not_retried(client, upstream):
    upstream.post(CHAT, json={"error": "something odd"})
    with pytest.raises(LMStudioServerError):
        client.chat_completion(PAYLOAD)
    assert len(upstream.calls) == 1


def test_request_error_keeps_upstream_details(client, upstream):
    upstream.post(
        CHAT,
        status=400,
        json={"error": {"message": "Context length exceeded"}},
        headers={"x-request-id": "up-42"},
    )
    with pytest.raises(LMStudioRequestError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.message == "Context length exceeded"
    assert info.value.request_id == "up-42"
    assert "Context length exceeded" in info.value.body


@pytest.mark.parametrize(
    "body",
    [
        "<html>oops</html>",
        '{"choices": [',
        json.dumps({"choices": []}),
        json.dumps({"choices": [{"message": {"content": 5}}]}),
        json.dumps([1, 2]),
    ],
    ids=["html", "truncated", "no-choices", "bad-content", "array"],
)
def test_invalid_answers_are_protocol_errors(client, upstream, body):
    upstream.post(CHAT, body=body, content_type="application/json")
    with pytest.raises(LMStudioProtocolError):
        client.chat_completion(PAYLOAD)


def test_list_models(client, upstream):
    upstream.get(
        f"{BASE}/v1/models",
        json={"object": "list", "data": [{"id": "a"}, {"id": "b"}]},
    )
    assert client.list_models() == ["a", "b"]


def test_probe_lmstudio_reports_loaded_models(client, upstream):
    upstream.get(f"{BASE}/v1/models", json={"data": [{"id": "a"}, {"id": "b"}]})
    upstream.get(f"{BASE}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(
        f"{BASE}/api/v0/models",
        json={
            "data": [
                {"id": "a", "type": "llm", "state": "not-loaded"},
                {"id": "b", "type": "llm", "state": "loaded"},
                {"id": "e", "type": "embeddings", "state": "loaded"},
            ]
        },
    )
    report = client.probe()
    assert report.reachable
    assert report.server == "lmstudio"
    assert report.models == ["a", "b"]
    assert report.loaded == ["b"]
    assert report.ready
    assert report.servable_models == ["b"]


def test_probe_other_server_has_unknown_loaded_state(client, upstream):
    upstream.get(f"{BASE}/v1/models", json={"data": [{"id": "gemma"}]})
    upstream.get(f"{BASE}/lmstudio-greeting", status=404, json={"detail": "Not Found"})
    report = client.probe()
    assert report.server == "openai-compatible"
    assert report.loaded is None
    assert report.servable_models == ["gemma"]
    assert report.ready


def test_probe_unreachable_does_not_retry(client, upstream, sleeps):
    upstream.get(f"{BASE}/v1/models", body=requests.ConnectionError("refused"))
    report = client.probe()
    assert not report.reachable
    assert not report.ready
    assert "connection failed" in report.error
    assert len(upstream.calls) == 1
    assert sleeps == []


def test_probe_wrong_base_url(client, upstream):
    # LM Studio answers unknown paths with 200 and an error body.
    upstream.get(
        f"{BASE}/v1/models",
        json={"error": "Unexpected endpoint or method. (GET /v1/v1/models)"},
    )
    report = client.probe()
    assert not report.reachable
    assert "server's root" in report.error


def test_environment_proxies_are_read_once_at_start(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "")
    lm = LMStudioClient("http://gpu-box.test:1234")
    monkeypatch.delenv("HTTP_PROXY")
    assert lm.session.trust_env is False
    assert lm.session.proxies["http"] == "http://proxy.test:3128"


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_answer_over_the_limit_is_refused(upstream, declared):
    client = LMStudioClient(BASE, retries=2, max_response_bytes=4096)
    upstream.post(
        CHAT,
        body=json.dumps(chat_completion("x" * 5000)),
        content_type="application/json",
        auto_calculate_content_length=declared,
    )
    with pytest.raises(LMStudioResponseTooLargeError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.status == 200
    assert len(upstream.calls) == 1  # not retried


def test_a_declared_length_over_the_limit_is_refused_before_reading(monkeypatch):
    """Content-Length decides before a byte of the body is read."""
    client = LMStudioClient(BASE, max_response_bytes=4096)
    read = []
    monkeypatch.setattr(
        requests.Response,
        "iter_content",
        lambda self, *args, **kwargs: read.append(1) or iter([b"{}"]),
    )
    with responses.RequestsMock() as mock:
        mock.post(
            CHAT,
            body=json.dumps(chat_completion("x" * 5000)),
            content_type="application/json",
            auto_calculate_content_length=True,
        )
        with pytest.raises(LMStudioResponseTooLargeError):
            client.chat_completion(PAYLOAD)
    assert read == []


def test_an_answer_at_the_limit_is_read(upstream):
    body = json.dumps(chat_completion("x" * 3000))
    client = LMStudioClient(BASE, max_response_bytes=len(body))
    upstream.post(CHAT, body=body, content_type="application/json")
    assert client.chat_completion(PAYLOAD).text == "x" * 3000


def test_an_error_answer_of_a_stream_over_the_limit_is_refused(upstream):
    client = LMStudioClient(BASE, retries=0, max_response_bytes=4096)
    upstream.post(
        CHAT, body=json.dumps({"error": "x" * 5000}), content_type="application/json"
    )
    with pytest.raises(LMStudioResponseTooLargeError):
        client.open_stream("/v1/chat/completions", PAYLOAD)


@pytest.mark.parametrize(
    ("correlation_id", "request_id"),
    [
        ("my-request-1", None),
        ("1b4e28ba-2fa1-11d2-883f-0016d3cca427", "same"),
        ("1B4E28BA-2FA1-11D2-883F-0016D3CCA427", "same"),
        # Forms uuid.UUID (and so llama-cpp-python) takes too.
        ("1b4e28ba2fa111d2883f0016d3cca427", "same"),
        ("urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427", "same"),
        ("1b4e28ba-2fa1-11d2-883f-0016d3cca42", None),
        ("1b4e28ba-2fa1-11d2-883f-0016d3cca427a", None),
        ("1b4e28ba-2fa1-11d2-883f-0016d3cca42g", None),
    ],
)
def test_x_request_id_goes_upstream_only_as_a_uuid(
    upstream, correlation_id, request_id
):
    client = LMStudioClient(BASE, correlation_id=lambda: correlation_id)
    upstream.post(CHAT, json=chat_completion())
    client.chat_completion(PAYLOAD)
    sent = upstream.calls[0].request.headers
    assert sent["X-Correlation-ID"] == correlation_id
    expected = correlation_id if request_id else None
    assert sent.get("X-Request-ID") == expected


def test_an_empty_error_body_relays_the_status_text(client, upstream):
    upstream.post(CHAT, status=400, body=b"")
    with pytest.raises(LMStudioRequestError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.message == "HTTP 400 Bad Request"


@pytest.mark.parametrize(
    ("raised", "cause", "error"),
    [
        (socket.gaierror(-2, "Name or service not known"), "dns", None),
        (ConnectionRefusedError(111, "Connection refused"), "refused", None),
        (
            http.client.BadStatusLine("SSH-2.0-OpenSSH_9.2p1\r\n"),
            "not_http",
            LMStudioProtocolError,
        ),
        (http.client.RemoteDisconnected("closed"), "unreachable", None),
    ],
)
def test_transport_failures_are_named(client, upstream, raised, cause, error):
    upstream.post(CHAT, body=requests.ConnectionError(raised))
    with pytest.raises(error or LMStudioConnectionError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.cause == cause
    assert (cause == "not_http") == (len(upstream.calls) == 1)  # never retried


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        (404, {"json": {"detail": "Not Found"}}),
        (404, {"body": "<h1>Not Found</h1>", "content_type": "text/html"}),
        (405, {"body": ""}),
        (501, {"body": "Unsupported method ('POST')"}),
    ],
)
def test_a_path_the_upstream_does_not_serve_names_the_url(
    client, upstream, status, answer
):
    upstream.post(CHAT, status=status, **answer)
    with pytest.raises(LMStudioProtocolError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.cause == "not_openai"
    assert "upstream URL" in info.value.message


def test_an_explained_llama_cpp_failure_is_not_retried(client, upstream, sleeps):
    error = {
        "message": "Llama model must be created with embedding=True to call this "
        "method",
        "type": "internal_server_error",
        "param": None,
        "code": None,
    }
    upstream.post(f"{BASE}/v1/embeddings", status=500, json={"error": error})
    with pytest.raises(LMStudioServerError) as info:
        client.post_json("/v1/embeddings", {"input": "hi"})
    assert "embedding=True" in info.value.message
    assert len(upstream.calls) == 1
    assert sleeps == []


def test_probe_timeout_during_a_generation_is_busy(client, upstream):
    upstream.get(f"{BASE}/v1/models", body=requests.ReadTimeout("generating"))
    client._track_generation(1)  # a generation of ours is under way
    report = client.probe()
    assert report.reachable
    assert report.busy
    upstream.get(f"{BASE}/v1/models", body=requests.ReadTimeout("generating"))
    client._track_generation(-1)
    report = client.probe()
    assert not report.reachable
    assert report.cause == "timeout"


def test_probe_recognises_another_llm_service(client, upstream):
    upstream.get(
        f"{BASE}/v1/models",
        json={"data": [{"id": "a"}]},
        headers={"Via": "1.1 llm-service"},
    )
    upstream.get(f"{BASE}/lmstudio-greeting", status=404)
    assert client.probe().chained


def test_a_redirect_is_refused_not_followed(client, upstream):
    """A redirected POST would come back as a GET elsewhere: never followed."""
    upstream.post(
        CHAT, status=307, headers={"Location": "http://elsewhere.invalid/v1/x"}
    )
    with pytest.raises(LMStudioProtocolError) as info:
        client.chat_completion(PAYLOAD)
    assert info.value.status == 307
    assert info.value.cause == "not_openai"
    assert [call.request.url for call in upstream.calls] == [CHAT]


def test_an_upstream_cookie_never_rides_on_a_later_call(client, upstream):
    """One caller's call must not hand the next caller's call its cookies."""
    upstream.post(
        CHAT, json=chat_completion(), headers={"Set-Cookie": "session=abc; Path=/"}
    )
    client.chat_completion(PAYLOAD)
    client.chat_completion(PAYLOAD)
    assert len(upstream.calls) == 2
    assert "Cookie" not in upstream.calls[1].request.headers


def test_the_body_sent_is_the_payload_as_json(client, upstream):
    upstream.post(CHAT, json=chat_completion())
    client.chat_completion(PAYLOAD)
    sent = upstream.calls[0].request
    assert json.loads(sent.body) == PAYLOAD
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Content-Length"] == str(len(sent.body))
    assert sent.headers["User-Agent"] == "llm-service"

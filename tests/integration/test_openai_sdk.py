"""The official openai SDK pointed at the gateway, with no special options."""

from __future__ import annotations

import openai
import pytest

from tests.servers import GatewayServer

MODEL = "fake-model-1"
HELLO = [{"role": "user", "content": "Hello from the SDK"}]


@pytest.fixture(scope="module")
def sdk(gateway):
    # max_retries=0 so the error-class tests see the gateway's first answer.
    # Closed at the end: an open pooled socket warns when it is collected.
    with openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def test_models_list(sdk):
    assert [model.id for model in sdk.models.list()] == [MODEL]


def test_chat_completion(sdk):
    completion = sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20)
    assert completion.choices[0].message.content == "Echo: Hello from the SDK"
    assert completion.model == MODEL
    assert completion.usage.total_tokens > 0


def test_chat_completion_passes_unknown_fields_through(sdk, fake):
    sdk.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        response_format={"type": "text"},
        extra_body={"ttl": 300, "top_k": 20},
    )
    sent = [r for r in fake.requests if r.path == "/v1/chat/completions"][-1].json
    assert sent["response_format"] == {"type": "text"}
    assert sent["ttl"] == 300
    assert sent["top_k"] == 20


def test_streamed_chat_completion(sdk, fake):
    fake.stream_interval = 0.05
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 3
    assert "".join(pieces) == "Echo: Hello from the SDK"
    assert usage.total_tokens > 0


def test_stream_error_raises_in_the_sdk(sdk, fake):
    fake.fault("stream_error", times=1, after=1)
    stream = sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    with pytest.raises(openai.APIError, match="Injected stream error"):
        for _ in stream:
            pass


def test_completion(sdk):
    completion = sdk.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    assert completion.choices[0].text


def test_embeddings(sdk):
    result = sdk.embeddings.create(model=MODEL, input=["one", "two"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8


def test_not_found_error(sdk, fake):
    fake.models = ["a", "b"]
    fake.loaded = ["a"]
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="missing-model", messages=HELLO)
    assert info.value.code == "model_not_found"


def test_unprocessable_entity_error(sdk):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        sdk.chat.completions.create(model=MODEL, messages=HELLO, temperature=5)
    assert info.value.param == "temperature"
    assert info.value.code == "validation_error"


def test_service_unavailable_error(sdk, fake):
    fake.refuse(drop_connections=True)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model=MODEL, messages=HELLO)
    finally:
        fake.accept()
    assert info.value.status_code == 503
    assert info.value.code == "upstream_unavailable"


def test_rate_limit_error(fake):
    settings = {"LM_STUDIO_URL": fake.url, "RATE_LIMIT_REQUESTS": 1}
    with (
        GatewayServer(settings) as gateway,
        openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
        ) as client,
    ):
        client.chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=HELLO)
    assert info.value.code == "rate_limited"
    assert info.value.response.headers["Retry-After"]

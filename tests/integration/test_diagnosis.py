"""A newcomer's misconfigurations, named for what they are (issue 10, 9.15).

The gateway under gunicorn in front of the fake: as llama.cpp's server (which
accepts only UUIDs as X-Request-ID, answers /v1/models only between
generations, cannot embed), behind a token, on a wrong path, as a plain web
server, as something that does not speak HTTP, and in front of itself.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import requests

from tests.fakes.lmstudio import FakeLMStudio
from tests.integration.conftest import FAST_FAILURE
from tests.servers import GatewayServer
from tests.support.readme import README_BODY, README_HEADERS

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture(scope="module")
def llama_cpp():
    with FakeLMStudio(lmstudio=False, models=["gemma-3-270m"], embeddings=False) as f:
        yield f


@pytest.fixture(scope="module")
def llama_gateway(llama_cpp):
    settings = {"LM_STUDIO_URL": llama_cpp.url, **FAST_FAILURE}
    with GatewayServer(settings) as server:
        yield server


def post(gateway, path="/llm/message", body=HELLO, **kwargs):
    return requests.post(f"{gateway.url}{path}", json=body, timeout=30, **kwargs)


def cause(response):
    return response.json()["error"]["details"]["cause"]


# -- 10.1: the README's example on llama.cpp ----------------------------------


def test_readme_example_works_on_llama_cpp(llama_gateway, llama_cpp):
    requests.get(f"{llama_gateway.url}/health", timeout=10)  # learns its model
    response = requests.post(
        f"{llama_gateway.url}/llm/message",
        data=README_BODY,
        headers=README_HEADERS,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["correlation_id"] == "my-request-1"
    sent = llama_cpp.requests[-1].headers
    assert sent["x-correlation-id"] == "my-request-1"
    assert "x-request-id" not in sent
    # llama.cpp echoes the name asked for; the model that answered is its own.
    assert response.json()["model"] == "gemma-3-270m"


def test_a_uuid_correlation_id_also_goes_as_x_request_id(llama_gateway, llama_cpp):
    request_id = str(uuid.uuid4())
    response = post(llama_gateway, headers={"X-Request-ID": request_id})
    assert response.status_code == 200, response.text
    assert llama_cpp.requests[-1].headers["x-request-id"] == request_id


def test_empty_upstream_error_relays_its_status_text(llama_gateway, llama_cpp):
    llama_cpp.fault("status", times=1, status=422, body=b"")
    response = post(llama_gateway, body={**HELLO, "model": "m"})
    assert response.status_code == 422
    assert "Unprocessable" in response.json()["error"]["message"]


# -- 10.5: the bundled model, honestly ----------------------------------------


def test_embeddings_relay_llama_cpps_explanation_without_retrying(
    llama_gateway, llama_cpp
):
    llama_cpp.clear_records()
    response = post(llama_gateway, "/v1/embeddings", {"input": "hello"})
    assert response.status_code == 502
    assert "embedding=True" in response.json()["error"]["message"]
    embeddings = [r for r in llama_cpp.requests if r.path == "/v1/embeddings"]
    assert len(embeddings) == 1


def test_health_is_not_503_while_llama_cpp_generates(llama_gateway, llama_cpp):
    assert requests.get(f"{llama_gateway.url}/health", timeout=10).ok
    llama_cpp.first_token_delay = 6.0
    try:
        slow = threading.Thread(target=post, args=(llama_gateway,), daemon=True)
        slow.start()
        assert llama_cpp.wait_for(lambda: llama_cpp._generations, timeout=10)
        health = requests.get(f"{llama_gateway.url}/health", timeout=10)
        ready = requests.get(f"{llama_gateway.url}/health/ready", timeout=10)
    finally:
        llama_cpp.first_token_delay = 0.0
    slow.join(15)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "busy"
    assert health.json()["lm_studio"]["busy"] is True
    assert ready.status_code == 200, ready.text
    assert ready.json()["models"] == ["gemma-3-270m"]


# -- 10.2 and 9.15: what is wrong, named as such --------------------------------


def test_wrong_path_on_llama_cpp_is_502_naming_the_url(llama_cpp):
    settings = {"LM_STUDIO_URL": f"{llama_cpp.url}/api", **FAST_FAILURE}
    with GatewayServer(settings) as gateway:
        named = post(gateway, body={**HELLO, "model": "gemma-3-270m"})
        unnamed = post(gateway)
        health = requests.get(f"{gateway.url}/health", timeout=10)
    for response in (named, unnamed):
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "upstream_invalid_response"
        assert "upstream URL" in response.json()["error"]["message"]
        assert cause(response) == "not_openai"
    assert health.status_code == 503
    assert health.json()["lm_studio"]["cause"] == "not_openai"


def test_token_needed_without_a_model_is_502_auth(gateway, fake):
    fake.api_token = "secret"
    response = post(gateway)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_auth_failed"
    assert cause(response) == "auth"
    health = requests.get(f"{gateway.url}/health", timeout=10)
    assert health.json()["lm_studio"]["cause"] == "auth"
    assert health.json()["error"]["code"] == "upstream_auth_failed"


@pytest.mark.parametrize("model", [None, "fake-model-1"])
def test_a_plain_web_server_is_502_not_openai(gateway, fake, model):
    fake.fault("web_server")
    body = {**HELLO, "model": model} if model else HELLO
    response = post(gateway, body=body)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_invalid_response"
    assert cause(response) == "not_openai"


def test_garbage_is_502_invalid_response_and_health_says_what_it_saw(gateway, fake):
    fake.fault("garbage", data="SSH-2.0-OpenSSH_9.2p1\r\n")
    response = post(gateway, body={**HELLO, "model": "fake-model-1"})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_invalid_response"
    assert cause(response) == "not_http"
    health = requests.get(f"{gateway.url}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["lm_studio"]["cause"] == "not_http"
    assert "SSH-2.0" in health.json()["lm_studio"]["error"]


def test_refused_names_nothing_listening(gateway, fake):
    fake.fault("refuse")
    response = post(gateway)
    assert response.status_code == 503
    assert cause(response) == "refused"
    assert "nothing is listening" in response.json()["error"]["message"]


def test_every_answer_says_it_came_through_llm_service(gateway):
    response = requests.get(f"{gateway.url}/health/live", timeout=5)
    assert response.headers["Via"] == "1.1 llm-service"


# -- 10.3: a gateway pointed at itself ------------------------------------------


def test_a_gateway_pointed_at_itself_stops_at_once():
    gateway = GatewayServer({**FAST_FAILURE, "LM_STUDIO_RETRY_BUDGET": 20})
    gateway.env["LLM_SERVICE_LM_STUDIO_URL"] = gateway.url
    with gateway:
        started = time.monotonic()
        response = post(gateway, body={**HELLO, "model": "any"})
        elapsed = time.monotonic() - started
        health = requests.get(f"{gateway.url}/health", timeout=10)
    assert response.status_code == 508, response.text
    assert response.json()["error"]["code"] == "upstream_loop"
    assert cause(response) == "loop"
    assert elapsed < 5
    assert health.json()["lm_studio"]["cause"] == "loop"

"""Several hosts against two real llama.cpp servers (the bundled one, twice).

Each server runs one request at a time, so the gateway gives each ``slots: 1``
(it has no ``/props`` to say so). Where each request went is read from the
``X-Upstream-Host`` header and checked against the access log.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import local_backend
from tests.live.conftest import LIVE_SETTINGS
from tests.servers import GatewayServer, free_port


@pytest.fixture(scope="module")
def two_servers():
    try:
        python = local_backend.ensure_installed()
        local_backend.ensure_model(python)
    except local_backend.LocalBackendError as err:
        pytest.fail(f"the bundled model server cannot be installed: {err}")
    servers = {}
    try:
        for name in ("gemma-a", "gemma-b"):
            server = local_backend.LocalModelServer(
                port=free_port(), python=python, threads=1, model_alias=name
            )
            server.start(timeout=300)
            servers[name] = server
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def hosts_gateway(two_servers):
    upstreams = [
        {"name": name, "url": server.url, "slots": 1}
        for name, server in two_servers.items()
    ]
    settings = {
        **LIVE_SETTINGS,
        "UPSTREAMS": json.dumps(upstreams),
        "DISCOVERY_INTERVAL_SECONDS": 1,
    }
    with GatewayServer(settings) as gateway:
        wait_until_both_hosts_answer(gateway)
        yield gateway


def wait_until_both_hosts_answer(gateway, timeout: float = 120) -> None:
    """Routing is under test here, not start-up: wait for both first probes.

    On a loaded machine a server's first probe can time out; the gateway then
    counts the host as down (and leaves it out of ``/v1/models``) until
    discovery's next probe a second later.
    """
    deadline = time.monotonic() + timeout
    while True:
        body = requests.get(f"{gateway.url}/health", timeout=30).json()
        statuses = [host["status"] for host in body.get("hosts", [])]
        if len(statuses) == 2 and all(s in ("up", "busy") for s in statuses):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the hosts never both answered: {statuses}")
        time.sleep(0.5)


def chat(gateway, model, messages, max_tokens=4):
    response = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": max_tokens},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response


def access_hosts(gateway) -> list[str]:
    """``upstream_host`` of each chat completion in the access log, in order."""
    hosts = []
    for line in gateway.logs().splitlines():
        if '"llm_service.access"' in line and "/v1/chat/completions" in line:
            hosts.append(json.loads(line)["upstream_host"])
    return hosts


def test_each_model_goes_to_the_server_that_serves_it(hosts_gateway):
    body = requests.get(f"{hosts_gateway.url}/v1/models", timeout=30).json()
    listed = {entry["id"]: entry["loaded_on"] for entry in body["data"]}
    assert listed == {"gemma-a": ["gemma-a"], "gemma-b": ["gemma-b"]}
    served = []
    for model in ("gemma-b", "gemma-a", "gemma-b"):
        response = chat(hosts_gateway, model, [{"role": "user", "content": "Hi"}])
        served.append(response.headers["X-Upstream-Host"])
        # llama.cpp answers with its own model, whatever name was asked.
        assert response.json()["model"] == model
    assert served == ["gemma-b", "gemma-a", "gemma-b"]
    assert access_hosts(hosts_gateway)[-3:] == served
    health = requests.get(f"{hosts_gateway.url}/health", timeout=30).json()
    assert [h["name"] for h in health["hosts"]] == ["gemma-a", "gemma-b"]
    assert all(h["slots"] == 1 for h in health["hosts"])


def test_conversations_keep_their_server(hosts_gateway):
    # A model neither lists goes to the least loaded server, which serves it
    # (llama.cpp answers any name): both servers are candidates.
    model = "any-gemma"
    chats = [
        [{"role": "user", "content": f"Conversation {n}: list many colours."}]
        for n in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        # A long first answer: still in flight when the second is placed,
        # which then goes to the other, idle server.
        first = pool.submit(chat, hosts_gateway, model, chats[0], 200)
        time.sleep(0.2)
        second = pool.submit(chat, hosts_gateway, model, chats[1])
        responses = [first.result(), second.result()]
    homes = [r.headers["X-Upstream-Host"] for r in responses]
    assert sorted(homes) == ["gemma-a", "gemma-b"]
    for _turn in range(2):
        for n, messages in enumerate(chats):
            answer = responses[n].json()["choices"][0]["message"]["content"][:200]
            messages += [
                {"role": "assistant", "content": answer or "ok"},
                {"role": "user", "content": "And another?"},
            ]
            responses[n] = chat(hosts_gateway, model, messages)
            assert responses[n].headers["X-Upstream-Host"] == homes[n]
    assert access_hosts(hosts_gateway)[-4:] == [*homes, *homes]

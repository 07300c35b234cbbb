"""Several model hosts: three fake hosts over real sockets, the gateway in front.

Placement by where a model is loaded, the /v1/models union, failover when a
host dies under load, circuit breakers, conversation affinity.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.fakes.lmstudio import FakeLMStudio
from tests.integration.conftest import FAST_FAILURE
from tests.servers import GatewayServer

NAMES = ("a", "b", "c")


@pytest.fixture
def fakes():
    hosts = {
        name: FakeLMStudio(models=["alpha", "beta"], loaded=["alpha"]) for name in NAMES
    }
    for fake in hosts.values():
        fake.start()
    yield hosts
    for fake in hosts.values():
        fake.stop()


def start_gateway(fakes, **settings) -> GatewayServer:
    upstreams = [{"name": name, "url": fake.url} for name, fake in fakes.items()]
    config = {
        **FAST_FAILURE,
        "UPSTREAMS": json.dumps(upstreams),
        "DISCOVERY_INTERVAL_SECONDS": 0.3,
        **settings,
    }
    return GatewayServer(config).start()


@pytest.fixture
def gateway_for(fakes):
    started = []

    def start(**settings):
        gateway = start_gateway(fakes, **settings)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def hosts_health(gateway) -> dict[str, dict]:
    body = requests.get(f"{gateway.url}/health", timeout=10).json()
    return {host["name"]: host for host in body["hosts"]}


def wait_until(predicate, timeout=10.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


_questions = itertools.count()


def chat(gateway, model="alpha", messages=None, **extra):
    """One chat request; without ``messages``, a new conversation each time."""
    messages = messages or [{"role": "user", "content": f"q{next(_questions)}"}]
    return requests.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": model,
            "messages": messages,
            "max_tokens": 5,
            **extra,
        },
        timeout=30,
    )


def chats_at(fake) -> int:
    return sum(r.path == "/v1/chat/completions" for r in fake.requests)


def test_a_model_goes_where_it_is_loaded(fakes, gateway_for):
    fakes["a"].loaded = []
    fakes["b"].loaded = ["beta"]
    fakes["c"].loaded = ["alpha"]
    gateway = gateway_for()
    for _ in range(6):
        response = chat(gateway, model="beta")
        assert response.status_code == 200
        assert response.headers["X-Upstream-Host"] == "b"
        response = chat(gateway, model="alpha")
        assert response.headers["X-Upstream-Host"] == "c"
    assert chats_at(fakes["a"]) == 0
    assert chats_at(fakes["b"]) == 6
    assert chats_at(fakes["c"]) == 6
    assert "upstream_host" in gateway.logs()


def generating(fake, model) -> bool:
    """True while ``fake`` works on a generation for ``model``."""
    return any(
        r.path == "/v1/chat/completions"
        and (r.json or {}).get("model") == model
        and r.status is None
        for r in fake.requests
    )


def test_an_unloaded_model_goes_to_an_idle_host(fakes, gateway_for):
    # beta is listed by b and c, loaded nowhere: either would load it.
    fakes["a"].models = ["alpha"]
    gateway = gateway_for()
    wait_until(lambda: all(h["status"] == "up" for h in hosts_health(gateway).values()))
    for round_ in range(3):
        # Each request a conversation of its own: no affinity at play.
        first = [{"role": "user", "content": f"slow {round_}"}]
        second = [{"role": "user", "content": f"fast {round_}"}]
        # A long generation at one of them...
        fakes["b"].first_token_delay = fakes["c"].first_token_delay = 1.2
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(chat, gateway, "beta", first)
            busy = wait_until(
                lambda: next((n for n in "bc" if generating(fakes[n], "beta")), None),
                timeout=5,
            )
            time.sleep(0.3)  # it has read its delay
            fakes["b"].first_token_delay = fakes["c"].first_token_delay = 0
            # ...and the next request for beta goes to the other, idle one.
            response = chat(gateway, "beta", second)
            assert response.status_code == 200
            assert response.headers["X-Upstream-Host"] == ("c" if busy == "b" else "b")
            assert slow.result().status_code == 200
        for fake in fakes.values():
            fake.clear_records()


def test_models_are_listed_once_with_where_they_are_loaded(fakes, gateway_for):
    fakes["a"].models, fakes["a"].loaded = ["alpha", "beta"], ["alpha"]
    fakes["b"].models, fakes["b"].loaded = ["alpha", "gamma"], ["gamma"]
    fakes["c"].models, fakes["c"].loaded = ["delta"], []
    gateway = gateway_for()

    def listing():
        body = requests.get(f"{gateway.url}/v1/models", timeout=10).json()
        return body if len(body["data"]) == 4 else None

    # A host whose first probe is still under way is listed once it answers
    # (seen under load right after start-up): the union converges.
    body = wait_until(listing)
    models = {entry["id"]: entry for entry in body["data"]}
    assert body["object"] == "list"
    assert sorted(models) == ["alpha", "beta", "delta", "gamma"]
    assert len(body["data"]) == 4
    assert models["alpha"]["loaded_on"] == ["a"]
    assert models["alpha"]["available_on"] == ["a", "b"]
    assert models["gamma"]["loaded_on"] == ["b"]
    assert models["delta"]["loaded_on"] == []
    ready = requests.get(f"{gateway.url}/health/ready", timeout=10).json()
    assert ready["status"] == "ready"
    assert sorted(ready["models"]) == ["alpha", "gamma"]
    assert [h["name"] for h in ready["hosts"]] == ["a", "b", "c"]


def test_an_unknown_model_names_the_available_ones(fakes, gateway_for):
    gateway = gateway_for()
    response = chat(gateway, model="nowhere")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "alpha" in error["message"]
    assert "beta" in error["message"]


def test_no_request_fails_when_a_host_dies_under_load(fakes, gateway_for):
    for fake in fakes.values():
        fake.first_token_delay = 0.2
        fake.stream_interval = 0.05
    gateway = gateway_for(BREAKER_FAILURES=2, BREAKER_COOLDOWN_SECONDS=30)
    wait_until(lambda: all(h["status"] == "up" for h in hosts_health(gateway).values()))
    stop = threading.Event()
    outcomes: list[tuple[str, int, int, bool]] = []  # kind, status, events, error
    lock = threading.Lock()

    def plain() -> None:
        while not stop.is_set():
            response = chat(gateway)
            with lock:
                outcomes.append(("plain", response.status_code, 0, False))

    def streamed() -> None:
        while not stop.is_set():
            with requests.post(
                f"{gateway.url}/v1/chat/completions",
                json={
                    "model": "alpha",
                    "stream": True,
                    "messages": [{"role": "user", "content": "one two three four"}],
                },
                stream=True,
                timeout=30,
            ) as response:
                events, failed = 0, False
                for line in response.iter_lines():
                    if line.startswith(b"data: {") and b'"error"' in line:
                        failed = True
                    elif line.startswith(b"data: {"):
                        events += 1
            with lock:
                outcomes.append(("stream", response.status_code, events, failed))

    workers = [threading.Thread(target=plain) for _ in range(6)]
    workers += [threading.Thread(target=streamed) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: chats_at(fakes["b"]) >= 3, timeout=10)
        fakes["b"].refuse(drop_connections=True)  # the host's process died
        time.sleep(2.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    plain_ones = [o for o in outcomes if o[0] == "plain"]
    streams = [o for o in outcomes if o[0] == "stream"]
    assert len(plain_ones) > 20
    assert len(streams) > 5
    assert [o for o in plain_ones if o[1] != 200] == []
    assert [o for o in streams if o[1] != 200] == []
    # A stream may fail only once it had started (its first event was out).
    assert [o for o in streams if o[3] and o[2] == 0] == []
    health = hosts_health(gateway)
    assert health["b"]["status"] == "down"
    assert health["b"]["circuit"] == "open"

    # It comes back: used again without a restart (once its trial succeeds).
    fakes["b"].accept()
    wait_until(lambda: hosts_health(gateway)["b"]["status"] == "up")


def test_a_host_that_comes_back_is_used_again(fakes, gateway_for):
    gateway = gateway_for(BREAKER_FAILURES=1, BREAKER_COOLDOWN_SECONDS=1)
    fakes["a"].refuse()
    fakes["b"].refuse()
    for _ in range(4):
        assert chat(gateway).status_code == 200
    wait_until(lambda: hosts_health(gateway)["a"]["status"] == "down")
    fakes["a"].accept()
    fakes["b"].accept()
    wait_until(lambda: hosts_health(gateway)["a"]["status"] == "up")
    served = collections.Counter(
        chat(gateway, messages=[{"role": "user", "content": f"q{n}"}]).headers[
            "X-Upstream-Host"
        ]
        for n in range(30)
    )
    assert set(served) == {"a", "b", "c"}
    assert hosts_health(gateway)["a"]["circuit"] == "closed"


def test_circuit_opens_half_opens_and_closes(fakes, gateway_for):
    gateway = gateway_for(BREAKER_FAILURES=2, BREAKER_COOLDOWN_SECONDS=2)
    fakes["b"].fault("status", path="/v1/chat/completions", status=500)
    # Every request succeeds (on a or c) while b fails twice and opens.
    wait_until(lambda: chat(gateway).status_code == 200 and chats_at(fakes["b"]) >= 2)
    assert chats_at(fakes["b"]) == 2
    assert hosts_health(gateway)["b"]["circuit"] == "open"
    opened = time.monotonic()
    # Open: no traffic for the cooldown.
    while time.monotonic() - opened < 1.5:
        assert chat(gateway).status_code == 200
    assert chats_at(fakes["b"]) == 2
    # After the cooldown one trial goes to b; it fails: open again.
    wait_until(lambda: chat(gateway).status_code == 200 and chats_at(fakes["b"]) == 3)
    assert hosts_health(gateway)["b"]["circuit"] == "open"
    reopened = time.monotonic()
    while time.monotonic() - reopened < 1.5:
        assert chat(gateway).status_code == 200
    assert chats_at(fakes["b"]) == 3
    # b is fixed: the next trial succeeds and the circuit closes.
    fakes["b"].clear_faults()
    wait_until(lambda: chat(gateway).headers["X-Upstream-Host"] == "b")
    assert hosts_health(gateway)["b"]["circuit"] == "closed"


def conversation(topic: str, turns: int):
    """The messages of each turn of a conversation about ``topic``."""
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": f"Long shared context about {topic}."},
    ]
    for turn in range(turns):
        yield list(messages)
        messages += [
            {"role": "assistant", "content": f"Answer {turn}."},
            {"role": "user", "content": f"Follow-up {turn} on {topic}?"},
        ]


def test_a_conversation_stays_on_its_host_and_conversations_spread(fakes, gateway_for):
    gateway = gateway_for()
    chats = {f"topic-{n}": conversation(f"topic-{n}", 4) for n in range(10)}
    served: dict[str, set[str]] = collections.defaultdict(set)
    for _turn in range(4):  # interleaved: one turn of each, then the next
        for topic, turns in chats.items():
            response = chat(gateway, messages=next(turns))
            assert response.status_code == 200
            served[topic].add(response.headers["X-Upstream-Host"])
    assert all(len(hosts) == 1 for hosts in served.values()), served
    assert len(set.union(*served.values())) > 1


def test_affinity_off_places_each_turn_on_its_own(fakes, gateway_for):
    gateway = gateway_for(AFFINITY="off")
    served = set()
    for messages in conversation("one topic", 20):
        served.add(chat(gateway, messages=messages).headers["X-Upstream-Host"])
    assert len(served) > 1

"""Admission through the real gateway: slots, the bounded queue, its deadline,
queue comments on streams, hang-ups while queued, and slots shared in Redis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from tests.integration.conftest import FAST_FAILURE
from tests.integration.test_redis_limits import redis_url  # noqa: F401 - fixture
from tests.servers import GatewayServer
from tests.support.sse import events_of

QUEUE = {
    "UPSTREAM_SLOTS": 1,
    "QUEUE_MAX": 2,
    "QUEUE_MAX_PER_KEY": 2,
    "QUEUE_TIMEOUT": 4,
    "LM_STUDIO_TIMEOUT": 20,
}


def chat(content="hi", model="fake-model-1", **extra):
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def stall(seconds: float) -> dict:
    return chat(model=f"fault:stall?seconds={seconds}")


@pytest.fixture(scope="module")
def queue_gateway(fake):
    settings = {"LM_STUDIO_URL": fake.url, **FAST_FAILURE, **QUEUE}
    with GatewayServer(settings) as server:
        yield server


def post(gateway, body, path="/v1/chat/completions", **kwargs):
    return requests.post(f"{gateway.url}{path}", json=body, timeout=30, **kwargs)


def in_background(function, *args):
    """Run ``function(*args)`` in a thread; return a way to get its result."""
    result = {}

    def run():
        try:
            result["value"] = function(*args)
        except requests.RequestException as err:  # e.g. the gateway was killed
            result["value"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(30)
        return result.get("value")

    return join


def occupy(gateway, fake, seconds):
    """Hold the gateway's one slot with a request the fake answers late."""
    before = len(fake.requests)
    done = in_background(post, gateway, stall(seconds))
    fake.wait_for(lambda: len(fake.requests) > before, timeout=10)
    return done


def test_answers_carry_the_time_queued(queue_gateway, fake):
    response = post(queue_gateway, chat())
    assert response.status_code == 200
    assert float(response.headers["X-Queue-Time"]) < 0.5
    message = post(queue_gateway, chat(), path="/llm/message")
    assert message.json()["queue_time"] < 0.5


def test_a_waiting_request_is_served_when_the_slot_frees(queue_gateway, fake):
    first = occupy(queue_gateway, fake, 1.0)
    response = post(queue_gateway, chat("second"))
    assert response.status_code == 200
    assert float(response.headers["X-Queue-Time"]) >= 0.3
    assert first().status_code == 200


def test_queue_full_is_decided_at_once_with_retry_after(queue_gateway, fake):
    first = occupy(queue_gateway, fake, 2.0)
    waiting = [in_background(post, queue_gateway, chat(f"w{i}")) for i in range(2)]
    time.sleep(0.5)  # both are queued now (QUEUE_MAX = 2)
    started = time.monotonic()
    refused = post(queue_gateway, chat("third"))
    assert time.monotonic() - started < 1.0
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    first()
    assert [join().status_code for join in waiting] == [200, 200]
    assert all(
        "third" not in json.dumps(r.json) for r in fake.requests if r.json is not None
    )


def test_queue_timeout_with_retry_after(queue_gateway, fake):
    first = occupy(queue_gateway, fake, 5.5)
    started = time.monotonic()
    late = post(queue_gateway, chat("late"), path="/llm/message")
    waited = time.monotonic() - started
    assert late.status_code == 503
    body = late.json()
    assert body["error"]["code"] == "queue_timeout"
    assert int(late.headers["Retry-After"]) >= 1
    assert 3.5 <= waited < 5.5
    first()
    assert all(
        "late" not in json.dumps(r.json) for r in fake.requests if r.json is not None
    )


def test_a_waiting_stream_gets_its_position_then_the_answer(queue_gateway, fake):
    first = occupy(queue_gateway, fake, 3.0)
    response = post(queue_gateway, chat("alpha beta", stream=True), stream=True)
    assert response.status_code == 200
    text = response.content.decode()
    events = events_of(text)
    assert events[0] == ": queued position=1"
    assert events.count(": queued position=1") >= 2  # every 2 s while waiting
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith(": queue_time=")
    assert float(events[-2].split("=")[1]) >= 1.5
    assert any("alpha" in event for event in events if event.startswith("data: {"))
    assert first().status_code == 200


def test_message_stream_reports_the_wait_in_its_done_event(queue_gateway, fake):
    first = occupy(queue_gateway, fake, 1.0)
    response = post(
        queue_gateway, chat("alpha", stream=True), path="/llm/message", stream=True
    )
    events = events_of(response.content.decode())
    assert events[0].startswith(": queued position=")
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert events[-1].startswith("event: done")
    assert done["queue_time"] >= 0.3
    first()


def test_a_stream_past_the_deadline_ends_with_a_queue_timeout_event(
    queue_gateway, fake
):
    first = occupy(queue_gateway, fake, 9.0)
    response = post(
        queue_gateway, chat("late", stream=True), path="/llm/message", stream=True
    )
    assert response.status_code == 200
    events = events_of(response.content.decode())
    assert events[0].startswith(": queued position=")
    assert events[-1].startswith("event: error")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["code"] == "queue_timeout"
    assert error["retry_after"] >= 1
    v1 = post(queue_gateway, chat("late", stream=True), stream=True)
    first()
    v1_error = json.loads(events_of(v1.content.decode())[-1].split("data: ", 1)[1])
    assert v1_error["error"]["code"] in ("queue_timeout",)
    assert v1_error["error"]["retry_after"] >= 1
    assert all(
        "late" not in json.dumps(r.json) for r in fake.requests if r.json is not None
    )


def send_raw(gateway, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_leaves_the_queue_is_never_sent_upstream(
    queue_gateway, fake, streamed
):
    first = occupy(queue_gateway, fake, 1.5)
    gone = send_raw(queue_gateway, chat("gone-while-queued", stream=streamed))
    time.sleep(0.5)  # queued now
    gone.close()
    time.sleep(0.2)
    # Its place is free at once: the queue holds 2, and both fit.
    others = [in_background(post, queue_gateway, chat(f"o{i}")) for i in range(2)]
    assert first().status_code == 200
    assert [join().status_code for join in others] == [200, 200]
    sent = [json.dumps(r.json) for r in fake.requests if r.json is not None]
    assert not any("gone-while-queued" in body for body in sent)
    logs = queue_gateway.logs()
    assert '"status": 499' in logs or "499" in logs


# -- several workers: slots ÷ N, or leases in Redis ------------------------------


def run_concurrently(gateway, count, path="/v1/chat/completions"):
    def one(i):
        return requests.post(
            f"{gateway.url}{path}",
            json=chat(f"c{i}"),
            headers={"Connection": "close"},  # spread over the workers
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_host_with_two_slots_never_runs_more_with_redis(
    fake,
    redis_url,  # noqa: F811
    workers,
):
    fake.first_token_delay = 0.02
    fake.peak_generations = 0
    settings = {
        "LM_STUDIO_URL": fake.url,
        **FAST_FAILURE,
        "UPSTREAM_SLOTS": 2,
        "RATE_LIMIT_STORAGE_URI": redis_url,
        "LM_STUDIO_TIMEOUT": 30,
    }
    with GatewayServer(settings, workers=workers) as gateway:
        statuses = run_concurrently(gateway, 200)
        logs = gateway.logs()
    assert statuses == [200] * 200
    assert fake.peak_generations == 2
    assert logs.count("Booting worker") == workers
    assert "slot store unreachable" not in logs


def test_without_redis_each_worker_takes_its_share_of_the_slots(fake):
    fake.first_token_delay = 0.02
    fake.peak_generations = 0
    settings = {
        "LM_STUDIO_URL": fake.url,
        **FAST_FAILURE,
        "UPSTREAM_SLOTS": 2,
        "LM_STUDIO_TIMEOUT": 30,
    }
    with GatewayServer(settings, workers=2) as gateway:
        statuses = run_concurrently(gateway, 100)
    assert statuses == [200] * 100
    assert fake.peak_generations <= 2


def kill_hard(gateway: GatewayServer) -> None:
    """SIGKILL the gunicorn master and its workers: nothing is released."""
    master = gateway.process.pid
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            children.append(int(entry.name))
    for pid in [*children, master]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    gateway.process.wait(10)


def test_slots_of_a_killed_gateway_come_back_when_their_leases_expire(
    fake,
    redis_url,  # noqa: F811
):
    redis.Redis.from_url(redis_url).flushdb()
    settings = {
        "LM_STUDIO_URL": fake.url,
        **FAST_FAILURE,
        "UPSTREAM_SLOTS": 1,
        "RATE_LIMIT_STORAGE_URI": redis_url,
        "SLOT_LEASE_SECONDS": 3,
        "QUEUE_TIMEOUT": 20,
        "LM_STUDIO_TIMEOUT": 30,
    }
    first = GatewayServer(settings).start()
    try:
        before = len(fake.requests)
        in_background(post, first, stall(20))
        fake.wait_for(lambda: len(fake.requests) > before, timeout=10)
        # Renewed while it runs: still held after longer than one lease.
        time.sleep(4)
        keys = redis.Redis.from_url(redis_url).keys("llm_service:slots:*")
        held = [k for k in keys if not k.endswith(b":freed")]
        assert held
        assert redis.Redis.from_url(redis_url).zcard(held[0]) == 1
        kill_hard(first)
        killed_at = time.monotonic()
    finally:
        first.stop()
    with GatewayServer(settings) as second:
        response = post(second, chat("after the crash"))
        served_after = time.monotonic() - killed_at
    assert response.status_code == 200
    # It waited for the dead gateway's lease to expire (3 s from its last renewal).
    assert float(response.headers["X-Queue-Time"]) > 0.2
    assert served_after < 3 + 1 + 10  # lease + poll + start-up on a loaded machine


def test_a_released_slot_goes_to_the_process_that_waited_longest(
    redis_url,  # noqa: F811
):
    from llm_service.upstreams.leases import RedisSlots

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    releasing, waiting = RedisSlots(client, 30), RedisSlots(client, 30)
    held = releasing.try_acquire("turns:1", 1)
    assert held is not None
    assert waiting.try_acquire("turns:1", 1) is None  # now in line
    releasing.release(held)
    # The releasing process asks again at once, first: the slot is not its.
    assert releasing.try_acquire("turns:1", 1) is None
    assert waiting.try_acquire("turns:1", 1) is not None
    assert releasing.try_acquire("turns:1", 1) is None  # full again
    assert client.zcard("llm_service:slots:turns:1") == 1


def test_a_release_is_announced_only_while_a_process_waits(
    redis_url,  # noqa: F811
):
    """No waiter, no announcement: it would wake every gateway's listener."""
    from llm_service.upstreams.leases import CHANNEL, RedisSlots

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(CHANNEL)
    assert listener.get_message(timeout=1) is None  # the subscription itself

    def announced() -> list[bytes]:
        found = []
        while (message := listener.get_message(timeout=0.2)) is not None:
            found.append(message["data"])
        return found

    one, other = RedisSlots(client, 30), RedisSlots(client, 30)
    lease = one.try_acquire("quiet:1", 1)
    one.release(lease)
    assert announced() == []

    lease = one.try_acquire("quiet:1", 1)
    assert other.try_acquire("quiet:1", 1) is None  # now waiting
    one.release(lease)
    assert announced() == [b"quiet:1"]
    listener.close()


def test_health_shows_the_requests_waiting_for_a_slot(queue_gateway, fake):
    first = occupy(queue_gateway, fake, 1.5)
    second = in_background(post, queue_gateway, chat("second"))
    deadline = time.monotonic() + 5
    queued = None
    while time.monotonic() < deadline:
        (host,) = requests.get(f"{queue_gateway.url}/health", timeout=10).json()[
            "hosts"
        ]
        queued = host["queued"]
        if queued == 1:
            break
        time.sleep(0.05)
    assert queued == 1
    assert first().status_code == 200
    assert second().status_code == 200
    (host,) = requests.get(f"{queue_gateway.url}/health", timeout=10).json()["hosts"]
    assert host["queued"] == 0

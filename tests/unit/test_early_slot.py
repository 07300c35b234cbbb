"""A keyed request's slot lease, asked for with its quota admission: one trip.

With one host the door's host is known before the view, so the lease rides
along the request's first trip to the shared store (:func:`store.ride`), and
the door uses it. A lease the view never uses goes back at the request's end;
none is asked while a request of this process waits for the host.
"""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import redis

from llm_service import quotas, store, upstreams
from llm_service.upstreams import leases
from llm_service.upstreams.admission import Admission
from tests.conftest import UPSTREAM
from tests.databases import RedisServer
from tests.servers import free_port
from tests.unit.test_auth import COMPLETION, HELLO, bearer, create_key
from tests.unit.test_store import Client

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"


@pytest.fixture(autouse=True)
def fresh_thread_state():
    store._begin()
    yield
    store._begin()


# -- riders, with a fake server ---------------------------------------------------


def test_a_rider_goes_with_the_next_run_of_a_held_request_and_hears_its_reply():
    client, heard = Client(), []
    admit, acquire = client.script("admit"), client.script("acquire")
    store.ride(client, lambda: (acquire, ["slots"], [4]), heard.append)
    store.run(client, admit, ["quota"], [1])  # not held: rides nothing
    assert client.trips == [[("admit", ("quota",), (1,))]]
    store.hold()
    assert store.run(client, admit, ["quota"], [1]) == 1
    assert client.trips[-1] == [
        ("admit", ("quota",), (1,)),
        ("acquire", ("slots",), (4,)),
    ]
    assert heard == [1]
    store.run(client, admit, ["quota"], [1])  # once
    assert len(client.trips[-1]) == 1


def test_a_rider_that_prepares_nothing_sends_nothing():
    client, heard = Client(), []
    admit = client.script("admit")
    store.hold()
    store.ride(client, lambda: None, heard.append)
    store.run(client, admit, ["quota"], [1])
    assert client.trips == [[("admit", ("quota",), (1,))]]
    assert heard == []


def test_a_failed_trip_gives_its_riders_the_error():
    client, heard = Client(), []
    admit, acquire = client.script("admit"), client.script("acquire")
    store.hold()
    store.ride(client, lambda: (acquire, ["slots"], [4]), heard.append)
    client.down = True
    with pytest.raises(redis.ConnectionError):
        store.run(client, admit, ["quota"], [1])
    assert [type(error) for error in heard] == [redis.ConnectionError]


def test_riders_never_go_with_the_request_end_nor_to_the_next_request():
    client, heard = Client(), []
    admit, acquire = client.script("admit"), client.script("acquire")
    store.hold()
    store.ride(client, lambda: (acquire, ["slots"], [4]), heard.append)
    with store.request_end():
        store.write(client, admit, ["quota"], [1])
    store._begin()
    store.hold()
    store.run(client, admit, ["quota"], [1])
    assert all(len(trip) == 1 for trip in client.trips)
    assert heard == []


# -- the app, against a real Redis ------------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    server.admin = redis.Redis.from_url(server.url)
    yield server
    server.admin.close()
    server.stop()


@pytest.fixture
def app(app_factory, tmp_path, redis_server):
    redis_server.admin.flushall()
    app = app_factory(
        DATABASE_URL=f"sqlite:///{tmp_path}/early.db",
        RATE_LIMIT_STORAGE_URI=redis_server.url,
    )
    yield app
    client = store.redis_for(app)
    lean = store.connections(client)
    while lean.free:
        lean.drop(lean.free.pop())
    client.connection_pool.disconnect()


@pytest.fixture
def trips(monkeypatch):
    """The scripts each round trip of this thread to the store ran, by name."""
    scripts = {
        "ADMIT": quotas._ADMIT,
        "FINISH": quotas._FINISH,
        "ACQUIRE": leases.ACQUIRE,
        "RELEASE": leases.RELEASE,
    }
    names = {
        hashlib.sha1(s.encode(), usedforsecurity=False).hexdigest(): n
        for n, s in scripts.items()
    }
    seen: list[list[str]] = []
    here = threading.get_ident()
    trip = store.Connections._trip

    def recorded(self, commands, stale=True):
        # This thread's (not the lease thread's), not a lost script's reloading.
        if threading.get_ident() == here and commands[0][0] != "SCRIPT":
            seen.append(
                [names.get(c[1], c[0]) if c[0] == "EVALSHA" else c[0] for c in commands]
            )
        return trip(self, commands, stale)

    monkeypatch.setattr(store.Connections, "_trip", recorded)
    return seen


def slots_leased(app, redis_server) -> int:
    """The leases of the app's host in Redis now."""
    host = app.extensions[upstreams.EXTENSION].hosts[0].slot_key
    return redis_server.admin.zcard(leases.slots_key(host))


def no_slot_held(app, redis_server):
    admission = app.extensions[upstreams.EXTENSION].admission
    assert all(h["in_flight"] == 0 for h in admission.snapshot().values())
    assert admission.store.redis.held == {}
    assert slots_leased(app, redis_server) == 0


def chat(app, key, **body):
    return app.test_client().post(
        "/v1/chat/completions", json={**HELLO, **body}, headers=bearer(key)
    )


def test_the_slot_is_taken_with_the_quota_admission_and_used(
    app, upstream, trips, redis_server, monkeypatch
):
    key = create_key(app, "alice", "--rpm", "10", "--concurrency", "2")
    monkeypatch.setattr(
        leases.RedisSlots, "try_acquire", pytest.fail, raising=True
    )  # the door takes no slot of its own
    upstream.post(CHAT, json=COMPLETION)
    response = chat(app, key)
    assert response.status_code == 200
    assert "X-Queue-Time" in response.headers
    assert ["ADMIT", "ACQUIRE"] in trips
    assert trips[-1] == ["RELEASE", "FINISH"]  # the request end: one trip
    no_slot_held(app, redis_server)


def test_a_refused_admission_gives_the_slot_back_at_its_end(
    app, upstream, trips, redis_server
):
    key = create_key(app, "alice", "--rpm", "1")
    upstream.post(CHAT, json=COMPLETION)
    assert chat(app, key).status_code == 200
    trips.clear()
    refused = chat(app, key)
    assert refused.status_code == 429
    assert ["ADMIT", "ACQUIRE"] in trips
    assert trips[-1] == ["RELEASE"]
    no_slot_held(app, redis_server)


def test_an_invalid_request_gives_the_slot_back_at_its_end(
    app, upstream, trips, redis_server
):
    key = create_key(app, "alice", "--rpm", "10", "--concurrency", "1")
    invalid = chat(app, key, temperature="hot")
    assert invalid.status_code in (400, 422)
    assert ["ADMIT", "ACQUIRE"] in trips
    assert trips[-1] == ["RELEASE", "FINISH"]
    no_slot_held(app, redis_server)
    upstream.post(CHAT, json=COMPLETION)
    assert chat(app, key).status_code == 200  # its concurrency unit came back


def test_no_slot_is_asked_early_while_a_request_waits_here(
    app, upstream, trips, redis_server
):
    key = create_key(app, "alice", "--rpm", "10")
    upstream_ = app.extensions[upstreams.EXTENSION]
    admission: Admission = upstream_.admission
    host = upstream_.hosts[0].slot_key
    admission.configure(host, 1)
    holder = admission.enter(host, "other")
    waiter = admission.enter(host, "other")
    assert holder.admitted
    assert not waiter.admitted
    trips.clear()
    try:
        assert chat(app, key, temperature="hot").status_code in (400, 422)
        assert ["ADMIT"] in trips
        assert not any("ACQUIRE" in trip for trip in trips)
    finally:
        waiter.release()
        holder.release()
    no_slot_held(app, redis_server)


def test_an_anonymous_request_takes_its_slot_at_the_door(app, upstream, trips):
    upstream.post(CHAT, json=COMPLETION)
    response = app.test_client().post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 200
    assert ["ACQUIRE"] in trips
    assert not any("ADMIT" in trip for trip in trips)


def test_a_stream_holds_its_early_slot_until_it_ends(
    app, upstream, trips, redis_server
):
    key = create_key(app, "alice", "--rpm", "10")
    chunk = {"model": "qwen-7b", "choices": [{"index": 0, "delta": {"content": "x"}}]}
    upstream.post(
        CHAT,
        body=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
        content_type="text/event-stream",
    )
    response = app.test_client().post(
        "/v1/chat/completions",
        json={**HELLO, "stream": True},
        headers=bearer(key),
        buffered=False,
    )
    held = []
    try:
        for _ in response.response:
            held.append(slots_leased(app, redis_server))
    finally:
        response.close()
    assert ["ADMIT", "ACQUIRE"] in trips
    assert held[0] == 1  # while it streams
    no_slot_held(app, redis_server)


def test_redis_away_at_the_admission_counts_slots_here(app_factory, tmp_path, upstream):
    app = app_factory(
        DATABASE_URL=f"sqlite:///{tmp_path}/away.db",
        RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}/0",
    )
    key = create_key(app, "alice", "--rpm", "10")
    upstream.post(CHAT, json=COMPLETION)
    assert chat(app, key).status_code == 200
    admission = app.extensions[upstreams.EXTENSION].admission
    assert admission.store.state == "local-fallback"
    assert app.extensions[quotas.EXTENSION].degraded
    assert all(h["in_flight"] == 0 for h in admission.snapshot().values())
    assert (
        admission.store.local.in_use(
            app.extensions[upstreams.EXTENSION].hosts[0].slot_key
        )
        == 0
    )


def test_an_early_ask_refused_keeps_the_process_out_of_the_line(app, redis_server):
    slots = app.extensions[upstreams.EXTENSION].admission.store
    taken = slots.try_acquire("h:1", 1)
    assert taken is not None
    heard = []
    slots.ask_along("h:1", lambda: 1, heard.append)
    store.hold()
    store.run(
        slots.redis.client, slots.redis._release, ["unrelated", "c", "w"], ["x", "h"]
    )
    assert heard == [None]
    shared = redis_server.admin
    assert shared.zcard(f"{leases.PREFIX}:h:1:waiting") == 0
    assert slots.try_acquire("h:1", 1) is None  # the door's ask joins it
    assert shared.zcard(f"{leases.PREFIX}:h:1:waiting") == 1

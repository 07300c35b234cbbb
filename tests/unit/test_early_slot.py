"""A keyed request's slot lease, taken in its quota admission's script: one trip.

With one host the door's host is known before the view, so the lease rides
along the request's first trip to the shared store (:func:`store.ride`): the
ACQUIRE script runs inside the quota's ADMIT script, only if it admitted the
request, and the door uses the lease. A request refused by its quota takes no
slot; a lease the view never uses goes back at the request's end; none is
asked while a request of this process waits for the host.
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

pytestmark = pytest.mark.mock_llm

CHAT = f"{UPSTREAM}/v1/chat/completions"


@pytest.fixture(autouse=True)
def fresh_thread_state():
    store._begin()
    yield
    store._begin()


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    server.admin = redis.Redis.from_url(server.url)
    yield server
    server.admin.close()
    server.stop()


def sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


@pytest.fixture
def trips(monkeypatch, redis_server):
    """The scripts each round trip of this thread to the store ran, by name."""
    scripts = {
        "ADMIT": quotas._ADMIT,
        "FINISH": quotas._FINISH,
        "ACQUIRE": leases.ACQUIRE,
        "RELEASE": leases.RELEASE,
        "FIRST": FIRST,
        "RIDER": RIDER,
    }
    names = {sha(s): n for n, s in scripts.items()}
    admin = redis_server.admin
    for first, rider, condition in [
        ("ADMIT", "ACQUIRE", quotas.ADMITTED),
        ("FIRST", "RIDER", WHEN),
    ]:
        together = store.fused(
            admin.register_script(scripts[first]),
            [admin.register_script(scripts[rider])],
            condition,
        )
        names[together.sha] = f"{first}+{rider}"
    seen: list[list[str]] = []
    here = threading.get_ident()
    trip = store.Connections._trip

    def recorded(self, commands, stale=True):
        # This thread's (not the lease thread's), not a lost script's reloading.
        if threading.get_ident() == here and commands[0][0] != "SCRIPT":
            seen.append(
                [names.get(c[1], c[1]) if c[0] == "EVALSHA" else c[0] for c in commands]
            )
        return trip(self, commands, stale)

    monkeypatch.setattr(store.Connections, "_trip", recorded)
    return seen


# -- riders, fused into the script they go with -----------------------------------

#: KEYS: a counter. ARGV: yes or no. Counts, and says ARGV[1] back.
FIRST = "redis.call('INCR', KEYS[1])\nreturn {ARGV[1], KEYS[1]}"
#: Runs only when FIRST said yes.
WHEN = "reply[1] == 'yes'"
#: KEYS: a counter. ARGV: by how much. Its new value.
RIDER = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def shared(redis_server):
    redis_server.admin.flushall()
    client = redis.Redis.from_url(redis_server.url)
    yield client
    lean = store.connections(client)
    while lean.free:
        lean.drop(lean.free.pop())
    client.close()


def count(client, key) -> int:
    return int(client.get(key) or 0)


def test_a_rider_runs_inside_the_next_run_that_takes_riders_when_allowed(shared, trips):
    first, rider, heard = (
        shared.register_script(FIRST),
        shared.register_script(RIDER),
        [],
    )
    store.ride(shared, lambda: (rider, ["ridden"], [5]), heard.append)
    store.run(shared, first, ["first"], ["yes"], riders_if=WHEN)  # not held
    store.hold()
    store.run(shared, first, ["first"], ["yes"])  # takes no riders
    assert trips == [["FIRST"], ["FIRST"]]
    assert count(shared, "ridden") == 0
    assert store.run(shared, first, ["first"], ["yes"], riders_if=WHEN) == [
        b"yes",
        b"first",
    ]
    assert trips[-1] == ["FIRST+RIDER"]  # one script, one trip
    assert heard == [5]
    assert count(shared, "ridden") == 5
    store.run(shared, first, ["first"], ["yes"], riders_if=WHEN)  # once
    assert trips[-1] == ["FIRST"]
    assert count(shared, "first") == 4


def test_a_rider_does_not_run_when_the_first_script_does_not_allow_it(shared, trips):
    first, rider, heard = (
        shared.register_script(FIRST),
        shared.register_script(RIDER),
        [],
    )
    store.hold()
    store.ride(shared, lambda: (rider, ["ridden"], [5]), heard.append)
    assert store.run(shared, first, ["first"], ["no"], riders_if=WHEN) == [
        b"no",
        b"first",
    ]
    assert trips == [["FIRST+RIDER"]]
    assert heard == [None]  # not run
    assert count(shared, "ridden") == 0
    assert count(shared, "first") == 1


def test_a_rider_that_prepares_nothing_sends_nothing(shared, trips):
    first, heard = shared.register_script(FIRST), []
    store.hold()
    store.ride(shared, lambda: None, heard.append)
    store.run(shared, first, ["first"], ["yes"], riders_if=WHEN)
    assert trips == [["FIRST"]]
    assert heard == []


def test_a_failing_rider_leaves_the_first_scripts_work_and_reply(shared):
    first, rider, heard = (
        shared.register_script(FIRST),
        shared.register_script(RIDER),
        [],
    )
    shared.hset("ridden", "not", "a counter")
    store.hold()
    store.ride(shared, lambda: (rider, ["ridden"], [5]), heard.append)
    reply = store.run(shared, first, ["first"], ["yes"], riders_if=WHEN)
    assert reply == [b"yes", b"first"]
    assert count(shared, "first") == 1
    assert [type(error) for error in heard] == [redis.ResponseError]


def test_a_failed_trip_gives_its_riders_the_error():
    down = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    first, rider, heard = down.register_script(FIRST), down.register_script(RIDER), []
    store.hold()
    store.ride(down, lambda: (rider, ["ridden"], [5]), heard.append)
    with pytest.raises(redis.ConnectionError):
        store.run(down, first, ["first"], ["yes"], riders_if=WHEN)
    assert [type(error) for error in heard] == [redis.ConnectionError]


def test_the_fused_script_is_loaded_again_when_redis_forgot_it(shared, trips):
    first, rider, heard = (
        shared.register_script(FIRST),
        shared.register_script(RIDER),
        [],
    )
    for _ in range(2):
        shared.script_flush()
        store.hold()
        store.ride(shared, lambda: (rider, ["ridden"], [5]), heard.append)
        store.run(shared, first, ["first"], ["yes"], riders_if=WHEN)
    assert heard == [5, 10]
    assert count(shared, "first") == 2


def test_riders_never_go_with_the_request_end_nor_to_the_next_request(shared, trips):
    first, rider, heard = (
        shared.register_script(FIRST),
        shared.register_script(RIDER),
        [],
    )
    store.hold()
    store.ride(shared, lambda: (rider, ["ridden"], [5]), heard.append)
    with store.request_end():
        store.write(shared, first, ["first"], ["yes"])
    store._begin()
    store.hold()
    store.run(shared, first, ["first"], ["yes"], riders_if=WHEN)
    assert trips == [["FIRST"], ["FIRST"]]
    assert heard == []


# -- the app, against a real Redis ------------------------------------------------


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
    assert ["ADMIT+ACQUIRE"] in trips
    assert trips[-1] == ["RELEASE", "FINISH"]  # the request end: one trip
    no_slot_held(app, redis_server)


def zadds(redis_server) -> int:
    """ZADDs run in Redis so far (inside scripts too)."""
    stats = redis_server.admin.info("commandstats")
    return stats.get("cmdstat_zadd", {}).get("calls", 0)


@pytest.fixture
def slots_at_admission(app, redis_server, monkeypatch):
    """The host's leases in Redis, and what the early ask heard, right after
    each quota admission (inside the request)."""
    seen: list[tuple[int, list]] = []
    admit, ask = quotas.RedisQuotas.admit, leases.SharedSlots.ask_along
    heard: list = []

    def admitted(self, *args):
        verdict = admit(self, *args)
        seen.append((slots_leased(app, redis_server), list(heard)))
        heard.clear()
        return verdict

    def asked(self, host, slots, then):
        def hear(lease):
            heard.append(lease)
            then(lease)

        ask(self, host, slots, hear)

    monkeypatch.setattr(quotas.RedisQuotas, "admit", admitted)
    monkeypatch.setattr(leases.SharedSlots, "ask_along", asked)
    return seen


def test_a_request_refused_by_its_quota_never_takes_a_slot(
    app, upstream, trips, redis_server, slots_at_admission
):
    key = create_key(app, "alice", "--rpm", "1")
    upstream.post(CHAT, json=COMPLETION)
    assert chat(app, key).status_code == 200
    [(leased, [lease])] = slots_at_admission  # admitted: taken in its script
    assert leased == 1
    assert lease is not None
    trips.clear()
    slots_at_admission.clear()
    before = zadds(redis_server)
    refused = chat(app, key)
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "rate_limited"
    assert trips == [["ADMIT+ACQUIRE"]]  # one trip: nothing to give back
    assert slots_at_admission == [(0, [None])]  # not taken, inside the request
    assert zadds(redis_server) == before  # neither a lease nor a line entry
    assert redis_server.admin.zcard(_waiting(app)) == 0
    no_slot_held(app, redis_server)


def test_a_request_over_its_concurrency_takes_no_slot_beside_a_stream(
    app, upstream, trips, redis_server, slots_at_admission
):
    key = create_key(app, "alice", "--rpm", "10", "--concurrency", "1")
    upstream.post(CHAT, body=_stream_body(), content_type="text/event-stream")
    stream = app.test_client().post(
        "/v1/chat/completions",
        json={**HELLO, "stream": True},
        headers=bearer(key),
        buffered=False,
    )
    try:
        assert slots_leased(app, redis_server) == 1
        trips.clear()
        slots_at_admission.clear()
        refused = chat(app, key)
        assert refused.status_code == 429
        assert refused.json["error"]["code"] == "concurrency_limit_exceeded"
        assert trips == [["ADMIT+ACQUIRE"]]
        assert slots_at_admission == [(1, [None])]  # the stream's lease only
    finally:
        for _ in stream.response:
            pass
        stream.close()
    no_slot_held(app, redis_server)


def test_the_fused_script_survives_redis_forgetting_its_scripts(
    app, upstream, trips, redis_server, monkeypatch
):
    key = create_key(app, "alice", "--rpm", "10")
    monkeypatch.setattr(leases.RedisSlots, "try_acquire", pytest.fail)
    for _ in range(2):
        redis_server.admin.script_flush()
        upstream.post(CHAT, json=COMPLETION)
        assert chat(app, key).status_code == 200
    assert trips.count(["ADMIT+ACQUIRE"]) == 2
    no_slot_held(app, redis_server)


def _waiting(app) -> str:
    host = app.extensions[upstreams.EXTENSION].hosts[0].slot_key
    return f"{leases.PREFIX}:{host}:waiting"


def _stream_body() -> str:
    chunk = {"model": "qwen-7b", "choices": [{"index": 0, "delta": {"content": "x"}}]}
    return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"


def test_an_invalid_request_gives_the_slot_back_at_its_end(
    app, upstream, trips, redis_server
):
    key = create_key(app, "alice", "--rpm", "10", "--concurrency", "1")
    invalid = chat(app, key, temperature="hot")
    assert invalid.status_code in (400, 422)
    assert ["ADMIT+ACQUIRE"] in trips
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
    assert ["ADMIT+ACQUIRE"] in trips
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
    client = slots.redis.client
    store.hold()
    store.run(client, client.register_script(FIRST), ["x"], ["yes"], riders_if=WHEN)
    assert heard == [None]  # asked, no slot free
    shared = redis_server.admin
    assert shared.zcard(f"{leases.PREFIX}:h:1:waiting") == 0
    assert slots.try_acquire("h:1", 1) is None  # the door's ask joins it
    assert shared.zcard(f"{leases.PREFIX}:h:1:waiting") == 1

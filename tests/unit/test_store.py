"""The shared store's request-end writes: held, sent in one trip, then followed up."""

from __future__ import annotations

import pytest
import redis

from llm_service import store


class Script:
    """A registered Lua script: calling it is one round trip of its own."""

    def __init__(self, client, sha, loaded=True):
        self.client = client
        self.sha = sha
        self.loaded = loaded

    def __call__(self, keys, args):
        self.client.trips.append([(self.sha, tuple(keys), tuple(args))])
        if self.client.down:
            raise redis.ConnectionError("down")
        self.loaded = True
        return 1


class Connection:
    """A pooled connection: what is sent at once is one round trip."""

    def __init__(self, client):
        self.client = client
        self.replies = []

    def pack_commands(self, commands):
        return list(commands)

    def send_packed_command(self, commands):
        self.client.trips.append(
            [(sha, tuple(rest[:n]), tuple(rest[n:])) for _, sha, n, *rest in commands]
        )
        if self.client.down:
            raise redis.ConnectionError("down")
        scripts = {s.sha: s for s in self.client.scripts}
        self.replies = [scripts[sha].loaded for _, sha, *_ in commands]

    def read_response(self):
        if not self.replies.pop(0):
            raise redis.exceptions.NoScriptError("NOSCRIPT")
        return 1

    def disconnect(self):
        self.client.disconnected += 1


class Pool:
    def __init__(self, client):
        self.connection = Connection(client)
        self.released = 0

    def get_connection(self):
        return self.connection

    def release(self, connection):
        assert connection is self.connection
        self.released += 1


class Client:
    """A Redis client that records each round trip's commands."""

    def __init__(self):
        self.trips = []
        self.scripts = []
        self.down = False
        self.disconnected = 0
        self.connection_pool = Pool(self)

    def script(self, sha, loaded=True):
        script = Script(self, sha, loaded)
        self.scripts.append(script)
        return script


@pytest.fixture(autouse=True)
def fresh_thread_state():
    store._begin()
    yield
    store._begin()


def test_a_write_outside_a_request_end_runs_at_once():
    client, heard = Client(), []
    release = client.script("release")
    store.write(client, release, ["k"], [1], heard.append)
    assert client.trips == [[("release", ("k",), (1,))]]
    assert heard == [None]
    client.down = True
    store.write(client, release, ["k"], [1], heard.append)
    assert isinstance(heard[-1], redis.ConnectionError)


def test_the_writes_of_a_request_end_go_in_one_trip_then_their_follow_ups():
    client, heard = Client(), []
    release, settle = client.script("release"), client.script("settle")
    with store.request_end():
        store.write(client, release, ["slots"], ["lease"], lambda e: heard.append(1))
        store.write(client, settle, ["quota"], ["id", 5], lambda e: heard.append(2))
        assert client.trips == []
        assert heard == []
    assert client.trips == [
        [("release", ("slots",), ("lease",)), ("settle", ("quota",), ("id", 5))]
    ]
    assert heard == [1, 2]


def test_deferred_work_waits_for_the_request_end_while_held():
    client, order = Client(), []
    release, settle = client.script("release"), client.script("settle")

    def give_back():
        order.append("released")
        store.write(client, release, ["s"], [], lambda e: order.append("sent"))

    store.defer(give_back)  # not held: now
    assert order == ["released", "sent"]
    order.clear()
    store.hold()
    store.defer(give_back)
    assert order == []
    with store.request_end():
        store.write(client, settle, ["q"], [], lambda e: order.append("settled"))
    assert order == ["released", "sent", "settled"]
    assert len(client.trips[-1]) == 2
    # The request ended: deferring runs at once again.
    store.defer(lambda: order.append("later"))
    assert order[-1] == "later"


def test_a_second_call_runs_the_first_ones_deferred_release_first():
    done = []
    store.hold()
    store.defer(lambda: done.append("first"))
    store.run_deferred()
    assert done == ["first"]
    store.defer(lambda: done.append("second"))
    assert done == ["first"]  # still held


def test_a_request_left_held_gives_its_work_to_the_next_request():
    done = []
    store.hold()
    store.defer(lambda: done.append("released"))
    store._begin()  # the thread's next request
    assert done == ["released"]
    store.defer(lambda: done.append("now"))
    assert done == ["released", "now"]


def test_the_writes_are_sent_even_when_the_block_raises():
    client, heard = Client(), []

    def end_that_fails():
        with store.request_end():
            store.write(client, client.script("r"), [], [], heard.append)
            raise RuntimeError

    with pytest.raises(RuntimeError):
        end_that_fails()
    assert heard == [None]
    assert len(client.trips) == 1


def test_nested_request_ends_send_once():
    client = Client()
    script = client.script("s")
    with store.request_end():
        store.write(client, script, [], [1], lambda e: None)
        with store.request_end():
            store.write(client, script, [], [2], lambda e: None)
        assert client.trips == []
    assert len(client.trips) == 1
    assert len(client.trips[0]) == 2


def test_a_lost_connection_fails_every_write_of_the_trip():
    client, heard = Client(), []
    client.down = True
    with store.request_end():
        store.write(client, client.script("a"), [], [], heard.append)
        store.write(client, client.script("b"), [], [], heard.append)
    assert len(heard) == 2
    assert all(isinstance(error, redis.ConnectionError) for error in heard)
    assert client.disconnected == 1
    assert client.connection_pool.released == 1


def test_a_script_redis_lost_is_loaded_and_run_again():
    client, heard = Client(), []
    known, forgotten = client.script("known"), client.script("forgotten", False)
    with store.request_end():
        store.write(client, known, [], [], heard.append)
        store.write(client, forgotten, [], [], heard.append)
    assert heard == [None, None]
    assert client.trips[1] == [("forgotten", (), ())]  # by the Script: loads it


def test_a_failing_follow_up_does_not_stop_the_others(caplog):
    client, heard = Client(), []

    def broken(_error):
        raise ValueError("bug")

    with store.request_end():
        store.write(client, client.script("a"), [], [], broken)
        store.write(client, client.script("b"), [], [], heard.append)
    assert heard == [None]
    assert "follow-up failed" in caplog.text


def test_one_client_per_app_shared_by_limits_quotas_and_leases():
    from llm_service import create_app, limits, quotas
    from llm_service.upstreams import get_upstream

    app = create_app({"TESTING": True, "RATE_LIMIT_STORAGE_URI": "redis://h:1/0"})
    with app.app_context():
        client = store.redis_for(app)
        pool = client.connection_pool
        assert pool.connection_kwargs["socket_timeout"] == store.TIMEOUT
        assert pool.connection_kwargs["socket_connect_timeout"] == store.TIMEOUT
        assert pool.connection_kwargs["retry"].get_retries() == 0
        assert quotas.quotas().redis.client is client
        assert get_upstream().admission.store.redis.client is client
        limiter = app.extensions[limits.EXTENSION]
        assert limiter._storage.get_connection().connection_pool is pool
    memory = create_app({"TESTING": True})
    assert store.redis_for(memory) is None

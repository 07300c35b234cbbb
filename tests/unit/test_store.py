"""The shared store's request-end writes: held, sent in one trip, then followed up."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from llm_service import store
from tests.databases import RedisServer


class Script:
    """A registered Lua script: its sha, its source."""

    def __init__(self, sha):
        self.sha = sha
        self.script = f"-- {sha}"


class Connection:
    """A connection to the fake server: what is sent at once is one round trip."""

    def __init__(self, client, **options):
        self.client = client
        self.replies = []
        self.open = True

    def pack_commands(self, commands):
        return list(commands)

    def send_packed_command(self, commands, check_health=True):
        self.client.trips.append(
            [
                (rest[0], tuple(rest[2 : 2 + rest[1]]), tuple(rest[2 + rest[1] :]))
                if name == "EVALSHA"
                else (name, *rest)
                for name, *rest in commands
            ]
        )
        if self.client.down:
            self.disconnect()
            raise redis.ConnectionError("down")
        self.replies = [self.client.answer(command) for command in commands]

    def read_response(self):
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def should_reconnect(self):
        return False

    def disconnect(self):
        self.client.disconnected += self.open
        self.open = False


class Pool:
    connection_class = Connection

    def __init__(self, client):
        self.connection_kwargs = {"client": client, "socket_timeout": 0.5}
        self.max_connections = 100


class Client:
    """A Redis client whose server records each round trip's commands."""

    def __init__(self):
        self.trips = []
        self.loaded = set()
        self.down = False
        self.disconnected = 0
        self.connection_pool = Pool(self)

    def script(self, sha, loaded=True):
        if loaded:
            self.loaded.add(sha)
        return Script(sha)

    def answer(self, command):
        if command[:2] == ("SCRIPT", "LOAD"):
            self.loaded.add(command[2].removeprefix("-- "))
            return command[2]
        if command[1] not in self.loaded:
            return redis.exceptions.NoScriptError("NOSCRIPT")
        return 1


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
    assert store.connections(client).made == 0  # dropped


def test_a_script_redis_lost_is_loaded_and_run_again():
    client, heard = Client(), []
    known, forgotten = client.script("known"), client.script("forgotten", False)
    with store.request_end():
        store.write(client, known, [], [], heard.append)
        store.write(client, forgotten, [], [], heard.append)
    assert heard == [None, None]
    # Loaded and run again, in one more trip.
    assert client.trips[1] == [
        ("SCRIPT", "LOAD", "-- forgotten"),
        ("forgotten", (), ()),
    ]
    assert "forgotten" in client.loaded


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


# -- the lean path, against a real Redis ----------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()  # resumed first if a test froze it


@pytest.fixture
def client(redis_server):
    """A client built as the app builds it; its connections closed after."""
    client = store._build(redis_server.url, store.TIMEOUT)
    yield client
    lean = store.connections(client)
    while lean.free:
        lean.drop(lean.free.pop())


ECHO = "return {KEYS[1], ARGV[1]}"


def client_id(client) -> int:
    return store.call(client, "CLIENT", "ID")


def test_the_hot_path_never_polls_a_connection_nor_locks_the_pool(client, monkeypatch):
    """Quota admission, a slot lease and the request-end trip: each is a
    pop and an append of the client's free list, one connection reused."""
    from llm_service.quotas import Caller, RedisQuotas
    from llm_service.upstreams.leases import RedisSlots

    def refused(*args, **kwargs):
        raise AssertionError("redis-py's checkout (a lock, a poll) on the hot path")

    quotas, slots = RedisQuotas(client), RedisSlots(client, 30)
    monkeypatch.setattr(redis.connection.AbstractConnection, "can_read", refused)
    monkeypatch.setattr(redis.ConnectionPool, "get_connection", refused)
    caller = Caller(key_id=1, rpm=1000, tpm=10**6, concurrency=50)
    for n in range(20):
        admission = quotas.admit(caller, 10, f"r{n}", 30_000)
        assert admission.allowed
        lease = slots.try_acquire("h", 50)
        assert lease is not None
        with store.request_end():
            slots.release(lease)
            store.write(client, quotas._finish, *finish_of(caller, n))
    lean = store.connections(client)
    assert lean.made == 1
    assert len(lean.free) == 1


def finish_of(caller, n):
    from llm_service.quotas import _keys

    _, tokens, leases, total = _keys(caller.key_id)
    return [tokens, leases, total], [f"r{n}", 10, 10, "1"]


def test_one_connection_serves_call_after_call(client):
    script = client.register_script(ECHO)
    first = client_id(client)
    assert store.run(client, script, ["k"], [1]) == [b"k", b"1"]
    assert store.call(client, "SET", "x", "y", "EX", 5) == b"OK"
    assert store.call(client, "GET", "x") == b"y"
    assert client_id(client) == first
    assert store.connections(client).made == 1


def test_an_error_reply_keeps_the_connection_anything_else_drops_it(
    client, redis_server
):
    lean = store.connections(client)
    first = client_id(client)
    failing = client.register_script("return redis.error_reply('no')")
    with pytest.raises(redis.ResponseError, match="no"):
        store.run(client, failing, [], [])
    assert client_id(client) == first  # a whole reply: the connection is clean
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client_id(client)
        # One read's timeout, and no second try.
        assert time.monotonic() - began < store.TIMEOUT + 0.4
        assert (lean.made, len(lean.free)) == (0, 0)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    # Its late reply is never read as another's: a new connection.
    assert client_id(client) != first


def test_a_connection_redis_closed_is_replaced_not_used(client, redis_server):
    """What redis-py's checkout poll found, found after the fact: the trip
    goes again on a fresh connection, and the idle ones are dropped."""
    script = client.register_script(ECHO)
    lean = store.connections(client)
    held = [lean.take()[0] for _ in range(3)]
    for connection in held:
        connection.connect()
        lean.give(connection)
    first = client_id(client)
    admin = redis.Redis.from_url(redis_server.url)
    admin.client_kill_filter(_type="normal", skipme=True)
    assert store.run(client, script, ["k"], [1]) == [b"k", b"1"]
    assert client_id(client) != first
    assert lean.made == 1


def test_a_restarted_redis_is_reached_again_at_once(redis_server):
    """Redis restarts (its scripts forgotten): the next call works, on a new
    connection, the script loaded again."""
    server = RedisServer()
    try:
        client = store._build(server.url, store.TIMEOUT)
        script = client.register_script(ECHO)
        assert store.run(client, script, ["k"], [1]) == [b"k", b"1"]
        server.stop()
        server = RedisServer(server.port)
        assert store.run(client, script, ["k"], [2]) == [b"k", b"2"]
        assert store.connections(client).made == 1
    finally:
        server.stop()


def test_a_script_redis_forgot_is_loaded_and_run(client, redis_server):
    script = client.register_script(ECHO)
    assert store.run(client, script, ["k"], [1]) == [b"k", b"1"]
    redis.Redis.from_url(redis_server.url).script_flush()
    assert store.run(client, script, ["k"], [2]) == [b"k", b"2"]
    redis.Redis.from_url(redis_server.url).script_flush()
    with store.request_end():
        heard = []
        store.write(client, script, ["a"], [1], heard.append)
        store.write(client, script, ["b"], [2], heard.append)
    assert heard == [None, None]


def test_connections_are_bounded_and_waited_for(client):
    lean = store.connections(client)
    lean.limit, lean.wait = 2, 0.3
    held = [lean.take()[0] for _ in range(2)]
    began = time.monotonic()
    with pytest.raises(redis.exceptions.MaxConnectionsError):
        lean.take()
    assert time.monotonic() - began >= 0.3
    # One given back while a thread waits: the thread gets it, at once.
    lean.wait = 5
    threading.Timer(0.1, lean.give, [held[0]]).start()
    began = time.monotonic()
    assert lean.take() == (held[0], True)
    assert time.monotonic() - began < 2
    lean.drop(held[1])  # a dropped one makes room for a new one
    assert lean.take()[1] is False
    assert lean.made == 2


def test_a_flood_of_threads_shares_a_bounded_few_connections(client, redis_server):
    lean = store.connections(client)
    lean.limit = 3
    script = client.register_script(ECHO)
    errors, threads = [], []

    def calls(n):
        try:
            for _ in range(20):
                assert store.run(client, script, ["k"], [n]) == [b"k", str(n).encode()]
        except Exception as err:
            errors.append(err)

    for n in range(64):
        threads.append(threading.Thread(target=calls, args=(n,)))
        threads[-1].start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert lean.made <= 3
    admin = redis.Redis.from_url(redis_server.url)
    assert admin.client_list(_type="normal").__len__() <= 3 + 1


def test_a_forked_child_never_uses_its_parents_connections(client):
    """A gunicorn worker forked from a process that used the store makes its
    own connections, and leaves the parent's working."""
    parent = client_id(client)
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            lean = store.connections(client)
            fresh = (lean.made, len(lean.free)) == (0, 0)
            os.write(writing, f"{int(fresh)} {client_id(client)}".encode())
        finally:
            os._exit(0)
    os.close(writing)
    report = os.read(reading, 100).decode().split()
    os.close(reading)
    os.waitpid(child, 0)
    assert report[0] == "1"
    assert int(report[1]) != parent
    assert client_id(client) == parent  # the parent's still works


def test_conversation_affinity_takes_the_lean_path(redis_server, monkeypatch):
    """Affinity's own client (its shorter timeout): shared between processes'
    maps through Redis, no checkout poll, its own map while Redis is frozen."""
    from llm_service.upstreams.affinity import REDIS_TIMEOUT, Affinity

    def refused(*args, **kwargs):
        raise AssertionError("redis-py's checkout (a lock, a poll) on the hot path")

    short = store._build(redis_server.url, REDIS_TIMEOUT)
    one, other = Affinity(60, short), Affinity(60, short)
    monkeypatch.setattr(redis.connection.AbstractConnection, "can_read", refused)
    monkeypatch.setattr(redis.ConnectionPool, "get_connection", refused)
    one.put("conversation", "host-b")
    assert other.get("conversation") == "host-b"
    assert other.get("another") is None
    assert store.connections(short).wait == REDIS_TIMEOUT
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        one.put("later", "host-a")
        assert time.monotonic() - began < REDIS_TIMEOUT + 0.4
        assert not one.shared
        assert one.get("later") == "host-a"  # its own map
    finally:
        redis_server.process.send_signal(signal.SIGCONT)


def test_the_rate_limits_hit_takes_the_lean_path_of_the_shared_pool(
    redis_server, monkeypatch
):
    """The limiter's client shares the store's pool, and so its free list."""
    from llm_service import create_app, limits

    def refused(*args, **kwargs):
        raise AssertionError("redis-py's checkout (a lock, a poll) on the hot path")

    app = create_app({"TESTING": True, "RATE_LIMIT_STORAGE_URI": redis_server.url})
    storage = app.extensions[limits.EXTENSION]._storage
    shared = store.connections(store.redis_for(app))
    assert store.connections(storage.get_connection()) is shared
    monkeypatch.setattr(redis.connection.AbstractConnection, "can_read", refused)
    monkeypatch.setattr(redis.ConnectionPool, "get_connection", refused)
    key = f"lean-{os.getpid()}-{time.monotonic_ns()}"
    assert [storage.incr(key, 60) for _ in range(3)] == [1, 2, 3]
    assert storage.get(key) == 3  # read back from the hit: no trip
    assert shared.made == 1
    while shared.free:
        shared.drop(shared.free.pop())

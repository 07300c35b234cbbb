"""Spreading connections over the workers (llm_service/balance.py): the decision."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
from gunicorn.config import Config

from llm_service import balance
from llm_service.balance import (
    BOUND,
    GROWTH,
    QUANTUM,
    SLACK,
    STALE,
    Balancer,
    Table,
    ahead,
)
from llm_service.server import Worker

NOW = 1000.0


@pytest.mark.parametrize(
    ("conns", "slots", "expected"),
    [
        (5, [(NOW, 5)], False),  # one worker: nobody to defer to
        (SLACK, [(NOW, SLACK), (NOW, 0)], True),
        (SLACK - 1, [(NOW, SLACK - 1), (NOW, 0)], False),  # within the slack
        (9, [(NOW, 9), (NOW, 9), (NOW, 7)], True),  # the least loaded counts
        (9, [(NOW, 9), (NOW - STALE, 0)], False),  # stale: stalled or dead
        (9, [(NOW, 9), (0.0, 0)], False),  # stopping, or not booted yet
        (9, [(NOW, 9), (NOW - STALE + 0.1, 0)], True),  # idle, beats each second
    ],
)
def test_a_worker_is_ahead_of_the_least_loaded_live_sibling(conns, slots, expected):
    assert ahead(conns, 0, slots, NOW) is expected


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sleeper():
    """A child process, standing for a worker that is alive."""
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def pair(sleeper):
    """A worker's balancer (slot 0) with a live idle sibling (slot 1)."""
    table = Table(slots=4)
    clock = Clock()
    me = Balancer(table, table.claim(SimpleNamespace(pid=sleeper.pid)), clock)
    sibling = Balancer(table, table.claim(SimpleNamespace(pid=sleeper.pid)), clock)
    sibling.publish(0)
    return me, sibling, clock


def test_with_no_sibling_a_worker_never_defers():
    table = Table(slots=4)
    me = Balancer(table, table.claim(SimpleNamespace(pid="[booting]")))
    assert not any(me.defer(conns) for conns in range(100))


def test_a_deferral_ends_after_the_bound_and_the_next_wake_accepts_regardless(pair):
    me, sibling, clock = pair
    assert me.defer(SLACK)
    while clock.now < NOW + BOUND - QUANTUM:
        clock.now += QUANTUM
        sibling.publish(0)  # alive, and taking nothing
        assert not me.may_listen(SLACK)
    clock.now = NOW + BOUND + 1e-9
    assert me.may_listen(SLACK)
    assert not me.deferring
    assert me.take_forced() == SLACK
    assert me.take_forced() == 0  # once


def test_the_allowance_grows_while_the_sibling_stays_behind(pair):
    """A stuck sibling slows new connections down for tens of ms at most."""
    me, sibling, clock = pair
    conns = SLACK
    allowances = []
    for _ in range(4):
        assert me.defer(conns)
        clock.now += BOUND + 1e-9
        sibling.publish(0)
        assert me.may_listen(conns)
        allowances.append(me.take_forced())
        conns += allowances[-1]
    assert allowances == [SLACK * GROWTH**n for n in range(4)]
    sibling.publish(conns - 1)  # caught up: the next deferral starts afresh
    assert not me.defer(conns)
    sibling.publish(0)
    assert me.defer(conns)
    clock.now += BOUND + 1e-9
    assert me.may_listen(conns)
    assert me.take_forced() == SLACK


def test_a_forced_accept_lapses_when_nothing_was_waiting(pair):
    me, _, clock = pair
    assert me.defer(SLACK)
    clock.now += BOUND + 1e-9
    assert me.may_listen(SLACK)
    clock.now += BOUND + 1e-9
    assert me.take_forced() == 0
    assert me.defer(SLACK)  # a later connection is asked for again


def test_a_deferral_ends_as_soon_as_the_sibling_caught_up(pair):
    me, sibling, clock = pair
    assert me.defer(SLACK)
    clock.now += QUANTUM
    assert not me.may_listen(SLACK)
    sibling.publish(SLACK - 1)
    assert me.may_listen(SLACK)
    assert me.take_forced() == 0


def test_a_sibling_that_stopped_or_stalled_is_not_waited_for(pair):
    me, sibling, clock = pair
    sibling.leave()  # stopping: listens no more
    assert not me.defer(10)
    sibling.publish(0)
    clock.now += STALE  # no beat since: stopped, GIL-stuck or dead
    assert not me.defer(10)


def test_live_workers_never_share_a_slot_and_exited_ones_free_theirs(sleeper):
    table = Table(slots=3)
    assert table.claim(SimpleNamespace(pid=sleeper.pid)) == 0
    other = subprocess.Popen(["sleep", "30"])
    assert table.claim(SimpleNamespace(pid=other.pid)) == 1
    assert table.claim(SimpleNamespace(pid=other.pid)) == 2
    assert table.claim(SimpleNamespace(pid="[booting]")) is None  # all alive
    other.kill()
    os.waitid(os.P_PID, other.pid, os.WEXITED | os.WNOWAIT)  # a zombie now
    assert table.claim(SimpleNamespace(pid="[booting]")) == 1
    assert table.claim(SimpleNamespace(pid="[booting]")) == 1  # never forked
    other.wait()  # reaped (slot 2's)
    assert table.claim(SimpleNamespace(pid=sleeper.pid)) == 1
    assert table.claim(SimpleNamespace(pid=sleeper.pid)) == 2
    assert len(table.read()) == 3


def test_a_full_table_leaves_a_worker_out(sleeper):
    table = Table(slots=1)
    assert table.claim(SimpleNamespace(pid=sleeper.pid)) == 0
    assert table.claim(SimpleNamespace(pid="[booting]")) is None


# The worker's accept, on a real listening socket -----------------------------


def make_worker(monkeypatch, **settings) -> Worker:
    monkeypatch.setattr(balance, "_table", None)  # a master of its own
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    worker = Worker(1, os.getpid(), [], None, 30, cfg, logging.getLogger("test"))
    worker.alive = True
    worker.poller = selectors.DefaultSelector()
    return worker


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as server:
        clients = [
            socket.create_connection(server.getsockname(), timeout=5) for _ in range(5)
        ]
        yield server
        for client in clients:
            client.close()


def close(worker: Worker) -> None:
    for key in list(worker.poller.get_map().values()):
        if key.fileobj not in worker.sockets:
            key.fileobj.close()
    worker.poller.close()
    worker.tmp.close()


@pytest.mark.parametrize("settings", [{"workers": 1}, {"reuse_port": True}])
def test_one_worker_accepts_everything_at_once(monkeypatch, listener, settings):
    worker = make_worker(monkeypatch, **{"workers": 2, **settings})
    worker.sockets = [listener]
    try:
        assert worker.balancer is None
        worker.set_accept_enabled(True)
        worker.accept(listener)
        assert worker.nr_conns == 5
    finally:
        close(worker)


def test_a_worker_ahead_lets_its_sibling_accept_for_the_bound_at_most(
    monkeypatch, listener, sleeper
):
    worker = make_worker(monkeypatch, workers=2)
    worker.sockets = [listener]
    worker.pid = sleeper.pid  # forked, as far as the table knows
    table = worker.balancer.table
    sibling = table.claim(SimpleNamespace(pid=sleeper.pid))
    try:
        table.write(sibling, time.monotonic(), 0)
        worker.set_accept_enabled(True)
        worker.accept(listener)
        assert worker.nr_conns == SLACK
        assert listener not in {key.fileobj for key in worker.poller.get_map().values()}
        worker.set_accept_enabled(True)  # gthread's loop asks on each turn
        assert not worker._accepting
        assert worker.balancer.timeout(1.0) == QUANTUM
        for accepted in (2 * SLACK, 5):  # SLACK more, then GROWTH x SLACK more
            time.sleep(BOUND)
            table.write(sibling, time.monotonic(), 0)  # alive, but took nothing
            worker.set_accept_enabled(True)
            assert worker._accepting
            worker.accept(listener)
            assert worker.nr_conns == accepted
        assert table.read()[worker.balancer.slot][1] == 5  # published
    finally:
        close(worker)

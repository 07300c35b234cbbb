"""The process's disconnect watcher (llm_service/upstreams/hangups.py)."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from llm_service.upstreams.hangups import DisconnectWatcher

REAL_EPOLL = getattr(select, "epoll", None)

pytestmark = pytest.mark.skipif(
    not hasattr(select, "epoll"), reason="the watcher needs epoll (Linux)"
)


class CountingEpoll:
    """A real epoll that counts what the watcher hands it."""

    def __init__(self) -> None:
        self._epoll = REAL_EPOLL()
        self.registered: list[int] = []
        self.unregistered: list[int] = []

    def register(self, fd: int, events: int) -> None:
        self.registered.append(fd)
        self._epoll.register(fd, events)

    def unregister(self, fd: int) -> None:
        self.unregistered.append(fd)
        self._epoll.unregister(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        return self._epoll.poll(timeout)


@pytest.fixture
def epoll(monkeypatch):
    made: list[CountingEpoll] = []

    def make() -> CountingEpoll:
        made.append(CountingEpoll())
        return made[-1]

    monkeypatch.setattr(select, "epoll", make)
    return made


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def calls_sockets(epoll: list[CountingEpoll], ours: socket.socket) -> list[int]:
    return [fd for fd in epoll[0].registered if fd == ours.fileno()]


def test_a_call_that_ends_at_once_costs_epoll_nothing(epoll, pair):
    ours, _theirs = pair
    watcher = DisconnectWatcher()
    for _ in range(100):
        watcher.watch(ours, lambda: None)()
    time.sleep(watcher.WATCH_AFTER * 5)
    assert calls_sockets(epoll, ours) == []
    assert epoll[0].unregistered == []


def test_a_hang_up_during_a_longer_call_is_noticed(epoll, pair):
    ours, theirs = pair
    watcher = DisconnectWatcher()
    hung_up = threading.Event()
    stop = watcher.watch(ours, hung_up.set)
    time.sleep(watcher.WATCH_AFTER * 5)
    assert calls_sockets(epoll, ours) == [ours.fileno()]
    theirs.close()
    assert hung_up.wait(2)
    stop()  # after the callback: nothing left to undo
    assert epoll[0].unregistered == [ours.fileno()]


def test_a_hang_up_before_the_call_is_watched_is_noticed_once_it_is(epoll, pair):
    ours, theirs = pair
    watcher = DisconnectWatcher()
    hung_up = threading.Event()
    theirs.close()
    started = time.monotonic()
    stop = watcher.watch(ours, hung_up.set)
    assert hung_up.wait(2)
    assert time.monotonic() - started >= watcher.WATCH_AFTER
    stop()


def test_a_call_stopped_before_it_is_watched_is_never_called_back(epoll, pair):
    ours, theirs = pair
    watcher = DisconnectWatcher()
    called = threading.Event()
    stop = watcher.watch(ours, called.set)
    theirs.close()
    stop()
    assert not called.wait(watcher.WATCH_AFTER * 10)
    assert calls_sockets(epoll, ours) == []


def test_an_idle_watcher_wakes_for_a_new_call(epoll, pair):
    ours, theirs = pair
    watcher = DisconnectWatcher()
    watcher.watch(ours, lambda: None)()
    time.sleep(watcher.WATCH_AFTER * 5)  # nothing pending: it sleeps
    hung_up = threading.Event()
    stop = watcher.watch(ours, hung_up.set)
    theirs.close()
    assert hung_up.wait(2)
    stop()


def test_without_a_socket_nothing_is_watched(epoll):
    watcher = DisconnectWatcher()
    watcher.watch(None, lambda: None)()
    assert epoll == []

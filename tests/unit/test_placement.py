"""Placement, affinity, the breaker (pure, fake clock) and the discovery thread."""

import random
import threading
import time

import pytest

from llm_service.upstreams.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from llm_service.upstreams.discovery import Discovery, Host
from llm_service.upstreams.placement import (
    AffinityMap,
    HostState,
    conversation_key,
    most_common_loaded,
    rank,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def host(name, *, models=("m",), loaded=None, **fields):
    return HostState(name=name, models=tuple(models), loaded=loaded, **fields)


def test_a_loaded_model_goes_where_it_is_loaded():
    hosts = [
        host("a", models=("m", "n"), loaded=("n",)),
        host("b", models=("m", "n"), loaded=("m",)),
        host("c", models=("m",), loaded=()),
    ]
    assert rank("m", hosts)[0] == "b"
    # Then the hosts that would load it; never a host that does not list it.
    assert set(rank("m", hosts)) == {"a", "b", "c"}
    assert rank("n", hosts) == ["a", "b"]  # c does not list it


def test_loaded_hosts_least_loaded_first():
    hosts = [
        host("a", loaded=("m",), in_flight=3, slots=4),
        host("b", loaded=("m",), in_flight=1, slots=4),
        host("c", loaded=("m",), in_flight=1, slots=1),
    ]
    assert rank("m", hosts) == ["b", "a", "c"]


def test_an_unloaded_model_goes_to_an_idle_host():
    hosts = [
        host("busy", loaded=(), in_flight=1, slots=8),
        host("idle", loaded=(), in_flight=0, slots=1),
    ]
    for seed in range(20):
        assert rank("m", hosts, rng=random.Random(seed))[0] == "idle"


def test_a_model_no_host_lists_goes_to_the_least_loaded_host():
    hosts = [
        host("a", models=("x",), in_flight=2),
        host("b", models=("y",), in_flight=0),
    ]
    assert rank("alias", hosts) == ["b", "a"]


def test_llama_cpp_serves_what_it_lists():
    # loaded=None: the server cannot tell; what it lists is what it serves.
    hosts = [host("lmstudio", loaded=()), host("llama", loaded=None)]
    assert rank("m", hosts)[0] == "llama"


def test_equal_hosts_share_by_weight():
    hosts = [host("a", weight=3), host("b", weight=1)]
    rng = random.Random(7)
    firsts = [rank("m", hosts, rng=rng)[0] for _ in range(4000)]
    assert 0.70 < firsts.count("a") / len(firsts) < 0.80


def test_down_and_open_hosts_come_last():
    hosts = [
        host("open", available=False),
        host("down", up=False),
        host("ok", in_flight=3),
    ]
    assert rank("m", hosts) == ["ok", "down", "open"]
    # With no other host, a lone open circuit is still tried.
    assert rank("m", [host("open", available=False)]) == ["open"]


def test_affinity_wins_while_the_host_has_a_free_slot():
    hosts = [host("a", in_flight=1, slots=2), host("b", in_flight=0, slots=2)]
    assert rank("m", hosts, affinity="a")[0] == "a"
    full = [host("a", in_flight=2, slots=2), host("b", in_flight=0, slots=2)]
    assert rank("m", full, affinity="a")[0] == "b"
    # Not where the model would have to be loaded while it is loaded elsewhere.
    unloaded = [host("a", loaded=()), host("b", loaded=("m",))]
    assert rank("m", unloaded, affinity="a")[0] == "b"
    down = [host("a", up=False), host("b")]
    assert rank("m", down, affinity="a")[0] == "b"


def test_most_common_loaded_model():
    hosts = [
        host("a", models=("x", "y"), loaded=("x",)),
        host("b", models=("y",), loaded=("y",)),
        host("c", models=("y",), loaded=None),
        host("d", models=("x",), loaded=("x",), up=False),
    ]
    assert most_common_loaded(hosts) == "y"
    assert most_common_loaded([host("a", up=False)]) is None


def test_a_conversation_keeps_its_key_turn_after_turn():
    turn1 = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Long context..."},
    ]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "And then?"},
    ]
    key = conversation_key("m", turn1)
    assert key is not None
    assert conversation_key("m", turn2) == key
    other = [{"role": "user", "content": "Something else"}]
    assert conversation_key("m", other) != key
    assert conversation_key("other-model", turn1) != key
    assert conversation_key("m", [{"role": "system", "content": "x"}]) is None
    assert conversation_key("m", "not a list") is None


def test_affinity_map_expires_and_stays_bounded():
    clock = Clock()
    conversations = AffinityMap(ttl=600, max_size=3, clock=clock)
    conversations.put("k1", "a")
    clock.now += 599
    assert conversations.get("k1") == "a"
    clock.now += 1
    assert conversations.get("k1") is None
    for index in range(5):
        conversations.put(f"k{index}", "b")
    assert len(conversations) == 3
    assert conversations.get("k0") is None
    assert conversations.get("k4") == "b"


def test_breaker_opens_after_consecutive_failures_then_half_opens():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown=30, clock=clock)
    breaker.failed()
    breaker.failed()
    breaker.succeeded()  # not consecutive
    breaker.failed()
    breaker.failed()
    assert breaker.state == CLOSED
    breaker.failed()
    assert breaker.state == OPEN
    assert not breaker.available()
    assert not breaker.allow()
    clock.now += 30
    assert breaker.available()
    assert breaker.allow()  # the one trial
    assert breaker.state == HALF_OPEN
    assert not breaker.allow()  # only one
    breaker.failed()  # the trial failed: open for another cooldown
    assert breaker.state == OPEN
    clock.now += 29
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == CLOSED
    assert breaker.allow()


def test_a_trial_that_never_reports_frees_the_next_one():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    breaker.failed()
    clock.now += 10
    assert breaker.allow()
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


@pytest.mark.parametrize("failures", [1, 5])
def test_breaker_threshold(failures):
    breaker = CircuitBreaker(failures=failures, cooldown=30, clock=Clock())
    for _ in range(failures - 1):
        breaker.failed()
    assert breaker.state == CLOSED
    breaker.failed()
    assert breaker.state == OPEN


class CountingHost:
    """Stands in for a Host: counts its probes."""

    def __init__(self, name):
        self.name = name
        self.probes = 0

    def refresh(self):
        self.probes += 1


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_one_discovery_thread_per_process_probing_every_interval_and_on_kicks():
    hosts = [CountingHost("a"), CountingHost("b")]
    discovery = Discovery(hosts, interval=60)
    # Other tests' threads come and go: count only the ones this test starts.
    before = set(threading.enumerate())
    discovery.ensure_started()
    discovery.ensure_started()
    started = set(threading.enumerate()) - before
    assert [t.name for t in started] == ["upstream-discovery"]
    assert wait_for(lambda: all(h.probes == 1 for h in hosts))  # a first round
    discovery.kick(hosts[1])  # a call to b failed: b at once, not a
    assert wait_for(lambda: hosts[1].probes == 2)
    assert hosts[0].probes == 1
    # After a fork the thread is not there: the child starts its own.
    discovery._pid = -1
    assert not discovery.running
    discovery.ensure_started()
    assert discovery.running
    started = set(threading.enumerate()) - before
    assert len(started) == 2
    discovery.stop()
    assert not discovery.running
    # The "parent's" thread (still here: no real fork) ends on the same stop.
    assert wait_for(lambda: not any(t.is_alive() for t in started))


def test_discovery_can_be_off():
    discovery = Discovery([CountingHost("a")], interval=0)
    discovery.ensure_started()
    assert not discovery.running


def test_a_call_in_flight_is_counted_once_however_often_it_is_released():
    host = Host("a", client=None, breaker=CircuitBreaker(3, 10.0))
    first, second = host.acquire(), host.acquire()
    assert host.in_flight == 2
    threads = [threading.Thread(target=first) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first()
    assert host.in_flight == 1
    second()
    second()
    assert host.in_flight == 0

"""The admission queue alone: slots, deficit round robin, bounds, deadlines."""

from __future__ import annotations

import random
import threading
import time

import pytest

from llm_service.upstreams.admission import (
    DEFAULT_SERVICE_SECONDS,
    Admission,
    Lease,
    LeftQueueError,
    LocalSlots,
    QueueFullError,
    QueueTimeoutError,
    workers_share,
)
from llm_service.upstreams.leases import SharedSlots

HOST = "host:1234"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


def make(clock, slots=1, **options):
    options.setdefault("queue_max", 1000)
    admission = Admission(clock=clock, **options)
    admission.configure(HOST, slots)
    return admission


def serve_all(admission, running, waiting):
    """Release the running tickets one by one; return the callers in served order."""
    order = []
    running = list(running)
    waiting = list(waiting)
    while running:
        running.pop(0).release()
        for ticket in [t for t in waiting if t.admitted]:
            waiting.remove(ticket)
            running.append(ticket)
            order.append(ticket.caller)
    assert not waiting
    return order


def test_takes_free_slots_then_queues(clock):
    admission = make(clock, slots=2)
    first, second, third = (admission.enter(HOST, "a") for _ in range(3))
    assert first.admitted
    assert second.admitted
    assert not third.admitted
    assert third.position == 1
    assert admission.snapshot()[HOST] == {"slots": 2, "in_flight": 2, "queued": 1}
    first.release()
    assert third.admitted
    assert third.wait(0) is True


def test_release_is_idempotent_and_frees_one_slot(clock):
    admission = make(clock, slots=1)
    first = admission.enter(HOST, "a")
    waiting = [admission.enter(HOST, "a") for _ in range(2)]
    first.release()
    first.release()
    assert [t.admitted for t in waiting] == [True, False]


def test_a_flood_delays_a_single_request_by_one_turn(clock):
    admission = make(clock, slots=1)
    running = admission.enter(HOST, "A")
    flood = [admission.enter(HOST, "A") for _ in range(50)]
    single = admission.enter(HOST, "B")
    assert single.position == 2  # one of A's, then B
    order = serve_all(admission, [running], [*flood, single])
    assert order.index("B") == 1


def test_equal_weights_alternate(clock):
    admission = make(clock, slots=1)
    running = admission.enter(HOST, "A")
    waiting = [admission.enter(HOST, c) for c in "AAAA"]
    waiting += [admission.enter(HOST, c) for c in "BBBB"]
    waiting += [admission.enter(HOST, c) for c in "CC"]
    order = serve_all(admission, [running], waiting)
    assert "".join(order) == "ABCABCABAB"


def test_weights_share_the_slots(clock):
    admission = make(clock, slots=1)
    running = admission.enter(HOST, "A")
    waiting = [admission.enter(HOST, "A", weight=2) for _ in range(8)]
    waiting += [admission.enter(HOST, "B", weight=1) for _ in range(4)]
    waiting += [admission.enter(HOST, "C", weight=0.5) for _ in range(2)]
    order = "".join(serve_all(admission, [running], waiting))
    assert order[:7] == "AABAABC"
    assert order.count("A") == 8


@pytest.mark.parametrize("seed", range(12))
def test_positions_are_the_order_of_service(clock, seed):
    rng = random.Random(seed)
    admission = make(clock, slots=1, max_per_key=1000)
    weights = {c: rng.choice([1.0] if seed < 6 else [0.5, 1, 2, 3]) for c in "ABCDE"}
    running = admission.enter(HOST, "X")
    waiting = [
        admission.enter(HOST, c, weights[c])
        for c in (rng.choice("ABCDE") for _ in range(60))
    ]
    for _ in range(rng.randrange(6)):  # a round under way
        running.release()
        running = next(t for t in waiting if t.admitted)
        waiting.remove(running)
    positions = {id(t): t.position for t in waiting}
    served = []
    while waiting:
        running.release()
        running = next(t for t in waiting if t.admitted)
        waiting.remove(running)
        served.append(running)
    assert [positions[id(t)] for t in served] == list(range(1, len(served) + 1))


def test_jain_index_of_equal_callers_is_one(clock):
    admission = make(clock, slots=2)
    running = [admission.enter(HOST, "A") for _ in range(2)]
    waiting = [admission.enter(HOST, c) for c in "ABCD" * 30]
    order = serve_all(admission, running, waiting)
    window = order[:80]  # all four still have requests waiting
    counts = [window.count(c) for c in "ABCD"]
    jain = sum(counts) ** 2 / (len(counts) * sum(x * x for x in counts))
    assert jain >= 0.99, counts


def test_single_caller_waits_at_most_one_service_time_behind_a_flood(clock):
    """A floods 200 at once; B sends one per second; service takes 1 s, 2 slots."""
    admission = make(clock, slots=2)
    service = 1.0
    in_flight = []  # (ends_at, ticket)
    waiting = []
    b_waits = []

    def start(ticket):
        in_flight.append((clock.now + service, ticket))

    for _ in range(200):
        ticket = admission.enter(HOST, "A")
        (start if ticket.admitted else waiting.append)(ticket)
    next_b = clock.now + 0.3
    step = 0.05
    while clock.now < 1000.0 + 60:
        clock.advance(step)
        if clock.now >= next_b:
            next_b += 1.0
            ticket = admission.enter(HOST, "B")
            (start if ticket.admitted else waiting.append)(ticket)
        for ends_at, ticket in list(in_flight):
            if ends_at <= clock.now + 1e-9:
                in_flight.remove((ends_at, ticket))
                ticket.release()
        for ticket in [t for t in waiting if t.admitted]:
            waiting.remove(ticket)
            start(ticket)
            if ticket.caller == "B":
                b_waits.append(ticket.waited)
    assert len(b_waits) >= 50
    b_waits.sort()
    p95 = b_waits[int(0.95 * len(b_waits)) - 1]
    assert p95 <= 1.5 * service + step, b_waits[-5:]


def test_queue_bound(clock):
    admission = make(clock, slots=1, queue_max=3, max_per_key=3)
    admission.enter(HOST, "a")
    for _ in range(3):
        admission.enter(HOST, "a")
    with pytest.raises(QueueFullError) as caught:
        admission.enter(HOST, "b")
    assert caught.value.scope == "queue"
    assert caught.value.retry_after >= 1
    assert admission.snapshot()[HOST]["queued"] == 3


def test_queue_max_zero_refuses_when_busy(clock):
    admission = make(clock, slots=1, queue_max=0)
    assert admission.enter(HOST, "a").admitted
    with pytest.raises(QueueFullError):
        admission.enter(HOST, "a")


def test_per_key_cap_leaves_room_for_others(clock):
    admission = make(clock, slots=1, queue_max=10, max_per_key=2)
    admission.enter(HOST, "a")
    admission.enter(HOST, "a")
    admission.enter(HOST, "a")
    with pytest.raises(QueueFullError) as caught:
        admission.enter(HOST, "a")
    assert caught.value.scope == "key"
    assert not admission.enter(HOST, "b").admitted  # queued, not refused


def test_per_key_cap_defaults_to_a_quarter():
    assert Admission(queue_max=1000).max_per_key == 250
    assert Admission(queue_max=2).max_per_key == 1


def test_deadline(clock):
    admission = make(clock, slots=1, queue_timeout=60)
    running = admission.enter(HOST, "a")
    late = admission.enter(HOST, "a")
    clock.advance(59.9)
    assert late.wait(0) is False
    clock.advance(0.1)
    with pytest.raises(QueueTimeoutError) as caught:
        late.wait(0)
    assert caught.value.retry_after >= 1
    assert admission.snapshot()[HOST]["queued"] == 0
    running.release()
    assert not late.admitted  # its place was given up, not its slot taken


def test_wait_returns_when_admitted_by_another_thread():
    admission = Admission()
    admission.configure(HOST, 1)
    running = admission.enter(HOST, "a")
    waiting = admission.enter(HOST, "a")
    threading.Timer(0.05, running.release).start()
    started = time.monotonic()
    assert waiting.wait(5) is True
    assert time.monotonic() - started < 2


def test_cancel_leaves_the_queue_at_once(clock):
    admission = make(clock, slots=1)
    running = admission.enter(HOST, "a")
    gone = admission.enter(HOST, "b")
    after = admission.enter(HOST, "c")
    gone.cancel()
    assert admission.snapshot()[HOST]["queued"] == 1
    with pytest.raises(LeftQueueError):
        gone.wait(0)
    running.release()
    assert after.admitted
    assert not gone.admitted


def test_cancel_just_after_admission_gives_the_slot_back(clock):
    admission = make(clock, slots=1)
    running = admission.enter(HOST, "a")
    raced = admission.enter(HOST, "b")
    next_one = admission.enter(HOST, "c")
    running.release()
    assert raced.admitted
    raced.cancel()  # the client left as the slot came
    with pytest.raises(LeftQueueError):
        raced.wait(0)
    assert next_one.admitted


def test_cancel_wakes_a_waiting_thread():
    admission = Admission()
    admission.configure(HOST, 1)
    admission.enter(HOST, "a")
    waiting = admission.enter(HOST, "a")
    threading.Timer(0.05, waiting.cancel).start()
    started = time.monotonic()
    with pytest.raises(LeftQueueError):
        waiting.wait()
    assert time.monotonic() - started < 2


def test_retry_after_follows_the_service_rate(clock):
    admission = make(clock, slots=2, queue_max=20, max_per_key=20)
    assert admission.retry_after(HOST, 4) == 4 * DEFAULT_SERVICE_SECONDS / 2
    tickets = [admission.enter(HOST, "a") for _ in range(12)]
    for _ in range(5):  # each request takes 3 s
        clock.advance(3)
        for ticket in [t for t in tickets if t.admitted]:
            ticket.release()
            tickets.remove(ticket)
    assert admission.retry_after(HOST, 10) == 15  # 10 ahead x 3 s / 2 slots
    assert admission.retry_after(HOST, 10_000) == 600  # capped
    assert admission.retry_after(HOST, 0) == 1


def test_slots_configured_beat_discovered_beat_default():
    admission = Admission(default_slots=4)
    assert admission.slots(HOST) == 4
    admission.discovered(HOST, 8)
    assert admission.slots(HOST) == 8
    admission.configure(HOST, 2)
    assert admission.slots(HOST) == 2
    admission.configure(HOST, None)
    assert admission.slots(HOST) == 8


def test_discovering_more_slots_admits_waiting_requests(clock):
    admission = make(clock, slots=1)
    admission.configure(HOST, None)
    admission.discovered(HOST, 1)
    admission.enter(HOST, "a")
    waiting = admission.enter(HOST, "a")
    admission.discovered(HOST, 2)
    assert waiting.admitted


@pytest.mark.parametrize(
    ("slots", "workers", "share"), [(4, 1, 4), (4, 2, 2), (5, 2, 2), (1, 2, 1)]
)
def test_each_worker_takes_its_share_without_a_shared_store(slots, workers, share):
    local = LocalSlots(workers_share(lambda: workers))
    leases = [local.try_acquire(HOST, slots) for _ in range(slots + 1)]
    assert sum(lease is not None for lease in leases) == share


def test_in_flight_never_exceeds_the_slots_under_threads():
    admission = Admission(queue_max=1000, max_per_key=1000)
    admission.configure(HOST, 3)
    lock = threading.Lock()
    current = peak = 0

    def request(caller):
        nonlocal current, peak
        ticket = admission.enter(HOST, caller)
        assert ticket.wait(10)
        with lock:
            current += 1
            peak = max(peak, current)
        time.sleep(0.001)
        with lock:
            current -= 1
        ticket.release()

    threads = [
        threading.Thread(target=request, args=(f"c{i % 7}",)) for i in range(120)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert peak == 3
    assert admission.snapshot()[HOST] == {"slots": 3, "in_flight": 0, "queued": 0}


class FlakyRedis:
    """A RedisSlots stand-in that fails while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.used = 0
        self.released = []

    def try_acquire(self, host, slots):
        if self.down:
            raise ConnectionError("down")
        if self.used >= slots:
            return None
        self.used += 1
        return Lease(host, shared=True)

    def release(self, lease, done):
        if self.down:
            done(ConnectionError("down"))
            return
        self.used -= 1
        self.released.append(lease)
        done(None)


def test_shared_slots_fall_back_to_the_local_share_and_come_back(clock):
    redis = FlakyRedis()
    local = LocalSlots(workers_share(lambda: 2))
    store = SharedSlots(redis, local, renew_seconds=10, clock=clock)
    first = store.try_acquire(HOST, 4)
    assert first.shared
    assert store.state == "redis"
    redis.down = True
    fallback = [store.try_acquire(HOST, 4) for _ in range(3)]
    assert store.state == "local-fallback"
    # This worker's share of 4 slots between 2 workers: 2.
    assert [lease is not None and not lease.shared for lease in fallback] == [
        True,
        True,
        False,
    ]
    store.release(fallback[0])
    assert local.in_use(HOST) == 1
    clock.advance(1.0)  # the first back-off
    redis.down = False
    again = store.try_acquire(HOST, 4)
    assert again.shared
    assert store.state == "redis"
    store.release(first)
    assert redis.released == [first]

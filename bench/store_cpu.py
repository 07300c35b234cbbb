"""CPU per shared-store call, redis-py's path against the lean one.

``python -m bench.store_cpu [--calls N] [--rounds R] [--threads T ...]``

Starts a private redis-server on loopback and times, in this process, the
calls a keyed request makes (``thread_time``/``process_time``: this process's
CPU, never Redis'):

- ``script``: the quota admission's shape, a registered Lua script with four
  keys and eight arguments: ``Script.__call__`` (redis-py: its pool's checkout
  with its lock and ``can_read`` poll, its command layers) against
  :func:`llm_service.store.run`;
- ``get``: conversation affinity's ``GET``: ``Redis.get`` against
  :func:`llm_service.store.call`;
- ``end``: the request-end trip, two scripts in one send: the checkout,
  ``send_packed_command``, reads and release the old ``store._execute`` did on
  redis-py's pool against the lean free list.

With ``--threads`` above 1 that many threads call at once (process CPU per
call; the GIL handed over at every poll shows here). Prints the median of
``--rounds`` rounds in microseconds of CPU per call, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable

import redis

from llm_service import store
from tests.databases import RedisServer

KEYS = ["llm_service:quota:1:requests", "q:tokens", "q:leases", "q:total"]
ARGS = [100000, 10**8, 10, 16, "request-id", 300000, 60000, 1000]
SCRIPT = "return {KEYS[1], ARGV[1], #ARGV}"


def redis_py_end(client: redis.Redis, script) -> None:
    """The old request-end trip: redis-py's pool checkout, send, read, release."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command(
            connection.pack_commands(
                [
                    ("EVALSHA", script.sha, len(KEYS), *KEYS, *ARGS),
                    ("EVALSHA", script.sha, len(KEYS), *KEYS, *ARGS),
                ]
            )
        )
        connection.read_response()
        connection.read_response()
    except Exception:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def lean_end(client: redis.Redis, script) -> None:
    store._execute(
        [(client, script, KEYS, ARGS, None), (client, script, KEYS, ARGS, None)]
    )


def cases(client: redis.Redis) -> dict[str, tuple[Callable, Callable]]:
    script = client.register_script(SCRIPT)
    client.set("affinity", "host")
    return {
        "script": (
            lambda: script(keys=KEYS, args=ARGS),
            lambda: store.run(client, script, KEYS, ARGS),
        ),
        "get": (
            lambda: client.get("affinity"),
            lambda: store.call(client, "GET", "affinity"),
        ),
        "end": (
            lambda: redis_py_end(client, script),
            lambda: lean_end(client, script),
        ),
    }


def cpu_per_call(call: Callable[[], object], calls: int, threads: int) -> float:
    """Microseconds of this process's CPU per call, ``threads`` calling at once."""
    each = calls // threads
    if threads == 1:
        began = time.process_time()
        for _ in range(each):
            call()
        return (time.process_time() - began) * 1e6 / each
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(each):
            call()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    began = time.process_time()
    start.wait()
    for worker in workers:
        worker.join()
    return (time.process_time() - began) * 1e6 / (each * threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    server = RedisServer()
    rows = []
    try:
        client = store._build(server.url, store.TIMEOUT)
        for name, (old, new) in cases(client).items():
            for threads in args.threads:
                for call in (old, new):  # connections made, scripts loaded
                    cpu_per_call(call, 200, threads)
                before, after = [], []
                for _ in range(args.rounds):  # alternated: noise hits both
                    before.append(cpu_per_call(old, args.calls, threads))
                    after.append(cpu_per_call(new, args.calls, threads))
                rows.append(
                    (name, threads, statistics.median(before), statistics.median(after))
                )
    finally:
        server.stop()
    print(f"{'call':6s} {'threads':>7s} {'redis-py':>9s} {'lean':>6s} {'ratio':>6s}")
    for name, threads, before, after in rows:
        print(
            f"{name:8s} {threads:7d} {before:9.1f} {after:6.1f} {after / before:6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Round trips to Redis per keyed request: ``python -m bench.store_trips [DIR ...]``.

Starts, for each gateway checkout ``DIR`` (default: this one), the gateway as
deployed (a key with RPM, TPM and concurrency quotas in Redis, slot leases in
Redis, one worker) in front of the fake LM Studio, with its Redis behind a
relay that counts round trips (a client's send after Redis last answered:
commands pipelined together are one trip) and connections. Sends requests one
at a time, non-streamed then streamed, and prints the round trips per request
(medians of ``--rounds``) and the connections each gateway opened.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

from bench import contenders
from bench.procs import Processes
from tests.databases import RedisServer, RoundTrips
from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import ROOT


def body(stream: bool) -> bytes:
    return json.dumps(
        {
            "model": "fake-model-1",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 16,
            "stream": stream,
        }
    ).encode()


def send(service: contenders.Service, stream: bool, count: int) -> None:
    for _ in range(count):
        request = urllib.request.Request(
            f"http://127.0.0.1:{service.port}/v1/chat/completions",
            data=body(stream),
            headers={**service.headers, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", type=Path, default=[ROOT])
    parser.add_argument("--requests", type=int, default=50, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="store-trips-"))
    redis_server = RedisServer()
    rows = []
    try:
        with FakeLMStudio() as fake, Processes(work) as procs:
            for n, gateway_dir in enumerate(args.dirs):
                relay = RoundTrips(redis_server.port)
                service = contenders.start_gateway(
                    procs,
                    f"gateway-{n}",
                    fake.url,
                    gateway_dir=gateway_dir,
                    log_level="INFO",
                    redis_url=relay.url,
                    keyed=True,
                    slots=8,
                )
                per_request = {}
                for stream in (False, True):
                    send(service, stream, 5)  # connections made, scripts loaded
                    trips = []
                    for _ in range(args.rounds):
                        before, _ = relay.count()
                        send(service, stream, args.requests)
                        after, _ = relay.count()
                        trips.append((after - before) / args.requests)
                    per_request[stream] = statistics.median(trips)
                _, connections = relay.count()
                rows.append((gateway_dir, per_request, connections))
                relay.stop()
    finally:
        redis_server.stop()
    print(f"{'gateway':50s} {'trips/request':>14s} {'streamed':>9s} {'conns':>6s}")
    for gateway_dir, per_request, connections in rows:
        print(
            f"{gateway_dir!s:50s} {per_request[False]:14.2f} "
            f"{per_request[True]:9.2f} {connections:6d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
